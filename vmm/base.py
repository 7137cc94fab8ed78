"""The interface every virtual-memory backend implements.

A backend knows one device. It reserves virtual ranges (no memory), creates physical pages (handles), maps
handles into a reserved range and unmaps them. It does no bookkeeping: the pool and the spaces own the books.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch

Handle = Any  # an opaque physical-page handle of the backend


class Fence(Protocol):
    """Marks a point on a device stream; pages may be unmapped once it has completed."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


class Backend(Protocol):
    name: str                 # "cuda" or "host"
    device_key: str           # names the physical device across processes (the ledger's key)
    device: torch.device
    granularity: int          # smallest page size the backend can map, bytes
    default_page_size: int    # page size chosen by measurement for this backend

    def describe(self) -> dict[str, Any]:
        """Facts for ``kvtier info`` and benchmark headers."""

    def free_memory(self) -> int:
        """Bytes of physical memory free on the device now."""

    def reserve(self, size: int, alignment: int) -> int:
        """Reserve ``size`` bytes of virtual address space; return its base address. No memory is used."""

    def free_reservation(self, address: int, size: int) -> None:
        """Give back a reservation made by :meth:`reserve`; nothing in it may be mapped."""

    def create(self, size: int) -> Handle:
        """Create one physical page of ``size`` bytes."""

    def release(self, handle: Handle) -> None:
        """Free one physical page; it must not be mapped anywhere."""

    def map(self, address: int, page_size: int, handles: Sequence[Handle]) -> None:
        """Map ``handles`` back to back from ``address`` and make the whole run read-write in one go."""

    def unmap(self, address: int, size: int) -> None:
        """Unmap every page in ``[address, address + size)``; the range becomes unreadable."""

    def pin(self, address: int, size: int) -> None:
        """Page-lock host memory so the device can DMA from and to it (no-op where there is no device)."""

    def unpin(self, address: int) -> None:
        """Undo :meth:`pin`."""

    def record_fence(self, stream: Any = None) -> Fence | None:
        """A fence after the work queued so far on ``stream`` (default: the current one); None if synchronous."""

    def synchronize(self) -> None:
        """Wait until all work queued on the device has finished."""

    def copy_async(self, dst: int, src: int, nbytes: int, stream: Any = None) -> None:
        """Copy ``nbytes`` from address ``src`` to address ``dst`` (device pages or pinned host memory), enqueued on
        ``stream`` (a torch stream; default: the current one); where there is no device, now."""

    def tensor(self, address: int, nbytes: int) -> torch.Tensor:
        """A ``uint8`` tensor over ``[address, address + nbytes)`` that does not own the memory."""

    def close(self) -> None:
        """Release what the backend holds (its context's resources); every page is released and every reservation
        freed first. The manager calls it last."""
