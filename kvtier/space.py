"""A KV space: one model's paged KV cache over a reserved virtual range, with pages mapped on demand.

Layout. The range holds ``2 * num_layers`` regions, one per (layer, K|V), each ``[num_blocks, block_size,
num_kv_heads, head_dim]`` -- the shape paged-attention kernels take. A *page* ``p`` of the space is the same
``page_size`` slice of every region, so mapping page ``p`` maps ``2 * num_layers`` physical handles and makes
blocks ``p * page_size // block_bytes ...`` usable in every layer at once. Per-layer regions keep a layer's blocks
dense (kvcached's cross-layer layout cost 31% decode throughput).

Residency. Reading a block whose page is not mapped faults (a CUDA kernel that does so kills the context). The
space guarantees that every block ``allocate`` returned stays mapped until ``free``; ``check_resident`` (and
``Config.debug_checks``) verifies block ids before a step.

Stream order. ``free`` records a fence on the given stream (default: the current one); a page emptied by that
free is unmapped only after the fence completes, so kernels still reading it are never cut off.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Hashable, Iterable, Sequence

import numpy as np
import torch

from kvtier.errors import InvalidArgumentError, NotResidentError, QuotaExceededError, UnknownSequenceError
from kvtier.placement import Placement
from kvtier.space_tiers import TierOps, _settle
from kvtier.policies import PageRef
from kvtier.tiering import GPU, HOST, LOST, NVME, PageTable

if TYPE_CHECKING:
    from kvtier.manager import TierManager

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2, torch.int8, torch.uint8)}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    name = str(dtype).removeprefix("torch.")
    if name not in SUPPORTED_DTYPES:
        raise InvalidArgumentError(f"dtype {dtype!r} is not supported (supported: {', '.join(SUPPORTED_DTYPES)})")
    return SUPPORTED_DTYPES[name]


def _runs(sorted_pages: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive runs of a sorted page list, as (first page, count)."""
    runs: list[tuple[int, int]] = []
    for p in sorted_pages:
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    return runs


