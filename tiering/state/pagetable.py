"""The page table of one space: where each page's data lives. It is the single source of truth, and its
transition methods (``mapped``, ``arrive``, ``not_arrived``, ``restored``, ``unmapped``, ``start_move``,
``landed``, ``failed``, ``lost``, ``dropped``, ``released``, ``written``, ``take_copy``, ``start_read``,
``cleared``) are its only writers: each changes every field a transition touches in one call, under the
manager's lock that every caller holds, and returns the slots that leave the table for the tiers' books.
``LEGAL`` lists the transitions; with ``debug`` (``debug_checks``) each one is checked.

Every page is in exactly one place: ``Tier.UNMAPPED`` (no data), ``Tier.GPU`` (mapped; the space's range
holds its handles), a lower tier -- its id, see ``TierStack`` -- (``slots`` holds one slot per region),
``LOST`` (a read back failed; the sequences on it must be recomputed), or ``DROPPED`` (the engine dropped tokens
it will never read again: the blocks stay their sequence's, the data is gone and nothing is held for it). A page in flight keeps its source
tier -- its data stays valid there until the transfer commits -- and is listed in ``moving`` with the transfer's
handle.

A GPU page brought up from below may keep its old slots as a *copy* (``copies``: tier and slots): the bytes
there equal the page's until a token is written into it again, so offloading it once more only unmaps it. A copy
is a cache: dropping it is always safe.

A GPU page may be *shared* (``shared``): mapped with the same physical handles as the same page of another space
(``KVSpace.share_pages``) or as another page of its own (``alias_pages``), so that both read one copy of the bytes. Such a page is not written, handed out
(``allocatable``) or moved while shared; it leaves the set when it is unmapped, leaves the GPU, or gets a copy of
its own (``unshared``). The flag may outlive the other mapping (the pool's counts say whether it is still shared):
that only keeps the page where it is until its space looks again.

A vacant page may be *arriving* (``arriving``): the background demoter maps it fresh without the manager's lock
(a page's mapping takes milliseconds); it is not vacant meanwhile, and lands as an empty GPU page.

A lower page being *read* (copied into an engine's buffer, without mapping) is listed in ``reading`` until the
read is done: it is not moved, freed or overwritten meanwhile. Finished reads are forgotten by
:meth:`forget_finished_reads`, which only commands call; queries never change the table.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from kvtier.tiering.state.tier import FIRST_LOWER, Tier, is_lower

LOWER = "lower"  # any lower tier, in ``LEGAL``
# The legal transitions of a page (``PageTable._set`` checks them with ``debug``): mapped fresh, moved between
# the GPU and the tiers below and between lower tiers, restored below from a kept tier, lost, dropped, given back.
_GPU, _UNMAPPED = int(Tier.GPU), int(Tier.UNMAPPED)  # numpy compares an array with a plain int ~5x faster

LEGAL = {(Tier.UNMAPPED, Tier.GPU), (Tier.UNMAPPED, LOWER), (Tier.GPU, Tier.UNMAPPED), (Tier.GPU, LOWER),
         (LOWER, Tier.GPU), (LOWER, LOWER), (Tier.GPU, Tier.LOST), (LOWER, Tier.LOST), (Tier.GPU, Tier.DROPPED),
         (LOWER, Tier.DROPPED), (LOWER, Tier.UNMAPPED), (Tier.LOST, Tier.UNMAPPED), (Tier.DROPPED, Tier.UNMAPPED)}


def _kind(place: int) -> Any:
    return LOWER if is_lower(place) else Tier(place)


class PageTable:
    """Where each page's data is; its transition methods are the only writers (see the module docstring)."""

    def __init__(self, num_pages: int, num_regions: int, debug: bool = False) -> None:
        self.num_regions, self.debug = num_regions, debug
        self.tier = np.zeros(num_pages, dtype=np.int8)  # a place per page: a Tier or a lower tier's id
        self.slots: dict[int, list[int]] = {}
        self.moving: dict[int, Any] = {}
        self.copies: dict[int, tuple[int, list[int]]] = {}
        self.written_in_flight: set[int] = set()  # pages written while coming up: their old slots are no copy
        self.reading: dict[int, Any] = {}  # lower pages a read is copying from: they stay until it is done
        self.shared: set[int] = set()  # GPU pages mapped with handles mapped elsewhere too (another space, page)
        self.arriving: set[int] = set()  # vacant pages being mapped fresh without the lock (map-ahead): not vacant

    # --- queries (no side effects) --------------------------------------------------------------------------
    def tier_of(self, page: int) -> int:
        return int(self.tier[page])

    def lower_mask(self) -> np.ndarray:
        """Pages in a lower tier."""
        return self.tier >= FIRST_LOWER

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
        """Pages whose free blocks may be handed out now: on the GPU, not in flight, not shared."""
        mask = self.tier == _GPU
        if self.moving or self.reading:  # mostly neither: each allocation of a new request asks (~1 us spared)
            mask &= ~self.moving_mask()
        if self.shared:
            mask[list(self.shared)] = False
        return mask

    def vacant(self) -> np.ndarray:
        """Pages that hold no data anywhere and are not being mapped: free to map fresh."""
        mask = self.tier == _UNMAPPED
        if self.arriving:
            mask[list(self.arriving)] = False
        return mask

    def count(self, tier: int) -> int:
        return int((self.tier == tier).sum())

    def pages_in(self, tier: int) -> list[int]:
        return np.flatnonzero(self.tier == tier).tolist()

    # --- transitions: the only writers of the table (callers hold the manager's lock) ------------------------------
    # Each returns the slots that leave the table, as (tier, slots) for the tier's books to take back.
    def _set(self, pages: Iterable[int] | int, dst: int) -> None:
        idx = np.asarray(pages if not isinstance(pages, (int, np.integer)) else [pages], dtype=np.int64)
        if self.debug and idx.size:
            for src in set(self.tier[idx].tolist()):
                assert (_kind(src), _kind(dst)) in LEGAL and src != dst, f"page table: {src} -> {dst} is not a " \
                    "transition"
        self.tier[idx] = dst
        if self.shared and dst != _GPU:
            self.shared.difference_update(idx.tolist())

    def mapped(self, pages: Iterable[int]) -> None:
        """Vacant (or arriving) pages were mapped fresh (an allocation, map-ahead): on the GPU, empty."""
        pages = list(pages)
        self._set(pages, Tier.GPU)
        if self.arriving:
            self.arriving.difference_update(pages)

    def arrive(self, pages: Iterable[int]) -> None:
        """Vacant pages are being mapped fresh without the lock (map-ahead): no plan may take them meanwhile;
        ``mapped`` or ``not_arrived`` ends it."""
        self.arriving.update(pages)

    def not_arrived(self, pages: Iterable[int]) -> None:
        """Arriving pages whose mapping failed or was given up: vacant again."""
        self.arriving.difference_update(pages)

    def aliased(self, pages: Iterable[int]) -> None:
        """Vacant pages were mapped with another space's handles for the same pages: on the GPU, shared."""
        pages = list(pages)
        self._set(pages, Tier.GPU)
        self.shared.update(pages)

    def share(self, pages: Iterable[int]) -> None:
        """GPU pages (not in flight) whose handles are now mapped elsewhere too: shared (their kept copies stay valid: nothing
        writes them while shared)."""
        self.shared.update(pages)

    def unshared(self, pages: Iterable[int]) -> None:
        """Shared pages now hold handles of their own (or the other mapping is gone)."""
        self.shared.difference_update(pages)

    def restored(self, page: int, tier: int, slots: list[int]) -> None:
        """A vacant page takes the data a kept tier restored at start (``slots`` there, one a region)."""
        self._set(page, tier)
        self.slots[page] = list(slots)

    def unmapped(self, pages: Iterable[int]) -> list[tuple[int, list[int]]]:
        """GPU pages were unmapped (freed, reclaimed, closed): vacant; their kept copies go."""
        pages = list(pages)
        freed = [self.copies.pop(p) for p in pages if p in self.copies]
        self._set(pages, Tier.UNMAPPED)
        return freed

    def start_move(self, page: int, handle: Any) -> None:
        self.moving[page] = handle

    def start_read(self, page: int, handle: Any) -> None:
        self.reading[page] = handle

    def written(self, page: int) -> tuple[int, list[int]] | None:
        """Tokens of ``page`` were (or are about to be) written: its kept copy goes, and a page still coming up
        will keep none when it lands."""
        if page in self.moving and self.moving[page].kind == "promote":
            self.written_in_flight.add(page)
        return self.copies.pop(page, None)

    def take_copy(self, page: int) -> list[int]:
        """The kept copy's slots, for a move down that copies nothing (they become the page's home below)."""
        return self.copies.pop(page)[1]

    def landed(self, page: int, src: int, dst: int, taken: list[Any], keep_copy: bool) -> \
            tuple[int, list[int]] | None:
        """A move committed: ``dst`` holds the page (``taken``: its slots there). Coming up, the slots below stay
        as a copy if ``keep_copy`` and nothing was written meanwhile -- in this one step, so that no one sees the
        page out of flight with its copy not yet recorded. Returns the source slots to give back."""
        self.moving.pop(page, None)
        written = page in self.written_in_flight
        self.written_in_flight.discard(page)
        freed = self.copies.pop(page, None) if src == Tier.GPU else None  # none is kept for a page leaving
        if is_lower(src):
            slots = self.slots.pop(page)
            if dst == Tier.GPU and keep_copy and not written:
                self.copies[page] = (src, slots)  # equal to the page's bytes until written
            else:
                freed = (src, slots)
        self._set(page, dst)
        if is_lower(dst):
            self.slots[page] = taken
        return freed

    def failed(self, page: int) -> None:
        """A move did not land: the page is out of flight where it was."""
        self.moving.pop(page, None)
        self.written_in_flight.discard(page)

    def lost(self, page: int) -> tuple[int, list[int]] | None:
        """The page's data cannot be had back (a read failed, bytes failed their digest, or half of it left the
        GPU): LOST until its sequences are freed; its slots below go back."""
        tier = self.tier_of(page)
        freed = (tier, self.slots.pop(page)) if is_lower(tier) else None
        self._set(page, Tier.LOST)
        return freed

    def dropped(self, page: int) -> tuple[int, list[int]] | None:
        """The engine will never read the page's tokens again (``drop_prefix``): its data goes."""
        tier = self.tier_of(page)
        freed = (tier, self.slots.pop(page)) if is_lower(tier) else self.copies.pop(page, None)
        self._set(page, Tier.DROPPED)
        return freed

    def released(self, page: int) -> list[tuple[int, list[int]]]:
        """The page lost its last live block: below, lost or dropped, it becomes vacant; on the GPU it keeps its
        mapping (the space unmaps it once its readers are done) and loses its copy."""
        tier = self.tier_of(page)
        if tier == Tier.GPU:
            return [self.copies.pop(page)] if page in self.copies else []
        freed = [(tier, self.slots.pop(page))] if is_lower(tier) else []
        if tier != Tier.UNMAPPED:
            self._set(page, Tier.UNMAPPED)
        return freed

    def cleared(self) -> list[tuple[int, list[int]]]:
        """The space closes (nothing in flight): every slot it holds below, pages and copies."""
        freed = [(self.tier_of(p), slots) for p, slots in self.slots.items()] + list(self.copies.values())
        self.slots.clear()
        self.copies.clear()
        return freed

    def forget_finished_reads(self) -> None:
        for p in [p for p, h in self.reading.items() if h.done()]:
            del self.reading[p]

    def check(self, live: np.ndarray, mapped: Iterable[int]) -> None:
        """Each page in exactly one tier, with the resources that tier needs and no others."""
        on_gpu = set(self.pages_in(Tier.GPU))
        assert all(self.tier[p] == _UNMAPPED for p in self.arriving), "a page arriving that holds data"
        promoting = {p for p, h in self.moving.items() if h.kind == "promote"}
        assert set(mapped) == on_gpu | promoting, "pages mapped that are not on (or coming to) the GPU"
        lower = set(np.flatnonzero(self.lower_mask()).tolist())
        for p in lower:
            assert len(self.slots.get(p, ())) == self.num_regions, f"page {p} lacks slots"
            assert live[p] > 0, f"page {p} holds data of no live block"
        assert set(self.slots) == lower, "slots held by pages not in a lower tier"
        assert set(self.copies) <= on_gpu, "a copy kept for a page that is not on the GPU"
        assert self.shared <= on_gpu and not self.shared & set(self.moving), "a shared page off the GPU or moving"
        assert self.written_in_flight <= promoting, "a written mark on a page not coming up"
        for p, (tier, slots) in self.copies.items():
            assert is_lower(tier) and len(slots) == self.num_regions, f"copy of page {p}"
