"""How writes into a lower tier are going, so that a tier that keeps failing is backed off from, not hammered.

A full or failing disk fails every write the host->NVMe cascade tries; retried each tick it would burn I/O and
fill the log (measured before this: 244 warnings in 5 s). After a failed page write the tier is *degraded*: the
background demoter sees no room in it until a back-off has passed -- 20 ms, doubling per failed try up to 30 s --
then one try goes through. Room made for an allocate or a prefetch still tries the tier until three tries have
failed, then waits for its next try only when that is under a second away (``retry_soon``); an engine's explicit
``offload`` always tries, and hears of a failure through its handle. The log says it once when it starts and once
when it ends, with counts (a tier that fails again within a minute of recovering is not said again: it flaps, it
does not change); ``mgr.stats()["tiers"][tier]["health"]`` shows it meanwhile.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

log = logging.getLogger(__name__)


class WriteHealth:
    FIRST, LONGEST = 0.02, 30.0  # back-off after the first failure, and its cap (seconds)
    QUIET = 60.0  # seconds after a warning during which a new streak of failures is not said again

    def __init__(self, tier: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.tier, self.clock = tier, clock
        self.failures = 0        # failed page writes, ever
        self.streak = 0          # failed since the last success
        self.tries = 0           # tries that failed since the last success (the pages of one try fail together)
        self.since = 0.0         # when the streak began
        self.retry_at = 0.0
        self.last_error = ""
        self._said_at: float | None = None  # when the last "failing" warning was logged
        self._said = False  # whether this streak was said
        self._attempt: object = None  # the try the last failure was part of

    @property
    def degraded(self) -> bool:
        return self.streak > 0

    PATIENT = 3  # failed tries after which even a request waiting for room leaves the tier alone while it backs off

    def backing_off(self, on_demand: bool = False) -> bool:
        """Whether plans should leave this tier alone for now: the background demoter's after one failed try; a
        request that needs room (``on_demand``: an allocate, a prefetch) tries again until ``PATIENT`` tries
        have failed -- one bad write on a flaky disk should not refuse it, a dead disk should not hold it up."""
        if on_demand and self.tries < self.PATIENT:
            return False
        return self.streak > 0 and self.clock() < self.retry_at

    def retry_soon(self, within: float = 1.0) -> bool:
        """Whether the tier is backing off but will be tried again within ``within`` seconds: worth a request's
        wait (a flaky disk), where a long back-off (a dead one) is not."""
        now = self.clock()
        return self.streak > 0 and now < self.retry_at <= now + within

    def failed(self, error: BaseException, attempt: object = None) -> None:
        """A page write failed; ``attempt`` names the try it was part of (its transfer): the pages of one try
        count as one failed try."""
        now = self.clock()
        self.failures += 1
        self.streak += 1
        self.last_error = str(error)
        if self.streak == 1:
            self.since = now
            self._said = self._said_at is None or now - self._said_at >= self.QUIET
            if self._said:
                self._said_at = now
                log.warning("%s tier: writes are failing (%s; %d failed page write(s) so far); backing off (up to "
                            "%.0f s between tries), counting failures in stats()['tiers']['%s']['health']",
                            self.tier, error, self.failures, self.LONGEST, self.tier)
        if attempt is None or attempt is not self._attempt:  # a new try, not another page of the same one
            self._attempt = attempt
            self.tries += 1
            self.retry_at = now + min(self.LONGEST, self.FIRST * 2 ** min(self.tries - 1, 20))

    def succeeded(self) -> None:
        if self.streak and self._said:
            log.warning("%s tier: writes succeed again, after %d failed page write(s) over %.1f s (last: %s)",
                        self.tier, self.streak, self.clock() - self.since, self.last_error)
        self.streak = self.tries = 0
        self.retry_at = 0.0
        self._attempt = None

    def describe(self) -> dict[str, object]:
        return {"degraded": self.degraded, "failed_writes": self.failures, "failing_since_seconds":
                self.clock() - self.since if self.streak else 0.0, "last_error": self.last_error}