class KVSpace(Placement, TierOps):
    """Made by :meth:`TierManager.create_space`; see the module docstring for the layout and guarantees."""

    def __init__(self, manager: "TierManager", name: str, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, block_size: int, max_tokens: int, priority: int, quota_bytes: int | None):
        self._mgr, self.name, self.priority, self.quota_bytes = manager, name, priority, quota_bytes
        self.num_layers, self.num_kv_heads, self.head_dim, self.dtype = num_layers, num_kv_heads, head_dim, dtype
        self.block_size, self.max_tokens = block_size, max_tokens
        backend, P = manager.backend, manager.page_size
        self.page_size = P
        self.block_bytes = block_size * num_kv_heads * head_dim * dtype.itemsize
        self.num_blocks = math.ceil(max_tokens / block_size)
        self.num_regions = 2 * num_layers
        self.num_pages = math.ceil(self.num_blocks * self.block_bytes / P)
        self.region_bytes = self.num_pages * P
        self.page_bytes = self.num_regions * P  # physical bytes one page of the space maps
        b = np.arange(self.num_blocks, dtype=np.int64)
        self._first_page = b * self.block_bytes // P
        self._last_page = ((b + 1) * self.block_bytes - 1) // P
        # --- books (the single source of truth; check() verifies them) ---
        self._block_free = np.ones(self.num_blocks, dtype=bool)
        self._free_blocks = self.num_blocks
        self._page_live = np.zeros(self.num_pages, dtype=np.int32)   # live blocks touching each page
        self.pages = PageTable(self.num_pages, self.num_regions)      # where each page's data lives
        self._empty: OrderedDict[int, Any] = OrderedDict()             # mapped pages with no live block -> fence
        self._seqs: dict[Hashable, list[int]] = {}
        self._tokens: dict[Hashable, int] = {}
        self._offloaded: set[Hashable] = set()                         # idle sequences, demotable
        self._seq_priority: dict[Hashable, int] = {}                   # set_priority overrides
        self._offload_fence: Any = None                                # after the last offload's kernels
        self.map_calls = self.unmap_calls = 0
        self.map_seconds = self.unmap_seconds = 0.0
        self.closed = False
        # --- the reservation and the tensors over it (their data pointers never change) ---
        self._reserved = self.num_regions * self.region_bytes
        self.base = backend.reserve(self._reserved, P)
        self._whole = whole = backend.tensor(self.base, self._reserved)
        shape = (self.num_blocks, block_size, num_kv_heads, head_dim)
        used = self.num_blocks * self.block_bytes
        regions = [whole[r * self.region_bytes: r * self.region_bytes + used].view(dtype).view(shape)
                   for r in range(self.num_regions)]
        self._kv = [(regions[2 * layer], regions[2 * layer + 1]) for layer in range(num_layers)]

    # --- engine-facing ------------------------------------------------------------------------------------------
    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``layer``: ``[num_blocks, block_size, num_kv_heads, head_dim]`` views that never move."""
        self._mgr._check_open(self)
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise InvalidArgumentError(f"layer {layer!r} is out of range: space {self.name!r} has "
                                       f"{self.num_layers} layers (0..{self.num_layers - 1})")
        return self._kv[layer]

    def allocate(self, seq_id: Hashable, num_tokens: int, first_block: int | None = None) -> list[int]:
        """Grow ``seq_id`` to hold ``num_tokens`` tokens in total; return all its block ids in order.

        A new ``seq_id`` starts empty. Asking for fewer tokens than the sequence holds changes nothing. On
        :class:`OutOfPagesError` (pool, quota or reservation exhausted) nothing changed. ``first_block`` pins the
        sequence to consecutive blocks from there (so that its tokens are one strided view of ``kv(layer)``, as
        contiguous-cache integrations need); those blocks must be free.
        """
        return self._mgr._retrying(lambda: self._allocate(seq_id, num_tokens, first_block))

    def _allocate(self, seq_id: Hashable, num_tokens: int, first_block: int | None) -> list[int]:
        """The body of :meth:`allocate`; runs under the manager's lock (``_retrying``)."""
        self._mgr._check_open(self)
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise InvalidArgumentError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
        if num_tokens > self.max_tokens:
            raise InvalidArgumentError(f"num_tokens {num_tokens} exceeds the space's max_tokens "
                                       f"{self.max_tokens} (create the space with a larger max_tokens)")
        if seq_id in self._offloaded:
            raise InvalidArgumentError(f"sequence {seq_id!r} is offloaded: prefetch it before growing it")
        held = self._seqs.get(seq_id, [])
        need = math.ceil(num_tokens / self.block_size) - len(held)
        if need <= 0:
            self._seqs.setdefault(seq_id, held)
            self._written(held, self._tokens.get(seq_id, 0), num_tokens)
            self._tokens[seq_id] = max(self._tokens.get(seq_id, 0), num_tokens)
            return list(held)
        if first_block is None:
            blocks, new_pages = self._plan(held, need)
        else:
            blocks, new_pages = self._plan_range(first_block, len(held), need)
        mapped_after = (len(self.pages.handles) + len(new_pages)) * self.page_bytes
        if not self._within_quota(len(new_pages)):
            raise QuotaExceededError(
                f"space {self.name!r}: {mapped_after} bytes would be mapped, over its quota of "
                f"{self.quota_bytes} bytes; free or offload sequences of this space, or raise quota_bytes")
        if new_pages:
            keep = set(self._pages_of(blocks))  # pages the plan counts on must not be reclaimed under it
            self._map(new_pages, self._mgr._acquire(self, len(new_pages) * self.num_regions, keep))
            self.pages.tier[new_pages] = GPU
        self._block_free[blocks] = False
        self._free_blocks -= len(blocks)
        policy = self._mgr.tiering.policy
        for p in self._pages_of(blocks):
            if self._page_live[p] == 0:
                policy.on_create(PageRef(self.name, p), self._seq_priority.get(seq_id, self.priority))
            self._page_live[p] += 1
            self._empty.pop(p, None)
        for p in set(self._pages_of(blocks)):  # the rest of an active sequence is never a candidate
            policy.on_use(PageRef(self.name, p))
        held = held + blocks.tolist()
        self._written(held, self._tokens.get(seq_id, 0), num_tokens)
        self._seqs[seq_id] = held
        self._tokens[seq_id] = num_tokens
        self._trim()
        if self._mgr.config.debug_checks:
            self.check()
        return list(held)

    def _written(self, blocks: list[int], old_tokens: int, new_tokens: int) -> None:
        """Tokens ``old_tokens..new_tokens`` are about to be written: the pages they fall in lose their kept
        copies, also pages still on their way up (a later offload must copy them)."""
        if new_tokens > old_tokens and (self.pages.copies or self.pages.moving):
            first, stop = old_tokens // self.block_size, -(-new_tokens // self.block_size)
            self._mgr.tiering.drop_copies(self, self._pages_of(np.asarray(blocks[first:stop], dtype=np.int64)))

    def free(self, seq_id: Hashable, stream: Any = None) -> None:
        """Release ``seq_id``'s blocks, in whatever tier they are. Pages left empty on the GPU are unmapped once
        the work queued on ``stream`` (default: the current stream) has finished; up to ``space_reserve_pages``
        of them stay mapped. Transfers in flight for its pages are waited for first."""
        while True:
            with self._mgr._lock:
                self._mgr._check_open(self)
                blocks = np.asarray(self._blocks_of(seq_id), dtype=np.int64)
                pending = self._in_flight(blocks)
                if not pending:
                    self._free_locked(seq_id, blocks, stream)
                    return
            for handle in pending:  # outside the lock: the worker needs it to commit
                _settle(handle)

    def _free_locked(self, seq_id: Hashable, blocks: np.ndarray, stream: Any) -> None:
        del self._seqs[seq_id], self._tokens[seq_id]
        self._offloaded.discard(seq_id)
        self._seq_priority.pop(seq_id, None)
        self._block_free[blocks] = True
        self._free_blocks += len(blocks)
        emptied = []
        for p in self._pages_of(blocks):
            self._page_live[p] -= 1
            if self._page_live[p] == 0:
                emptied.append(p)
        fence = self._mgr.backend.record_fence(stream) if emptied else None
        tiering = self._mgr.tiering
        for p in emptied:
            tiering.policy.on_remove(PageRef(self.name, p))
            code = int(self.pages.tier[p])
            if code == GPU:
                self._empty[p] = fence
                tiering.drop_copies(self, [p])
            elif code in (HOST, NVME):  # the copy below holds nothing live any more
                books = tiering.host.books if code == HOST else tiering.nvme.books
                books.give(self.pages.slots.pop(p))
                self.pages.tier[p] = 0
            elif code == LOST:
                self.pages.tier[p] = 0
        self._trim()
        if self._mgr.config.debug_checks:
            self.check()

    def set_priority(self, seq_id: Hashable, priority: int) -> None:
        """Set a sequence's priority (default: the space's), e.g. for requests under a tight latency objective.
        A page's priority is the highest of the sequences on it; the ``priority`` policy demotes low first."""
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidArgumentError(f"priority must be an int, got {priority!r}")
        with self._mgr._lock:
            self._mgr._check_open(self)
            blocks = np.asarray(self._blocks_of(seq_id), dtype=np.int64)
            self._seq_priority[seq_id] = priority
            policy = self._mgr.tiering.policy
            for p in set(self._pages_of(blocks)):
                page_priority = max(self._seq_priority.get(q, self.priority) for q in self._sequences_on(p))
                policy.on_priority(PageRef(self.name, p), page_priority)

    def blocks(self, seq_id: Hashable) -> list[int]:
        """The block ids of ``seq_id`` in order."""
        with self._mgr._lock:
            return list(self._blocks_of(seq_id))

    def num_tokens(self, seq_id: Hashable) -> int:
        with self._mgr._lock:
            self._blocks_of(seq_id)
            return self._tokens[seq_id]

    def sequences(self) -> list[Hashable]:
        with self._mgr._lock:
            return list(self._seqs)

    def check_resident(self, block_ids: Iterable[int]) -> None:
        """Raise :class:`NotResidentError` unless every block is live and its pages are mapped (a debug check
        to run before a step: a kernel reading an unmapped page would kill the CUDA context)."""
        with self._mgr._lock:
            ids = np.asarray(list(block_ids), dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= self.num_blocks):
                raise NotResidentError(f"space {self.name!r}: block ids must lie in 0..{self.num_blocks - 1}")
            mapped = np.zeros(self.num_pages, dtype=bool)
            if self.pages.handles:
                mapped[list(self.pages.handles)] = True
            bad = ids[self._block_free[ids] | ~mapped[self._first_page[ids]] | ~mapped[self._last_page[ids]]]
            if bad.size:
                raise NotResidentError(f"space {self.name!r}: blocks {bad[:8].tolist()} are not allocated and "
                                       "mapped; allocate (or prefetch) them before the step")

    def region_view(self, region: int, page: int) -> torch.Tensor:
        """The bytes of one page in one (layer, K|V) region, as a ``uint8`` tensor on the device."""
        start = region * self.region_bytes + page * self.page_size
        return self._whole[start:start + self.page_size]

    def stats(self) -> dict[str, Any]:
        with self._mgr._lock:
            t = self.pages
            return {"pages_mapped": len(t.handles), "pages_empty": len(self._empty),
                    "pages_host": t.count(HOST), "pages_nvme": t.count(NVME), "pages_lost": t.count(LOST),
                    "pages_reserved": self.num_pages, "bytes_mapped": len(t.handles) * self.page_bytes,
                    "bytes_reserved": self._reserved, "blocks_used": self.num_blocks - self._free_blocks,
                    "blocks_total": self.num_blocks, "sequences": len(self._seqs),
                    "sequences_offloaded": len(self._offloaded),
                    "map_calls": self.map_calls, "map_seconds": self.map_seconds,
                    "unmap_calls": self.unmap_calls, "unmap_seconds": self.unmap_seconds}

    def _pages_of(self, blocks: np.ndarray) -> list[int]:
        """Pages touched by each block, once per (block, page) pair."""
        first, last = self._first_page[blocks], self._last_page[blocks]
        pages = first.tolist()
        straddling = np.flatnonzero(last != first)
        pages.extend(last[straddling].tolist())
        return pages

    def _blocks_of(self, seq_id: Hashable) -> list[int]:
        try:
            return self._seqs[seq_id]
        except (KeyError, TypeError):
            raise UnknownSequenceError(f"space {self.name!r} has no sequence {seq_id!r}") from None

    # --- mapping ------------------------------------------------------------------------------------------------
    def _region_address(self, region: int, page: int) -> int:
        return self.base + region * self.region_bytes + page * self.page_size

    def _map(self, pages: list[int], handles: list[Any]) -> None:
        """Map ``pages`` (sorted) with ``handles`` (``num_regions`` per page); all or nothing."""
        backend, R = self._mgr.backend, self.num_regions
        per_page = {p: handles[i * R:(i + 1) * R] for i, p in enumerate(pages)}
        done: list[tuple[int, int, int]] = []
        start = time.perf_counter()
        try:
            with self._mgr.tiering.mapping():
                self._map_runs(pages, per_page, done)
        except Exception:
            for r, first, count in done:
                backend.unmap(self._region_address(r, first), count * self.page_size)
            self._mgr._release(handles)
            raise
        finally:
            self.map_seconds += time.perf_counter() - start
        self.pages.handles.update(per_page)

    def _map_runs(self, pages: list[int], per_page: dict[int, list[Any]], done: list[tuple[int, int, int]]) -> None:
        for first, count in _runs(pages):
            for r in range(self.num_regions):
                run_handles = [per_page[first + j][r] for j in range(count)]
                self._mgr.backend.map(self._region_address(r, first), self.page_size, run_handles)
                done.append((r, first, count))
                self.map_calls += count

    def _unmap(self, pages: list[int]) -> None:
        """Unmap ``pages`` (empty, fences complete) and give their handles back to the pool."""
        backend, pages = self._mgr.backend, sorted(pages)
        start = time.perf_counter()
        for first, count in _runs(pages):
            for r in range(self.num_regions):
                backend.unmap(self._region_address(r, first), count * self.page_size)
            self.unmap_calls += count * self.num_regions
        self.unmap_seconds += time.perf_counter() - start
        handles = []
        self._mgr.tiering.drop_copies(self, pages)
        for p in pages:
            handles.extend(self.pages.handles.pop(p))
            self._empty.pop(p, None)
        self.pages.tier[pages] = 0
        self._mgr._release(handles)

    def _trim(self) -> None:
        """Unmap empty pages beyond the reserve whose fences have completed (never waits)."""
        excess = len(self._empty) - self._mgr.config.space_reserve_pages
        if excess <= 0:
            return
        done = [p for p, fence in list(self._empty.items())[:excess] if fence is None or fence.query()]
        if done:
            self._unmap(done)

    def _reclaim(self, pages_wanted: int, keep: set[int] = frozenset()) -> int:  # type: ignore[assignment]
        """Unmap up to ``pages_wanted`` empty pages not in ``keep``, waiting on their fences; returns pages
        unmapped."""
        victims = [(p, f) for p, f in self._empty.items() if p not in keep][:pages_wanted]
        for _, fence in victims:
            if fence is not None:
                fence.synchronize()
        if victims:
            self._unmap([p for p, _ in victims])
        return len(victims)

    def _close(self) -> None:
        self._reclaim(len(self._empty))
        if self.pages.handles:  # live pages: unmap them too, once the device is done with them
            self._mgr.backend.synchronize()
            self._unmap(list(self.pages.handles))
        tiering = self._mgr.tiering
        for p, slots in list(self.pages.slots.items()):
            (tiering.host.books if self.pages.tier[p] == HOST else tiering.nvme.books).give(slots)
        self.pages.slots.clear()
        self._mgr.backend.free_reservation(self.base, self._reserved)
        self._seqs.clear()
        self._tokens.clear()
        self.closed = True

    # --- integrity ------------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Verify the books (AssertionError on a broken invariant)."""
        live = np.zeros(self.num_pages, dtype=np.int32)
        seen = np.zeros(self.num_blocks, dtype=bool)
        for seq, blocks in self._seqs.items():
            b = np.asarray(blocks, dtype=np.int64)
            assert len(blocks) == math.ceil(self._tokens[seq] / self.block_size), (seq, len(blocks))
            assert not seen[b].any() and not self._block_free[b].any(), f"block owned twice or free: {seq}"
            seen[b] = True
            np.add.at(live, self._pages_of(b), 1)
        assert (seen == ~self._block_free).all() and self._free_blocks == int(self._block_free.sum())
        assert (live == self._page_live).all(), "page live counts disagree with the sequences' blocks"
        self.pages.check(live)
        on_gpu = self.pages.tier == GPU
        assert (self.pages.tier[live > 0] != 0).all(), "a live block sits on a page with no data anywhere"
        assert set(self._empty) == set(np.flatnonzero(on_gpu & (live == 0)).tolist()), "empty pages"
        assert not (self.pages.tier[live == 0] > GPU).any(), "a lower tier holds a page with no live block"
        assert self._offloaded <= set(self._seqs)

