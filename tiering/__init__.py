"""Tiers below the GPU, in three parts: ``state`` (the page table, tiers and slot books, demotion plans),
``tiers`` (the plug-in registry; pinned host slots and NVMe slots are built in) and ``engine`` (commits, the
mover, transfers, background demotion). Imports only ``kvtier.vmm``, ``kvtier.policies``, ``kvtier.errors`` and
``kvtier.config``; what it needs from the layer above is stated by the Protocols in ``interfaces``.

Its names are imported when first used (``kvtier.tiering.tiers.registry`` -- read by ``config check --schema-only``
-- needs no torch)."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "FIRST_LOWER": "state.tier", "IO_ALIGN": "state.tier", "HostSlots": "state.tier", "ElasticTier": "state.tier",
    "LowerTier": "state.tier",
    "Tier": "state.tier", "TierStack": "state.tier", "is_lower": "state.tier", "PageTable": "state.pagetable",
    "DemotionPlan": "state.plans", "PlannedMove": "state.plans",
    "TierContext": "tiers.registry", "known_tiers": "tiers.registry", "register_tier": "tiers.registry",
    "ChecksumMismatch": "tiers.digest", "FileLayer": "tiers.nvme", "PosixFiles": "tiers.nvme",
    "Tiering": "engine.tiering", "Mover": "engine.mover", "Move": "engine.transfer", "PairsFailed": "engine.transfer",
    "TransferHandle": "engine.transfer", "Work": "engine.transfer",
    "SpaceDirectory": "interfaces", "TieredSpace": "interfaces"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"kvtier.tiering.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kvtier.tiering' has no attribute {name!r}")
