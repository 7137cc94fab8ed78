"""Torch tensors over raw virtual address ranges, through a hand-built DLPack capsule.

Why DLPack rather than ``__cuda_array_interface__``: torch's array-interface path asks the runtime which device
owns the pointer (``cudaPointerGetAttributes``), which is not defined for a reserved range whose first page is
not mapped yet. A DLPack tensor names its device explicitly, so torch wraps the address as it is. The tensor does
not own the memory: the space that reserved the range keeps it alive and must outlive every use of the tensor.
"""

from __future__ import annotations

import ctypes
import threading

import torch

_KDL_CPU, _KDL_CUDA = 1, 2
_KDL_UINT = 1


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    pass


_Deleter = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _Deleter)]

# Structures handed to torch stay alive here until torch calls the deleter (it reads the deleter field then).
# Reentrant: a garbage collection inside ``tensor_over`` may free an older tensor, whose deleter runs right there.
_live: dict[int, tuple[_DLManagedTensor, ctypes.Array]] = {}
_live_lock = threading.RLock()


@_Deleter
def _release(managed: ctypes.POINTER(_DLManagedTensor)) -> None:  # type: ignore[valid-type]
    with _live_lock:
        _live.pop(ctypes.addressof(managed.contents), None)


_PyCapsule_New = ctypes.pythonapi.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def tensor_over(address: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A 1-D ``uint8`` tensor of ``nbytes`` at ``address`` on ``device``, not owning the memory."""
    shape = (ctypes.c_int64 * 1)(nbytes)
    managed = _DLManagedTensor()
    managed.dl_tensor.data = address
    if device.type == "cuda":
        managed.dl_tensor.device = _DLDevice(_KDL_CUDA, device.index or 0)
    else:
        managed.dl_tensor.device = _DLDevice(_KDL_CPU, 0)
    managed.dl_tensor.ndim = 1
    managed.dl_tensor.dtype = _DLDataType(_KDL_UINT, 8, 1)
    managed.dl_tensor.shape = shape
    managed.dl_tensor.strides = None
    managed.dl_tensor.byte_offset = 0
    managed.deleter = _release
    with _live_lock:
        _live[ctypes.addressof(managed)] = (managed, shape)
    capsule = _PyCapsule_New(ctypes.addressof(managed), b"dltensor", None)
    return torch.utils.dlpack.from_dlpack(capsule)


def memoryview_over(tensor: torch.Tensor) -> memoryview:
    """A writable buffer over a contiguous CPU tensor's bytes (no copy), for POSIX I/O."""
    array = (ctypes.c_uint8 * (tensor.numel() * tensor.element_size())).from_address(tensor.data_ptr())
    return memoryview(array).cast("B")
