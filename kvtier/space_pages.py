"""Pages mapped twice -- by two spaces, or at two pages of one -- one physical copy of KV read by both, until one
of them writes.

``TieredCache``'s copy (transformers' prompt-reuse recipe, ``copy.deepcopy(prompt_cache)`` for each question)
must show the same tokens at its own addresses: each layer is one strided view of a space, so a fork of block
ids (``KVSpace.fork``) cannot serve it. Instead the copy's space maps, at the same page positions, the very
physical handles the original maps (``share_pages``): no byte is copied for a page that no one will write. A row
that takes another row's past (a beam reorder) maps that row's whole pages at its own the same way
(``alias_pages``).

Contract, for the spaces on both sides (their page tables mark the pages ``shared``):

- a shared page is never written, handed out to another sequence (``allocatable``), demoted, dropped or reused
  as an empty page: it holds exactly the bytes both sides had when it was shared;
- a side that is about to write a token on a shared page calls ``unshare`` first: that side gets handles of its
  own holding the same bytes (the other keeps the old ones), so neither sees the other's writes;
- a shared page whose blocks are all freed on one side is unmapped there at once (once the kernels queued on the
  free's stream are done), and the pool takes its handles back only with their last mapping (``PagePool.share``).

The flag may outlive the other side's mapping; ``unshare`` then copies nothing and only clears it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Hashable, Iterable, Sequence

import numpy as np
import torch

from kvtier.errors import InvalidArgumentError, PagesInFlight
from kvtier.tiering import Tier

if TYPE_CHECKING:
    from kvtier.space import KVSpace


class SpacePages:
    """Sharing pages with another space of the same manager, for one :class:`KVSpace`, which owns this object and
    calls it under the manager's lock (see the module docstring). ``adopted``: pages mapped by ``share_pages``
    whose blocks no sequence of this space holds yet (only ``allocate(..., first_block=...)`` books them)."""

    def __init__(self, space: "KVSpace") -> None:
        self.space = space
        self.adopted: set[int] = set()

    def whole_pages(self, seq_tokens: dict[Hashable, int]) -> list[int]:
        """GPU pages (not in flight, every region mapped) that hold nothing but whole blocks below the given
        token counts of the given sequences: pages no append to those sequences writes."""
        sp = self.space
        b = sp.block_books
        full = np.zeros(sp.num_blocks, dtype=bool)
        for seq, tokens in seq_tokens.items():
            held = b.blocks_of(seq)
            full[np.asarray(held[:min(tokens, b.tokens[seq]) // sp.block_size], dtype=np.int64)] = True
        if not full.any():
            return []
        covered = np.zeros(sp.num_pages, dtype=bool)
        covered[b.pages_of(np.flatnonzero(full))] = True
        others = np.flatnonzero(~full)
        if others.size:
            covered[b.pages_of(others)] = False  # a page with any other block on it (free or not) is written later
        covered &= (sp.pages.tier == Tier.GPU) & ~sp.pages.moving_mask()  # shared already: may be shared again
        if sp.range.partial:
            covered[list(sp.range.partial)] = False
        return np.flatnonzero(covered).tolist()

    def share_pages(self, source: "KVSpace", pages: Sequence[int]) -> None:
        """Map this space's vacant ``pages`` with the handles ``source`` maps at the same pages (see
        ``KVSpace.share_pages``)."""
        sp = self.space
        pages = sorted(set(pages))
        if source is sp or source._room is not sp._room:
            raise InvalidArgumentError("share_pages: the source must be another space of the same manager")
        if source.layout_tag != sp.layout_tag or \
                (pages and not 0 <= pages[0] <= pages[-1] < min(sp.num_pages, source.num_pages)):
            raise InvalidArgumentError(f"share_pages: spaces {source.name!r} and {sp.name!r} differ in layout (layers, "
                                       "heads, head dim, dtype, block or page size) or those pages lie outside one; "
                                       "only a space of the same layout can share pages")
        if not pages:
            return
        if sp.arrival is not None and set(pages) & set(sp.arrival.pages):  # the demoter maps them ahead just now:
            raise PagesInFlight(f"space {sp.name!r}: pages being mapped ahead", [sp.arrival])  # empties once landed
        empty = [p for p in pages if p in sp._empty]  # mapped, no live block: its own memory goes back first
        if not (sp.pages.vacant()[pages] | np.isin(pages, empty)).all():
            raise InvalidArgumentError(f"share_pages: pages of {sp.name!r} to share hold data already")
        if (source.pages.tier[pages] != Tier.GPU).any() or source.pages.moving_mask()[pages].any() or \
                set(pages) & source.range.partial:
            raise InvalidArgumentError(f"share_pages: pages of {source.name!r} must be on the GPU, whole and "
                                       "not in flight")
        if empty:
            sp.reclaim(empty)
        handles = [h for p in pages for h in source.range.handles[p]]
        pool = sp._room.pool
        pool.share(handles)
        try:
            sp.range.map(pages, handles)
        except BaseException:
            pool.give(handles)  # one mapping fewer again: the source keeps them
            raise
        sp.pages.aliased(pages)
        source.pages.share(pages)
        self.adopted.update(pages)

    def alias(self, pairs: Sequence[tuple[int, int]]) -> int:
        """Map each ``dst`` of ``pairs`` ``(src, dst)`` -- pages of this space on the GPU, whole, not in flight --
        with the handles ``src`` maps now (all read before any changes: rows may swap); ``dst``'s old handles go
        back (freed with their last mapping). Both become shared. Waits for the device first (kernels may still
        read ``dst``). Return how many pages were mapped anew (a pair already mapping the same handles is left)."""
        sp = self.space
        table, held = sp.pages, sp.range.handles
        pages = sorted({p for pair in pairs for p in pair})
        if pages and not (0 <= pages[0] and pages[-1] < sp.num_pages):
            raise InvalidArgumentError(f"alias: pages must lie in 0..{sp.num_pages - 1}, got {pages[0]}..{pages[-1]}")
        if (table.tier[pages] != Tier.GPU).any() or table.moving_mask()[pages].any() or set(pages) & sp.range.partial:
            raise InvalidArgumentError(f"alias: pages of {sp.name!r} must be on the GPU, whole and not in flight")
        todo = {d: s for s, d in pairs if any(a is not b for a, b in zip(held[s], held[d]))}
        if len({d for _, d in pairs}) != len(pairs):
            raise InvalidArgumentError("alias: a page is mapped anew at most once")
        if not todo:
            return 0
        dsts = sorted(todo)
        fresh = [h for d in dsts for h in held[todo[d]]]
        pool = sp._room.pool
        pool.share(fresh)
        sp._backend.synchronize()
        old = sp.range.unmap(dsts)
        try:
            sp.range.map(dsts, fresh)
        except BaseException:
            sp.range.map(dsts, old)  # the same handles at the same place again: the pages are as they were
            pool.give(fresh)
            raise
        sp._room.give_pages(old)  # one mapping fewer each: freed with their last
        sp._tiering.drop_copies(sp, dsts)  # their bytes changed: a copy kept below is stale
        table.share(dsts + [todo[d] for d in dsts])
        return len(dsts)

    def booked(self, pages: Iterable[int]) -> None:
        """Blocks on ``pages`` were booked: adopted ones with no free block left are the space's own from now."""
        if not self.adopted:
            return
        b = self.space.block_books
        for p in set(pages) & self.adopted:
            first, last = p * b.page_size // b.block_bytes, ((p + 1) * b.page_size - 1) // b.block_bytes
            if not b.free[first:min(last, b.num_blocks - 1) + 1].any():
                self.adopted.discard(p)

    def emptied(self, pages: Sequence[int], fence: Any) -> list[int]:
        """Of ``pages`` left with no live block, the shared ones are unmapped now, after ``fence`` (never kept as
        empty pages: someone would write them); return the rest."""
        sp = self.space
        shared = [p for p in pages if p in sp.pages.shared]
        if not shared:
            return list(pages)
        if fence is not None:
            fence.synchronize()
        sp.unmap_pages(shared)
        return [p for p in pages if p not in set(shared)]

    def settle(self) -> None:
        """Clear the flag of shared pages whose other mappings are gone (they may be moved and handed out again)."""
        sp = self.space
        pool = sp._room.pool
        sp.pages.unshared([p for p in sp.pages.shared if not any(pool.is_shared(h) for h in sp.range.handles[p])])

    def unshare(self, pages: Iterable[int] | None) -> int:
        """Give the shared ``pages`` (default: all) handles of their own holding the same bytes; return how many
        were copied. Waits for the device first (kernels may still read or write the old mapping); the copies
        back are queued on the current stream, before whatever the caller writes there next."""
        sp = self.space
        table, pool = sp.pages, sp._room.pool
        pages = sorted(table.shared if pages is None else set(pages) & table.shared)
        alone = [p for p in pages if not any(pool.is_shared(h) for h in sp.range.handles[p])]
        table.unshared(alone)  # the other side has let go: nothing to copy
        todo = [p for p in pages if p not in alone]
        if not todo:
            return 0
        R, P = sp.num_regions, sp.page_size
        room = sp._room.plan_room(sp, len(todo) * R, keep=set(todo))
        fresh = sp._room.take_room(room)
        try:
            sp._backend.synchronize()
            saved = torch.empty(len(todo) * R * P, dtype=torch.uint8, device=sp.range.whole.device)
            for i, p in enumerate(todo):
                for r in range(R):
                    saved[(i * R + r) * P:(i * R + r + 1) * P].copy_(sp.range.region_view(r, p))
            sp._backend.synchronize()
        except BaseException:
            sp._room.give_pages(fresh)
            raise
        old = sp.range.unmap(todo)
        try:
            sp.range.map(todo, fresh)
        except BaseException:
            sp.range.map(todo, old)  # the same handles at the same place again: the page is as it was
            sp._room.give_pages(fresh)
            raise
        sp._room.give_pages(old)  # one mapping fewer: the other side keeps them
        for i, p in enumerate(todo):
            for r in range(R):
                sp.range.region_view(r, p).copy_(saved[(i * R + r) * P:(i * R + r + 1) * P])
        table.unshared(todo)
        return len(todo)
