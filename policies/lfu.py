"""``lfu``: the least frequently used page goes down first, LRU among equals.

Frequency-aware, so a one-off scan (a long prompt read once) does not push out pages that are used again and
again, as it would under LRU. Counts halve every ``half_life`` seconds, so old popularity fades.
"""

from __future__ import annotations

import math
import time
from typing import Callable

from kvtier.errors import ConfigError
from kvtier.policies.base import BookkeepingPolicy, PageRef
from kvtier.policies.registry import register_policy


@register_policy("lfu")
class LFUPolicy(BookkeepingPolicy):
    name = "lfu"

    def __init__(self, half_life: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        if isinstance(half_life, bool) or not isinstance(half_life, (int, float)) or not half_life > 0:
            raise ConfigError(f"[policy] half_life: {half_life!r} must be a number of seconds > 0")
        self.half_life = half_life

    def _key(self, ref: PageRef, now: float) -> tuple:
        last = self._last.get(ref, float("-inf"))
        decay = math.exp2(-(now - last) / self.half_life) if last > float("-inf") else 0.0
        return (self._uses.get(ref, 0) * decay, last)
