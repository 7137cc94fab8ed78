"""A transformers ``Cache`` whose keys and values live in kvtier spaces::

    cache = TieredCache(model.config, max_tokens=32768, resident_layers=None)
    model.generate(input_ids, cache=cache, max_new_tokens=256)   # past_key_values= before transformers 5.2x

Each layer is a space of its own (one model layer: K and V regions), all sharing one manager's page pool, so a
layer's pages can leave the GPU and come back independently of the others. Each batch row owns a fixed run of
blocks, so a layer's past is one strided view of the space's tensor: ``update`` writes the new tokens in place
and returns views -- no per-step copy of the cache.

``resident_layers`` layers stay on the GPU during decode (``None``: as many as the pool's budget holds at
``max_tokens`` beside the streaming ring). The others (``streamed_layers``, spread among the resident ones) keep
only their last page per row on the GPU; the pages their tokens have filled go down to host memory once
(``offload_prefix``) and are never written again. Each step, such a layer's past is *read* into one of two ring
slots -- spaces mapped once -- without mapping anything: the pages below are copied up ahead (as soon as the
slot's previous layer has run, on the transfer stream), and the GPU tail is copied in on the compute stream
when the layer starts. A decode step thus crosses PCIe once per streamed byte, upwards only, and makes no driver
calls.
When not every layer is resident, a prefill into an empty cache sends the layers down after use, so that its
activations -- the peak of a long prompt -- have the GPU memory; the next step (a decode step, or the next chunk of
a chunked prefill) brings the resident layers back.

The whole Cache contract: the batch is learned from the first update; ``reorder_cache`` (beam search),
``batch_select_indices``, ``batch_repeat_interleave`` and ``crop`` (assisted and prompt-lookup decoding) work as
DynamicCache's do. In a resident layer whose rows start on page boundaries, a row that takes another's past maps
that row's whole pages (``KVSpace.alias_pages``: beams over one prompt hold it once) and copies only the rest.
They bring a streamed layer's pages up one layer at a time, rewrite its rows on the GPU and send them down again,
so they cost a PCIe round trip of the streamed layers (beam search over streamed layers is correct, not fast). ``layers[i].keys`` / ``.values`` are always safe to read: views of the resident pages, or a
fresh copy when the layer's past lies below.
"""

from __future__ import annotations

import bisect
import math
from typing import Any, Iterator

import torch
from transformers.cache_utils import Cache

from kvtier.config import Config
from kvtier.errors import InvalidArgumentError, TransferError
from kvtier.integrations.cache_copies import CacheCopies
from kvtier.integrations.cache_layers import (TieredLayer, _dynamic_cache_item_arity, _kv_shape, _layer_bytes,
                                              _windows, cache_kwarg, unsupported_reason)
from kvtier.manager import TierManager

__all__ = ["TieredCache", "TieredLayer", "cache_kwarg"]

RING_SLOTS = 2  # one slot read by the layer computing, one filling for the next streamed layer


def _wait_down(handle: Any) -> None:
    """Wait for pages on their way down. A failed write leaves them where they were (the GPU), which is no error
    for a cache -- they are read from there; data lost (``TransferError.lost``) is, and propagates."""
    try:
        handle.result()
    except TransferError as failure:
        if failure.lost:
            raise


