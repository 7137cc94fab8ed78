"""Virtual memory: reserve address ranges, create physical pages, map and unmap them; one backend per platform.

Its names are imported when first used (``kvtier.vmm.ledger`` -- the operator's commands -- needs no torch)."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"Backend": "kvtier.vmm.base", "Fence": "kvtier.vmm.base", "Handle": "kvtier.vmm.base",
         "HostBackend": "kvtier.vmm.host", "MappedRange": "kvtier.vmm.mapped_range", "runs": "kvtier.vmm.mapped_range",
         "PagePool": "kvtier.vmm.pool", "cuda_unavailable_reason": "kvtier.vmm.devices",
         "open_backend": "kvtier.vmm.devices", "resolve_device": "kvtier.vmm.devices"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kvtier.vmm' has no attribute {name!r}")
