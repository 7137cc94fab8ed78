"""Tiers below the GPU (pinned host slots, NVMe slots), the page table, transfers and background demotion."""

from kvtier.tiering.pagetable import GPU, HOST, LOST, NVME, UNMAPPED, PageTable
from kvtier.tiering.tiering import Tiering
from kvtier.tiering.transfer import Move, Mover, TransferHandle

__all__ = ["GPU", "HOST", "LOST", "NVME", "UNMAPPED", "PageTable", "Tiering", "Move", "Mover", "TransferHandle"]
