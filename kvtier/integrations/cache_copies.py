"""Copies of a :class:`TieredCache`, and rows that take another row's past, by pages shared rather than bytes copied.

A layer of a TieredCache is one space whose rows are fixed runs of blocks (each row starts on a page boundary), so
a copy of the cache (``copy.deepcopy``: transformers' prompt-reuse recipe) can map the original's whole pages into
its own spaces (``KVSpace.share_pages``), and a row that takes another's past (a beam reorder) can map that row's
whole pages at its own (``KVSpace.alias_pages``). A page holding a token either side may still write -- each row's
last page, a crop's -- is copied; a write into a shared page's tokens (a crop back into them) first gives the
writer pages of its own (``unshare``; ``_shared_upto`` says below which token a layer may share pages).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from kvtier.integrations.transformers import TieredCache


class CacheCopies:
    """Copies and row remaps by shared pages, for one :class:`TieredCache`, which owns this object and calls it
    (see the module docstring)."""

    def __init__(self, cache: "TieredCache") -> None:
        self.cache = cache

    def deep_copy(self, memo: dict[int, Any]) -> "TieredCache":
        """A cache holding the same KV, on the same manager. A resident layer's pages of whole blocks are shared,
        not copied: both caches map the same GPU memory until one of them rewrites a token there (a crop below the
        copy's length, a beam reorder), which first gives that cache pages of its own. The rest -- each row's last
        page, streamed and sliding layers -- is copied once, from whichever tier it is in; a streamed layer goes
        down again before the next is copied (the room a prefill takes). The original is left as it was."""
        c = self.cache
        c._copies += 1
        twin = type(c)(manager=c.manager, name=f"{c.name}.copy{c._copies}", **c._args)
        twin._own_manager, twin._users = c._own_manager, c._users
        c._users[0] += 1
        memo[id(c)] = twin
        if not c.spaces:
            return twin
        twin.num_kv_heads, twin.head_dim = c.num_kv_heads, c.head_dim
        twin.rows, twin.capacity, twin._generation = c.rows, c.capacity, 1
        twin.blocks_per_row, twin.max_tokens = c.blocks_per_row, c.max_tokens  # as set up (page-aligned rows)
        twin.spaces = [twin._new_space(f"{twin.name}.L{i}", space.dtype) for i, space in enumerate(c.spaces)]
        twin._streamed = list(c._streamed)
        twin._settled = {i: [0] * c.rows for i in c._streamed}  # each settled as it is copied
        twin._dropped = [list(d) for d in c._dropped]
        twin._allocated, twin._high = list(c._allocated), list(c._high)
        for i, (layer, mine, theirs) in enumerate(zip(c.layers, c.spaces, twin.spaces)):
            twin.layers[i].length = layer.length
            if not layer.length:
                continue
            if layer.is_initialized:
                like = torch.empty(0, dtype=mine.dtype, device=layer.device)
                twin.layers[i].lazy_initialization(like, like)
            shared = self.share_layer(i, theirs)
            for row in c._rows():
                theirs.allocate(row, c._allocated[i], first_block=row * c.blocks_per_row)
            if shared:
                c._shared_upto[i] = twin._shared_upto[i] = layer.length
            self.copy_layer(i, theirs.kv(0), set(shared))
            if i in twin._settled:  # streamed: down again before the next layer is copied (the room a prefill
                twin._settle(i, None, wait=True)  # takes, not the whole cache's)
        return twin

    def share_layer(self, i: int, theirs: Any) -> list[int]:
        """Map into the copy's space ``theirs`` the pages of layer ``i`` that hold only whole blocks of its rows,
        where the layer is resident and on the GPU; return them."""
        c = self.cache
        layer = c.layers[i]
        if i in c._settled or layer.window is not None or i in c._shared:
            return []  # streamed, sliding (its pages are dropped as it goes), read by later layers
        if i in c._down and not c._idle:  # sent down by the prompt's prefill: back now, as the next step would
            c._materialize(i)             # bring it (an idle cache's stay where they are)
        pending = c._pending.pop(i, None)
        if pending is not None:
            pending.result()
        return theirs.share_whole_pages(c.spaces[i], {row: layer.length for row in c._rows()})

    def unshare(self, i: int, start: int = 0) -> None:
        """Layer ``i`` is about to rewrite its tokens from ``start`` on, which a copy of the cache (or another row)
        may read: the pages holding them get memory of their own first (those wholly before ``start`` stay shared:
        a prompt cache's copy cropped to the prefix a new prompt shares keeps that prefix's pages shared)."""
        c = self.cache
        space = c.spaces[i]
        first = start // c.block_size
        blocks = np.asarray([row * c.blocks_per_row + k for row in c._rows()
                             for k in range(first, c.blocks_per_row)], dtype=np.int64)
        space.unshare(space.block_books.pages_of(blocks) if first else None)
        c._shared_upto[i] = start

    def copy_layer(self, i: int, dst: tuple[torch.Tensor, torch.Tensor], shared: set[int]) -> None:
        """Layer ``i``'s kept tokens into ``dst`` (tensors shaped like its space's), from any tier -- but those on
        ``shared`` pages, which ``dst`` maps already."""
        c = self.cache
        space, length, kept = c.spaces[i], c.layers[i].length, max(c._dropped[i])
        pending = c._pending.pop(i, None)
        if pending is not None:
            pending.result()
        read = c._reads.get(i)
        for handle in read[1] if read is not None else []:
            handle.result()  # a read ahead holds the pages where they are until it lands
        handles = [space.read(row, [dst], start=a, stop=b) for row in c._rows()
                   for a, b in self.unshared_runs(space, row, max(kept, c._dropped[i][row]), length, shared)]
        for handle in handles:
            handle.result()

    def unshared_runs(self, space: Any, row: int, start: int, stop: int, shared: set[int]) -> list[tuple[int, int]]:
        """The runs of tokens ``start..stop`` of ``row`` whose blocks do not lie wholly on ``shared`` pages."""
        if not shared:
            return [(start, stop)] if stop > start else []
        bs, books = self.cache.block_size, space.block_books
        k = np.arange(start // bs, -(-stop // bs))
        blocks = row * self.cache.blocks_per_row + k
        on = np.zeros(space.num_pages, dtype=bool)
        on[list(shared)] = True
        # a block lies on its first and last page and those between (a block wider than a page): all shared
        if books.wide:
            skip = np.fromiter((on[books.first_page[b]:books.last_page[b] + 1].all() for b in blocks), dtype=bool,
                               count=len(blocks))
        else:
            skip = on[books.first_page[blocks]] & on[books.last_page[blocks]]
        runs: list[tuple[int, int]] = []
        for j in np.flatnonzero(~skip).tolist():
            a, b = max(start, int(k[j]) * bs), min(stop, (int(k[j]) + 1) * bs)
            if runs and runs[-1][1] == a:
                runs[-1] = (runs[-1][0], b)
            else:
                runs.append((a, b))
        return runs

    def whole_pages_below(self, i: int) -> tuple[int, int]:
        """For a row reorder of layer ``i``: the tokens a row whose pages are wholly below its length (0 where
        rows do not start on page boundaries, or the layer is streamed, sliding or read by later layers), and the
        pages a row spans."""
        c = self.cache
        space, page = c.spaces[i], c._manager.page_size
        token_bytes, row_bytes = space.block_bytes // c.block_size, c.blocks_per_row * space.block_bytes
        if i in c._settled or i in c._shared or c.layers[i].window is not None or row_bytes % page \
                or page % token_bytes:
            return 0, 0
        return c.layers[i].length * token_bytes // page * (page // token_bytes), row_bytes // page
