"""CUDA driver virtual-memory backend (cuda-python's ``cuda.bindings.driver``), on torch's primary context.

Every driver call's result is checked; a failure raises :class:`kvtier.errors.CudaError` naming the call and
the CUDA error. ``map`` maps a run of handles back to back and sets access once for the whole run (fewer calls;
measured on an H100 the driver's cost stays ~27 us per handle either way, so the page size is the real lever).
Nearly all of it is ``cuMemSetAccess``, whose cost follows the handles it covers (~25 us each with 8 MiB pages;
one call over 64 pages as slow as 64 calls) and which waits for device-to-host copies in flight; ``cuMemMap``
takes ~2 us.
A range unmapped and mapped again needs its access set again (without it a kernel's access is illegal).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator, Sequence

import torch

from kvtier.errors import CudaError, DeviceError
from kvtier.vmm.fences import DriverFence, EventPool
from kvtier.vmm.tensor import tensor_over

try:
    from cuda.bindings import driver as _drv
except ImportError:  # pragma: no cover - depends on the install
    _drv = None


def available() -> bool:
    """True when cuda-python and a CUDA device are both present."""
    return _drv is not None and torch.cuda.is_available()


def unavailable_reason() -> str | None:
    """Why this backend cannot run here, or None."""
    if _drv is None:
        return "cuda-python is not installed (install kvtier[cu12] or kvtier[cu13])"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


def peer_access(index: int, peer: int) -> bool:
    """Whether device ``index`` can read and write memory on device ``peer`` (NVLink or PCIe peer-to-peer)."""
    if _drv is None or index == peer:
        return False
    _check("cuInit", _drv.cuInit(0))
    dev, other = _check("cuDeviceGet", _drv.cuDeviceGet(index)), _check("cuDeviceGet", _drv.cuDeviceGet(peer))
    return bool(_check("cuDeviceCanAccessPeer", _drv.cuDeviceCanAccessPeer(dev, other)))


def device_address(host_address: int) -> int | None:
    """The address at which the GPU reaches pinned host memory (the same one where addressing is unified), or
    None where it cannot or this cannot be asked (no cuda-python)."""
    if _drv is None:
        return None
    attribute = _drv.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_POINTER
    err, address = _drv.cuPointerGetAttribute(attribute, host_address)
    return int(address) if err == _drv.CUresult.CUDA_SUCCESS and int(address) else None


def _check(call: str, result: Any) -> Any:
    """Unpack a cuda-python result tuple, raising CudaError on failure."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != _drv.CUresult.CUDA_SUCCESS:
        _, name = _drv.cuGetErrorName(err)
        _, text = _drv.cuGetErrorString(err)
        raise CudaError(call, name.decode() if name else str(err), text.decode() if text else "")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@contextlib.contextmanager
def context_kept() -> Iterator[None]:
    """Whatever context the calling thread has current is current again afterwards: a backend of another device
    (the peer tier's) binds its own for its calls, and torch would otherwise see that device as the current one."""
    if _drv is None:
        yield
        return
    before = _check("cuCtxGetCurrent", _drv.cuCtxGetCurrent())
    try:
        yield
    finally:
        _drv.cuCtxSetCurrent(before)


