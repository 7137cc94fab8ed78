"""``lru``: the least recently used page goes down first."""

from __future__ import annotations

from kvtier.policies.base import BookkeepingPolicy, PageRef
from kvtier.policies.registry import register_policy


@register_policy("lru")
class LRUPolicy(BookkeepingPolicy):
    name = "lru"

    def _key(self, ref: PageRef, now: float) -> tuple:
        return (self._last.get(ref, float("-inf")),)
