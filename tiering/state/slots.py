"""The slot allocator shared by the lower tiers, and the free-piece counts plans simulate it with.

A tier's memory is a row of *frames*, one page of one region each. A frame may be split into ``pieces`` equal
*units* (a power of two): a slot is then an aligned run of 1, 2, 4 ... ``pieces`` units (a buddy allocator), so
that a page whose live bytes fit a quarter of a frame takes a quarter (a 1024-token sequence of a Llama-3-8B
shape holds 2 MiB per region of an 8 MiB page). A slot's id is its first unit; with ``pieces = 1`` a slot is a
frame and its id the frame's, as before. Counts (``total``, ``capacity``, ``free``, ``used``, ``lent``) are in
units.
"""

from __future__ import annotations

import threading
from typing import Iterable

from kvtier.errors import TierFullError


def _sizes(pieces: int) -> list[int]:
    return [1 << i for i in range(pieces.bit_length())]


class FreePieces:
    """Free slots of one tier by size, as a plan counts them: ``take`` splits the smallest free slot that fits,
    as :meth:`SlotBooks.take` does; ``give`` adds a slot without merging it with its buddy (the books merge, so
    they can always do what the counts say: with sizes that divide each other, a set of slots fits iff for every
    size the slots at least that large add up to no more than the free ones at least that large)."""

    def __init__(self, counts: dict[int, int], pieces: int) -> None:
        self.pieces = pieces
        self.counts = {s: counts.get(s, 0) for s in _sizes(pieces)}

    @classmethod
    def none(cls, pieces: int) -> "FreePieces":
        return cls({}, pieces)

    def copy(self) -> "FreePieces":
        return FreePieces(self.counts, self.pieces)

    def fits(self, size: int) -> int:
        """How many slots of ``size`` units could be taken."""
        return sum(n * (s // size) for s, n in self.counts.items() if s >= size)

    def can_take(self, n: int, size: int) -> bool:
        return self.fits(size) >= n

    def take(self, n: int, size: int) -> None:
        for _ in range(n):
            s = next(s for s in sorted(self.counts) if s >= size and self.counts[s])
            self.counts[s] -= 1
            while s > size:  # the split's other halves stay free
                s //= 2
                self.counts[s] += 1

    def give(self, size: int, n: int = 1) -> None:
        self.counts[size] += n

    def can_take_all(self, wanted: list[tuple[int, int]]) -> bool:
        """Whether every ``(n, size)`` of ``wanted`` could be taken, in that order (no side effects)."""
        left = self.copy()
        for n, size in wanted:
            if not left.can_take(n, size):
                return False
            left.take(n, size)
        return True


class SlotBooks:
    """Free slots of a tier (see the module docstring). ``capacity`` may grow while the tier is being built (host
    pinning in chunks).

    Contract: ``can_take(n, size)`` has no side effects; ``take(n, size)`` returns ``n`` slots of ``size`` units
    or raises TierFullError and changes nothing; giving back slots from ``take`` is always safe.
    """

    def __init__(self, tier: str, total: int, pieces: int = 1) -> None:
        """``total`` frames of ``pieces`` units each."""
        if pieces < 1 or pieces & (pieces - 1):
            raise ValueError(f"{tier} tier: pieces must be a power of two, not {pieces}")
        self.tier, self.pieces, self.total = tier, pieces, total * pieces
        self.capacity = 0
        self.lent = 0  # units lent as scratch space to transfers in flight
        self._free: dict[int, dict[int, None]] = {s: {} for s in _sizes(pieces)}  # size -> first units, in order
        self._size: dict[int, int] = {}  # every slot taken or lent -> its size in units
        self._lent: set[int] = set()
        self._lock = threading.Lock()

    # --- growing and shrinking (whole frames) ------------------------------------------------------------------
    def grow(self, first: int, count: int) -> None:
        """Frames ``first .. first + count - 1`` are ready."""
        with self._lock:
            whole = self._free[self.pieces]
            for f in range(first + count - 1, first - 1, -1):
                whole[f * self.pieces] = None
            self.capacity += count * self.pieces

    def add(self, slots: list[int]) -> None:
        """More frames, free (a tier whose size follows a budget: the peer tier, one unit a frame)."""
        assert self.pieces == 1, "only a tier of whole frames changes size"
        with self._lock:
            self._free[1].update(dict.fromkeys(slots))
            self.capacity += len(slots)
            self.total += len(slots)

    def remove_free(self, n: int) -> list[int]:
        """Up to ``n`` free frames out of the books for good (the tier gives their memory back); which ones."""
        assert self.pieces == 1, "only a tier of whole frames changes size"
        with self._lock:
            gone = [self._free[1].popitem()[0] for _ in range(min(n, len(self._free[1])))]
            self.capacity -= len(gone)
            self.total -= len(gone)
            return gone

    # --- queries -----------------------------------------------------------------------------------------------
    @property
    def used(self) -> int:
        return self.capacity - self.free

    @property
    def free(self) -> int:
        return sum(s * len(ids) for s, ids in self._free.items())

    def size(self, slot: int) -> int:
        """Units the slot (taken or lent) spans."""
        return self._size[slot]

    def units_for(self, nbytes: int, frame_bytes: int) -> int:
        """The size of the smallest slot that holds ``nbytes`` of a frame of ``frame_bytes``."""
        unit = frame_bytes // self.pieces
        size = 1
        while size < self.pieces and size * unit < nbytes:
            size *= 2
        return size

    def free_pieces(self) -> FreePieces:
        with self._lock:
            return FreePieces({s: len(ids) for s, ids in self._free.items()}, self.pieces)

    def can_take(self, n: int, size: int | None = None) -> bool:
        return self.free_pieces().can_take(n, size or self.pieces)

    # --- transitions -------------------------------------------------------------------------------------------
    def _take_one(self, size: int) -> int:
        s = next(s for s in sorted(self._free) if s >= size and self._free[s])
        slot = self._free[s].popitem()[0]
        while s > size:  # split: the upper half stays free
            s //= 2
            self._free[s][slot + s] = None
        self._size[slot] = size
        return slot

    def take(self, n: int, size: int | None = None) -> list[int]:
        """``n`` slots of ``size`` units (default: whole frames)."""
        size = size or self.pieces
        with self._lock:
            fits = sum(len(ids) * (s // size) for s, ids in self._free.items() if s >= size)
            if n > fits:
                raise TierFullError(f"{self.tier} tier full: {n} slot(s) of {size}/{self.pieces} frame wanted, room "
                                    f"for {fits}; {self.free} of {self.capacity} units free ({self.total} "
                                    "configured); raise its size")
            return [self._take_one(size) for _ in range(n)]

    def claim(self, slots: list[int], sizes: list[int] | None = None) -> None:
        """Take these free slots (pages restored into them), of ``sizes`` units (default: whole frames)."""
        with self._lock:
            for slot, size in zip(slots, sizes or [self.pieces] * len(slots)):
                s = next((s for s in sorted(self._free) if s >= size and (slot & ~(s - 1)) in self._free[s]), None)
                assert s is not None and slot % size == 0, f"{self.tier}: claimed slot {slot} is not free"
                base = slot & ~(s - 1)
                del self._free[s][base]
                while s > size:  # split, keeping the half that holds the slot
                    s //= 2
                    if slot >= base + s:
                        self._free[s][base] = None
                        base += s
                    else:
                        self._free[s][base + s] = None
                self._size[slot] = size

    def _give_one(self, slot: int) -> None:
        size = self._size.pop(slot)
        while size < self.pieces and (slot ^ size) in self._free[size]:  # merge with a free buddy
            del self._free[size][slot ^ size]
            slot, size = min(slot, slot ^ size), size * 2
        self._free[size][slot] = None

    def give(self, slots: Iterable[int]) -> None:
        with self._lock:
            for slot in slots:
                self._give_one(slot)

    def lend(self, n: int) -> list[int]:
        """Up to ``n`` whole free frames as scratch space for a transfer (they hold no page); back with
        :meth:`give_lent`."""
        with self._lock:
            fits = sum(len(ids) for s, ids in self._free.items() if s == self.pieces)
            taken = [self._take_one(self.pieces) for _ in range(min(n, fits))]
            self._lent.update(taken)
            self.lent += len(taken) * self.pieces
            return taken

    def give_lent(self, slots: list[int]) -> None:
        with self._lock:
            for slot in slots:
                self._lent.remove(slot)
                self.lent -= self._size[slot]
                self._give_one(slot)

    def check(self, in_use: list[int]) -> None:
        """The books against the slots the tier's users hold (pages, copies, moves in flight, restored pages)."""
        with self._lock:
            free = [(slot, s) for s, ids in self._free.items() for slot in ids]
            assert len(set(in_use)) == len(in_use), f"{self.tier}: a slot is held twice"
            assert set(in_use) | self._lent == set(self._size), \
                (self.tier, "slots taken but held by no one, or held but not taken",
                 sorted(set(self._size) ^ (set(in_use) | self._lent))[:8])
            assert not set(in_use) & self._lent, f"{self.tier}: a lent slot holds a page"
            spans = sorted([(slot, s) for slot, s in free] + list(self._size.items()))
            assert all(slot % s == 0 for slot, s in spans), f"{self.tier}: a slot not aligned to its size"
            assert all(a + s <= b for (a, s), (b, _) in zip(spans, spans[1:])), f"{self.tier}: slots overlap"
            assert sum(s for _, s in spans) == self.capacity, (self.tier, "units lost", self.capacity)
            assert self.lent == sum(self._size[s] for s in self._lent)
