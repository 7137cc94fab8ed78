"""A transformers ``Cache`` whose keys and values live in kvtier spaces::

    cache = TieredCache(model.config, max_tokens=32768, resident_layers=None)
    model.generate(input_ids, past_key_values=cache, max_new_tokens=256)

Each layer is a space of its own (one model layer: K and V regions), all sharing one manager's page pool, so a
layer's pages can leave the GPU and come back independently of the others. Each batch row owns a fixed run of
blocks, so a layer's past is one strided view of the space's tensor: ``update`` writes the new tokens in place
and returns views -- no per-step copy of the cache.

``resident_layers`` layers stay on the GPU during decode (``None``: as many as the pool's budget holds at
``max_tokens``, less three streaming slots); the others (``streamed_layers``, spread among the resident ones)
stream: when layer ``l`` starts, layer ``l-1`` -- whose attention has been enqueued -- is offloaded if it streams
(its copies and unmaps wait on the compute stream, so they never race the kernels), and the next streamed layers
are prefetched, as many as the pool has room for, to land while the layers before them compute. A pool of two
streamed layers is enough (a prefetch then waits for ``l-1`` to leave).
When not every layer is resident, a prefill (more than one new token) sends every layer down after use, so that
its activations -- the peak of a long prompt -- have the GPU memory; the first decode step brings the resident
layers back.
Pages keep their host copy when they come up (``Config.keep_copies``), so going down again copies only the pages
the new tokens were written to: a decode step moves the streamed KV up once, and a few pages down.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvtier.config import Config
from kvtier.errors import InvalidArgumentError
from kvtier.manager import TierManager


class TieredLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: "TieredCache", index: int) -> None:
        super().__init__()
        self.cache, self.index, self.length = cache, index, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values = self.cache._update(self, key_states, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        # transformers 5.2x passes the query length; earlier 5.x releases pass ``cache_position`` (the new tokens'
        # positions), and a tensor here would cost a materialised mask -- or a wrong one -- on every layer
        new = query_length.shape[0] if isinstance(query_length, torch.Tensor) else query_length
        return self.length + new, 0

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


class TieredCache(Cache):
    """See the module docstring. ``manager``: share an existing :class:`TierManager` (default: one is made on
    the first update's device with ``config`` or defaults). ``offload_tier``: where streamed layers go
    ("host" or "nvme")."""

    def __init__(self, model_config: Any, max_tokens: int = 32768, batch_size: int = 1,
                 manager: TierManager | None = None, config: Config | None = None,
                 resident_layers: int | None = None, offload_tier: str = "host", block_size: int = 16,
                 name: str = "tiered-cache") -> None:
        num_layers = model_config.num_hidden_layers
        super().__init__(layers=[TieredLayer(self, i) for i in range(num_layers)])
        if offload_tier not in ("host", "nvme"):
            raise InvalidArgumentError(f"offload_tier {offload_tier!r}: use 'host' or 'nvme'")
        self.num_kv_heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
        self.head_dim = getattr(model_config, "head_dim", None) or \
            model_config.hidden_size // model_config.num_attention_heads
        self.rows, self.block_size, self.name = batch_size, block_size, name  # Cache.batch_size reads layers
        self.blocks_per_row = math.ceil(max_tokens / block_size)
        self.max_tokens = self.blocks_per_row * block_size
        self.manager, self._own_manager, self._config = manager, manager is None, config
        self.resident_layers, self.offload_tier = resident_layers, offload_tier
        self.spaces: list[Any] = []
        self._pending: dict[int, Any] = {}  # layer -> prefetch handle
        self._streamed: set[int] = set()  # layers that stream during decode
        self._lookahead = 1  # streamed layers brought up ahead of the one computing
        self._slots = 2  # layers the pool holds beside the resident ones
        self._ahead: list[list[int]] = []  # per layer: the streamed layers to bring up when it starts
        self._down: set[int] = set()  # layers offloaded and not yet brought back

    # --- set-up on the first update (the dtype and device come with the first key states) ------------------------
    def _setup(self, key_states: torch.Tensor) -> None:
        if self.manager is None:
            device = str(key_states.device) if key_states.device.type == "cuda" else "cpu"
            self.manager = TierManager((self._config or Config()).replace(device=device))
        n = len(self.layers)
        for i in range(n):
            self.spaces.append(self.manager.create_space(
                f"{self.name}.L{i}", num_layers=1, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                dtype=key_states.dtype, block_size=self.block_size, max_tokens=self.rows * self.max_tokens))
        per_layer = self.spaces[0].page_bytes * self.spaces[0].num_pages
        fits = self.manager.pool.budget_pages * self.manager.page_size // per_layer  # layers at full length
        resident = self.resident_layers
        if resident is None:  # as many as the pool holds, less three streaming slots
            resident = n if fits >= n else max(0, fits - 3)
        streamed = n - min(n, resident)
        # spread out, so that each streamed layer's copy overlaps the compute of the resident ones before it
        self._streamed = {(2 * k + 1) * n // (2 * streamed) for k in range(streamed)}
        self._slots = fits - (n - streamed)
        self._lookahead = max(1, min(self._slots - 2, streamed - 1))  # a slot each for the current and the last
        self._ahead = [[j for j in ((i + k) % n for k in range(1, n)) if j in self._streamed][:self._lookahead]
                       for i in range(n)]

    @property
    def streamed_layers(self) -> list[int]:
        """The layers that stream during decode (known after the first update)."""
        return sorted(self._streamed)

    def _rows(self) -> range:
        return range(self.rows)

    # --- the step ---------------------------------------------------------------------------------------------------
    def _update(self, layer: TieredLayer, key_states: torch.Tensor,
                value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.spaces:
            self._setup(key_states)
        i, n = layer.index, len(self.layers)
        batch, heads, new, dim = key_states.shape
        if batch != self.rows:
            raise InvalidArgumentError(f"TieredCache was made for batch_size {self.rows}, got {batch}")
        space = self.spaces[i]
        stream = torch.cuda.current_stream(key_states.device) if key_states.is_cuda else None
        if self._streamed:
            self._stream_around(i, stream, prefill=new > 1)
        pending = self._pending.pop(i, None)
        if pending is None and i in self._down:  # not brought up ahead (the first decode step, a reset)
            pending = space.prefetch(self._rows())
            self._down.discard(i)
        if pending is not None:
            pending.wait(stream)  # this layer's pages are on the GPU before its attention reads them
        start, stop = layer.length, layer.length + new
        if stop > self.max_tokens:
            raise InvalidArgumentError(f"TieredCache holds {self.max_tokens} tokens a row; raise max_tokens")
        for row in self._rows():  # also tells kvtier which pages change (their kept copies are stale now)
            space.allocate(row, stop, first_block=row * self.blocks_per_row)
        rows_k, rows_v = (t.view(self.rows, self.max_tokens, heads, dim) for t in space.kv(0))
        rows_k[:, start:stop] = key_states.transpose(1, 2)
        rows_v[:, start:stop] = value_states.transpose(1, 2)
        layer.length = stop
        return rows_k[:, :stop].transpose(1, 2), rows_v[:, :stop].transpose(1, 2)

    def _stream_around(self, i: int, stream: Any, prefill: bool) -> None:
        """Layer ``i`` is next. Offload the one before (its attention is enqueued on ``stream``; the copies and
        unmaps wait for it), then start bringing up the next streamed layers, as many as the pool has slots for,
        so that each lands while the layers before it compute. During a prefill every layer goes down after use
        (the activations need the room); the first decode step brings the resident layers back for good."""
        n = len(self.layers)
        # map the next layers before the copies down start where the pool has room: mapping waits for copies
        # down in flight, and those wait for the step's kernels
        early = not prefill and self._slots >= self._lookahead + 2
        if early:
            self._bring_up(i)
        previous = (i - 1) % n
        if previous != i and previous not in self._down and self.layers[previous].length and \
                (prefill or previous in self._streamed):
            handles = [self.spaces[previous].offload(row, tier=self.offload_tier, stream=stream)
                       for row in self._rows()]
            self._down.add(previous)
            if prefill:  # the host runs ahead of a long prefill: wait for the layer to be gone, so that one
                for handle in handles:  # layer's pages are in use beside the activations (the peak)
                    handle.result()
        if not prefill and not early:
            self._bring_up(i)

    def _bring_up(self, i: int) -> None:
        """Prefetch the resident layers still down (the first decode step) and the next streamed ones."""
        returning = sorted(self._down - self._streamed)
        for j in returning + self._ahead[i]:
            if j in self._down and self.layers[j].length:
                self._pending[j] = self.spaces[j].prefetch(self._rows())
                self._down.discard(j)

    def _reset_layer(self, layer: TieredLayer) -> None:
        self._down.discard(layer.index)
        if self.spaces:
            handle = self._pending.pop(layer.index, None)
            if handle is not None:
                handle.result()
            for row in self._rows():
                if row in self.spaces[layer.index].sequences():
                    self.spaces[layer.index].free(row)
        layer.length = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].length if layer_idx < len(self.layers) else 0

    def residency(self) -> dict[str, int]:
        """Bytes of this cache per tier, over every layer and row."""
        total = {"gpu": 0, "host": 0, "nvme": 0, "lost": 0}
        for space in self.spaces:
            for row in space.sequences():
                for tier, nbytes in space.residency(row).items():
                    total[tier] += nbytes
        return total

    def close(self) -> None:
        """Give the pages back (and close the manager if this cache made it)."""
        for handle in self._pending.values():
            handle.result()
        self._pending.clear()
        if self.manager is not None:
            if self._own_manager:
                self.manager.close()
            else:
                for space in self.spaces:
                    self.manager.drop_space(space.name)
        self.spaces.clear()
