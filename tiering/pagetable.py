"""The page table of one space: where each page's data lives. It is the single source of truth.

Every page is in exactly one :class:`Tier`: ``UNMAPPED`` (no data), ``GPU`` (mapped; the space's range holds
its handles), ``HOST`` or ``NVME`` (``slots`` holds one slot per region), ``LOST`` (a read back failed; the
sequences on it must be recomputed), or ``DROPPED`` (the engine dropped tokens it will never read again: the
blocks stay their sequence's, the data is gone and nothing is held for it). A page in flight keeps its source
tier -- its data stays valid there until the transfer commits -- and is listed in ``moving`` with the transfer's
handle.

A GPU page brought up from below may keep its old slots as a *copy* (``copies``: tier and slots): the bytes
there equal the page's until a token is written into it again, so offloading it once more only unmaps it. A copy
is a cache: dropping it is always safe.

A lower page being *read* (copied into an engine's buffer, without mapping) is listed in ``reading`` until the
read is done: it is not moved, freed or overwritten meanwhile. Finished reads are forgotten by
:meth:`forget_finished_reads`, which only commands call; queries never change the table.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from kvtier.tiering.tier import LOWER, Tier


class PageTable:
    def __init__(self, num_pages: int, num_regions: int) -> None:
        self.num_regions = num_regions
        self.tier = np.zeros(num_pages, dtype=np.int8)  # a Tier per page
        self.slots: dict[int, list[int]] = {}
        self.moving: dict[int, Any] = {}
        self.copies: dict[int, tuple[Tier, list[int]]] = {}
        self.written_in_flight: set[int] = set()  # pages written while coming up: their old slots are no copy
        self.reading: dict[int, Any] = {}  # lower pages a read is copying from: they stay until it is done

    # --- queries (no side effects) --------------------------------------------------------------------------
    def tier_of(self, page: int) -> Tier:
        return Tier(int(self.tier[page]))

    def reads_pending(self) -> dict[int, Any]:
        """The lower pages still being read (until the read has landed and been committed)."""
        return {p: h for p, h in self.reading.items() if not h.done()} if self.reading else {}

    def moving_mask(self) -> np.ndarray:
        """Pages in flight or being read: no other transfer may start on them."""
        mask = np.zeros(len(self.tier), dtype=bool)
        if self.moving:
            mask[list(self.moving)] = True
        if self.reading:
            pending = self.reads_pending()
            if pending:
                mask[list(pending)] = True
        return mask

    def in_flight(self, pages: Iterable[int]) -> list[Any]:
        """Handles of the transfers and reads under way on ``pages``."""
        if not self.moving and not self.reading:
            return []
        reading = self.reads_pending()
        return list({self.moving[p] for p in pages if p in self.moving} | {reading[p] for p in pages if p in reading})

    def allocatable(self) -> np.ndarray:
        """Pages whose free blocks may be handed out now: on the GPU and not in flight."""
        return (self.tier == Tier.GPU) & ~self.moving_mask()

    def vacant(self) -> np.ndarray:
        """Pages that hold no data anywhere: free to map fresh."""
        return self.tier == Tier.UNMAPPED

    def count(self, tier: Tier) -> int:
        return int((self.tier == tier).sum())

    def pages_in(self, tier: Tier) -> list[int]:
        return np.flatnonzero(self.tier == tier).tolist()

    # --- commands -------------------------------------------------------------------------------------------------
    def forget_finished_reads(self) -> None:
        for p in [p for p, h in self.reading.items() if h.done()]:
            del self.reading[p]

    def check(self, live: np.ndarray, mapped: Iterable[int]) -> None:
        """Each page in exactly one tier, with the resources that tier needs and no others."""
        on_gpu = set(self.pages_in(Tier.GPU))
        promoting = {p for p, h in self.moving.items() if h.kind == "promote"}
        assert set(mapped) == on_gpu | promoting, "pages mapped that are not on (or coming to) the GPU"
        for tier in LOWER:
            for p in self.pages_in(tier):
                assert len(self.slots.get(p, ())) == self.num_regions, f"page {p} lacks slots"
                assert live[p] > 0, f"page {p} holds data of no live block"
        lower = set(np.flatnonzero(np.isin(self.tier, LOWER)).tolist())
        assert set(self.slots) == lower, "slots held by pages not in a lower tier"
        assert set(self.copies) <= on_gpu, "a copy kept for a page that is not on the GPU"
        assert self.written_in_flight <= promoting, "a written mark on a page not coming up"
        for p, (tier, slots) in self.copies.items():
            assert tier in LOWER and len(slots) == self.num_regions, f"copy of page {p}"