class CudaBackend:
    name = "cuda"
    _live = 0  # backends open in the process: more than one (the peer tier's), and contexts are checked per call
    granularity: int
    # Measured on an H100 (README, "Choosing the page size"): map + set-access costs ~27 us per handle whatever
    # its size, so an 8k-token Llama-3-8B allocation (1 GiB) takes 14 ms with 2 MiB handles and 3.8 ms with 8 MiB.
    default_page_size = 8 << 20

    def __init__(self, index: int) -> None:
        if _drv is None:
            raise DeviceError("device 'cuda' needs cuda-python: install kvtier[cu12] or kvtier[cu13]")
        if not torch.cuda.is_available():
            raise DeviceError("device 'cuda' asked for, but torch sees no CUDA device (use device='cpu')")
        if not 0 <= index < torch.cuda.device_count():
            raise DeviceError(f"cuda:{index} does not exist: this machine has {torch.cuda.device_count()} "
                              "CUDA device(s)")
        self.device = torch.device("cuda", index)
        # streams looked up by index: given a torch.device, torch resolves it on every call (5 us of a free's fence
        # under cProfile, H100, d8a2b52); what the index saves was not measured on its own
        self.index = index
        torch.cuda.init()
        with torch.cuda.device(index):
            torch.cuda.current_stream()  # makes torch create (and set current) the primary context
        _check("cuInit", _drv.cuInit(0))
        self._dev = _check("cuDeviceGet", _drv.cuDeviceGet(index))
        self._ctx = _check("cuDevicePrimaryCtxRetain", _drv.cuDevicePrimaryCtxRetain(self._dev))
        CudaBackend._live += 1
        self._bound = threading.local()
        self._bind()
        self._events = EventPool(self._bind, index, _check)
        attr = _drv.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
        if not _check("cuDeviceGetAttribute", _drv.cuDeviceGetAttribute(attr, self._dev)):
            raise DeviceError(f"cuda:{index} does not support CUDA virtual memory management")
        self._prop = _drv.CUmemAllocationProp()
        self._prop.type = _drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        self._prop.location.type = _drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._prop.location.id = index
        self.granularity = int(_check("cuMemGetAllocationGranularity", _drv.cuMemGetAllocationGranularity(
            self._prop, _drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM)))
        access = _drv.CUmemAccessDesc()
        access.location.type = _drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = index
        access.flags = _drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self.access = [access]  # public: raw-driver ceilings in the benchmarks use it
        # the GPU's UUID: the same device whatever CUDA_VISIBLE_DEVICES numbers it in each process
        props = torch.cuda.get_device_properties(self.device)
        self.device_key = f"cuda-{getattr(props, 'uuid', None) or f'{index}-{props.name}'}"

    def grant(self, index: int) -> None:
        """Let device ``index`` read and write what this backend maps from now on (its copy engines then copy to
        and from these pages: the peer tier's slots on another GPU)."""
        access = _drv.CUmemAccessDesc()
        access.location.type = _drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = index
        access.flags = _drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self.access.append(access)

    def _bind(self) -> None:
        # Driver calls act on the calling thread's current context; make it torch's primary one once per thread --
        # or, while a backend of another device is open too (the peer tier's), whenever another one is current.
        if CudaBackend._live > 1:
            current = _check("cuCtxGetCurrent", _drv.cuCtxGetCurrent())
            if current is None or int(current) != int(self._ctx):
                _check("cuCtxSetCurrent", _drv.cuCtxSetCurrent(self._ctx))
            return
        if not getattr(self._bound, "done", False):
            _check("cuCtxSetCurrent", _drv.cuCtxSetCurrent(self._ctx))
            self._bound.done = True

    def describe(self) -> dict[str, Any]:
        props = torch.cuda.get_device_properties(self.device)
        version = _check("cuDriverGetVersion", _drv.cuDriverGetVersion())
        return {"backend": "cuda", "device": str(self.device), "name": props.name,
                "memory_total": props.total_memory, "driver_cuda": f"{version // 1000}.{version % 1000 // 10}",
                "torch_cuda": torch.version.cuda, "vmm_supported": True, "granularity": self.granularity}

    def free_memory(self) -> int:
        self._bind()
        free, _total = _check("cuMemGetInfo", _drv.cuMemGetInfo())
        return int(free)

    def reserve(self, size: int, alignment: int) -> int:
        self._bind()
        return int(_check("cuMemAddressReserve", _drv.cuMemAddressReserve(size, alignment, 0, 0)))

    def free_reservation(self, address: int, size: int) -> None:
        self._bind()
        _check("cuMemAddressFree", _drv.cuMemAddressFree(address, size))

    def create(self, size: int) -> Any:
        self._bind()
        return _check("cuMemCreate", _drv.cuMemCreate(size, self._prop, 0))

    def release(self, handle: Any) -> None:
        self._bind()
        _check("cuMemRelease", _drv.cuMemRelease(handle))

    def map(self, address: int, page_size: int, handles: Sequence[Any]) -> None:
        self._bind()
        mapped = 0
        try:
            for i, handle in enumerate(handles):
                _check("cuMemMap", _drv.cuMemMap(address + i * page_size, page_size, 0, handle, 0))
                mapped += 1
            _check("cuMemSetAccess", _drv.cuMemSetAccess(address, mapped * page_size, self.access, len(self.access)))
        except CudaError:
            if mapped:  # leave nothing half-mapped behind: the caller's books say "unmapped"
                _drv.cuMemUnmap(address, mapped * page_size)
            raise

    def unmap(self, address: int, size: int) -> None:
        self._bind()
        _check("cuMemUnmap", _drv.cuMemUnmap(address, size))

    def pin(self, address: int, size: int) -> None:
        """Page-lock host memory for DMA (cuMemHostRegister), so copies to and from it run at PCIe speed."""
        self._bind()
        _check("cuMemHostRegister", _drv.cuMemHostRegister(address, size, 0))

    def unpin(self, address: int) -> None:
        self._bind()
        _check("cuMemHostUnregister", _drv.cuMemHostUnregister(address))

    def record_fence(self, stream: Any = None) -> DriverFence:
        return self._events.record(stream)  # a pooled driver event (kvtier.vmm.fences says why)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def copy_async(self, dst: int, src: int, nbytes: int, stream: Any = None) -> None:
        """One ``cuMemcpyAsync`` (unified addressing infers the direction). The tier moves use it rather than
        ``Tensor.copy_`` on views: the calling thread's cost per copy bounds short moves. H100: a 1024-token
        fault-back enqueues 64 copies of 2 MiB between its maps, 1.9 ms of its 5.7 ms with ``copy_``, 0.7 of 4.2
        this way."""
        self._bind()
        stream = stream if stream is not None else torch.cuda.current_stream(self.index)
        _check("cuMemcpyAsync", _drv.cuMemcpyAsync(dst, src, nbytes, stream.cuda_stream))

    def tensor(self, address: int, nbytes: int) -> torch.Tensor:
        return tensor_over(address, nbytes, self.device)

    def close(self) -> None:
        self._events.close()
        self._bind()
        _drv.cuDevicePrimaryCtxRelease(self._dev)
        CudaBackend._live -= 1
