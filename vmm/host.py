"""Linux virtual-memory backend: the CPU stand-in for CUDA VMM, with the same semantics.

Reserve: ``mmap(PROT_NONE, MAP_NORESERVE)``. Physical pages: slots of one memfd. Map: ``mmap(MAP_SHARED |
MAP_FIXED)`` of a slot at the page's address. Unmap: an anonymous ``PROT_NONE`` mapping put back over the range,
so touching it faults exactly as a kernel touching an unmapped CUDA page would. Release: the slot's memory is
punched out of the memfd and the slot is reused.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from typing import Any, Sequence

import torch

from kvtier.vmm.tensor import tensor_over

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_NORESERVE = 0x4000
_PROT_NONE = 0
_MAP_FIXED = 0x10
_MAP_POPULATE = 0x8000
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def _check_mmap(result: int | None, what: str) -> int:
    if result is None or result == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def map_anonymous(size: int) -> int:
    """Plain page-aligned host memory (exact size: no power-of-two rounding as in torch's pinned allocator),
    populated up front as pinning would, so first copies into it do not pay page faults."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_POPULATE
    return _check_mmap(_libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0), "mmap(host)")


def unmap_anonymous(address: int, size: int) -> None:
    if _libc.munmap(address, size) != 0:
        raise OSError(ctypes.get_errno(), "munmap(host)")


class HostBackend:
    name = "host"
    granularity = mmap.PAGESIZE
    default_page_size = 8 << 20  # same as the CUDA default, so CPU runs mirror the GPU's page counts

    def __init__(self, index: int = 0) -> None:
        """``index``: which stand-in device (``cpu:N``): each has pages of its own and a ledger of its own, so two
        of them stand in for two GPUs of one host (the peer tier's tests)."""
        self.device = torch.device("cpu")
        self.index = index
        self.device_key = "host" if not index else f"host-{index}"
        self._fd = os.memfd_create("kvtier-pages", os.MFD_CLOEXEC)
        self._slot_size: int | None = None
        self._slots = 0                 # slots the memfd has room for
        self._free_slots: list[int] = []
        self._slot_lock = threading.Lock()  # the pool creates from its worker thread while others release

    def describe(self) -> dict[str, Any]:
        return {"backend": "host", "device": f"cpu:{self.index}" if self.index else "cpu",
                "granularity": self.granularity,
                "why": "no usable CUDA device, or device='cpu' was asked for"}

    def free_memory(self) -> int:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        return os.sysconf("SC_AVPHYS_PAGES") * mmap.PAGESIZE

    def reserve(self, size: int, alignment: int) -> int:
        # Over-reserve by one alignment, then trim, so the base is aligned as on CUDA.
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        raw = _check_mmap(_libc.mmap(None, size + alignment, _PROT_NONE, flags, -1, 0), "mmap(reserve)")
        base = (raw + alignment - 1) // alignment * alignment
        if base > raw:
            _libc.munmap(raw, base - raw)
        tail = raw + size + alignment - (base + size)
        if tail:
            _libc.munmap(base + size, tail)
        return base

    def free_reservation(self, address: int, size: int) -> None:
        if _libc.munmap(address, size) != 0:
            raise OSError(ctypes.get_errno(), "munmap(reservation)")

    def create(self, size: int) -> int:
        with self._slot_lock:
            if self._slot_size is None:
                self._slot_size = size
            if size != self._slot_size:
                raise ValueError(f"host backend pages are all {self._slot_size} bytes, not {size}")
            if self._free_slots:
                return self._free_slots.pop()
            slot = self._slots
            self._slots += 1
            os.ftruncate(self._fd, self._slots * size)  # sparse: memory is used only once written
            return slot

    def release(self, handle: int) -> None:
        assert self._slot_size is not None
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if _libc.fallocate(self._fd, mode, handle * self._slot_size, self._slot_size) != 0:
            raise OSError(ctypes.get_errno(), "fallocate(PUNCH_HOLE)")
        with self._slot_lock:
            self._free_slots.append(handle)

    def map(self, address: int, page_size: int, handles: Sequence[int]) -> None:
        flags = mmap.MAP_SHARED | _MAP_FIXED
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        for i, slot in enumerate(handles):
            at = address + i * page_size
            _check_mmap(_libc.mmap(at, page_size, prot, flags, self._fd, slot * page_size), "mmap(map page)")

    def unmap(self, address: int, size: int) -> None:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED | _MAP_NORESERVE
        _check_mmap(_libc.mmap(address, size, _PROT_NONE, flags, -1, 0), "mmap(unmap)")

    def pin(self, address: int, size: int) -> None:
        return None  # no device to DMA from: plain memory is what the CPU backend copies from

    def unpin(self, address: int) -> None:
        return None

    def record_fence(self, stream: Any = None) -> None:
        return None  # CPU work through torch is synchronous: nothing to wait for

    def synchronize(self) -> None:
        return None

    def copy_async(self, dst: int, src: int, nbytes: int, stream: Any = None) -> None:
        ctypes.memmove(dst, src, nbytes)

    def tensor(self, address: int, nbytes: int) -> torch.Tensor:
        return tensor_over(address, nbytes, self.device)

    def close(self) -> None:
        os.close(self._fd)
