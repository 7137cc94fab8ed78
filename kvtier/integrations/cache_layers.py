"""The pieces of :class:`~kvtier.integrations.transformers.TieredCache` that transformers sees per layer, and what
the cache needs to know of the installed transformers and the model's config."""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import CacheLayerMixin

if TYPE_CHECKING:
    from kvtier.integrations.transformers import TieredCache


class TieredLayer(CacheLayerMixin):
    """One model layer. A sliding-window layer (``window``: the model's sliding window) answers as
    DynamicSlidingWindowLayer does -- its mask sizes, and its keys (the last ``window - 1`` tokens) -- and keeps
    only about two windows of tokens: older pages are dropped (``KVSpace.drop_prefix``)."""

    is_compileable = False
    is_croppable = True

    def __init__(self, cache: "TieredCache", index: int, window: int | None = None) -> None:
        self.cache, self.index, self.length, self.window = cache, index, 0, window
        self.is_sliding = window is not None
        super().__init__()

    # The data lives in the cache's spaces: ``keys`` and ``values`` are read from there, never kept here, so they
    # cannot dangle (a layer's pages move between tiers, and ``reset`` frees them).
    @property
    def keys(self) -> torch.Tensor | None:
        return self.cache._layer_kv(self)[0]

    @keys.setter
    def keys(self, value: Any) -> None:
        pass

    @property
    def values(self) -> torch.Tensor | None:
        return self.cache._layer_kv(self)[1]

    @values.setter
    def values(self, value: Any) -> None:
        pass

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.cache._update(self, key_states, value_states)

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        # transformers 5.2x passes the query length; earlier 5.x releases pass ``cache_position`` (the new tokens'
        # positions), and a tensor here would cost a materialised mask -- or a wrong one -- on every layer
        new = query_length.shape[0] if isinstance(query_length, torch.Tensor) else query_length
        if self.window is None:
            return self.length + new, 0
        offset = max(self.length - self.window + 1, 0)  # as DynamicSlidingWindowLayer: the window and the new
        return (self.window - 1 + new if self.length >= self.window else self.length + new), offset

    def visible_from(self, length: int | None = None) -> int:
        """The first token a step after ``length`` tokens attends to (0 unless the layer slides)."""
        length = self.length if length is None else length
        return 0 if self.window is None else max(0, length - (self.window - 1))

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.cache.max_tokens

    def offload(self) -> None:  # the cache streams its pages itself
        return None

    def prefetch(self) -> None:
        return None

    def reset(self) -> None:
        self.cache._reset_layer(self)

    # batch operations and crop act on every layer at once (TieredCache overrides the Cache-level calls)
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.cache._remap_layer(self.index, beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.cache._remap_layer(self.index, self.cache._indices(indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.cache._remap_layer(self.index, torch.arange(self.cache.rows).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        self.cache._crop_layer(self.index, tokens_to_remove)


def _windows(model_config: Any, num_layers: int) -> list[int | None]:
    """Each layer's sliding window (None: full attention), as DynamicCache lays the model's layers out."""
    from transformers import DynamicCache
    try:
        layers = DynamicCache(config=model_config).layers
    except Exception:  # noqa: BLE001 - a config DynamicCache cannot lay out: full attention everywhere
        return [None] * num_layers
    windows = [getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None
               for layer in layers]
    return windows if len(windows) == num_layers else [None] * num_layers


@functools.cache
def cache_kwarg() -> str:
    """The keyword that hands a cache to ``model(...)`` / ``generate(...)`` in the installed transformers: ``cache``
    from 5.2x on, ``past_key_values`` before (still taken, with a deprecation warning)."""
    from transformers.generation import utils
    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


@functools.cache
def _dynamic_cache_item_arity() -> int:
    """How many items DynamicCache's iteration yields per layer in the installed transformers (2 or 3)."""
    from transformers import DynamicCache
    cache = DynamicCache()
    cache.update(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), 0)
    return len(next(iter(cache)))


ATTENTION_LAYERS = {"full_attention", "sliding_attention", "chunked_attention"}


def unsupported_reason(model_config: Any) -> str | None:
    """Why a TieredCache cannot hold this model's cache (it holds one K/V shape, the same for K and V, in every
    layer that updates the cache), or None."""
    if getattr(model_config, "kv_lora_rank", None):
        return ("multi-head latent attention (DeepSeek-V2/V3 and kin) caches keys and values of different widths; "
                "use DynamicCache")
    kinds = set(getattr(model_config, "layer_types", None) or ()) | \
        set(getattr(model_config, "layers_block_type", None) or ())
    other = sorted(str(k) for k in kinds - ATTENTION_LAYERS - {"attention"})
    if other:
        return (f"layers of kind {', '.join(other)} keep a recurrent state (Mamba, linear attention), not a paged KV "
                "cache; use the model's own cache")
    try:
        _kv_shape(model_config)
    except Exception as exc:  # noqa: BLE001 - heterogeneous configs refuse a global head_dim, say
        return f"its layers have no single K/V shape ({str(exc).splitlines()[0]})"
    return None


def _kv_shape(model_config: Any) -> tuple[int, int]:
    """K/V heads and head dim as the config says them (the first update's tensors are what the cache holds)."""
    heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    if getattr(model_config, "multi_query", False) and not getattr(model_config, "new_decoder_architecture", False):
        heads = 1  # Falcon's multi-query attention: one K/V head, whatever num_kv_heads says
    dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    return heads, dim


def _layer_bytes(token_bytes: int, row_tokens: int, rows: int, page_size: int) -> tuple[int, int]:
    """GPU bytes of one layer (K and V) at full length, and of a streamed layer's last page per row."""
    pages = math.ceil(rows * row_tokens * token_bytes / page_size)
    return 2 * pages * page_size, 2 * rows * page_size
