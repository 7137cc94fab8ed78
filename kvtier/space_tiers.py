"""The tier operations of a KV space: offload, prefetch, stage, residency -- and the idle-page books the
tiering layer asks about. A mixin of :class:`kvtier.space.KVSpace`, kept apart so that each file does one thing:
``space.py`` owns blocks and mapping, this file moves sequences between tiers through ``kvtier.tiering``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Hashable, Iterable, Sequence

import numpy as np
import torch

from kvtier.errors import InvalidArgumentError, PagesInFlight, TransferError
from kvtier.policies import PageRef
from kvtier.tiering import GPU, HOST, LOST, NVME, TransferHandle


class TierOps:
    # provided by KVSpace
    name: str
    num_pages: int
    block_bytes: int
    num_regions: int
    pages: Any
    _mgr: Any
    _seqs: dict[Hashable, list[int]]
    _offloaded: set[Hashable]
    _offload_fence: Any
    _tokens: dict[Hashable, int]
    _whole: torch.Tensor
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    page_size: int
    _first_page: np.ndarray
    _last_page: np.ndarray
    _page_live: np.ndarray

    if TYPE_CHECKING:  # provided by KVSpace; real stubs here would shadow its methods in the MRO
        def _blocks_of(self, seq_id: Hashable) -> list[int]: ...

        def _pages_of(self, blocks: np.ndarray) -> list[int]: ...

        def region_view(self, region: int, page: int) -> torch.Tensor: ...

    def offload(self, seq_id: Hashable, tier: str | None = None, stream: Any = None) -> TransferHandle:
        """Mark ``seq_id`` idle (e.g. waiting for its next turn). With ``tier=None`` the policy decides when and
        where its pages go (under GPU pressure); with ``"host"`` or ``"nvme"`` they start going there now.
        Pages it shares with active sequences stay. ``stream``: where its last kernels ran (default: current);
        demotion copies wait for them."""
        if tier not in (None, "host", "nvme"):
            raise InvalidArgumentError(f"tier {tier!r} is not a tier to offload to (use None, 'host' or 'nvme')")
        with self._mgr._lock:
            self._mgr._check_open(self)
            self._blocks_of(seq_id)
            self._offloaded.add(seq_id)
            self._offload_fence = self._mgr.backend.record_fence(stream)
            tiering = self._mgr.tiering
            for p in set(self._pages_of(np.asarray(self._seqs[seq_id], dtype=np.int64))):
                tiering.policy.on_use(PageRef(self.name, p))  # its last use: the policy ages it from here
            if tier is None:
                tiering.poke()
                return TransferHandle(tiering, "demote", [])
            movable = set(self._idle_pages())
            if tier == "nvme":  # pages already in host memory go on down too
                movable |= set(np.flatnonzero((self.pages.tier == HOST) & ~self.pages.moving_mask()).tolist())
            pages = sorted(p for p in set(self._pages_of(np.asarray(self._seqs[seq_id], dtype=np.int64)))
                           if p in movable)
            return tiering.demote(self, pages, dst=tier, after=self._offload_fence)

    def prefetch(self, seq_ids: Iterable[Hashable]) -> TransferHandle:
        """Start bringing every page of ``seq_ids`` to the GPU; they become active again. The handle's
        ``wait(stream)`` makes the step's stream wait on the device; ``result()`` blocks. Raises OutOfPagesError
        (nothing started) when the GPU cannot take them even after demoting idle pages."""
        seqs = list(seq_ids)
        while True:
            with self._mgr._lock:
                self._mgr._check_open(self)
                blocks = np.asarray([b for q in seqs for b in self._blocks_of(q)], dtype=np.int64)
                pending = self._in_flight(blocks)
                if not pending:
                    pages = sorted(set(self._pages_of(blocks)))
                    lost = [p for p in pages if self.pages.tier[p] == LOST]
                    if lost:
                        raise TransferError(f"space {self.name!r}: pages {lost} were lost (a read back failed); "
                                            "free and recompute these sequences", self._sequences_on(*lost))
                    below = [p for p in pages if self.pages.tier[p] in (HOST, NVME)]
                    # active before promoting: making room must not demote pages these sequences share
                    was_idle = self._offloaded.intersection(seqs)
                    self._offloaded.difference_update(seqs)
                    try:
                        handle = self._mgr.tiering.promote(self, below)
                    except PagesInFlight:  # pages on their way down will make room: wait for them, start over
                        self._offloaded.update(was_idle)
                        self._mgr._changed.wait(0.05)
                        continue
                    except BaseException:
                        self._offloaded.update(was_idle)
                        raise
                    for p in pages:
                        self._mgr.tiering.policy.on_use(PageRef(self.name, p))
                    return handle
            for handle in pending:
                _settle(handle)

    def offload_prefix(self, seq_id: Hashable, tokens: int, tier: str = "host", stream: Any = None) -> TransferHandle:
        """Start moving down the pages that hold only ``seq_id``'s first ``tokens`` tokens, while the sequence
        stays active: it keeps growing in its later pages, and :meth:`read` copies the prefix into the engine's
        buffer when a step needs it (a layer streamed through host memory, whose past is never written again).
        A page holding later tokens or another sequence's blocks stays. ``stream``: where the kernels that wrote
        (or copied) the prefix ran; the copies down wait for them."""
        if tier not in ("host", "nvme"):
            raise InvalidArgumentError(f"tier {tier!r} is not a tier to offload to (use 'host' or 'nvme')")
        with self._mgr._lock:
            self._mgr._check_open(self)
            blocks = np.asarray(self._blocks_of(seq_id), dtype=np.int64)
            if isinstance(tokens, bool) or not isinstance(tokens, int) or not 0 <= tokens <= self._tokens[seq_id]:
                raise InvalidArgumentError(f"tokens must be an int in 0..{self._tokens[seq_id]} (the tokens "
                                           f"{seq_id!r} holds), got {tokens!r}")
            cut = tokens // self.block_size  # blocks wholly below ``tokens``
            ours = np.bincount(np.asarray(self._pages_of(blocks[:cut]), dtype=np.int64), minlength=self.num_pages)
            later = set(self._pages_of(blocks[cut:]))
            movable = self.pages.allocatable()
            pages = [p for p in np.flatnonzero(ours).tolist()
                     if ours[p] == self._page_live[p] and p not in later and movable[p]]
            return self._mgr.tiering.demote(self, pages, dst=tier, after=self._mgr.backend.record_fence(stream))

    def read(self, seq_id: Hashable, dst: Sequence[tuple[torch.Tensor, torch.Tensor]], start: int = 0,
             stop: int | None = None, stream: Any = None) -> TransferHandle:
        """Copy the KV of ``seq_id``'s tokens ``start..stop`` (default: all) into ``dst`` -- one (K, V) pair per
        layer, shaped and typed like :meth:`kv`, on the space's device -- at the same block positions, from
        whichever tier each page is in. Nothing is mapped: this is how a step reads a prefix kept below (see
        :meth:`offload_prefix`). Whole pages are copied (the bytes of other blocks on them come along).

        GPU pages are copied on ``stream`` (default: current) at once; host and NVMe pages on the transfer
        stream (NVMe: by the I/O worker), after the work queued on ``stream`` so far, which may still read
        ``dst``. ``handle.wait(stream)`` orders the step after them. Pages in flight are waited for first; the
        pages read stay where they are until the read is done. Raises TransferError for lost pages."""
        self._check_read_target(dst)
        while True:
            with self._mgr._lock:
                self._mgr._check_open(self)
                held = self._blocks_of(seq_id)
                stop = self._tokens[seq_id] if stop is None else stop
                if isinstance(start, bool) or isinstance(stop, bool) or not isinstance(start, int) or \
                        not isinstance(stop, int) or not 0 <= start <= stop <= self._tokens[seq_id]:
                    raise InvalidArgumentError(f"tokens {start!r}..{stop!r} are not within the "
                                               f"{self._tokens[seq_id]} tokens {seq_id!r} holds")
                blocks = np.asarray(held[start // self.block_size: -(-stop // self.block_size)], dtype=np.int64)
                pages = np.unique(np.concatenate((self._first_page[blocks], self._last_page[blocks]))).tolist()
                moving = self.pages.moving
                pending = list({moving[p] for p in pages if p in moving}) if moving else []
                if not pending:
                    return self._read_locked(pages, dst, stream)
            for handle in pending:  # outside the lock: the worker needs it to commit
                _settle(handle)

    def _check_read_target(self, dst: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        shape = (self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        tensors = [t for pair in dst for t in pair] if len(dst) == self.num_layers else []
        for t in tensors:
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != self.dtype or \
                    t.device.type != self._whole.device.type or not t.is_contiguous():
                tensors = []
                break
        if len(tensors) != self.num_regions:
            raise InvalidArgumentError(f"read needs one (K, V) pair per layer ({self.num_layers}), each a "
                                       f"contiguous {self.dtype} tensor of shape {list(shape)} on "
                                       f"{self._whole.device} (like kv(layer))")

    def _read_locked(self, pages: list[int], dst: Sequence[tuple[torch.Tensor, torch.Tensor]],
                     stream: Any) -> TransferHandle:
        lost = [p for p in pages if self.pages.tier[p] == LOST]
        if lost:
            raise TransferError(f"space {self.name!r}: pages {lost} were lost (a read back failed); free and "
                                "recompute these sequences", self._sequences_on(*lost))
        flat = [t.view(torch.uint8).view(-1) for pair in dst for t in pair]
        used = flat[0].numel()

        def target(region: int, page: int) -> torch.Tensor:  # the page's bytes in dst (the last page is short)
            return flat[region][page * self.page_size: min((page + 1) * self.page_size, used)]
        on_gpu = [p for p in pages if self.pages.tier[p] == GPU]
        if on_gpu:
            cuda = flat[0].is_cuda
            with torch.cuda.stream(stream) if cuda and stream is not None else contextlib.nullcontext():
                for p in on_gpu:
                    for r in range(self.num_regions):
                        view = target(r, p)
                        view.copy_(self.region_view(r, p)[:view.numel()], non_blocking=cuda)
        lower = [p for p in pages if self.pages.tier[p] in (HOST, NVME)]
        if not lower:
            return TransferHandle(self._mgr.tiering, "read", [])
        return self._mgr.tiering.read(self, lower, target, after=self._mgr.backend.record_fence(stream))

    def stage(self, seq_ids: Iterable[Hashable]) -> TransferHandle:
        """Start reading the NVMe pages of ``seq_ids`` into host memory, ahead of a ``prefetch`` (which then
        crosses PCIe only). Pages for which the host tier has no room stay on NVMe."""
        with self._mgr._lock:
            self._mgr._check_open(self)
            blocks = np.asarray([b for q in seq_ids for b in self._blocks_of(q)], dtype=np.int64)
            moving = self.pages.moving_mask()
            pages = sorted(p for p in set(self._pages_of(blocks)) if self.pages.tier[p] == NVME and not moving[p])
            return self._mgr.tiering.stage(self, pages)

    def ensure_resident(self, seq_ids: Iterable[Hashable]) -> None:
        """``prefetch(seq_ids).result()``: blocks until every page is on the GPU."""
        self.prefetch(seq_ids).result()

    def residency(self, seq_id: Hashable) -> dict[str, int]:
        """Bytes of ``seq_id``'s blocks per tier (``gpu``, ``host``, ``nvme``, ``lost``)."""
        with self._mgr._lock:
            blocks = np.asarray(self._blocks_of(seq_id), dtype=np.int64)
            codes = self.pages.tier[self._first_page[blocks]]
            per_block = self.block_bytes * self.num_regions
            return {name: int((codes == code).sum()) * per_block
                    for name, code in (("gpu", GPU), ("host", HOST), ("nvme", NVME), ("lost", LOST))}

    def page_residency(self, seq_id: Hashable) -> dict[str, int]:
        """Distinct pages holding ``seq_id``'s blocks, per tier (pages may be shared with other sequences)."""
        with self._mgr._lock:
            pages = sorted(set(self._pages_of(np.asarray(self._blocks_of(seq_id), dtype=np.int64))))
            codes = self.pages.tier[pages]
            return {name: int((codes == code).sum())
                    for name, code in (("gpu", GPU), ("host", HOST), ("nvme", NVME), ("lost", LOST))}

    def _idle_pages(self) -> list[int]:
        """GPU pages, not in flight, whose live blocks all belong to offloaded sequences."""
        if not self._offloaded:  # the common case on the allocation path: nothing is idle
            return []
        active = np.zeros(self.num_pages, dtype=bool)
        blocks = [b for q, bl in self._seqs.items() if q not in self._offloaded for b in bl]
        if blocks:
            active[self._pages_of(np.asarray(blocks, dtype=np.int64))] = True
        idle = self.pages.allocatable() & (self._page_live > 0) & ~active
        return np.flatnonzero(idle).tolist()

    def _in_flight(self, blocks: np.ndarray) -> list[TransferHandle]:
        """Transfers and reads under way on these blocks' pages."""
        moving, reading = self.pages.moving, self.pages.reads_pending() if self.pages.reading else {}
        if not moving and not reading:
            return []
        pages = self._pages_of(blocks)
        return list({moving[p] for p in pages if p in moving} | {reading[p] for p in pages if p in reading})

    def _sequences_on(self, *pages: int) -> list[Hashable]:
        wanted = set(pages)
        return [q for q, bl in self._seqs.items()
                if wanted & set(self._pages_of(np.asarray(bl, dtype=np.int64)))]


def _settle(handle: TransferHandle) -> None:
    """Wait for a transfer someone else started; its failure is reported to whoever started it."""
    try:
        handle.result()
    except TransferError:
        pass
