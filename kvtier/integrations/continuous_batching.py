"""transformers' continuous batching engine on kvtier: elastic KV and tiered preemption::

    with kvtier_engine(model, mgr, name="llama") as engine:
        outputs = model.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb)
    engine.stats()   # pages mapped (now, peak), requests preempted to the tiers, soft resets, restores

Inside the ``with``, every continuous-batching entry point of ``model`` (``generate_batch``,
``init_continuous_batching``, ``continuous_batching_context_manager``, and so ``transformers serve``) builds its
paged cache on kvtier:

- **Elastic KV.** The engine's one flat cache tensor is an :class:`~kvtier.buffer.ElasticBuffer`: its address is
  fixed (kernels and CUDA graphs keep their pointers), and a sector's pages are mapped from the manager's pool
  when the engine hands the sector to an allocator and go back when the sector is free again (after the compute
  stream's queued work). An idle engine holds its two pad sectors and nothing else; several models' engines
  on one manager share one pool, so a burst on one uses the pages the others gave back.
- **Tiered preemption.** When the engine runs out of cache it preempts requests; instead of its static pinned
  swap pool (or recomputing: a "soft reset") their blocks are copied into a kvtier space and sent down (host,
  then NVMe under the tiers' policy), in chunks of at most ``staging_bytes``; a request scheduled again is
  brought back and copied into its new blocks before the step. Only when even the staging room is not to be
  had is a request soft reset, as the engine would. ``staging_bytes`` of the pool are left unused by the
  engine's cache so that preemption has room to stage through.
- **Sharing.** An engine with requests waiting for pool room says so (``ElasticBuffer.want``): while it does,
  engines of the same or a lower priority on the pool (or in other processes on the device) grow no further than
  their fair share, so their own scheduler preempts or holds back until the pool is split evenly among the busy.
- **Prefixes through the tiers.** With the engine's prefix sharing on, the full blocks of finished requests
  that it would forget under pressure are copied into a kvtier space first, keyed by content and sent down the
  tiers; a prompt that goes on past what the GPU cache still holds gets the rest from there instead of
  recomputing it (:mod:`kvtier.integrations.cb_prefix`).
- **Waiting for room.** An engine that can neither schedule nor preempt (the pages are held by another engine
  on the pool, or another process on the device) waits up to ``room_wait_s`` for its room to grow, where the
  engine as shipped would stop with an error (longer while it is itself held at its fair share).

The cache is in :mod:`kvtier.integrations.cb_cache`, preemption in :mod:`kvtier.integrations.cb_preemption`; this
module holds the entry point, the engine's manager and the settings.

Supported: transformers 5.24 (the engine's internals -- ``PagedAttentionCache``, ``CachePool``,
``OffloadingManager`` -- change between releases; another version is refused at start).
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any, Callable

import torch
import transformers
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.cache import PagedAttentionCache
from transformers.generation.continuous_batching.cache_allocators import SLIDING_ATTENTION
from transformers.generation.continuous_batching.continuous_api import (ContinuousBatchingManager,
                                                                        ContinuousBatchProcessor)
from transformers.generation.continuous_batching.initialization import update_cb_config_after_cache_creation
from transformers.generation.continuous_batching.requests import RequestStatus
from transformers.generation.continuous_batching.scheduler import SCHEDULER_MAPPING, FIFOScheduler
from transformers.generation.continuous_batching.utils import find_head_dim, find_num_key_value_heads

from kvtier.buffer import ElasticBuffer
from kvtier.errors import ConfigError
from kvtier.integrations.cb_cache import ElasticCache, ElasticSectors
from kvtier.integrations.cb_preemption import TieredOffloading
from kvtier.integrations.cb_prefix import TieredPrefixes
from kvtier.manager import TierManager

__all__ = ["kvtier_engine", "KVTierEngine", "ElasticCache", "ElasticSectors", "TieredOffloading", "check_version"]

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ("5.24",)


def check_version() -> None:
    version = transformers.__version__
    if ".".join(version.split(".")[:2]) not in SUPPORTED_VERSIONS:
        raise ConfigError(f"kvtier's continuous-batching integration supports transformers "
                          f"{', '.join(v + '.x' for v in SUPPORTED_VERSIONS)} (the engine's internals change between "
                          f"releases); this is {version}: install transformers=={SUPPORTED_VERSIONS[-1]}.*")


class KVTierBatchingManager(ContinuousBatchingManager):
    """The engine's manager, with its batch processor built on kvtier (see the module docstring)."""

    kvtier: "KVTierEngine"

    def _create_batch_processor(self) -> ContinuousBatchProcessor:
        if isinstance(self.batch_processor, ContinuousBatchProcessor):
            self.batch_processor.reset()
            return self.batch_processor
        engine, cb, model = self.kvtier, self.continuous_batching_config, self.model
        cb.cpu_offload_space = 0.0  # kvtier's tiers take preempted requests
        keep_logits = getattr(model, "_supports_logits_to_keep", None)
        cache_args: dict[str, Any] = dict(config=model.config.get_text_config(), continuous_batching_config=cb,
                          distributed_helper=self.distributed_helper, dtype=model.dtype,
                          model_supports_logits_to_keep=callable(keep_logits) and keep_logits())
        if cb.num_blocks is None:
            # the virtual capacity: the engine's share of the pool, but no more than the engine's own sizing
            # allows, since its batch buffers (real memory) grow with the capacity
            own = PagedAttentionCache(device="meta", **cache_args).num_blocks
            share = engine.capacity_bytes // engine.bytes_per_block(cache_args["config"], cb.page_size, model.dtype)
            cb.num_blocks = max(1, min(own, share))
        cache = ElasticCache(engine, model.device, **cache_args)
        self._use_prefix_sharing = cache.use_prefix_sharing
        update_cb_config_after_cache_creation(cb_config=cb, num_blocks=cache.num_blocks,
                                              max_batch_tokens=cache.max_batch_tokens)
        if SLIDING_ATTENTION in cache.cache_allocators:  # the engine's own rule: no decode fast path then
            cb.max_blocks_per_request = 0
        scheduler_class: Callable[..., Any] = SCHEDULER_MAPPING.get(cb.scheduler_type, FIFOScheduler)
        scheduler = scheduler_class(
            cache=cache, safety_margin=cb.safety_margin, max_requests_per_batch=cb.max_requests_per_batch)
        processor = ContinuousBatchProcessor(
            cache=cache, config=model.config.get_text_config(), generation_config=self.generation_config,
            continuous_batching_config=cb, logit_processor=self.logit_processor,
            input_queue=self.input_queue if self.is_tp_driver else None,
            cancel_queue=self.cancel_queue if self.is_tp_driver else None, output_router=self.output_router,
            background_thread_status=self.background_thread_status, model_device=model.device,
            model_dtype=model.dtype, scheduler=scheduler, distributed_helper=self.distributed_helper)
        stream = processor.inputs_and_outputs.compute_stream
        cache.pool.stream = stream
        try:
            offloading = TieredOffloading(cache, scheduler, stream, self.distributed_helper, engine)
        except BaseException:
            cache.close()
            raise
        processor.offloading_manager = offloading
        if cache.use_prefix_sharing and engine.keep_prefixes:
            try:
                engine.prefixes_for(cache_args["config"], model.dtype).bind(cache, stream, offloading.swap_tokens)
            except BaseException:
                offloading.close()
                cache.close()
                raise
        engine.attach(cache, offloading)
        schedule = scheduler.schedule_batch

        def schedule_batch(*args: Any, **kwargs: Any) -> Any:
            # whether the last try scheduled nothing: the engine then asks to preempt or stop (see _wait_for_room)
            out = schedule(*args, **kwargs)
            offloading.nothing_scheduled = out[0] is None
            if out[0] is None:  # the room it judged by: more by the time it would stop, and it tries again
                offloading.room_seen = cache.buffer.available()
            if (out[0] is None or scheduler.waiting_requests) and cache.pool.room_limited:
                cache.buffer.want()  # work waits for pool room: engines past their fair share stop growing
            return out

        scheduler.schedule_batch = schedule_batch  # wrapped in place: the engine calls the scheduler's attribute
        infer = scheduler._infer_request_tokens

        def infer_request_tokens(state: Any, *args: Any, **kwargs: Any) -> Any:
            # a request part-way through its prompt whose lookup was short of room: look again before its next chunk
            if state.status == RequestStatus.PREFILLING and not state.is_cpu_offloaded:
                cache.resume_prefix(state)
            return infer(state, *args, **kwargs)

        scheduler._infer_request_tokens = infer_request_tokens
        return processor

    def stop(self, *args: Any, **kwargs: Any) -> None:
        self.kvtier.stopping.set()  # a loop waiting for pool room gives up at once
        try:
            super().stop(*args, **kwargs)
        finally:
            self.kvtier.stopping.clear()
        if self.batch_processor is None:  # not kept for a next session: its memory goes back
            self.kvtier.detach()


