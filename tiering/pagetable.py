"""The page table of one space: where each page's data lives. It is the single source of truth.

Every page is in exactly one tier: ``UNMAPPED`` (no data), ``GPU`` (mapped, ``handles`` holds one physical
handle per region), ``HOST`` or ``NVME`` (``slots`` holds one slot per region), or ``LOST`` (a read back failed;
the sequences on it must be recomputed). A page in flight keeps its source tier -- its data stays valid there
until the transfer commits -- and is listed in ``moving`` with the transfer's handle.

A GPU page brought up from below may keep its old slots as a *copy* (``copies``: tier code and slots): the bytes
there equal the page's until a token is written into it again, so offloading it once more only unmaps it. A copy
is a cache: dropping it is always safe.

A lower page being *read* (copied into an engine's buffer, without mapping) is listed in ``reading`` until the
read is done: it is not moved, freed or overwritten meanwhile.
"""

from __future__ import annotations

from typing import Any

import numpy as np

UNMAPPED, GPU, HOST, NVME, LOST = 0, 1, 2, 3, 4
TIER_CODE = {"gpu": GPU, "host": HOST, "nvme": NVME}
TIER_NAME = {UNMAPPED: "unmapped", GPU: "gpu", HOST: "host", NVME: "nvme", LOST: "lost"}


class PageTable:
    def __init__(self, num_pages: int, num_regions: int) -> None:
        self.num_regions = num_regions
        self.tier = np.zeros(num_pages, dtype=np.int8)
        self.handles: dict[int, list[Any]] = {}
        self.slots: dict[int, list[int]] = {}
        self.moving: dict[int, Any] = {}
        self.copies: dict[int, tuple[int, list[int]]] = {}
        self.written_in_flight: set[int] = set()  # pages written while coming up: their old slots are no copy
        self.reading: dict[int, Any] = {}  # lower pages a read is copying from: they stay until it is done

    def reads_pending(self) -> dict[int, Any]:
        """The lower pages still being read (finished reads are forgotten here)."""
        for p in [p for p, h in self.reading.items() if h.ready()]:
            del self.reading[p]
        return self.reading

    def moving_mask(self) -> np.ndarray:
        """Pages in flight or being read: no other transfer may start on them."""
        mask = np.zeros(len(self.tier), dtype=bool)
        if self.moving:
            mask[list(self.moving)] = True
        if self.reading and self.reads_pending():
            mask[list(self.reading)] = True
        return mask

    def allocatable(self) -> np.ndarray:
        """Pages whose free blocks may be handed out now: on the GPU and not in flight."""
        return (self.tier == GPU) & ~self.moving_mask()

    def vacant(self) -> np.ndarray:
        """Pages that hold no data anywhere: free to map fresh."""
        return self.tier == UNMAPPED

    def count(self, code: int) -> int:
        return int((self.tier == code).sum())

    def check(self, live: np.ndarray) -> None:
        """Each page in exactly one tier, with the resources that tier needs and no others."""
        for p in np.flatnonzero(self.tier == GPU).tolist():
            assert len(self.handles.get(p, ())) == self.num_regions, f"gpu page {p} lacks handles"
        for code in (HOST, NVME):
            for p in np.flatnonzero(self.tier == code).tolist():
                assert len(self.slots.get(p, ())) == self.num_regions, f"page {p} lacks slots"
                assert live[p] > 0, f"page {p} holds data of no live block"
        on_gpu = set(np.flatnonzero(self.tier == GPU).tolist())
        promoting = {p for p, h in self.moving.items() if h.kind == "promote"}
        assert set(self.handles) == on_gpu | promoting, "handles held by pages not on (or coming to) the GPU"
        lower = set(np.flatnonzero((self.tier == HOST) | (self.tier == NVME)).tolist())
        assert set(self.slots) == lower, "slots held by pages not in a lower tier"
        assert set(self.copies) <= on_gpu, "a copy kept for a page that is not on the GPU"
        assert self.written_in_flight <= promoting, "a written mark on a page not coming up"
        for p, (code, slots) in self.copies.items():
            assert code in (HOST, NVME) and len(slots) == self.num_regions, f"copy of page {p}"
