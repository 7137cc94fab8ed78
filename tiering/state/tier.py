"""Where a page can be, and what a tier below the GPU must provide.

A page's place is an integer in its space's page table: one of the fixed states of :class:`Tier` (``UNMAPPED``,
``GPU``, ``LOST``, ``DROPPED``), or the id of a lower tier. Lower tiers are plug-ins (``tiering/tiers/registry.py``):
the configured ones (``[tiers] order``, nearest the GPU first) are numbered from ``FIRST_LOWER`` in that order by
a :class:`TierStack`, which also turns ids into names and back. Names appear only at the edges: the public API
(``offload(tier="host")``), the policies' interface, the stats and the metrics.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, Iterator, Protocol, runtime_checkable

import torch

from kvtier.errors import InvalidArgumentError
from kvtier.tiering.state.slots import SlotBooks


IO_ALIGN = 4096  # lengths and offsets of slot I/O: O_DIRECT's logical block (a page moves in whole ones)


class Tier(IntEnum):
    """The places a page can be that are no tier below the GPU. A page in flight keeps its source until its
    transfer commits."""

    UNMAPPED = 0  # no data anywhere: free to map fresh
    GPU = 1       # mapped: one physical handle per region
    LOST = 2      # a read back failed: the sequences on it must be recomputed
    DROPPED = 3   # the engine dropped the data on purpose (tokens it will never read again, e.g. out of a window)

    @property
    def label(self) -> str:
        return self.name.lower()


FIRST_LOWER = 4  # the id of the first configured lower tier; the next ones follow in order


def is_lower(place: int) -> bool:
    """Whether a page-table value names a lower tier (slots hold the page's data)."""
    return place >= FIRST_LOWER


class LowerTier(Protocol):
    """A tier below the GPU: fixed-size slots, one (layer, K|V) region of one page per slot.

    Contract:
    - ``name`` is its label (``offload(tier=name)``, the stats, the metrics) and, for a plug-in, its TOML section;
      ``id`` is set by the :class:`TierStack` it is part of.
    - ``books`` allocates slots: ``can_take(n)`` has no side effect, ``take(n)`` returns ``n`` slots or raises
      :class:`kvtier.errors.TierFullError` changing nothing, ``give(slots)`` returns them; ``capacity`` may grow
      while the tier is being built.
    - ``register_routes(mover, stack)`` registers with the ``Mover`` the copies it serves: to and from the GPU,
      and between itself and the other tiers of ``stack`` it can reach (``Mover.register``). Each route returns a
      ``Work`` (a device event and/or host steps) and reports failed pages by raising ``PairsFailed``; the move is
      then undone (the source stays the truth) or, for a read back, the page is reported lost. A failed copy is
      never reported as landed. Automatic plans use only the pairs that have a route.
    - ``watermarks`` is ``(low, high)``, fractions of its slots: above ``high`` the background demoter drops kept
      copies, then moves its coldest pages to the tiers below until ``low`` (``None``: it never cascades).
    - ``failed_read_loses``: a read back from it that fails means its bytes cannot be had (a disk): the page is
      lost. Otherwise a failed read leaves the page where it is (bytes that fail their digest are lost anyway).
    - ``held(slot)`` is what the slot holds (a prefix: a page moves its live bytes only); ``describe()`` plain
      facts for ``mgr.stats()``; ``wait_ready()`` blocks until it is built whole (a tier built in the
      background); ``close()`` releases everything, after every transfer has been waited for.
    """

    name: str
    id: int
    slot_size: int
    books: SlotBooks
    watermarks: tuple[float, float] | None
    failed_read_loses: bool

    def register_routes(self, mover: Any, stack: "TierStack") -> None: ...

    def held(self, slot: int) -> int: ...

    def describe(self) -> dict[str, Any]: ...

    def wait_ready(self, timeout: float | None = None) -> bool: ...

    def close(self) -> None: ...


@runtime_checkable
class ElasticTier(Protocol):
    """A lower tier whose size follows a budget it shares with others (the peer tier: another GPU's ledger).

    The background demoter calls ``rebalance()`` every tick, under the manager's lock: the tier grows, or gives
    back free slots (``SlotBooks.remove_free``), as its budget says, and returns how many of its *used* slots it
    still owes; the demoter then drops kept copies there and moves that many slots' worth of its pages down, and
    the tier gives those slots back at a later tick, once they are free."""

    def rebalance(self) -> int: ...


@runtime_checkable
class HostSlots(Protocol):
    """A lower tier whose slots are host memory a device copy or a file's I/O can reach (the host tier). Other
    tiers use it: the NVMe tier stages GPU pages through its lent slots and reads and writes its slots -- with
    ``O_DIRECT``, so each slot starts on an ``IO_ALIGN`` boundary."""

    name: str
    id: int
    books: SlotBooks
    digests: Any  # a Digests, or None (no checksums)
    backend: Any

    def view(self, slot: int) -> torch.Tensor: ...

    def data(self, slot: int) -> torch.Tensor: ...

    def address(self, slot: int) -> int: ...

    def hold(self, slot: int, nbytes: int) -> None: ...

    def held(self, slot: int) -> int: ...


class TierStack:
    """The configured lower tiers, nearest the GPU first, numbered from ``FIRST_LOWER``: the one place that
    turns a tier's id into its name and back."""

    def __init__(self, tiers: list[LowerTier]) -> None:
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise InvalidArgumentError(f"tiers {names}: each tier may appear once")
        for i, tier in enumerate(tiers):
            tier.id = FIRST_LOWER + i
        self.tiers = list(tiers)
        self._by_name = {t.name: t for t in tiers}

    def __iter__(self) -> Iterator[LowerTier]:
        return iter(self.tiers)

    def __len__(self) -> int:
        return len(self.tiers)

    @property
    def ids(self) -> list[int]:
        return [t.id for t in self.tiers]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tiers]

    def __getitem__(self, tier_id: int) -> LowerTier:
        return self.tiers[tier_id - FIRST_LOWER]

    def get(self, name: str) -> LowerTier | None:
        return self._by_name.get(name)

    def named(self, name: str) -> int:
        """The id of the tier called ``name`` (a lower tier)."""
        tier = self._by_name.get(name)
        if tier is None:
            raise InvalidArgumentError(f"{name!r} is not a tier of this manager (its tiers: "
                                       f"{', '.join(self.names) or 'none'}; see [tiers] order)")
        return tier.id

    def label(self, place: int) -> str:
        """The name of a page-table value: a fixed state's (``gpu``, ``lost``...) or a lower tier's."""
        return self[place].name if is_lower(place) else Tier(place).label

    def below(self, place: int) -> list[int]:
        """The lower tiers below ``place`` (all of them below the GPU), nearest first."""
        return [t.id for t in self.tiers if t.id > place] if is_lower(place) else self.ids

    def storage(self) -> list[tuple[str, int]]:
        """(name, value) of every place that holds data, nearest first: the GPU, then each lower tier."""
        return [("gpu", int(Tier.GPU))] + [(t.name, t.id) for t in self.tiers]