class KVTierEngine:
    """What ``kvtier_engine`` returns: the settings, the live cache and its counts."""

    def __init__(self, model: Any, manager: TierManager, name: str, priority: int, capacity_bytes: int | None,
                 staging_bytes: int | None, swap_tier: str, room_wait_s: float = 30.0, keep_prefixes: bool = True,
                 model_id: str | None = None) -> None:
        check_version()
        if swap_tier not in manager.config.tiers:
            raise ConfigError(f"swap_tier must be one of the manager's tiers {manager.config.tiers} ('host' "
                              f"cascades to the next tier as it fills), got {swap_tier!r}")
        self.model, self.manager, self.name, self.priority = model, manager, name, priority
        self.swap_tier, self.room_wait_s, self.keep_prefixes = swap_tier, room_wait_s, keep_prefixes
        config = model.config.get_text_config()
        self.model_id = model_id if model_id is not None else \
            (getattr(model.config, "_name_or_path", "") or config.model_type)
        if not room_wait_s >= 0:
            raise ConfigError(f"kvtier_engine {name!r}: room_wait_s must be >= 0 seconds, got {room_wait_s!r}")
        budget = manager.pool.budget_pages * manager.page_size
        self.staging_bytes = staging_bytes if staging_bytes is not None else max(manager.page_size, budget // 16)
        self.capacity_bytes = capacity_bytes if capacity_bytes is not None else budget - self.staging_bytes
        if self.capacity_bytes <= 0 or self.staging_bytes <= 0:
            raise ConfigError(f"kvtier_engine {name!r}: capacity_bytes ({self.capacity_bytes}) and staging_bytes "
                              f"({self.staging_bytes}) must be positive and fit the pool ({budget} bytes)")
        if manager.pool.budget_pages < self.staging_pages() + 2:
            raise ConfigError(f"kvtier_engine {name!r}: the pool's {manager.pool.budget_pages} pages leave none for the "
                              f"cache beside the {self.staging_pages()} kept for staging preempted requests; raise "
                              "pool_budget or lower staging_bytes")
        self.counts = {"preempted_to_tiers": 0, "soft_resets": 0, "restored": 0, "staged": 0, "lost": 0,
                       "bytes_down": 0, "room_waits": 0, "prefix_kept_blocks": 0, "prefix_not_kept": 0,
                       "prefix_hit_blocks": 0, "prefix_hit_tokens": 0, "prefix_found_below": 0,
                       "prefix_short_of_room": 0, "prefix_requeued": 0}
        self.cache: ElasticCache | None = None
        self.offloading: TieredOffloading | None = None
        self.prefixes: TieredPrefixes | None = None  # kept blocks, across the engine's sessions in the ``with``
        self.managers: weakref.WeakSet[ContinuousBatchingManager] = weakref.WeakSet()  # built inside the with
        self.stopping = threading.Event()
        self._peak_bytes = 0
        self.private: set[str] = set()  # requests whose blocks kvtier keeps nowhere (do_not_retain)

    def do_not_retain(self, *request_ids: str) -> None:
        """Keep none of these requests' blocks below the GPU or in a remote store (a prompt that must not
        outlive its request); they still find what others kept. Mark them before adding them. The engine's own
        GPU prefix cache is the engine's: turn its sharing off (``allow_block_sharing=False``) to keep none there."""
        self.private.update(request_ids)

    @staticmethod
    def bytes_per_block(config: Any, page_size: int, dtype: torch.dtype) -> int:
        return (config.num_hidden_layers * 2 * find_num_key_value_heads(config) * find_head_dim(config) *
                dtype.itemsize * page_size)

    def prefixes_for(self, config: Any, dtype: torch.dtype) -> TieredPrefixes:
        """The kept blocks of this engine; their keys carry the model's KV layout (``kvtier.prefix.fingerprint``)."""
        layout = (config.num_hidden_layers, find_num_key_value_heads(config), find_head_dim(config), str(dtype))
        if self.prefixes is None or self.prefixes.layout != layout:
            if self.prefixes is not None:
                self.prefixes.close()
            self.prefixes = TieredPrefixes(self, layout, self.model_id)
        return self.prefixes

    def staging_pages(self) -> int:
        # a swap chunk of staging_bytes is half in its space's K region and half in V, each maybe straddling a page
        return 2 * (-(-self.staging_bytes // (2 * self.manager.page_size)) + 1)

    def make_buffer(self, nbytes: int) -> ElasticBuffer:
        return self.manager.create_buffer(f"{self.name}/kv", nbytes, self.priority, reserve_pages=self.staging_pages())

    def attach(self, cache: ElasticCache, offloading: TieredOffloading) -> None:
        self.cache, self.offloading = cache, offloading

    def detach(self) -> None:
        if self.cache is not None and self.offloading is not None:  # attached together
            self._peak_bytes = max(self._peak_bytes, self.cache.buffer.peak_pages * self.manager.page_size)
            self.offloading.close()
            self.cache.close()
            self.cache = self.offloading = None

    def stats(self) -> dict[str, Any]:
        live = self.cache.buffer.stats() if self.cache is not None else {}
        peak = max(self._peak_bytes, live.get("peak_bytes_mapped", 0))
        sectors = {"sectors_held": self.cache.pool.held, "peak_sectors_held": self.cache.pool.peak_held} \
            if self.cache is not None else {}
        kept = self.prefixes.stats() if self.prefixes is not None else {}
        return {"bytes_mapped": live.get("bytes_mapped", 0), "peak_bytes_mapped": peak, **sectors, **self.counts,
                "prefix_tiers": kept}


class kvtier_engine:  # noqa: N801 -- used as a context manager, like torch.no_grad
    """Run ``model``'s continuous batching on ``manager`` inside the ``with`` (see the module docstring).

    ``capacity_bytes``: the most KV the engine's cache may map (default: the pool's budget less the staging);
    ``staging_bytes``: pool room left to the engine's preemptions (default: a sixteenth of the budget);
    ``priority``: the swap spaces' priority under the tiers' policy; ``swap_tier``: where preempted requests go
    at once (``"host"``, whence the host's cascade takes them on to NVMe as it fills; or ``"nvme"``);
    ``room_wait_s``: how long an engine that can neither schedule nor preempt waits for pool room held by other
    engines or processes before it fails with OutOfPagesError (the engine as shipped fails at once);
    ``keep_prefixes``: with the engine's prefix sharing on (``allow_block_sharing``), the cached blocks it forgets
    under pressure go down the tiers and are found there by later prompts (``kvtier.integrations.cb_prefix``);
    ``model_id``: what the kept blocks' keys name the model by (default: its ``name_or_path``, else its type)."""

    def __init__(self, model: Any, manager: TierManager, name: str | None = None, priority: int = 0,
                 capacity_bytes: int | None = None, staging_bytes: int | None = None,
                 swap_tier: str = "host", room_wait_s: float = 30.0, keep_prefixes: bool = True,
                 model_id: str | None = None) -> None:
        self.engine = KVTierEngine(model, manager, name or f"{model.config.model_type}-{id(model):x}", priority,
                                   capacity_bytes, staging_bytes, swap_tier, room_wait_s, keep_prefixes, model_id)

    def __enter__(self) -> KVTierEngine:
        model, engine = self.engine.model, self.engine
        cached = getattr(model, "_cached_continuous_batching_manager", None)
        if cached is not None and not isinstance(cached, KVTierBatchingManager):
            raise ConfigError("the model keeps a continuous batching manager of its own from an earlier session: call "
                              "model.destroy_cached_continuous_batching_manager() first")

        def init_continuous_batching(generation_config: Any = None,
                                     continuous_batching_config: ContinuousBatchingConfig | None = None,
                                     workload_hints: Any = None) -> ContinuousBatchingManager:
            manager = type(model).init_continuous_batching(model, generation_config, continuous_batching_config,
                                                           workload_hints)
            if not isinstance(manager, KVTierBatchingManager):
                # the engine's own construction (attention switch, config resolution), then our processor: the
                # manager's class changes before it has built anything
                manager.__class__ = KVTierBatchingManager
                manager.kvtier = engine
            engine.managers.add(manager)
            return manager

        model.init_continuous_batching = init_continuous_batching
        return engine

    def __exit__(self, *exc: object) -> None:
        model = self.engine.model
        model.__dict__.pop("init_continuous_batching", None)
        for manager in list(self.engine.managers):  # one left running would use the cache after it is unmapped
            if manager.is_running():
                log.warning("continuous batching %r: a manager still running at the end of kvtier_engine is stopped "
                            "(its pending requests fail)", self.engine.name)
                manager.stop(block=True, hard_stop=True)
        model.destroy_cached_continuous_batching_manager()
        self.engine.detach()
        if self.engine.prefixes is not None:  # the kept blocks go with the ``with``
            self.engine.prefixes.close()
            self.engine.prefixes = None
