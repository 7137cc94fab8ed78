"""A KV space: one model's paged KV cache over a reserved virtual range, with pages mapped on demand.

Layout. The range holds ``2 * num_layers`` regions, one per (layer, K|V), each ``[num_blocks, block_size,
num_kv_heads, head_dim]`` -- the shape paged-attention kernels take. A *page* ``p`` of the space is the same
``page_size`` slice of every region, so mapping page ``p`` maps ``2 * num_layers`` physical handles and makes
blocks ``p * page_size // block_bytes ...`` usable in every layer at once. Per-layer regions keep a layer's blocks
dense (kvcached's cross-layer layout cost 31% decode throughput).

Composition. A space is three sets of books, each with its own state: ``block_books`` (:class:`BlockBooks`: free
blocks, sequences, live blocks per page), ``range`` (:class:`kvtier.vmm.MappedRange`: the reservation, what is
mapped, the tensors over it) and ``pages`` (:class:`kvtier.tiering.PageTable`: where each page's data is).
Placement (``kvtier.placement``) plans against them; the space commits.

Residency. Reading a block whose page is not mapped faults (a CUDA kernel that does so kills the context). The
space guarantees that every block ``allocate`` returned stays mapped until ``free``; ``check_resident`` (and
``Config.debug_checks``) verifies block ids before a step.

Stream order. ``free`` records a fence on the given stream (default: the current one); a page emptied by that
free is unmapped only after the fence completes, so kernels still reading it are never cut off.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable, Sequence

import numpy as np
import torch

from kvtier.blocks import BlockBooks
from kvtier.checks import INT64, block_ids_arg, int_arg, seq_id_arg
from kvtier.errors import (ClosedError, InvalidArgumentError, NotResidentError, PagesInFlight, QuotaExceededError,
                           SpaceFullError)
from kvtier.placement import PageMasks, first_on_mapped, plan_blocks, plan_range
from kvtier.policies import PageRef
from kvtier.reserve import Arrival, ReserveDemand
from kvtier.space_pages import SpacePages
from kvtier.space_sharing import SpaceSharing
from kvtier.tiering import IO_ALIGN, PageTable, Tier, TransferHandle
from kvtier.space_tiers import SpaceTiers
from kvtier.vmm import MappedRange

if TYPE_CHECKING:
    from kvtier.manager import TierManager

log = logging.getLogger(__name__)
_GPU = int(Tier.GPU)  # a numpy scalar compares with a plain int faster than with the enum (the decode step's path)

SUPPORTED_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2, torch.int8, torch.uint8)}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    name = str(dtype).removeprefix("torch.")
    if name not in SUPPORTED_DTYPES:
        raise InvalidArgumentError(f"dtype {dtype!r} is not supported (supported: {', '.join(SUPPORTED_DTYPES)})")
    return SUPPORTED_DTYPES[name]


class KVSpace:
    """Made by :meth:`TierManager.create_space`; see the module docstring for the layout and guarantees."""

    def __init__(self, manager: "TierManager", name: str, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, block_size: int, max_tokens: int, priority: int, quota_bytes: int | None):
        # what a space uses of its manager: the lock, the tiers, the room planner, the backend, the config; it never
        # calls the manager itself (but to hear it closed)
        self._lock, self._tiering, self._room = manager.lock, manager.tiering, manager.room
        self._backend, self._config, self._manager_open = manager.backend, manager.config, manager.check_open
        self.name, self.priority, self.quota_bytes = name, priority, quota_bytes
        self.num_layers, self.num_kv_heads, self.head_dim, self.dtype = num_layers, num_kv_heads, head_dim, dtype
        self.block_size, self.max_tokens = block_size, max_tokens
        self.page_size = P = manager.page_size
        self.block_bytes = block_size * num_kv_heads * head_dim * dtype.itemsize
        self.num_blocks = math.ceil(max_tokens / block_size)
        self.num_regions = 2 * num_layers
        self.block_books = BlockBooks(name, self.num_blocks, self.block_bytes, block_size, P)
        self.num_pages = self.block_books.num_pages
        self.page_bytes = self.num_regions * P  # physical bytes one page of the space maps
        self.pages = PageTable(self.num_pages, self.num_regions, manager.config.debug_checks)
        self.range = MappedRange(manager.backend, self.num_regions, self.num_pages, P, gate=self._tiering.mapping)
        self.region_bytes = self.range.region_bytes
        # mapped pages with no live block -> (the fence of their last readers, when they became empty)
        self._empty: OrderedDict[int, tuple[Any, float]] = OrderedDict()
        self._offloaded: set[Hashable] = set()               # idle sequences, demotable
        self._seq_priority: dict[Hashable, int] = {}         # set_priority overrides
        self.idle_fence: Any = None                          # after the last offload's kernels
        self._poke_owed = False  # a new request took the reserve: the demoter is poked once a sequence grows
        self.maps_ahead = manager.config.map_ahead           # the demoter tops up its reserve (create_space sets it)
        self.reserve = ReserveDemand(manager.config.space_reserve_pages, manager.config.space_reserve_window_s,
                                     manager.clock)
        self.arrival: Arrival | None = None                  # the reserve's pages being mapped without the lock
        self.closed = False
        shape = (self.num_blocks, block_size, num_kv_heads, head_dim)
        used = self.num_blocks * self.block_bytes
        regions = [self.range.region(r, used).view(dtype).view(shape) for r in range(self.num_regions)]
        self._kv = [(regions[2 * layer], regions[2 * layer + 1]) for layer in range(num_layers)]
        self.tiers = SpaceTiers(self)  # offload, prefetch, stage, read: the methods of the same name below call it
        self.sharing = SpaceSharing(self)  # fork, own, publish, share_prefix, the cache: the methods below call it
        self.prefix = self.sharing.prefix
        self.shared_pages = SpacePages(self)  # pages mapped with another space's handles: the methods below call it
        self._layout = (num_layers, num_kv_heads, head_dim, str(dtype).removeprefix("torch."), block_size)
        self.layout_tag: list[Any] = [*self._layout, P]  # a kept tier restores pages only into this layout

    # --- engine-facing ------------------------------------------------------------------------------------------
    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``layer``: ``[num_blocks, block_size, num_kv_heads, head_dim]`` views that never move."""
        self._check_open()
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise InvalidArgumentError(f"layer {layer!r} is out of range: space {self.name!r} has "
                                       f"{self.num_layers} layers (0..{self.num_layers - 1})")
        return self._kv[layer]

    def block_rows(self, first: int, count: int) -> torch.Tensor:
        """Blocks ``first .. first + count - 1`` of every region as one ``[num_regions, count * block_bytes]``
        ``uint8`` view, a region a row (the regions lie at one stride in the space's range): a run of blocks moves
        in one copy, not one a region (a 32-layer model's 64 copies of a block were launched one by one)."""
        self._check_open()
        int_arg("first", first, 0, self.num_blocks)
        int_arg("count", count, 0, self.num_blocks - first)
        whole = self.range.whole
        return whole.as_strided((self.num_regions, count * self.block_bytes), (self.region_bytes, 1),
                                whole.storage_offset() + first * self.block_bytes)

    def allocate(self, seq_id: Hashable, num_tokens: int, first_block: int | None = None) -> list[int]:
        """Grow ``seq_id`` to hold ``num_tokens`` tokens in total; return all its block ids in order.

        A new ``seq_id`` starts empty. Asking for fewer tokens than the sequence holds changes nothing. On
        :class:`OutOfPagesError` (pool, quota or reservation exhausted) nothing changed. ``first_block`` pins the
        sequence to consecutive blocks from there (so that its tokens are one strided view of ``kv(layer)``, as
        contiguous-cache integrations need); those blocks must be free.
        """
        return self._room.run_planned(lambda: self._allocate(seq_id, num_tokens, first_block))

    def _allocate(self, seq_id: Hashable, num_tokens: int, first_block: int | None) -> list[int]:
        self._check_open()
        seq_id_arg(seq_id)
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise InvalidArgumentError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
        if num_tokens > self.max_tokens:
            raise InvalidArgumentError(f"num_tokens {num_tokens} exceeds the space's max_tokens "
                                       f"{self.max_tokens} (create the space with a larger max_tokens)")
        if first_block is not None:
            int_arg("first_block", first_block, 0, self.num_blocks - 1)
        if seq_id in self._offloaded:
            raise InvalidArgumentError(f"sequence {seq_id!r} is offloaded: prefetch it before growing it")
        books = self.block_books
        held, old_tokens = books.seqs.get(seq_id, []), books.tokens.get(seq_id, 0)
        need = books.blocks_needed(seq_id, num_tokens)
        if need <= 0:
            books.seqs.setdefault(seq_id, held)
            self._written(held, old_tokens, num_tokens)
            books.tokens[seq_id] = max(old_tokens, num_tokens)
            return list(held)
        if held and first_block is None:  # a decode step: mostly the next blocks, on the page it is writing
            blocks = self._next_on_tail_page(held, need)
            if blocks is not None:
                return self._grow(seq_id, blocks, old_tokens, num_tokens)
        if not held and first_block is None:  # a new request shorter than a page: free blocks on mapped pages
            mapped = self.pages.allocatable()
            idle = self.idle_pages()
            if idle:  # mostly none: numpy's assignment through an empty list cost ~1.4 us (CPU machine)
                mapped[idle] = False
            blocks = first_on_mapped(books, need, mapped)
            if blocks is not None:
                return self._grow(seq_id, blocks, old_tokens, num_tokens)
        if self.arrival is not None:  # fresh pages are being mapped ahead: take them once they land
            raise PagesInFlight(f"space {self.name!r}: pages being mapped ahead", [self.arrival])
        # plan: blocks, pages to map, room for them -- nothing changes until all three are known to hold
        try:
            blocks, new_pages = self._plan(held, need, first_block)
        except SpaceFullError:
            short = need - self.block_books.free_count
            if not self.sharing.cached or not self.evict_cached(0, blocks=short):  # cached blocks give way first
                raise
            raise PagesInFlight(f"space {self.name!r}: cached blocks dropped for room", again=True) from None
        if not self.within_quota(len(new_pages)):
            raise QuotaExceededError(
                f"space {self.name!r}: {(len(self.range.handles) + len(new_pages)) * self.page_bytes} bytes would "
                f"be mapped, over its quota of {self.quota_bytes} bytes; free or offload sequences of this space, "
                "or raise quota_bytes")
        room = self._room.plan_room(self, len(new_pages) * self.num_regions, keep=set(books.pages_of(blocks))) \
            if new_pages else None
        # commit
        if room is not None:
            self.map_pages(new_pages, self._room.take_room(room))
            self.pages.mapped(new_pages)
        return self._grow(seq_id, blocks, old_tokens, num_tokens)

    def _plan(self, held: list[int], need: int, first_block: int | None) -> tuple[np.ndarray, list[int]]:
        masks = self._masks()
        if first_block is None:
            return plan_blocks(self.block_books, held, need, masks, lambda n: self._room.can_back(self, n))
        if self.shared_pages.adopted:  # pages shared from another space: booked only by a range, as they are
            masks.allocatable[list(self.shared_pages.adopted)] = True
        return plan_range(self.block_books, first_block, len(held), need, masks)

    def _next_on_tail_page(self, held: list[int], need: int) -> np.ndarray | None:
        """The ``need`` blocks right after the sequence's last one, if they are free and lie on the page of its
        last block, on the GPU and not in flight: what ``plan_blocks`` would pick first (free blocks on the
        sequence's own pages, after its last block), found without scanning the space's books (a 16-token
        decode step cost ~90 us here through the full plan, mostly masks over every block and page)."""
        books, last = self.block_books, held[-1]
        stop = last + 1 + need
        if stop > books.num_blocks:
            return None
        page = int(books.last_page[last])
        if books.first_page[last + 1] != page or books.last_page[stop - 1] != page:
            return None
        if self.pages.tier[page] != _GPU or self.pages.in_flight([page]):
            return None
        if not (books.free[last + 1] if need == 1 else books.free[last + 1:stop].all()):
            return None
        return np.arange(last + 1, stop, dtype=np.int64)

    def _grow(self, seq_id: Hashable, blocks: np.ndarray, old_tokens: int, num_tokens: int) -> list[int]:
        """Book ``blocks`` (free, on mapped pages) to ``seq_id``, now ``num_tokens`` long."""
        books = self.block_books
        policy, priority = self._tiering.policy, self._seq_priority.get(seq_id, self.priority)
        fresh, pages = books.grow_touching(seq_id, blocks, num_tokens)
        for p in fresh:
            policy.on_create(PageRef(self.name, p), priority)
            self._empty.pop(p, None)
        if fresh:
            self.reserve.took(len(fresh))
            if self.maps_ahead and len(self._empty) < self.reserve.target():
                # the reserve fell short: the demoter tops it up now, not at its next look (up to 20 ms away: a
                # sequence growing 16 tokens a call needs its next page in ~2) -- a growing sequence's take at
                # once; a new request's at its first step of growth, as its free may give the page back first: a
                # poke at each take woke the demoter for every short request (alloc + free of 1 / 16 / 64 blocks
                # 44.4 / 41.7 / 42.6 us, 37.8 / 38.2 / 40.6 without the poke, H100, c494d88)
                if old_tokens:
                    self._tiering.poke()
                self._poke_owed = not old_tokens  # a growing sequence's poke pays one owed too
        elif self._poke_owed and old_tokens:  # one attribute a decode step
            self._poke_owed = False
            if self.arrival is None and len(self._empty) < self.reserve.target():
                self._tiering.poke()
        self.shared_pages.booked(pages)
        for p in pages:  # the rest of an active sequence is never a candidate
            policy.on_use(PageRef(self.name, p))
        self._written(books.seqs[seq_id], old_tokens, num_tokens)
        self._trim()
        self._debug_check()
        return list(books.seqs[seq_id])

    def _masks(self) -> PageMasks:
        table = self.pages
        promoting = np.zeros(self.num_pages, dtype=bool)
        if table.moving:
            promoting[[p for p, h in table.moving.items() if h.kind == "promote"]] = True
        idle = np.zeros(self.num_pages, dtype=bool)
        idle[self.idle_pages()] = True
        return PageMasks(allocatable=table.allocatable(), idle=idle, vacant=table.vacant(), promoting=promoting)

    def mark_written(self, seq_id: Hashable, start: int, stop: int) -> None:
        """Tokens ``start..stop`` of ``seq_id`` were written (or rewritten) through the tensors: the pages they lie
        on lose their kept copies below, so that going down again copies the new bytes. Engines that write only
        a sequence's newest tokens after ``allocate`` need not call it (the last block's page keeps no copy);
        engines that rewrite earlier tokens (beam reordering, in-place edits) must."""
        with self._lock:  # always: the page states it reads are committed by the worker under this lock
            self._check_open()
            b = self.block_books
            held = b.blocks_of(seq_id)
            if isinstance(start, bool) or isinstance(stop, bool) or not isinstance(start, int) or \
                    not isinstance(stop, int) or not 0 <= start <= stop <= b.tokens[seq_id]:
                raise InvalidArgumentError(f"tokens {start!r}..{stop!r} are not a range of the {b.tokens[seq_id]} "
                                           f"tokens {seq_id!r} holds")
            blocks = np.asarray(held[start // self.block_size: -(-stop // self.block_size)], dtype=np.int64)
            if (b.refs[blocks] > 1).any():
                raise InvalidArgumentError(f"space {self.name!r}: tokens {start}..{stop} of {seq_id!r} lie in blocks "
                                           "another sequence shares; call own() before rewriting them (their "
                                           "other holders now read what was written)")
            if self.prefix.key_of:
                self.prefix.forget(blocks)  # their keys name the old bytes
            if not self.pages.copies and not self.pages.moving:  # the common case: nothing kept, nothing coming up
                return
            self._tiering.drop_copies(self, b.pages_of(blocks))

    def _written(self, blocks: list[int], old_tokens: int, new_tokens: int) -> None:
        """Tokens ``old_tokens..new_tokens`` are about to be written: the pages they fall in lose their kept
        copies, also pages still on their way up (a later offload must copy them)."""
        if new_tokens > old_tokens and (self.pages.copies or self.pages.moving):
            first, stop = old_tokens // self.block_size, -(-new_tokens // self.block_size)
            self._tiering.drop_copies(self, self.block_books.pages_of(np.asarray(blocks[first:stop], dtype=np.int64)))

    def free(self, seq_id: Hashable, stream: Any = None, retain: bool = True) -> None:
        """Release ``seq_id``'s blocks, in whatever tier they are. Pages left empty on the GPU are unmapped once
        the work queued on ``stream`` (default: the current stream) has finished; up to the reserve (see
        ``kvtier.reserve``) stay mapped. Transfers in flight for its pages are waited for first. Its published blocks
        (``publish``) that no other sequence holds stay cached, found by their keys, idle (they go down under
        pressure like idle sequences) until a call short of blocks or room drops them, oldest first;
        ``retain=False`` frees them now (a request that must not be kept)."""
        self._room.run_planned(lambda: self._free(seq_id, stream, retain))

    def _free(self, seq_id: Hashable, stream: Any, retain: bool = False) -> int:
        """Free ``seq_id`` (see ``free``); return the pages left empty."""
        self._check_open()
        books = self.block_books
        books.blocks_of(seq_id)  # an unknown sequence: UnknownSequenceError before anything changes
        pages = self.pages
        pending = pages.in_flight(books.pages_of_seqs([seq_id])) if pages.moving or pages.reading else []
        if pending:
            raise PagesInFlight(f"space {self.name!r}: {seq_id!r} has pages in flight", pending)
        if self.prefix.key_of:  # published blocks: those this frees hold nothing any more, unless retained
            last = books.last_held(seq_id)
            if retain:
                last = self.sharing.retain(last)
            self.prefix.forget(last)
        emptied = books.release(seq_id)
        self._offloaded.discard(seq_id)
        self._seq_priority.pop(seq_id, None)
        fence = self._backend.record_fence(stream) if emptied else None
        for p in emptied:
            self._tiering.policy.on_remove(PageRef(self.name, p))
        self._tiering.release(self, emptied)
        for p in self.shared_pages.emptied(emptied, fence) if self.pages.shared else emptied:
            if self.pages.tier_of(p) == Tier.GPU:
                self._empty[p] = (fence, self.reserve.now())
        self.sharing.dropped(seq_id)
        self._trim()
        self._debug_check()
        return len(emptied)

    def set_priority(self, seq_id: Hashable, priority: int) -> None:
        """Set a sequence's priority (default: the space's), e.g. for requests under a tight latency objective.
        A page's priority is the highest of the sequences on it; the ``priority`` policy demotes low first."""
        int_arg("priority", priority, -INT64, INT64 - 1)
        with self._lock:
            self._check_open()
            pages = self.block_books.pages_of_seqs([seq_id])
            self._seq_priority[seq_id] = priority
            for p in pages:
                page_priority = max(self._seq_priority.get(q, self.priority) for q in self.sequences_on([p]))
                self._tiering.policy.on_priority(PageRef(self.name, p), page_priority)

    def blocks(self, seq_id: Hashable) -> list[int]:
        """The block ids of ``seq_id`` in order."""
        with self._lock:
            self._check_open()
            return list(self.block_books.blocks_of(seq_id))

    def num_tokens(self, seq_id: Hashable) -> int:
        with self._lock:
            self._check_open()
            self.block_books.blocks_of(seq_id)
            return self.block_books.tokens[seq_id]

    def sequences(self) -> list[Hashable]:
        with self._lock:
            self._check_open()
            return [q for q in self.block_books.seqs if not self.sharing.is_holder(q)]

    def check_resident(self, block_ids: Iterable[int]) -> None:
        """Raise :class:`NotResidentError` unless every block is live and its pages are mapped (a debug check
        to run before a step: a kernel reading an unmapped page would kill the CUDA context)."""
        with self._lock:
            self._check_open()
            listed = block_ids_arg(block_ids)
            if listed and not 0 <= min(listed) <= max(listed) < self.num_blocks:
                raise NotResidentError(f"space {self.name!r}: block ids must lie in 0..{self.num_blocks - 1}")
            ids = np.asarray(listed, dtype=np.int64)
            mapped = np.zeros(self.num_pages, dtype=bool)
            if self.range.handles:
                mapped[list(self.range.handles)] = True
                mapped[list(self.range.partial)] = False  # going down: some regions are gone already
            b = self.block_books
            bad = ids[b.free[ids] | ~b.all_on(mapped, ids)]
            if bad.size:
                raise NotResidentError(f"space {self.name!r}: blocks {bad[:8].tolist()} are not allocated and "
                                       "mapped; allocate (or prefetch) them before the step")

    def region_view(self, region: int, page: int) -> torch.Tensor:
        """The bytes of one page in one (layer, K|V) region, as a ``uint8`` tensor on the device."""
        int_arg("region", region, 0, self.num_regions - 1)
        int_arg("page", page, 0, self.num_pages - 1)
        return self.range.region_view(region, page)

    def live_bytes(self, page: int) -> int:
        """Bytes of the page, in each region, that a move must carry: up to the end of its last live block, in
        whole I/O blocks (a 1024-token sequence on a 4096-token page moves a quarter of it)."""
        int_arg("page", page, 0, self.num_pages - 1)
        return self.block_books.live_bytes(page, IO_ALIGN)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            t, mapped = self.pages, len(self.range.handles)
            return {"stripes_mapped": mapped, "stripes_empty": len(self._empty), "stripes_shared": len(t.shared),
                    **{f"stripes_{tier.name}": t.count(tier.id) for tier in self._tiering.stack},
                    "stripes_lost": t.count(Tier.LOST), "stripes_dropped": t.count(Tier.DROPPED),
                    "stripes_reserved": self.num_pages,
                    "bytes_mapped": mapped * self.page_bytes, "bytes_reserved": self.range.size,
                    "blocks_used": self.num_blocks - self.block_books.free_count, "blocks_total": self.num_blocks,
                    "sequences": len(self.block_books.seqs) - len(self.sharing.cached),
                    "sequences_offloaded": len(self._offloaded) - len(self.sharing.cached),
                    "cached_blocks": len(self.sharing.cached),
                    "prefix": self.prefix.stats(),
                    **self.range.stats()}

    # --- sharing (kvtier/space_sharing.py has the contracts) -------------------------------------------------------
    def fork(self, parent: Hashable, child: Hashable, stream: Any = None) -> list[int]:
        """A new sequence ``child`` sharing ``parent``'s whole blocks (its last, partial one copied)."""
        return self.sharing.fork(parent, child, stream)

    def own(self, seq_id: Hashable, start: int, stop: int, stream: Any = None) -> list[int]:
        """Copy on write: ``seq_id``'s own copies of the shared blocks of tokens ``start..stop``."""
        return self.sharing.own(seq_id, start, stop, stream)

    def block_keys(self, tokens: Sequence[int], salt: bytes = b"", model: str = "") -> list[bytes]:
        """Keys of the whole blocks of ``tokens`` in this space's layout."""
        return self.sharing.block_keys(tokens, salt, model)

    def publish(self, seq_id: Hashable, keys: Sequence[bytes], salt: bytes = b"") -> int:
        """Offer ``seq_id``'s first whole blocks for reuse under ``keys`` (made with ``salt``)."""
        return self.sharing.publish(seq_id, keys, salt)

    def erase(self, salt: bytes) -> int:
        """Forget every block published under ``salt``; free those only the cache held."""
        return self.sharing.erase(salt)

    def share_prefix(self, seq_id: Hashable, keys: Sequence[bytes]) -> int:
        """Start ``seq_id`` with the longest prefix of ``keys`` held; return its tokens."""
        return self.sharing.share_prefix(seq_id, keys)

    def prefix_blocks(self, page: int) -> list[tuple[int, bytes, bytes]]:
        """The indexed whole blocks on ``page``: (index within the page, key, salt) (a kept tier notes them)."""
        return self.sharing.prefix_blocks(page)

    def indexed(self, keys: Sequence[bytes]) -> list[bool]:
        """Which of ``keys`` this space holds a block for (no hit counted, nothing shared)."""
        return self.sharing.indexed(keys)

    def evict_cached(self, pages: int, blocks: int = 0) -> int:
        """Drop cached blocks no sequence holds, oldest first (``RoomUser``)."""
        return self.sharing.evict_cached(pages, blocks)

    # --- pages shared with another space (kvtier/space_pages.py has the contract) -----------------------------------
    def whole_pages(self, seq_tokens: dict[Hashable, int]) -> list[int]:
        """GPU pages holding nothing but whole blocks below ``seq_tokens[seq]`` tokens of each given sequence."""
        with self._lock:
            self._check_open()
            return self.shared_pages.whole_pages(seq_tokens)

    def share_pages(self, source: "KVSpace", pages: Sequence[int]) -> None:
        """Map this space's vacant ``pages`` with the physical pages ``source`` (a space of the same manager and
        layout) maps at the same positions -- on the GPU, whole, not in flight: no byte copied. Book their blocks
        with ``allocate(seq, tokens, first_block=...)``; neither side may write a shared page before ``unshare``."""
        def share() -> None:
            self._check_open()
            source._check_open()
            self.shared_pages.share_pages(source, pages)
        self._room.run_planned(share)  # (planned: it waits for pages the demoter is mapping ahead)

    def share_whole_pages(self, source: "KVSpace", seq_tokens: dict[Hashable, int]) -> list[int]:
        """``share_pages(source, source.whole_pages(seq_tokens))`` in one step (the demoter cannot move a page
        between the two); return the pages shared."""
        def share() -> list[int]:
            self._check_open()
            source._check_open()
            pages = source.shared_pages.whole_pages(seq_tokens)
            self.shared_pages.share_pages(source, pages)
            return pages
        return self._room.run_planned(share)

    def alias_pages(self, pairs: Sequence[tuple[int, int]]) -> int:
        """Map page ``dst`` with the physical memory page ``src`` maps, for each ``(src, dst)`` (pages of this space
        on the GPU): ``dst`` then reads ``src``'s bytes, no byte copied (a beam reorder: a row takes another's whole
        pages); both are shared (``unshare`` before writing them). Returns how many were mapped anew."""
        with self._lock:
            self._check_open()
            return self.shared_pages.alias(pairs)

    def unshare(self, pages: Iterable[int] | None = None) -> int:
        """Give this space's shared ``pages`` (default: all) memory of its own with the same bytes, before writing
        them; return how many were copied (none where the other side has let go)."""
        return self._room.run_planned(lambda: self._unshare(pages))

    def _unshare(self, pages: Iterable[int] | None) -> int:
        self._check_open()
        return self.shared_pages.unshare(pages) if self.pages.shared else 0

    # --- between the tiers (kvtier/space_tiers.py has the contracts) ------------------------------------------
    def offload(self, seq_id: Hashable, tier: str | None = None, stream: Any = None) -> TransferHandle:
        """Mark ``seq_id`` idle; with ``tier``, start sending its pages there now (see ``SpaceTiers.offload``)."""
        return self.tiers.offload(seq_id, tier, stream)

    def offload_prefix(self, seq_id: Hashable, tokens: int, tier: str = "host", stream: Any = None) -> TransferHandle:
        """Send down the pages holding only ``seq_id``'s first ``tokens`` tokens while it stays active."""
        return self.tiers.offload_prefix(seq_id, tokens, tier, stream)

    def drop_prefix(self, seq_id: Hashable, tokens: int, stream: Any = None) -> TransferHandle:
        """Give back the pages holding only ``seq_id``'s first ``tokens`` tokens (never read again)."""
        return self.tiers.drop_prefix(seq_id, tokens, stream)

    def prefetch(self, seq_ids: Iterable[Hashable], start: int = 0) -> TransferHandle:
        """Start bringing the pages of ``seq_ids`` (from token ``start`` on) to the GPU; they become active."""
        return self.tiers.prefetch(seq_ids, start)

    def ensure_resident(self, seq_ids: Iterable[Hashable]) -> None:
        """``prefetch(seq_ids).result()``."""
        self.tiers.ensure_resident(seq_ids)

    def stage(self, seq_ids: Iterable[Hashable]) -> TransferHandle:
        """Start reading the disk-tier pages of ``seq_ids`` into host memory, ahead of a prefetch."""
        return self.tiers.stage(seq_ids)

    def read(self, seq_id: Hashable, dst: Sequence[tuple[torch.Tensor, torch.Tensor]], start: int = 0,
             stop: int | None = None, stream: Any = None) -> TransferHandle:
        """Copy the KV of ``seq_id``'s tokens ``start..stop`` into ``dst`` from whichever tier holds them."""
        return self.tiers.read(seq_id, dst, start, stop, stream)

    def read_blocks(self, seq_id: Hashable, dst: Callable[[int, int], torch.Tensor], count: int | None = None,
                    stream: Any = None) -> TransferHandle:
        """Copy the bytes of ``seq_id``'s first ``count`` blocks into ``dst(region, i)``, from whichever tier."""
        return self.tiers.read_blocks(seq_id, dst, count, stream)

    def residency(self, seq_id: Hashable) -> dict[str, int]:
        """Bytes of ``seq_id``'s blocks per place: ``gpu``, each configured tier, ``lost``."""
        return self.tiers.residency(seq_id)

    def stripe_residency(self, seq_id: Hashable) -> dict[str, int]:
        """Distinct pages holding ``seq_id``'s blocks, per place."""
        return self.tiers.stripe_residency(seq_id)

    # --- what tiering needs (kvtier.tiering.TieredSpace) ----------------------------------------------------------
    def idle_pages(self) -> list[int]:
        """GPU pages, not in flight, whose live blocks all belong to offloaded sequences."""
        if not self._offloaded:  # the common case on the allocation path: nothing is idle
            return []
        if self.pages.shared:  # pages another space let go of since they were shared may go down again
            self.shared_pages.settle()
        active = self.block_books.pages_used_by(q for q in self.block_books.seqs if q not in self._offloaded)
        return np.flatnonzero(self.pages.allocatable() & (self.block_books.live > 0) & ~active).tolist()

    def sequences_on(self, pages: Iterable[int]) -> list[Hashable]:
        return [q for q in self.block_books.sequences_on(pages) if not self.sharing.is_holder(q)]

    def takes_writes(self, page: int) -> bool:
        """Whether a sequence's last block lies on ``page``: engines fill it token by token without telling."""
        return bool(self.block_books.tail[page])

    def map_pages(self, pages: list[int], handles: list[Any],
                  on_region: Callable[[int], None] | None = None) -> None:
        """Map vacant ``pages`` with ``handles``, region after region (``on_region(r)`` once region ``r`` is
        mapped); all or nothing (on failure the handles go back to the pool)."""
        try:
            self.range.map(pages, handles, on_region)
        except BaseException:
            self._room.give_pages(handles)
            raise

    def unmap_pages(self, pages: list[int], still_below: bool = False, leaving: bool = False) -> None:
        """Unmap GPU ``pages`` (their readers are done) and give their handles back; they become vacant. With
        ``still_below``: pages mapped for a promotion that failed -- their data stays where it is below; with
        ``leaving``: pages whose move away commits now (the page table's transition says where they went)."""
        self._room.give_pages(self.range.unmap(pages))
        if still_below:
            return
        for p in pages:
            self._empty.pop(p, None)
        if not leaving:
            self._tiering.give_back(self.pages.unmapped(pages))

    def unmap_regions(self, page: int, regions: list[int]) -> None:
        """Unmap ``regions`` of a page going down (their copies have landed) and give their handles back; the
        page's other regions stay until ``unmap_pages``."""
        self._room.give_pages(self.range.unmap_regions(page, regions))

    def mapped_regions(self, page: int) -> list[int]:
        return self.range.mapped_regions(page)

    # --- what the manager needs: quota and empty pages -------------------------------------------------------------
    def within_quota(self, new_pages: int) -> bool:
        mapped = len(self.range.handles) + len(self.range.arriving)
        return self.quota_bytes is None or (mapped + new_pages) * self.page_bytes <= self.quota_bytes

    @property
    def stocked_pages(self) -> int:
        """Pool pages (handles) this space keeps mapped ahead of need: its empty pages and those arriving. Read by
        the pool's worker without the lock (``PagePool.stocked``): a count, stale by at most one change."""
        arrival = self.arrival
        return (len(self._empty) + (len(arrival.pages) if arrival is not None else 0)) * self.num_regions

    def reclaimable(self, keep: Iterable[int] = ()) -> list[int]:
        """Empty mapped pages (not in ``keep``) the pool may take back when it runs short."""
        keep = set(keep)
        return [p for p in self._empty if p not in keep]

    def reclaim(self, pages: list[int]) -> None:
        """Unmap empty ``pages``, waiting for their fences."""
        for p in pages:
            fence = self._empty[p][0]
            if fence is not None:
                fence.synchronize()
        if pages:
            self.unmap_pages(pages)

    def _trim(self) -> None:
        """Unmap the oldest empty pages beyond the reserve whose fences have completed (never waits): those over
        ``space_reserve_pages`` at once, those over the demand's target once they have been empty for its window.
        Why not all at once: the demoter maps the reserve while a short request holds a page, and the page that
        request frees is then over the target -- unmapped, and another mapped at the next look, ~4 ms of driver
        calls a cycle (64 regions, H100), for as long as requests come and go; within the cap they stay."""
        if len(self._empty) <= self.reserve.least:  # within any target: no need to age the demand's books
            return
        excess = len(self._empty) - self.reserve.target()
        if excess > 0:
            over_cap, aged = len(self._empty) - self.reserve.cap, self.reserve.now() - self.reserve.window
            done = [p for i, (p, (fence, since)) in enumerate(itertools.islice(self._empty.items(), excess))
                    if (i < over_cap or since <= aged) and (fence is None or fence.query())]
            if done:
                self.unmap_pages(done)

    def map_ahead(self) -> int:
        """Map fresh pages as empties, up to the reserve's target (``ReserveDemand``), from what the pool has free
        now (no reclaim, no demotion): the next allocations book blocks on them without a driver call; empties over
        the target (demand fell) are unmapped once their fences pass. Returns the pages mapped. Under the lock,
        all of it; the background demoter (``map_ahead`` on) maps without it: ``start_map_ahead``, the arrival's
        ``arrive``, ``land_map_ahead``."""
        with self._lock:  # taken here: a caller without it raced the demoter, both booking the same pages
            self._check_open()
            arrival = self.start_map_ahead()
            if arrival is None:
                return 0
            arrival.arrive()
            error = arrival.error
            mapped = self.land_map_ahead(arrival)
        if error is not None:
            raise error
        return mapped

    def start_map_ahead(self) -> Arrival | None:
        """Book the pages ``map_ahead`` would map as arriving, with handles from the pool (under the lock); None
        if there is nothing to map or an arrival is under way already."""
        if self.closed or self.arrival is not None:
            return None
        want = self.reserve.target() - len(self._empty)
        if want < 0:
            self._trim()
        if want <= 0 or not self._room.pool.can_take(self.num_regions):
            return None
        want = min(want, self._room.pool.available() // self.num_regions)
        pages = np.flatnonzero(self.pages.vacant())[:want].tolist()
        if not pages or not self.within_quota(len(pages)):
            return None
        # the arrival is stock before the pool's take: its worker, woken by the take, would otherwise refill the
        # ready pages these handles came from (``PagePool.stocked``; 256 MiB held for nothing, H100, c8a514c)
        arrival = self.arrival = Arrival(self, pages)
        try:
            self.range.book_arriving(pages, self._room.pool.take(len(pages) * self.num_regions))
        except BaseException:
            self.arrival = None
            raise
        self.pages.arrive(pages)
        return arrival

    def land_map_ahead(self, arrival: Arrival) -> int:
        """The arrival's pages were mapped (they become empties) or failed to be (their handles go back to the
        pool; logged: an allocation maps what it needs itself). Under the lock; returns the pages mapped."""
        assert arrival is self.arrival, "land the space's own arrival"
        self.arrival = None
        try:
            mapped = arrival.error is None
            self._room.give_pages(self.range.land_arriving(arrival.pages, mapped, arrival.seconds))
            if not mapped:
                self.pages.not_arrived(arrival.pages)
                log.warning("space %r: mapping %d page(s) ahead failed: %s", self.name, len(arrival.pages),
                            arrival.error)
                return 0
            self.pages.mapped(arrival.pages)
            for p in arrival.pages:
                self._empty[p] = (None, self.reserve.now())
            return len(arrival.pages)
        finally:
            arrival.landed()

    def in_flight(self) -> list[Any]:
        """Transfers and reads under way on any page of this space, and pages being mapped ahead."""
        return self.pages.in_flight(range(self.num_pages)) + ([self.arrival] if self.arrival is not None else [])

    def close(self) -> None:
        """Unmap every page (after the device is idle), give every slot back, free the reservation. The
        manager calls it once no transfer of this space is in flight (nor an arrival: ``in_flight``)."""
        assert self.arrival is None, "close a space with no pages being mapped ahead"
        self.reclaim(list(self._empty))
        if self.range.handles:  # live pages: unmap them too, once the device is done with them
            self._backend.synchronize()
            self.unmap_pages(list(self.range.handles))
        self._tiering.close_space(self)
        self.range.close()
        self.block_books.seqs.clear()
        self.block_books.tokens.clear()
        self.closed = True

    def _check_open(self) -> None:
        self._manager_open()
        if self.closed:
            raise ClosedError(f"space {self.name!r} was dropped; create it again")

    # --- integrity ------------------------------------------------------------------------------------------------
    def _debug_check(self) -> None:
        if self._config.debug_checks:
            self.check()

    def check(self) -> None:
        """Verify the books (AssertionError on a broken invariant)."""
        live = self.block_books.check()
        self.pages.check(live, self.range.handles)
        on_gpu = self.pages.tier == Tier.GPU
        assert (self.pages.tier[live > 0] != Tier.UNMAPPED).all(), "a live block sits on a page with no data"
        adopted = self.shared_pages.adopted  # shared from another space, blocks not all booked yet: not empty pages
        assert set(self._empty) == set(np.flatnonzero(on_gpu & (live == 0)).tolist()) - adopted, "empty pages"
        assert not adopted & set(self._empty), "a page shared from another space kept as empty"
        assert not self.pages.lower_mask()[live == 0].any(), "a lower tier holds a page with no live block"
        assert self._offloaded <= set(self.block_books.seqs)
        arriving = set(self.arrival.pages) if self.arrival is not None else set()
        assert arriving == set(self.range.arriving) == self.pages.arriving, "pages being mapped ahead"
        self.prefix.check(self.block_books.free)
        assert all(self.block_books.seqs.get(h) == [h.block] for h in self.sharing.cached), "cached blocks' holders"
