"""``priority``: lower-priority pages go down first, LRU within a priority class.

Aging guard: a page's priority falls by one for every ``aging_seconds`` it sits unused, so a high-priority
sequence that went idle long ago does not keep its pages on the GPU forever while busy low-priority traffic is
evicted again and again.
"""

from __future__ import annotations

import time
from typing import Callable

from kvtier.errors import ConfigError
from kvtier.policies.base import BookkeepingPolicy, PageRef
from kvtier.policies.registry import register_policy


@register_policy("priority")
class PriorityPolicy(BookkeepingPolicy):
    name = "priority"

    def __init__(self, aging_seconds: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        if isinstance(aging_seconds, bool) or not isinstance(aging_seconds, (int, float)) or not aging_seconds > 0:
            raise ConfigError(f"[policy] aging_seconds: {aging_seconds!r} must be a number of seconds > 0")
        self.aging_seconds = aging_seconds

    def effective_priority(self, ref: PageRef, now: float) -> float:
        idle = now - self._last.get(ref, now)
        return self._priority.get(ref, 0) - idle // self.aging_seconds

    def _key(self, ref: PageRef, now: float) -> tuple:
        return (self.effective_priority(ref, now), self._last.get(ref, float("-inf")))
