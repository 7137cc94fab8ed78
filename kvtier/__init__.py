"""kvtier: a virtual KV-cache address space on GPU virtual memory, for LLM serving engines.

Quick start::

    import kvtier
    with kvtier.TierManager(kvtier.Config()) as mgr:
        space = mgr.create_space("llama", num_layers=32, num_kv_heads=8, head_dim=128, max_tokens=65536)
        blocks = space.allocate("req-1", 8192)     # pages mapped now
        k, v = space.kv(0)                         # [num_blocks, block_size, heads, head_dim], never moves
        space.free("req-1")
"""

from importlib.metadata import PackageNotFoundError, version

from kvtier import errors
from kvtier.config import Config
from kvtier.errors import (ClosedError, ConfigError, CudaError, DeviceError, InvalidArgumentError, KVTierError,
                           NotResidentError, OutOfPagesError, QuotaExceededError, SpaceFullError,
                           TierFullError, TransferError, UnknownSequenceError)
from kvtier.manager import TierManager
from kvtier.space import KVSpace
from kvtier.tiering import TransferHandle

try:
    __version__ = version("kvtier")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["Config", "TierManager", "KVSpace", "errors", "KVTierError", "ConfigError", "InvalidArgumentError",
           "DeviceError", "CudaError", "OutOfPagesError", "QuotaExceededError", "SpaceFullError",
           "UnknownSequenceError", "NotResidentError", "ClosedError", "TierFullError", "TransferError",
           "TransferHandle", "__version__"]
