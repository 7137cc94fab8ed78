"""A reserved virtual range whose pages are mapped on demand, in runs of handles.

The range holds ``num_regions`` regions of ``num_pages * page_size`` bytes each. *Page* ``p`` of the range is the
same ``page_size`` slice of every region, so mapping it takes one physical handle per region. The range is
reserved once and never moves: tensors over it keep their data pointers for its whole life.

The range keeps the books of what is mapped (``handles``); it does not own the handles' budget: ``map`` takes
handles from its caller and ``unmap`` hands them back.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, ContextManager, Sequence

import torch

from kvtier.vmm.base import Backend, Handle


# Regions mapped per hold of the mapping gate (0: the whole call). While the gate is held no new batch of copies
# down starts (a set-access waits for those in flight); let go between groups, the copies down go on while a
# large promotion maps, and each group's set-access then waits for the batches started meanwhile.
GATE_REGIONS = 0


def runs(sorted_pages: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive runs of a sorted page list, as (first page, count)."""
    out: list[tuple[int, int]] = []
    for p in sorted_pages:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


class MappedRange:
    """``num_regions`` regions of ``num_pages`` pages over one reservation.

    ``gate``: a context manager held while pages are being mapped. The tiering layer passes one that keeps new
    device-to-host copies from starting meanwhile (set-access waits for those in flight; see ``tiering.mover``).
    """

    def __init__(self, backend: Backend, num_regions: int, num_pages: int, page_size: int,
                 gate: Callable[[], ContextManager[None]] = contextlib.nullcontext) -> None:
        self.backend, self.num_regions, self.num_pages, self.page_size = backend, num_regions, num_pages, page_size
        self.region_bytes = num_pages * page_size
        self.size = num_regions * self.region_bytes
        self._gate = gate
        self.handles: dict[int, list[Handle | None]] = {}  # mapped page -> one handle per region
        self.arriving: dict[int, list[Handle]] = {}  # pages being mapped without the caller's lock (``arrive``)
        self.partial: set[int] = set()  # pages some of whose regions went ahead (None in ``handles``)
        self.map_calls = self.unmap_calls = 0
        self.map_seconds = self.unmap_seconds = 0.0
        self.base = backend.reserve(self.size, page_size)
        self.whole = backend.tensor(self.base, self.size)
        self._views: dict[int, torch.Tensor] = {}  # region * num_pages + page -> its view (see region_view)

    def region(self, region: int, nbytes: int) -> torch.Tensor:
        """The first ``nbytes`` of one region, as a ``uint8`` tensor (a view that never moves)."""
        start = region * self.region_bytes
        return self.whole[start:start + nbytes]

    def region_view(self, region: int, page: int) -> torch.Tensor:
        """The bytes of one page in one region. Made once per (region, page) -- the range never moves -- because
        every move takes one per region and page, and a tensor slice costs microseconds of the calling thread."""
        key = region * self.num_pages + page
        view = self._views.get(key)
        if view is None:
            start = region * self.region_bytes + page * self.page_size
            view = self._views[key] = self.whole[start:start + self.page_size]
        return view

    def is_mapped(self, page: int) -> bool:
        return page in self.handles

    def handle_count(self) -> int:
        """Handles mapped now, over every region of every page."""
        released = sum(self.handles[p].count(None) for p in self.partial)
        return (len(self.handles) + len(self.arriving)) * self.num_regions - released

    def _address(self, region: int, page: int) -> int:
        return self.base + region * self.region_bytes + page * self.page_size

    def map(self, pages: Sequence[int], handles: Sequence[Handle],
            on_region: Callable[[int], None] | None = None) -> None:
        """Map ``pages`` (sorted, unmapped) with ``handles`` (``num_regions`` per page, page after page); one
        driver map per handle and one set-access per run. Region after region: ``on_region(r)``, if given, is
        called once region ``r`` of every page is mapped (a caller enqueues its copies there, so that they run
        while the later regions are mapped). All or nothing: on failure every run mapped so far is unmapped
        again (after the device has finished whatever ``on_region`` enqueued) and the handles stay the caller's."""
        R = self.num_regions
        assert len(handles) == len(pages) * R, (len(handles), len(pages), R)
        per_page = {p: list(handles[i * R:(i + 1) * R]) for i, p in enumerate(pages)}
        seconds = 0.0
        try:
            seconds = self._map(per_page, on_region)
        finally:
            self.map_seconds += seconds
        self.map_calls += len(pages) * R
        self.handles.update(per_page)

    def _map(self, per_page: dict[int, list[Handle]], on_region: Callable[[int], None] | None) -> float:
        """The driver calls of ``map`` (no books written: ``arrive`` runs them without the caller's lock); all or
        nothing. Returns the seconds spent mapping (``on_region``'s work not counted)."""
        pages = sorted(per_page)
        done: list[tuple[int, int, int]] = []
        start, elsewhere = time.perf_counter(), 0.0
        R, group = self.num_regions, GATE_REGIONS or self.num_regions
        try:
            for start_r in range(0, R, group):
                with self._gate():
                    for r in range(start_r, min(R, start_r + group)):
                        for first, count in runs(pages):
                            self.backend.map(self._address(r, first), self.page_size,
                                             [per_page[first + j][r] for j in range(count)])
                            done.append((r, first, count))
                        if on_region is not None:
                            called = time.perf_counter()
                            on_region(r)
                            elsewhere += time.perf_counter() - called
        except BaseException:
            if on_region is not None and done:
                self.backend.synchronize()  # copies into the regions mapped so far must land before they go
            for r, first, count in done:
                self.backend.unmap(self._address(r, first), count * self.page_size)
            raise
        return time.perf_counter() - start - elsewhere

    # --- mapping without the caller's lock, in three steps: book (locked), map (not), land (locked) ----------------
    def book_arriving(self, pages: Sequence[int], handles: Sequence[Handle]) -> None:
        """Book unmapped ``pages`` as arriving with ``handles`` (``num_regions`` per page, page after page): the
        handles count as this range's from now (``handle_count``), the pages are mapped by ``arrive``."""
        R = self.num_regions
        assert len(handles) == len(pages) * R and not set(pages) & (set(self.handles) | set(self.arriving))
        for i, p in enumerate(pages):
            self.arriving[p] = list(handles[i * R:(i + 1) * R])

    def arrive(self, pages: Sequence[int]) -> float:
        """Map arriving ``pages``: the driver calls alone, which may run without the lock that guards these books
        (only the caller touches the pages meanwhile); all or nothing. Returns the seconds spent."""
        return self._map({p: self.arriving[p] for p in pages}, None)

    def land_arriving(self, pages: Sequence[int], mapped: bool, seconds: float) -> list[Handle]:
        """``arrive`` ended: the pages are mapped (``mapped``; now in ``handles``) or not -- then their handles
        are returned, for the pool."""
        per_page = {p: self.arriving.pop(p) for p in pages}
        self.map_seconds += seconds
        if not mapped:
            return [h for hs in per_page.values() for h in hs]
        self.map_calls += len(pages) * self.num_regions
        self.handles.update(per_page)
        return []

    def unmap_regions(self, page: int, regions: Sequence[int]) -> list[Handle]:
        """Unmap ``regions`` of the mapped ``page`` ahead of its others and return their handles; ``unmap`` takes
        the rest. A page going down gives its regions back as their copies land: measured on an H100 (driver 580)
        an unmap costs ~31 us a handle and does not wait for copies in flight, so done while the page's later
        regions are still copying it costs no time (a 4096-token Llama-3-8B page: 10.3 ms of copies, +2.1 ms
        unmapping its 64 regions after them, +0 ms group by group as they land)."""
        held = self.handles[page]
        out: list[Handle] = []
        start = time.perf_counter()
        for r in regions:
            handle = held[r]
            if handle is not None:
                self.backend.unmap(self._address(r, page), self.page_size)
                held[r] = None
                out.append(handle)
        self.partial.add(page)
        self.unmap_calls += len(out)
        self.unmap_seconds += time.perf_counter() - start
        return out

    def mapped_regions(self, page: int) -> list[int]:
        """The regions of a mapped ``page`` still mapped."""
        return [r for r, h in enumerate(self.handles[page]) if h is not None]

    def unmap(self, pages: Sequence[int]) -> list[Handle]:
        """Unmap ``pages`` (mapped; no kernel may still read them) and return their handles."""
        pages = sorted(pages)
        start = time.perf_counter()
        for first, count in runs(pages):
            run = range(first, first + count)
            for r in range(self.num_regions):
                if not self.partial or all(self.handles[p][r] is not None for p in run):
                    self.backend.unmap(self._address(r, first), count * self.page_size)
                    self.unmap_calls += count
                    continue
                for p in run:  # some of the run's pages gave this region back already
                    if self.handles[p][r] is not None:
                        self.backend.unmap(self._address(r, p), self.page_size)
                        self.unmap_calls += 1
        self.unmap_seconds += time.perf_counter() - start
        self.partial.difference_update(pages)
        return [h for p in pages for h in self.handles.pop(p) if h is not None]

    def stats(self) -> dict[str, float]:
        return {"map_calls": self.map_calls, "map_seconds": self.map_seconds, "unmap_calls": self.unmap_calls,
                "unmap_seconds": self.unmap_seconds}

    def close(self) -> None:
        """Give the reservation back; every page must have been unmapped."""
        assert not self.handles and not self.arriving, f"{len(self.handles)} page(s) still mapped"
        self.backend.free_reservation(self.base, self.size)
