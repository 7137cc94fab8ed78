"""The policy interface: the tiering layer tells a policy about pages and asks it which go down, and where.

A page is named by a :class:`PageRef` (space name, page index). Policies keep their own state; they never move
bytes or touch the page table (mechanics stay in ``kvtier.tiering``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol


@dataclass(frozen=True)
class PageRef:
    space: str
    page: int


class Policy(Protocol):
    name: str

    def on_create(self, ref: PageRef, priority: int) -> None:
        """A page got its first live block (mapped on the GPU)."""

    def on_use(self, ref: PageRef) -> None:
        """A page was used: allocated into, prefetched, or its sequence returned."""

    def on_remove(self, ref: PageRef) -> None:
        """A page holds no live block any more, in any tier."""

    def victims(self, candidates: Iterable[PageRef], n: int) -> list[PageRef]:
        """Up to ``n`` of ``candidates`` to demote first, coldest first. Returning fewer is always safe."""

    def target_tier(self, ref: PageRef, tier_from: str) -> str:
        """Where a page leaving ``tier_from`` ("gpu" or "host") should go: "host" or "nvme"."""
