"""Tiers below the GPU (pinned host slots, NVMe slots), the page table, demotion plans, transfers and background
demotion. Imports only ``kvtier.vmm``, ``kvtier.policies``, ``kvtier.errors`` and ``kvtier.config``; what it
needs from the layer above is stated by the Protocols in ``interfaces``."""

from kvtier.tiering.digest import ChecksumMismatch
from kvtier.tiering.interfaces import SpaceDirectory, TieredSpace
from kvtier.tiering.nvme import FileLayer, PosixFiles
from kvtier.tiering.pagetable import PageTable
from kvtier.tiering.plans import DemotionPlan, PlannedMove
from kvtier.tiering.tier import IO_ALIGN, LOWER, STORAGE, LowerTier, Tier
from kvtier.tiering.tiering import Tiering
from kvtier.tiering.mover import Mover
from kvtier.tiering.transfer import Move, TransferHandle

__all__ = ["IO_ALIGN", "LOWER", "STORAGE", "ChecksumMismatch", "DemotionPlan", "FileLayer", "LowerTier", "Move",
           "Mover", "PageTable", "PlannedMove", "PosixFiles", "SpaceDirectory", "Tier", "TieredSpace", "Tiering",
           "TransferHandle"]
