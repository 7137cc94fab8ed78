"""NVMe admission filter, usable with any policy: only pages used at least ``min_uses`` times may go to NVMe
(as Dynamo's KVBM does, to spare SSD wear on one-off data). A page refused by the filter stays where it is."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from kvtier.policies.base import Candidate, PageRef


class NvmeAdmission:
    def __init__(self, inner: Any, min_uses: int) -> None:
        self.inner, self.min_uses = inner, min_uses
        self.name = f"{inner.name}+nvme_min_uses={min_uses}"

    def __getattr__(self, attr: str) -> Any:  # on_create, on_use, ... go to the wrapped policy
        return getattr(self.inner, attr)

    def victims(self, candidates: Iterable[PageRef], n: int) -> list[PageRef]:
        return self.inner.victims(candidates, n)

    def place(self, ref: PageRef, tier_from: str, candidates: Sequence[Candidate]) -> str | None:
        tier = self.inner.place(ref, tier_from, candidates)
        if tier == "nvme" and self.inner.uses(ref) < self.min_uses:
            return None
        return tier
