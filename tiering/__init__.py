"""Tiers below the GPU (plug-ins: pinned host slots and NVMe slots are built in), the page table, demotion plans,
transfers and background demotion. Imports only ``kvtier.vmm``, ``kvtier.policies``, ``kvtier.errors`` and
``kvtier.config``; what it needs from the layer above is stated by the Protocols in ``interfaces``.

Its names are imported when first used (``kvtier.tiering.registry`` -- read by ``config check --schema-only``
-- needs no torch)."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"ChecksumMismatch": "digest", "SpaceDirectory": "interfaces", "TieredSpace": "interfaces",
         "FileLayer": "nvme", "PosixFiles": "nvme", "PageTable": "pagetable", "DemotionPlan": "plans",
         "PlannedMove": "plans", "TierContext": "registry", "known_tiers": "registry", "register_tier": "registry",
         "FIRST_LOWER": "tier", "IO_ALIGN": "tier", "HostSlots": "tier", "LowerTier": "tier", "Tier": "tier",
         "TierStack": "tier", "is_lower": "tier", "Tiering": "tiering", "Mover": "mover", "Move": "transfer",
         "PairsFailed": "transfer", "TransferHandle": "transfer", "Work": "transfer"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"kvtier.tiering.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kvtier.tiering' has no attribute {name!r}")