class TieredCache(Cache):
    """See the module docstring. ``batch_size``: the rows to reserve room for (default: the first update's
    batch; a larger batch later is taken too, at the cost of rebuilding the spaces). ``manager``: share an
    existing :class:`TierManager` (default: one is made on the first update's device with ``config`` or
    defaults). ``offload_tier``: where streamed layers' pages go (a tier of the manager's ``[tiers] order``:
    "host" or "nvme" by default)."""

    layers: list[TieredLayer]  # type: ignore[assignment]  # transformers' union of layer kinds: ours are all one

    def __init__(self, model_config: Any, max_tokens: int = 32768, batch_size: int | None = None,
                 manager: TierManager | None = None, config: Config | None = None,
                 resident_layers: int | None = None, offload_tier: str = "host", block_size: int = 16,
                 name: str = "tiered-cache") -> None:
        model_config = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") \
            else model_config
        why = unsupported_reason(model_config)
        if why is not None:
            raise InvalidArgumentError(f"TieredCache cannot hold a {getattr(model_config, 'model_type', '?')} "
                                       f"model's cache: {why}")
        num_layers = model_config.num_hidden_layers
        super().__init__(layers=[TieredLayer(self, i, w) for i, w in enumerate(_windows(model_config, num_layers))])
        tiers = (manager.config if manager is not None else config or Config()).tiers
        self._places = ["gpu", *tiers, "lost"]  # residency's keys
        if offload_tier not in tiers:
            raise InvalidArgumentError(f"offload_tier {offload_tier!r}: use one of the manager's tiers {tiers}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise InvalidArgumentError(f"batch_size must be a positive int or None, got {batch_size!r}")
        self.num_kv_heads, self.head_dim = _kv_shape(model_config)
        self.rows, self.block_size, self.name = batch_size or 0, block_size, name  # Cache.batch_size reads layers
        self.capacity = self.rows  # rows each space has room for
        self.blocks_per_row = math.ceil(max_tokens / block_size)
        self.max_tokens = self.blocks_per_row * block_size
        self.manager, self._own_manager, self._config = manager, manager is None, config
        self._users = [1]  # caches sharing the manager this one made (deepcopy): the last to close closes it
        self._closed = False
        self._copies = 0
        self.copies = CacheCopies(self)  # deep copies and row remaps by shared pages (cache_copies.py)
        self._idle = False  # kept for later copies (``idle``): its resident layers may rest below meanwhile
        self._asleep: set[int] = set()  # streamed layers whose rows ``idle`` made idle: woken as a step comes
        self._args = dict(model_config=model_config, max_tokens=max_tokens, batch_size=batch_size, config=config,
                          resident_layers=resident_layers, offload_tier=offload_tier, block_size=block_size)
        self.resident_layers, self.offload_tier = resident_layers, offload_tier
        self.spaces: list[Any] = []
        self._ring: list[Any] = []  # the ring slots: spaces of one layer's shape, mapped while decoding
        self._pending: dict[int, Any] = {}  # resident layer coming back -> its prefetch
        self._down: set[int] = set()  # resident layers sent down by a prefill, not yet back
        self._streamed: list[int] = []  # layers streamed during decode, in order
        self._settled: dict[int, list[int]] = {}  # streamed layer -> per row, the tokens kept below
        # streamed layer -> its ring slot, the reads ahead into it, and the tokens they cover per row
        self._reads: dict[int, tuple[int, list[Any], list[int]]] = {}
        self._slot_user: list[int | None] = [None] * RING_SLOTS  # the layer each ring slot is read for
        self._last = -1  # the layer of the previous update: its attention is enqueued by the next one
        self._allocated = [0] * num_layers  # tokens a row each layer's space holds (whole blocks)
        self._views: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._generation = 0  # spaces made so far (their names must differ on a shared manager)
        self._dropped = [[0] * self.rows for _ in range(num_layers)]  # sliding layers: tokens dropped, per row
        self._high = [0] * num_layers  # the furthest token each layer has written since the last reset
        # tokens a row below which a layer's pages may be shared with a copy of this cache (``__deepcopy__``): a
        # write there gives the layer pages of its own first
        self._shared_upto = [0] * num_layers
        # layers whose K/V later layers of the same forward read (KV sharing, e.g. Gemma 3n): the views their
        # update returns must stay valid until the forward ends -- never streamed, old pages dropped only as the
        # next forward starts; layers that reuse another's K/V never update the cache
        modes = list(getattr(model_config, "kv_sharing_modes", None) or [None] * num_layers)
        self._shared = {i for i, mode in enumerate(modes) if mode == "store"}
        self._reusing = {i for i, mode in enumerate(modes) if mode == "reuse"}

    @staticmethod
    def pool_bytes(model_config: Any, max_tokens: int, resident_layers: int, batch_size: int = 1,
                   page_size: int = 8 << 20, itemsize: int = 2, block_size: int = 16) -> int:
        """GPU pool a cache with ``resident_layers`` resident needs while decoding at ``max_tokens``: those
        layers whole, the ring, a last page per row of every streamed layer, and one spare page."""
        heads, dim = _kv_shape(model_config)
        layer, tail = _layer_bytes(heads * dim * itemsize, math.ceil(max_tokens / block_size) * block_size,
                                   batch_size, page_size)
        n = model_config.num_hidden_layers
        if resident_layers >= n:
            return n * layer
        return (resident_layers + RING_SLOTS) * layer + (n - resident_layers) * tail + tail // batch_size

    # --- set-up on the first update (the dtype and device come with the first key states) ------------------------
    def _setup(self, key_states: torch.Tensor) -> None:
        if self.manager is None:
            device = str(key_states.device) if key_states.device.type == "cuda" else "cpu"
            self.manager = TierManager((self._config or Config()).replace(device=device))
        n = len(self.layers)
        self.rows = key_states.shape[0]
        self.capacity = max(self.capacity, self.rows)
        self._generation += 1
        # rows start on page boundaries (the row's blocks rounded up to whole pages, address space only), so that a
        # row may map another's whole pages (a beam reorder, ``_remap_rows``)
        block_bytes = self.block_size * key_states.shape[1] * key_states.shape[3] * key_states.element_size()
        per_page = self._manager.page_size // block_bytes if self._manager.page_size % block_bytes == 0 else 1
        self.blocks_per_row = -(-math.ceil(self._args["max_tokens"] / self.block_size) // per_page) * per_page
        self.max_tokens = self.blocks_per_row * self.block_size
        for i in range(n):
            self.spaces.append(self._new_space(f"{self.name}.L{i}", key_states.dtype))
        self._dropped = [[0] * self.rows for _ in range(n)]
        page, token_bytes = self._manager.page_size, self.spaces[0].block_bytes // self.block_size
        layer, tail = _layer_bytes(token_bytes, self.max_tokens, self.rows, page)
        # sliding layers stay resident: they keep about two windows (and the pages those straddle); so do layers
        # whose K/V later layers read (KV sharing); layers reusing another's hold nothing
        full = [i for i in range(n) if self.layers[i].window is None and i not in self._shared | self._reusing]
        windows = {i: w for i in range(n) if (w := self.layers[i].window) is not None and i not in self._reusing}
        fixed = sum(_layer_bytes(token_bytes, min(self.max_tokens, 2 * w + 2 * page // token_bytes), self.rows,
                                 page)[0] for w in windows.values())
        fixed += layer * sum(1 for i in self._shared if self.layers[i].window is None)
        budget = self._manager.pool.budget_pages * page - fixed
        m = len(full)
        if self.resident_layers is None:  # as many as the pool holds beside the ring and the streamed last pages
            spare = budget - RING_SLOTS * layer - m * tail - tail // self.rows
            streamed = 0 if m * layer <= budget else m - max(0, min(m - 1, spare // (layer - tail)))
        else:
            streamed = min(m, n - min(n, self.resident_layers))
        # spread out, so that each streamed layer's read overlaps the compute of the resident ones before it
        self._streamed = sorted({full[(2 * k + 1) * m // (2 * streamed)] for k in range(streamed)})
        self._settled = {i: [0] * self.rows for i in self._streamed}

    @property
    def _manager(self) -> TierManager:
        assert self.manager is not None, "the manager is made by the first update"  # every caller runs after it
        return self.manager

    def _new_space(self, name: str, dtype: torch.dtype) -> Any:
        name = name if self._generation == 1 else f"{name}.g{self._generation}"  # a name may be in use still
        return self._manager.create_space(name, num_layers=1, num_kv_heads=self.num_kv_heads,
                                         head_dim=self.head_dim, dtype=dtype, block_size=self.block_size,
                                         max_tokens=self.capacity * self.max_tokens,
                                         # the pool is sized to what the cache maps (pool_bytes): pages mapped
                                         # ahead into one layer would be unmapped again by the next layer's read
                                         map_ahead=False)

    def _teardown(self) -> None:
        """Give every space back (the cache is empty, or about to be rebuilt)."""
        self._settle_reads()
        for handle in self._pending.values():
            handle.result()
        self._pending.clear()
        if self.manager is not None:
            for space in self.spaces + self._ring:
                self.manager.drop_space(space.name)
        self.spaces, self._ring = [], []
        self._views.clear()
        self._down.clear()
        self._asleep.clear()
        self._allocated = [0] * len(self.layers)
        self._high = [0] * len(self.layers)
        self._shared_upto = [0] * len(self.layers)
        self._slot_user, self._last = [None] * RING_SLOTS, -1

    @property
    def streamed_layers(self) -> list[int]:
        """The layers that stream during decode (known after the first update)."""
        return list(self._streamed)

    def _rows(self) -> range:
        return range(self.rows)

    def _rows_of(self, space: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of a space as ``[rows, max_tokens, heads, dim]`` (made once: the step path is host-bound)."""
        views = self._views.get(space.name)
        if views is None:
            k, v = (t.view(self.capacity, self.max_tokens, self.num_kv_heads, self.head_dim).narrow(0, 0, self.rows)
                    for t in space.kv(0))
            views = self._views[space.name] = (k, v)
        return views

    def _row_views(self, space: Any, stop: int, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._rows_of(space)
        return k.narrow(1, first, stop - first).transpose(1, 2), v.narrow(1, first, stop - first).transpose(1, 2)

    def _drop_old(self, i: int, stream: Any) -> None:
        """A sliding layer keeps about two windows (so that a crop of up to one window can be undone): the pages
        of older tokens are dropped once a whole page has fallen out, after the kernels queued on ``stream`` (the
        layer's attention, which may still read them: this runs as the next layer starts)."""
        layer, space = self.layers[i], self.spaces[i]
        assert layer.window is not None  # called for sliding layers only
        keep = layer.length - 2 * layer.window
        if keep - min(self._dropped[i]) < self._manager.page_size // (space.block_bytes // self.block_size):
            return
        for row in self._rows():
            space.drop_prefix(row, keep, stream=stream)
            self._dropped[i][row] = keep

    # --- the step ---------------------------------------------------------------------------------------------------
    def _update(self, layer: TieredLayer, key_states: torch.Tensor,
                value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, new, dim = key_states.shape
        if value_states.shape != key_states.shape or value_states.dtype != key_states.dtype:
            raise InvalidArgumentError(f"layer {layer.index}: keys {tuple(key_states.shape)} and values "
                                       f"{tuple(value_states.shape)} differ; TieredCache holds K and V of one shape")
        if not self.spaces:  # the first update says what the layers hold (Falcon's multi-query: 1 head, say)
            self.num_kv_heads, self.head_dim = heads, dim
        elif (heads, dim) != (self.num_kv_heads, self.head_dim):
            raise InvalidArgumentError(f"layer {layer.index}: {heads} K/V heads of {dim}, the cache holds "
                                       f"{self.num_kv_heads} of {self.head_dim} (from the first update): layers of "
                                       "different K/V shapes are not supported")
        if self.spaces and batch != self.rows:
            if any(layer.length for layer in self.layers):
                raise InvalidArgumentError(f"TieredCache holds {self.rows} rows; got a batch of {batch}: reset() it "
                                           "first, or use batch_select_indices / batch_repeat_interleave")
            self._teardown()  # an empty cache takes the new batch (a smaller one keeps the room reserved)
        if not self.spaces:
            self._setup(key_states)
        self._idle = False  # stepped again: its layers come back as the step reaches them (``_down``)
        i = layer.index
        start, stop = layer.length, layer.length + new
        if stop > self.max_tokens:
            raise InvalidArgumentError(f"TieredCache holds {self.max_tokens} tokens a row; raise max_tokens")
        space = self.spaces[i]
        stream = torch.cuda.current_stream(key_states.device) if key_states.is_cuda else None
        previous = self.layers[self._last] if self._last >= 0 else None
        if previous is not None and previous.window is not None and previous.length \
                and previous.index not in self._shared:
            self._drop_old(previous.index, stream)  # its attention is enqueued: tokens out of its window can go
        if i <= self._last:  # a new forward: the views of layers read by later ones are done with now
            for j in self._shared:
                if self.layers[j].window is not None and self.layers[j].length:
                    self._drop_old(j, stream)
        if self._streamed:
            self._before(i, stream, new, first_fill=start == 0)
        pending = self._pending.pop(i, None)
        if pending is not None:
            pending.wait(stream)  # a resident layer's pages are back before its attention reads them
        if i in self._down and start:  # a later chunk over a layer the first one sent down: it comes back
            self._down.discard(i)
            space.prefetch(self._rows()).wait(stream)
        if i in self._asleep:  # a streamed layer of a cache kept idle: what its rows keep on the GPU comes back
            self._asleep.discard(i)
            for row in self._rows():
                space.prefetch([row], start=self._settled[i][row]).wait(stream)
        if stop > self._allocated[i]:  # whole blocks at a time: one call per block, not per token
            upto = min(self.max_tokens, -(-stop // self.block_size) * self.block_size)
            for row in self._rows():  # also tells kvtier which pages change (their kept copies are stale now)
                space.allocate(row, upto, first_block=row * self.blocks_per_row)
            self._allocated[i] = upto
        if start < self._shared_upto[i]:  # rewriting tokens a copy of this cache reads too: pages of its own first
            self.copies.unshare(i, start)
        rows_k, rows_v = self._rows_of(space)
        rows_k.narrow(1, start, new).copy_(key_states.transpose(1, 2))  # narrow: cheaper on the host than [:, a:b]
        rows_v.narrow(1, start, new).copy_(value_states.transpose(1, 2))
        if start < self._high[i]:  # rewriting tokens (after a crop): their pages' copies below are stale now
            for row in self._rows():
                space.mark_written(row, start, stop)
        self._high[i] = max(self._high[i], stop)  # appending needs no call: the last block's page keeps no copy
        layer.length = stop
        self._last = i
        if layer.window is not None:  # the window and the new tokens, as DynamicSlidingWindowLayer returns them
            return self._row_views(space, stop, layer.visible_from(start))
        if i in self._settled and any(self._settled[i]):  # its past is partly below: read it into a ring slot
            return self._read_streamed(i, stream, stop)
        return self._row_views(space, stop)

    def _before(self, i: int, stream: Any, new: int, first_fill: bool) -> None:
        """Layer ``i`` is next, with ``new`` tokens; the attention of the layer before is enqueued on ``stream``.
        Send that layer's settled pages down (all of a resident layer's during a prefill into an empty cache,
        which needs the room), free its ring slot, and read ahead into the free slots. The first decode step
        brings the resident layers back."""
        prefill = new > 1
        previous = self._last
        if previous >= 0 and self.layers[previous].length:
            if previous in self._settled:
                self._settle(previous, stream, wait=prefill)
            elif prefill and first_fill and previous not in self._down and previous not in self._shared:
                handles = [self.spaces[previous].offload(row, tier=self.offload_tier, stream=stream)
                           for row in self._rows()]
                self._down.add(previous)
                for handle in handles:  # the host runs ahead of a long prefill: wait for the layer to be gone,
                    _wait_down(handle)  # so that one layer's pages are in use beside the activations (the peak)
        self._slot_user = [None if user == previous else user for user in self._slot_user]
        if prefill:
            return
        for j in sorted(self._down):  # the first decode step: the resident layers come back for good
            if self.layers[j].length:
                self._pending[j] = self.spaces[j].prefetch(self._rows())
        self._down.clear()
        self._read_ahead(i, stream, len(self._streamed))

    def _read_ahead(self, i: int, stream: Any, count: int) -> None:
        """Start reading the pages kept below of the next ``count`` streamed layers from ``i`` on (cyclic: those
        before ``i`` for the next step) into free ring slots, in layer order, as far as slots are free."""
        if None not in self._slot_user:
            return  # every slot is taken (the common case: this runs as every layer starts)
        m, first = len(self._streamed), bisect.bisect_left(self._streamed, i)
        for k in range(min(count, m)):
            j = self._streamed[(first + k) % m]
            if j in self._reads or not any(self._settled[j]):
                continue  # read already, or nothing below (its attention reads the space itself)
            if None not in self._slot_user:
                return
            slot = self._slot_user.index(None)
            self._slot_user[slot] = j
            below, ring = list(self._settled[j]), self._ring_kv(slot)
            self._reads[j] = (slot, [self.spaces[j].read(row, [ring], stop=below[row], stream=stream)
                                     for row in self._rows() if below[row]], below)

    def _ring_kv(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of a ring slot (the ring is mapped on first use)."""
        if not self._ring:
            dtype = self.spaces[0].dtype
            self._ring = [self._new_space(f"{self.name}.ring{k}", dtype) for k in range(RING_SLOTS)]
        ring = self._ring[slot]
        if not ring.sequences():
            for row in self._rows():
                ring.allocate(row, self.max_tokens, first_block=row * self.blocks_per_row)
        return ring.kv(0)

    def _read_streamed(self, i: int, stream: Any, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i not in self._reads:  # not read ahead: a prefill over a past kept below
            self._read_ahead(i, stream, 1)
        assert i in self._reads, "reads ahead are issued and consumed in layer order: a slot is free for i"
        slot, handles, below = self._reads.pop(i)
        for handle in handles:
            handle.wait(stream)
        ring = self._ring[slot].kv(0)  # mapped when the read into it was issued
        for row in self._rows():  # the pages still on the GPU (the new tokens among them), on the step's stream
            self.spaces[i].read(row, [ring], start=below[row], stop=stop, stream=stream)
        return self._row_views(self._ring[slot], stop)

    def _settle(self, j: int, stream: Any, wait: bool) -> None:
        """Send down the pages of streamed layer ``j`` that its rows' tails have left (read from below from now
        on). The copies wait for the kernels queued on ``stream``."""
        token_bytes = self.spaces[j].block_bytes // self.block_size
        page, length = self._manager.page_size, self.layers[j].length
        for row in self._rows():
            first = row * self.blocks_per_row * self.block_size  # the row's first token in the space
            # the tokens below the page the next token goes to
            cut = min(length, max(0, (first + length) * token_bytes // page * page // token_bytes - first))
            if cut > self._settled[j][row]:
                handle = self.spaces[j].offload_prefix(row, cut, tier=self.offload_tier, stream=stream)
                self._settled[j][row] = cut  # pages whose write fails stay on the GPU: read() reads them there
                if wait:
                    _wait_down(handle)

    def _reset_layer(self, layer: TieredLayer) -> None:
        i = layer.index
        self._down.discard(i)
        self._asleep.discard(i)
        if self.spaces:
            handle = self._pending.pop(i, None)
            if handle is not None:
                handle.result()
            for handle in self._reads.pop(i, (0, [], []))[1]:
                handle.result()
            for row in self._rows():
                if row in self.spaces[i].sequences():
                    self.spaces[i].free(row)
            if i in self._settled:
                self._settled[i] = [0] * self.rows
            self._dropped[i] = [0] * self.rows
            self._allocated[i] = 0
            self._high[i] = 0
            self._shared_upto[i] = 0  # its rows are freed: pages shared with a copy went with them
        if i == 0:  # a new generation: the ring is mapped again when a step needs it
            for _, handles, _ in self._reads.values():  # reads ahead into the ring land before it is unmapped
                for handle in handles:
                    handle.result()
            self._reads.clear()
            self._slot_user, self._last = [None] * RING_SLOTS, -1
            for ring in self._ring:
                for row in ring.sequences():
                    ring.free(row)
        layer.length = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].length if layer_idx < len(self.layers) else 0

    # --- the rest of the Cache contract ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        """(keys, values, ...) per layer, shaped as DynamicCache's iteration yields them."""
        for layer in self.layers:
            yield (*self._layer_kv(layer), None)[:_dynamic_cache_item_arity()]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows ``indices`` (an index or boolean tensor), in that order."""
        self._remap(self._indices(indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times, each copy next to its original."""
        self._remap(torch.arange(self.rows).repeat_interleave(repeats))

    def _indices(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.arange(self.rows)[torch.as_tensor(indices).cpu()]

    def _layer_kv(self, layer: TieredLayer) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A layer's K and V as ``[rows, heads, length, dim]``: views when its pages are all on the GPU, else a
        copy read from every tier (slow, but never a view of memory that may be unmapped or reused)."""
        if not self.spaces or not layer.length:
            return None, None
        i, space, length = layer.index, self.spaces[layer.index], layer.length
        first = layer.visible_from()  # a sliding layer keeps the last window - 1 tokens, as DynamicCache's does
        pending = self._pending.pop(i, None)
        if pending is not None:
            pending.result()
        if i not in self._down and not any(self._settled.get(i, ())):
            return self._row_views(space, length, first)
        k_buf, v_buf = (torch.empty_like(t) for t in space.kv(0))
        for handle in [space.read(row, [(k_buf, v_buf)], start=first, stop=length) for row in self._rows()]:
            handle.result()
        shape = (self.capacity, self.max_tokens, self.num_kv_heads, self.head_dim)
        return tuple(t.view(shape)[:self.rows, first:length].transpose(1, 2) for t in (k_buf, v_buf))  # type: ignore

    def _crop_layer(self, i: int, tokens_to_remove: int) -> None:
        if isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove, int) or tokens_to_remove > 0:
            raise InvalidArgumentError(f"crop takes the number of tokens to remove as a negative int, got "
                                       f"{tokens_to_remove!r} (as DynamicCache does)")
        layer = self.layers[i]
        if not tokens_to_remove or not layer.length:
            return
        length = max(0, layer.length + tokens_to_remove)
        if layer.window is not None and layer.visible_from(length) < max(self._dropped[i]):
            raise InvalidArgumentError(f"layer {i} slides over {layer.window} tokens and keeps about two windows: "
                                       f"it cannot be cropped back {-tokens_to_remove} tokens (its older tokens "
                                       "were dropped)")
        if i in self._settled and max(self._settled[i]) > length:
            self._materialize(i)  # tokens that will be written again lie below: bring them back
        layer.length = length

    def _remap_layer(self, i: int, src: torch.Tensor) -> None:
        """A per-layer batch call (``Cache`` iterates its layers): allowed when it keeps the number of rows."""
        if len(src) != self.rows:
            raise InvalidArgumentError("batch_select_indices / batch_repeat_interleave change the number of rows: "
                                       "call them on the TieredCache, not on one of its layers")
        self._remap_rows(i, src.cpu().long())

    def _remap(self, src: torch.Tensor) -> None:
        """Row ``r`` of every layer becomes old row ``src[r]`` (beam reordering, selecting, repeating)."""
        src = src.cpu().long()
        if not self.spaces or not any(layer.length for layer in self.layers):
            if self.spaces:
                self._teardown()  # nothing stored: the next update sets the batch up afresh
            return
        self._settle_reads()  # reads ahead are for the old rows
        if len(src) > self.capacity:  # more rows than the spaces have room for: new spaces
            self._grow(len(src))
        for i in range(len(self.layers)):
            self._remap_rows(i, src)
        for i in self._settled:
            self._settled[i] = [0] * len(src)
        for space in self.spaces:  # rows no longer used give their pages back
            for row in [r for r in space.sequences() if r >= len(src)]:
                space.free(row)
        self.rows = len(src)
        self._views.clear()
        for i in self._settled:  # streamed layers send their past down again
            if self.layers[i].length:
                self._settle(i, None, wait=True)

    def _remap_rows(self, i: int, src: torch.Tensor) -> None:
        layer, space = self.layers[i], self.spaces[i]
        if not layer.length:
            return
        self._materialize(i)
        k, v = self._rows_of(space)
        length, device, kept = layer.length, k.device, max(self._dropped[i])  # tokens before ``kept`` are gone
        whole, per_row = self.copies.whole_pages_below(i)  # rows' whole pages: remapped, not copied
        start = max(kept, whole)
        if self._shared_upto[i] > start:  # the tokens rewritten from ``start`` on may lie on shared pages
            self.copies.unshare(i, start)
        new_k, new_v = (t[:, start:length].index_select(0, src.to(device)) for t in (k, v))  # copies
        upto = self._allocated[i]
        for row in range(len(src)):
            if row >= self.rows or row not in space.sequences():
                space.allocate(row, upto, first_block=row * self.blocks_per_row)
        if whole:  # row r maps the whole pages of row src[r]: the beams' common past is held once
            pages = whole * (space.block_bytes // self.block_size) // self._manager.page_size
            space.alias_pages([(int(s_) * per_row + j, r * per_row + j) for r, s_ in enumerate(src.tolist())
                               if s_ != r for j in range(pages)])
            self._shared_upto[i] = max(self._shared_upto[i], whole)
        shape = (self.capacity, self.max_tokens, self.num_kv_heads, self.head_dim)
        for t, new in zip(space.kv(0), (new_k, new_v)):
            t.view(shape)[:len(src), start:length].copy_(new)
        for row in range(len(src)):
            space.mark_written(row, start, length)
        self._dropped[i] = [self._dropped[i][r] if r < self.rows else 0 for r in range(len(src))]

    def _grow(self, rows: int) -> None:
        """New spaces with room for ``rows`` rows, holding what the old ones held (one layer at a time)."""
        old_capacity, self.capacity = self.capacity, rows
        self._generation += 1
        for ring in self._ring:
            self._manager.drop_space(ring.name)
        self._ring = []
        for i, old in enumerate(self.spaces):
            length = self.layers[i].length
            if length:
                self._materialize(i)
            new = self._new_space(f"{self.name}.L{i}", old.dtype)
            if length:
                shape_old = (old_capacity, self.max_tokens, self.num_kv_heads, self.head_dim)
                shape_new = (rows, self.max_tokens, self.num_kv_heads, self.head_dim)
                kept = max(self._dropped[i])
                for row in range(self.rows):
                    new.allocate(row, self._allocated[i], first_block=row * self.blocks_per_row)
                for t_new, t_old in zip(new.kv(0), old.kv(0)):
                    t_new.view(shape_new)[:self.rows, kept:length].copy_(t_old.view(shape_old)[:self.rows, kept:length])
                self._dropped[i] = [0] * self.rows  # the new space maps them all: dropped again as it grows
            self._manager.drop_space(old.name)
            self._shared_upto[i] = 0
            self.spaces[i] = new
        self._views.clear()

    def _materialize(self, i: int) -> None:
        """Bring all of layer ``i`` onto the GPU, in its space (rows rewritten there are sent down again by the
        caller or by the next step)."""
        pending = self._pending.pop(i, None)
        if pending is not None:
            pending.result()
        read = self._reads.pop(i, None)
        if read is not None:
            for handle in read[1]:
                handle.result()
            self._slot_user[read[0]] = None
        below = i in self._down or i in self._asleep or any(self._settled.get(i, ()))
        self._down.discard(i)
        self._asleep.discard(i)
        if below:
            self.spaces[i].prefetch(self._rows()).result()
        if i in self._settled:
            self._settled[i] = [0] * self.rows

    def _settle_reads(self) -> None:
        """Let every read ahead land and free the ring."""
        for _, handles, _ in self._reads.values():
            for handle in handles:
                handle.result()
        self._reads.clear()
        self._slot_user = [None] * RING_SLOTS

    def idle(self) -> None:
        """The cache will not be stepped for a while (kept for later prompts: ``PromptCaches`` calls it): its
        resident layers' pages may go down the tiers under pressure, as an idle sequence's do, and its streamed
        layers keep only each row's last page on the GPU. A copy takes them from wherever they rest; the next step
        brings each layer back before its attention reads it."""
        if not self.spaces:
            return
        self._settle_reads()
        for handle in self._pending.values():
            handle.result()
        self._pending.clear()
        for ring in self._ring:  # the ring is mapped again when a step needs it
            for row in ring.sequences():
                ring.free(row)
        for i, layer in enumerate(self.layers):
            if not layer.length or i in self._down or i in self._asleep:
                continue
            if i in self._settled:  # streamed: all but each row's last page goes down now, as a step would send it
                self._settle(i, None, wait=True)
            for row in self._rows():
                self.spaces[i].offload(row)  # no tier: the policy sends it down when room is short
            (self._asleep if i in self._settled else self._down).add(i)
        self._idle = True

    def residency(self) -> dict[str, int]:
        """Bytes of this cache per tier, over every layer and row (the ring's copies not counted)."""
        total = dict.fromkeys(self._places, 0)
        for space in self.spaces:
            for row in space.sequences():
                for tier, nbytes in space.residency(row).items():
                    total[tier] = total.get(tier, 0) + nbytes
        return total

    # --- copies ---------------------------------------------------------------------------------------------------
    def __deepcopy__(self, memo: dict[int, Any]) -> "TieredCache":
        """A cache holding the same KV, on the same manager (transformers' prompt-reuse recipe: a prompt's cache
        computed once, ``copy.deepcopy(prompt_cache)`` for each question): see ``CacheCopies.deep_copy``."""
        return self.copies.deep_copy(memo)

    def close(self) -> None:
        """Give the pages back (and close the manager if this cache made it and no copy of it still uses it)."""
        if self.manager is not None and not self.manager.closed and not self._closed:
            self._teardown()
            self._closed = True  # once: a second close must not count this cache out of the manager's users again
            self._users[0] -= 1
            if self._own_manager and self._users[0] <= 0:
                self.manager.close()
        self.spaces, self._ring = [], []
        self._views.clear()
        for layer in self.layers:
            layer.length = 0
