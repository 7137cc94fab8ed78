"""``lru``: demote the least recently used page first; GPU pages go to host, host pages to NVMe."""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

from kvtier.policies.base import PageRef
from kvtier.policies.registry import register_policy


@register_policy("lru")
class LRUPolicy:
    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[PageRef, None] = OrderedDict()  # oldest first

    def on_create(self, ref: PageRef, priority: int) -> None:
        self._order[ref] = None
        self._order.move_to_end(ref)

    def on_use(self, ref: PageRef) -> None:
        self._order[ref] = None
        self._order.move_to_end(ref)

    def on_remove(self, ref: PageRef) -> None:
        self._order.pop(ref, None)

    def victims(self, candidates: Iterable[PageRef], n: int) -> list[PageRef]:
        wanted = set(candidates)
        picked = [ref for ref in self._order if ref in wanted][:n]
        if len(picked) < n:  # pages the policy never heard of are the coldest of all
            picked = [ref for ref in wanted if ref not in self._order][:n - len(picked)] + picked
        return picked[:n]

    def target_tier(self, ref: PageRef, tier_from: str) -> str:
        return "host" if tier_from == "gpu" else "nvme"
