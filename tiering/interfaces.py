"""What the tiering layer needs from the layer above it, as Protocols it owns.

The tiering layer never imports the manager or the space: the manager hands it a :class:`SpaceDirectory` and
each space satisfies :class:`TieredSpace`. Both contracts are small on purpose; everything else about a space
(its blocks, its sequences' growth, its quota) stays above.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Hashable, Iterable, Protocol

import torch

from kvtier.tiering.state.pagetable import PageTable


class Arrival(Protocol):
    """Fresh pages booked to be mapped without the lock (see ``TieredSpace.start_map_ahead``)."""

    def arrive(self) -> None:
        """Map them (the driver calls); a failure is kept for the landing, never raised."""


class TieredSpace(Protocol):
    """One space's pages, as tiering sees them.

    - ``pages`` is the space's page table; tiering changes it only under the directory's ``lock``.
    - ``region_view(region, page)`` is the device memory of one mapped page in one region; ``live_bytes(page)``
      how much of it, from its start, holds live blocks (rounded up to whole I/O blocks): what a move carries.
    - ``map_pages(pages, handles, on_region)`` maps vacant pages with ``num_regions`` handles each (page after
      page), region after region, calling ``on_region(r)`` once region ``r`` is mapped: all or nothing, and on
      failure the handles go back to the pool.
    - ``unmap_pages(pages)`` unmaps GPU pages whose last reader has finished and gives their handles back to the
      pool; the page table entries become ``Tier.UNMAPPED`` (the caller sets where the data went). With
      ``still_below``, pages mapped for a promotion that failed: unmapped, their entries and copies untouched.
    - ``unmap_regions(page, regions)`` unmaps some regions of a GPU page going down whose copies have landed and
      gives their handles back; the page stays mapped (and on the GPU in the books) until ``unmap_pages`` takes
      the rest. ``mapped_regions(page)`` lists the regions of a mapped page still mapped.
    - ``sequences_on(pages)`` names the sequences with blocks on any of ``pages`` (to report lost pages).
    - ``idle_pages()`` lists GPU pages, not in flight, whose live blocks all belong to idle sequences.
    - ``takes_writes(page)`` says whether an engine may write into the page without a call that tells (it holds
      a sequence's last block, which fills token by token): such a page keeps no copy below when it comes up.
    - ``idle_fence`` is a fence after the kernels of the space's last offload: copies down wait for it.
    - ``layout_tag`` names the space's layout (what makes a page's bytes readable by another space of the same
      name); ``prefix_blocks(page)`` lists the indexed whole blocks on ``page`` as ``(index within the page, key,
      salt)``: what a kept tier's journal notes when the page lands there.
    - ``maps_ahead`` says whether the background demoter may map fresh empty pages into the space, up to its
      reserve, from what the pool has free (no reclaim, no demotion): ``start_map_ahead()`` books them (None:
      nothing to map), the arrival's ``arrive()`` maps them without the lock, ``land_map_ahead(arrival)`` lands
      them under it (whatever ``arrive`` did) and returns how many are mapped.
    """

    name: str
    num_regions: int
    page_size: int
    pages: PageTable
    idle_fence: Any
    maps_ahead: bool
    layout_tag: list[Any]

    def region_view(self, region: int, page: int) -> torch.Tensor: ...

    def live_bytes(self, page: int) -> int: ...

    def map_pages(self, pages: list[int], handles: list[Any],
                  on_region: Callable[[int], None] | None = None) -> None: ...

    def unmap_pages(self, pages: list[int], still_below: bool = False) -> None: ...

    def unmap_regions(self, page: int, regions: list[int]) -> None: ...

    def mapped_regions(self, page: int) -> list[int]: ...

    def sequences_on(self, pages: Iterable[int]) -> list[Hashable]: ...

    def idle_pages(self) -> list[int]: ...

    def takes_writes(self, page: int) -> bool: ...

    def start_map_ahead(self) -> Arrival | None: ...

    def land_map_ahead(self, arrival: Arrival) -> int: ...

    def prefix_blocks(self, page: int) -> list[tuple[int, bytes, bytes]]: ...


class SpaceDirectory(Protocol):
    """The manager, as tiering sees it.

    - ``lock`` guards every page table and the pool's books; tiering takes it to commit transfers.
    - ``tiered_spaces()`` lists the open spaces.
    - ``pages_changed()`` is called (under the lock) whenever committed transfers may have made room, so that
      callers waiting for pages plan again.
    - ``cache_counters()`` sums what the prefix caches found (blocks hit, tokens not computed, hits by where the
      blocks rested): published on the device's ledger for ``kvtier top``.
    """

    lock: threading.RLock

    def tiered_spaces(self) -> list[TieredSpace]: ...

    def pages_changed(self) -> None: ...

    def cache_counters(self) -> dict[str, int]: ...
