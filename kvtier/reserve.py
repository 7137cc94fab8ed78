"""How many empty pages a space keeps mapped: as many as its largest allocation of the last ``window`` seconds
took (at least one), at most ``cap`` (``space_reserve_pages``). ``window`` 0 keeps ``cap`` always.

Why follow demand: a fixed reserve of two pages held 1 GiB of a Llama-3-8B-shaped space mapped for nothing while
one sequence grew 16 tokens at a time, which took one page at a time (``bench peers``, H100, 70c754c: 2474 MiB
held against kvcached's 1792). Why a short window: a reserve sized down costs an allocation that needs more at
most one page's mapping, 2.1-2.7 ms for 64 regions (33-42 us a handle, H100, 93bffd3), and then the reserve
follows it again -- at 0.5 s, at most ~0.5 % of the time of a workload whose bursts come just too rarely. Why at
least one: a new request's first blocks then find a mapped page, whatever came before. An empty page over the
target but within the cap is unmapped only once it has been empty for the window too (``KVSpace._trim``):
requests that come and go keep their pages meanwhile instead of unmapping one and mapping another each time.

The background demoter maps the reserve without the manager's lock (``Arrival``): under it, the 2.1-2.7 ms of a
page's mapping stalled every allocation meanwhile, the growth's outliers in ``bench peers`` (H100, 2faf649:
the growth's total 10.2 ms against 512 calls of 12.6 us at its median).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable


class ReserveDemand:
    """The pages recent allocations took, as a falling sequence of (when, pages): an entry that a later, larger
    one outlasts can never be the largest again, so it is dropped -- the books stay as short as the window's
    distinct record sizes."""

    def __init__(self, cap: int, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.cap, self.window, self._clock = cap, window, clock
        self.least = min(cap, 1)  # no target is below it
        self._took: deque[tuple[float, int]] = deque()

    def took(self, pages: int) -> None:
        """An allocation took ``pages`` empty or unmapped pages."""
        if not self.window or pages <= 0:
            return
        while self._took and self._took[-1][1] <= pages:
            self._took.pop()
        self._took.append((self._clock(), pages))

    def now(self) -> float:
        return self._clock()

    def target(self) -> int:
        """Empty pages to keep mapped now."""
        if not self.window or not self.cap:
            return self.cap
        since = self._clock() - self.window
        while self._took and self._took[0][0] < since:
            self._took.popleft()
        return min(self.cap, max(1, self._took[0][1] if self._took else 1))


class Arrival:
    """Fresh pages of one space booked as arriving (``KVSpace.start_map_ahead``, under the lock), mapped by
    ``arrive`` (without it: only this holder touches them) and landed by ``KVSpace.land_map_ahead`` (under it
    again). ``settle`` waits until they have landed -- an allocation that needs fresh pages meanwhile waits
    for them, as for a transfer, rather than mapping others beside them."""

    def __init__(self, space: Any, pages: list[int]) -> None:
        self.space, self.pages = space, pages
        self.error: BaseException | None = None
        self.seconds = 0.0
        self._landed = threading.Event()

    def arrive(self) -> None:
        """The driver calls; a failure is kept for the landing (which gives the handles back)."""
        try:
            self.seconds = self.space.range.arrive(self.pages)
        except BaseException as exc:  # noqa: BLE001 - landed and reported by land_map_ahead
            self.error = exc

    def landed(self) -> None:
        self._landed.set()

    def done(self) -> bool:
        return self._landed.is_set()

    def settle(self) -> None:
        self._landed.wait()
