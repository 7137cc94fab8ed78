"""The tier operations of a KV space: offload, prefetch, stage, residency -- and the idle-page books the
tiering layer asks about. A mixin of :class:`kvtier.space.KVSpace`, kept apart so that each file does one thing:
``space.py`` owns blocks and mapping, this file moves sequences between tiers through ``kvtier.tiering``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Hashable, Iterable

import numpy as np

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
    _first_page: np.ndarray
    _page_live: np.ndarray

    if TYPE_CHECKING:  # provided by KVSpace; real stubs here would shadow its methods in the MRO
        def _blocks_of(self, seq_id: Hashable) -> list[int]: ...

        def _pages_of(self, blocks: np.ndarray) -> list[int]: ...

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
        moving = self.pages.moving
        return list({moving[p] for p in self._pages_of(blocks) if p in moving}) if moving else []

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
