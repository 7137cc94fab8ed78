"""Which backend a device string gets."""

from __future__ import annotations

import torch

from kvtier.errors import DeviceError
from kvtier.vmm import cuda as _cuda
from kvtier.vmm.base import Backend
from kvtier.vmm.host import HostBackend


def cuda_unavailable_reason() -> str | None:
    """Why the CUDA backend cannot be used here, or None when it can."""
    return _cuda.unavailable_reason()


def resolve_device(device: str) -> torch.device:
    """Turn a config device string into a concrete ``torch.device`` ("auto" picks CUDA when usable)."""
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if _cuda.available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"{device!r} is not a device (use 'auto', 'cpu', 'cuda' or 'cuda:N')") from exc
    if dev.type == "cuda":
        return torch.device("cuda", dev.index if dev.index is not None else 0)
    if dev.type != "cpu":
        raise DeviceError(f"device type {dev.type!r} is not supported (supported: 'cpu', 'cuda')")
    return dev


def open_backend(device: torch.device) -> Backend:
    """The backend for a resolved device."""
    if device.type == "cuda":
        return _cuda.CudaBackend(device.index or 0)
    return HostBackend(device.index or 0)
