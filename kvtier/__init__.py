"""kvtier: a virtual KV-cache address space on GPU virtual memory, for LLM serving engines.

Quick start::

    import kvtier
    with kvtier.TierManager(kvtier.Config()) as mgr:
        space = mgr.create_space("llama", num_layers=32, num_kv_heads=8, head_dim=128, max_tokens=65536)
        blocks = space.allocate("req-1", 8192)     # pages mapped now
        k, v = space.kv(0)                         # [num_blocks, block_size, heads, head_dim], never moves
        space.free("req-1")
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from kvtier import errors
from kvtier.errors import (ClosedError, ConfigError, CudaError, DeviceError, InvalidArgumentError, KVTierError,
                           LedgerError, NotResidentError, OutOfPagesError, QuotaExceededError, SpaceFullError,
                           TierFullError, TransferError, UnknownSequenceError)

try:
    __version__ = version("kvtier")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

# Imported when first used: the operator's commands (kvtier ls, top, limit, config check --schema-only) read the
# ledger and the config only, and must answer at once, without importing torch.
_LAZY = {"Config": "kvtier.config", "TierManager": "kvtier.manager", "KVSpace": "kvtier.space",
         "TransferHandle": "kvtier.tiering"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kvtier' has no attribute {name!r}")


__all__ = ["Config", "TierManager", "KVSpace", "errors", "KVTierError", "ConfigError", "InvalidArgumentError",
           "DeviceError", "CudaError", "OutOfPagesError", "QuotaExceededError", "SpaceFullError", "LedgerError",
           "UnknownSequenceError", "NotResidentError", "ClosedError", "TierFullError", "TransferError",
           "TransferHandle", "__version__"]
