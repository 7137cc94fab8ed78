"""The tiers, and what a tier below the GPU must provide.

A page's tier is a :class:`Tier` (stored as its integer value in each space's page table). Strings appear only at
the edges: the public API (``offload(tier="host")``), the policies' interface and the stats' path names use each
tier's ``label``.

Adding a tier (a peer GPU's memory, a remote store) means: a value here, a module with a class that satisfies
:class:`LowerTier`, an entry in the ``Tiering``'s tier map, and the copy routes it serves registered with the
``Mover`` (``Mover.register(src, dst, route)``), one per (source, destination) pair. Nothing else branches on
the tier.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, Protocol

import torch

from kvtier.errors import InvalidArgumentError
from kvtier.tiering.slots import SlotBooks


IO_ALIGN = 4096  # lengths and offsets of slot I/O: O_DIRECT's logical block (a page moves in whole ones)

class Tier(IntEnum):
    """Where a page's data is. A page in flight keeps its source tier until its transfer commits."""

    UNMAPPED = 0  # no data anywhere: free to map fresh
    GPU = 1       # mapped: one physical handle per region
    HOST = 2      # pinned host slots, one per region
    NVME = 3      # slots of the NVMe file, one per region
    LOST = 4      # a read back failed: the sequences on it must be recomputed
    DROPPED = 5   # the engine dropped the data on purpose (tokens it will never read again, e.g. out of a window)

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def named(cls, label: str) -> "Tier":
        """The tier of a label (``"host"`` -> ``Tier.HOST``)."""
        try:
            return cls[label.upper()]
        except (KeyError, AttributeError):
            raise InvalidArgumentError(f"{label!r} is not a tier (tiers: "
                                       f"{', '.join(t.label for t in STORAGE)})") from None


STORAGE = (Tier.GPU, Tier.HOST, Tier.NVME)  # the tiers that hold data, nearest first
LOWER = (Tier.HOST, Tier.NVME)              # the tiers below the GPU, nearest first


class LowerTier(Protocol):
    """A tier below the GPU: fixed-size slots, one (layer, K|V) region of one page per slot.

    Contract:
    - ``books`` allocates slots: ``can_take(n)`` has no side effect, ``take(n)`` returns ``n`` slots or raises
      :class:`kvtier.errors.TierFullError` changing nothing, ``give(slots)`` returns them; ``capacity`` may grow
      while the tier is being built.
    - The tier serves copies through the routes it registers with the ``Mover`` (each route returns a ``Work``:
      a device event and/or host steps). A route reports failure by raising from a host step or from the
      future it waits on; the transfer is then undone (the source stays the truth) or, for a read back, the
      page is reported lost. A failed copy is never reported as landed.
    - ``describe()`` returns plain facts for ``mgr.stats()``; ``close()`` releases everything (after every
      transfer has been waited for).
    """

    tier: Tier
    slot_size: int
    books: SlotBooks

    def held(self, slot: int) -> int: ...  # bytes the slot holds: what was last written into it (a prefix)

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class HostAddressable(LowerTier, Protocol):
    """A lower tier whose slots are host memory a device copy can reach (the host tier)."""

    def view(self, slot: int) -> torch.Tensor: ...

    def data(self, slot: int) -> torch.Tensor: ...


class FileBacked(LowerTier, Protocol):
    """A lower tier whose slots are read and written by I/O calls returning futures (the NVMe tier)."""

    def write(self, slot: int, src: torch.Tensor) -> Any: ...

    def read(self, slot: int, dst: torch.Tensor) -> Any: ...
