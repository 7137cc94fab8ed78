"""A slot allocator shared by the lower tiers: fixed-size slots, a free list, and books that can be checked."""

from __future__ import annotations

import threading

from kvtier.errors import TierFullError


class SlotBooks:
    """Free list of slot ids. ``capacity`` may grow while the tier is being built (host pinning in chunks).

    Contract: ``can_take(n)`` has no side effects; ``take(n)`` returns ``n`` slots or raises TierFullError and
    changes nothing; giving back slots from ``take`` is always safe.
    """

    def __init__(self, tier: str, total: int) -> None:
        self.tier, self.total = tier, total
        self.capacity = 0
        self.lent = 0  # slots lent as scratch space to transfers in flight
        self._free: list[int] = []
        self._lock = threading.Lock()

    def grow(self, first: int, count: int) -> None:
        with self._lock:
            self._free.extend(range(first + count - 1, first - 1, -1))
            self.capacity += count

    def add(self, slots: list[int]) -> None:
        """More slots, free (a tier whose size follows a budget: the peer tier)."""
        with self._lock:
            self._free.extend(slots)
            self.capacity += len(slots)
            self.total += len(slots)

    def remove_free(self, n: int) -> list[int]:
        """Up to ``n`` free slots out of the books for good (the tier gives their memory back); which ones."""
        with self._lock:
            n = min(n, len(self._free))
            gone = self._free[len(self._free) - n:]
            del self._free[len(self._free) - n:]
            self.capacity -= n
            self.total -= n
            return gone

    @property
    def used(self) -> int:
        return self.capacity - len(self._free)

    @property
    def free(self) -> int:
        return len(self._free)

    def can_take(self, n: int) -> bool:
        return n <= len(self._free)

    def take(self, n: int) -> list[int]:
        with self._lock:
            if n > len(self._free):
                raise TierFullError(f"{self.tier} tier full: {n} slot(s) wanted, {len(self._free)} free of "
                                    f"{self.capacity} ready ({self.total} configured); raise its size")
            taken = self._free[len(self._free) - n:]
            del self._free[len(self._free) - n:]
            return taken

    def claim(self, slots: list[int]) -> None:
        """Take these free slots (pages restored into them)."""
        with self._lock:
            wanted = set(slots)
            assert len(wanted) == len(slots) and wanted <= set(self._free), f"{self.tier}: claimed slots not free"
            self._free = [s for s in self._free if s not in wanted]

    def give(self, slots: list[int]) -> None:
        with self._lock:
            self._free.extend(slots)

    def lend(self, n: int) -> list[int]:
        """Up to ``n`` free slots as scratch space for a transfer (they hold no page); back with :meth:`give_lent`."""
        with self._lock:
            n = min(n, len(self._free))
            taken = self._free[len(self._free) - n:]
            del self._free[len(self._free) - n:]
            self.lent += n
            return taken

    def give_lent(self, slots: list[int]) -> None:
        with self._lock:
            self._free.extend(slots)
            self.lent -= len(slots)

    def check(self, in_use: int) -> None:
        with self._lock:
            assert len(set(self._free)) == len(self._free), f"{self.tier}: a slot is free twice"
            assert self.capacity - len(self._free) == in_use + self.lent, \
                (self.tier, self.capacity, len(self._free), in_use, self.lent)
