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

Supported: transformers 5.24 (the engine's internals -- ``PagedAttentionCache``, ``CachePool``,
``OffloadingManager`` -- change between releases; another version is refused at start).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any, Hashable

import torch
import transformers
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.cache import PagedAttentionCache
from transformers.generation.continuous_batching.cache_allocators import SLIDING_ATTENTION, CachePool
from transformers.generation.continuous_batching.continuous_api import (ContinuousBatchingManager,
                                                                        ContinuousBatchProcessor)
from transformers.generation.continuous_batching.initialization import update_cb_config_after_cache_creation
from transformers.generation.continuous_batching.offloading_manager import OffloadingManager
from transformers.generation.continuous_batching.requests import RequestStatus
from transformers.generation.continuous_batching.scheduler import SCHEDULER_MAPPING, FIFOScheduler
from transformers.generation.continuous_batching.utils import find_head_dim, find_num_key_value_heads, stream_context

from kvtier.buffer import ElasticBuffer
from kvtier.errors import ConfigError, OutOfPagesError, TransferError
from kvtier.manager import TierManager

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ("5.24",)


def check_version() -> None:
    version = transformers.__version__
    if ".".join(version.split(".")[:2]) not in SUPPORTED_VERSIONS:
        raise ConfigError(f"kvtier's continuous-batching integration supports transformers "
                          f"{', '.join(v + '.x' for v in SUPPORTED_VERSIONS)} (the engine's internals change between "
                          f"releases); this is {version}: install transformers=={SUPPORTED_VERSIONS[-1]}.*")


class ElasticSectors(CachePool):
    """The engine's sector pool over an elastic buffer: a sector is mapped when it is handed out and released
    when it is free again. Counts a sector free only if the pages it needs could be mapped now."""

    def __init__(self, buffer: ElasticBuffer, bytes_per_sector: int, num_sectors: int, num_allocators: int) -> None:
        self.buffer, self.bytes_per_sector = buffer, bytes_per_sector
        self.peak_held = 0
        self.stream: Any = None  # the engine's compute stream: pages go back after its queued work
        self._counted: tuple[Any, int] = (None, 0)  # (what num_free_sectors depended on, its answer)
        self._changes = 0  # bumped whenever the free sectors change
        super().__init__(num_sectors, num_allocators)
        buffer.acquire([self.span(0), self.span(1)])  # the pad sectors (read and write trash): always there

    def span(self, sector: int) -> tuple[int, int]:
        return sector * self.bytes_per_sector, (sector + 1) * self.bytes_per_sector

    def _cost(self, sector: int) -> int:
        return self.buffer.missing([self.span(sector)])

    @property
    def held(self) -> int:
        """Data sectors handed out: those not free (the two pad sectors are never in the free list)."""
        return self.num_sectors - len(self.free_sectors)

    def reset(self) -> None:
        free = set(getattr(self, "free_sectors", range(2, self.num_sectors + 2)))  # CachePool's __init__ resets too
        taken = [s for s in range(2, self.num_sectors + 2) if s not in free]
        super().reset()
        self._changes = getattr(self, "_changes", 0) + 1
        if taken:
            self.buffer.release([self.span(s) for s in taken], self.stream)

    @property
    def num_free_sectors(self) -> int:
        # the scheduler asks per request per step: counted again only when what it depends on changed
        room = self.buffer.available()
        key = (room, self.buffer.mapped_pages, self._changes)
        if key != self._counted[0]:
            count = 0
            for cost in sorted(self._cost(s) for s in self.free_sectors):  # sectors on mapped pages cost nothing
                if cost > room:
                    break
                room, count = room - cost, count + 1
            self._counted = (key, count)
        return self._counted[1]

    def allocate_sector(self, index: int) -> None:
        # the cheapest free sector (on pages mapped already), the most recently freed among equals
        sector = min(reversed(self.free_sectors), key=self._cost)
        self.buffer.acquire([self.span(sector)])  # OutOfPagesError: nothing changed
        self.free_sectors.remove(sector)
        self._changes += 1
        self.peak_held = max(self.peak_held, self.held)
        self._free_blocks[index].add_tree(sector)

    def try_to_free_sectors(self) -> None:
        before = len(self.free_sectors)
        super().try_to_free_sectors()
        freed = self.free_sectors[before:]
        if freed:
            self._changes += 1
            self.buffer.release([self.span(s) for s in freed], self.stream)


class ElasticCache(PagedAttentionCache):
    """The engine's paged cache with its tensor on an elastic buffer (sized, laid out and used as the engine's)."""

    def __init__(self, engine: "KVTierEngine", device: torch.device | str, **kwargs: Any) -> None:
        super().__init__(device="meta", **kwargs)  # sizes and lays out everything; the meta tensor holds nothing
        self.device = device
        bps = self.bytes_per_sector
        self.buffer = engine.make_buffer((self.num_sectors + 2) * bps)
        try:
            self.pool = ElasticSectors(self.buffer, bps, self.num_sectors, len(self.cache_allocators))
        except BaseException:  # no room even for the pad sectors: nothing is left behind
            self.buffer.close()
            raise
        self.cache_tensor = self.buffer.tensor
        for allocator in self.cache_allocators.values():
            allocator.register_cache_tensor(bps, self.num_sectors * bps, self.cache_tensor, self.pool)
        self._lock = engine.manager.lock
        self.holding = False  # while preempting: freed blocks keep their pages until they are copied

    def can_store_request_tokens(self, *args: Any, **kwargs: Any) -> bool:
        with self._lock:  # check and allocation at once: another engine on the pool cannot come between
            try:
                return super().can_store_request_tokens(*args, **kwargs)
            except OutOfPagesError:  # the pool moved under the count (another process): no room, as the engine
                return False         # would say; sectors handed out before it stay its free blocks

    def prepare_fork_request(self, *args: Any, **kwargs: Any) -> list[str]:
        with self._lock:
            return super().prepare_fork_request(*args, **kwargs)

    def free_blocks(self, request_id: str, no_cache: bool = False) -> None:
        super().free_blocks(request_id, no_cache)
        if not self.holding:
            self.pool.try_to_free_sectors()  # a finished request's pages go back to the pool

    def free_all_requests(self, clear_ledgers: bool = False) -> None:
        super().free_all_requests(clear_ledgers)
        self.pool.try_to_free_sectors()

    def close(self) -> None:
        self.buffer.close()


class TieredOffloading(OffloadingManager):
    """Preempted requests go down through kvtier's tiers instead of the engine's static swap pool."""

    MAX_SWAP_BLOCKS = 1 << 20  # ~10 MB of books a swap space at most
    ROOM_POLL_S = 0.005

    def __init__(self, cache: ElasticCache, scheduler: Any, compute_stream: Any, distributed_helper: Any,
                 engine: "KVTierEngine") -> None:
        super().__init__(cache, scheduler, 0.0, 1.0, compute_stream, distributed_helper)  # no pinned pool
        self.engine = engine
        mgr = engine.manager
        self.swap = {name: mgr.create_space(f"{engine.name}/swap/{name}", num_layers=1, num_kv_heads=1,
                                            head_dim=a.bytes_per_block // 4, dtype=torch.float16, block_size=1,
                                            max_tokens=self._swap_tokens(a.bytes_per_block, a.num_blocks),
                                            priority=engine.priority,
                                            map_ahead=False)  # staging room only while a chunk goes down
                     for name, a in cache.cache_allocators.items()}
        self.chunk_blocks = {name: max(1, engine.staging_bytes // a.bytes_per_block)
                             for name, a in cache.cache_allocators.items()}
        self.swapped: dict[str, list[tuple[str, Hashable, int]]] = {}  # request -> (allocator, swap seq, offset)
        self.going_down: dict[str, list[Any]] = {}  # request -> its chunks' transfers down
        self.nothing_scheduled = False  # the scheduler's last try found no room for any request

    def _swap_tokens(self, bytes_per_block: int, num_blocks: int) -> int:
        """Blocks the (virtual) swap space of one allocator is sized for. Requests swapped out may together hold
        far more blocks than the cache (each was preempted for the next), and a page below takes no new blocks, so
        each chunk keeps a page to itself until it comes back: room for every page the tiers below can hold plus
        the staging pages, in blocks -- capped, since the space's books cost a few bytes a block (past the cap, a
        swap-out finds no room and the request is recomputed: the engine's own fallback)."""
        mgr = self.engine.manager
        slots = sum(t.books.total for t in mgr.tiering.tiers.values())  # a slot is one page of one region
        pages = slots // 2 + self.engine.staging_pages() + 2 * num_blocks
        return max(num_blocks, min(pages * 2 * mgr.page_size // bytes_per_block, self.MAX_SWAP_BLOCKS))

    # --- down -------------------------------------------------------------------------------------------------
    def offload_requests(self) -> bool:
        self.cache.holding = True
        try:
            moved = super().offload_requests()
        finally:
            self.cache.holding = False
            self.cache.pool.try_to_free_sectors()  # after the copies were queued: the fences cover them
            self.stage_waiting()
        # (also asked after a batch was made, for requests left without blocks: then nothing is waited for)
        return moved or (self.nothing_scheduled and self._wait_for_room())

    def _wait_for_room(self) -> bool:
        """Nothing of its own to preempt, and nothing scheduled: the engine would stop with an error. If what it
        lacks is pool room (its own sectors are free, the pages are held by another engine on the pool or another
        process on the device), wait for that room to grow -- their requests finish, or they preempt theirs --
        and let the engine schedule again; after ``room_wait_s`` with no change, a clear OutOfPagesError."""
        sectors = self.cache.pool
        if not sectors.free_sectors:  # its own cache is full: the engine's own error
            return False
        buffer, ledger = self.cache.buffer, self.engine.manager.pool.ledger
        before = buffer.available()
        deadline = time.monotonic() + self.engine.room_wait_s
        while time.monotonic() < deadline and not self.engine.stopping.is_set():
            if ledger is not None:  # other processes' demoters give idle pages back to a process that says so
                ledger.want(max(1, min(sectors._cost(s) for s in sectors.free_sectors) - before))
            time.sleep(self.ROOM_POLL_S)
            if buffer.available() > before:
                self.engine.counts["room_waits"] += 1
                return True
        raise OutOfPagesError(
            f"continuous batching {self.engine.name!r}: no request can be scheduled and none preempted, and the "
            f"pool's room for this engine ({before} page(s)) did not grow in {self.engine.room_wait_s:g} s: other "
            "engines on the pool (or processes on the device: kvtier ls) hold the rest; raise pool_budget, lower "
            "their capacity_bytes, or raise room_wait_s")

    def _offload_to_cpu(self, victims: list[Any], victim_block_tables: dict[str, dict[str, list[int]]]) -> set[str]:
        done = set()
        for state in victims:
            table = {name: blocks for name, blocks in victim_block_tables[state.request_id].items() if blocks}
            if not table:
                continue
            try:
                self._swap_out(state.request_id, table)
            except OutOfPagesError as exc:  # no room even to stage: the engine's own fallback, recompute
                log.info("continuous batching %r: request %s soft reset (%s)", self.engine.name, state.request_id,
                         exc)
                self._free_swapped(state.request_id)
                self.engine.counts["soft_resets"] += 1
                continue
            state.is_cpu_offloaded = True
            done.add(state.request_id)
            self.engine.counts["preempted_to_tiers"] += 1
        return done

    def _swap_out(self, request_id: str, table: dict[str, list[int]]) -> None:
        chunks = self.swapped.setdefault(request_id, [])
        handles = self.going_down.setdefault(request_id, [])
        for name, blocks in table.items():
            space, allocator, step = self.swap[name], self.cache.cache_allocators[name], self.chunk_blocks[name]
            for offset in range(0, len(blocks), step):
                part = blocks[offset:offset + step]
                seq = (request_id, name, offset)
                try:
                    dst = space.allocate(seq, len(part))
                except OutOfPagesError:  # the staging room is on its way down with earlier chunks: this
                    for earlier in self.going_down.values():  # request's, or another victim's of this step
                        _settle(earlier)
                    dst = space.allocate(seq, len(part))
                chunks.append((name, seq, offset))
                with stream_context(self._compute_stream):
                    src = allocator._copy_view.index_select(0, torch.tensor(part, device=self.cache.device))
                    _swap_bytes(space, dst, src, self.cache.device)
                handles.append(space.offload(seq, tier=self.engine.swap_tier, stream=self._compute_stream))
                self.engine.counts["bytes_down"] += src.numel()

    # --- up ---------------------------------------------------------------------------------------------------
    def restore_scheduled_requests(self, requests_in_batch: list[Any]) -> None:
        # the batch is made (its token counts fixed): a request that lost its KV here can only fail, with the
        # engine's error; stage_waiting reads swapped requests up ahead of their turn so that losses are met
        # there, while a request can still be recomputed
        for future_state in requests_in_batch:
            state = future_state.state
            if not state.is_cpu_offloaded:
                continue
            for name, seq, offset in self.swapped.pop(state.request_id, []):
                space, allocator = self.swap[name], self.cache.cache_allocators[name]
                space.ensure_resident([seq])
                gpu_blocks = allocator.block_table.get(state.request_id, [])[offset:offset + space.num_tokens(seq)]
                if gpu_blocks:  # the engine may give it fewer blocks than it had: what it reads again
                    with stream_context(self._compute_stream):
                        src = _swapped_bytes(space, space.blocks(seq)[:len(gpu_blocks)], self.cache.device)
                        ids = torch.tensor(gpu_blocks, device=self.cache.device)
                        allocator._copy_view.index_copy_(0, ids, src)
                space.free(seq, stream=self._compute_stream)
            state.is_cpu_offloaded = False
            self.engine.counts["restored"] += 1
            if self.cache.use_prefix_sharing:  # restored blocks are full blocks the engine may share again
                for name, allocator in self.cache.cache_allocators.items():
                    full = state.position_offset // allocator.tokens_per_page
                    if full:
                        future_state.complete_blocks[name] = future_state.complete_blocks.get(name, 0) + full
        self.stage_waiting()

    @staticmethod
    def _stage_now(chunks: list[tuple[Any, Hashable]], room: int) -> int:
        """Bring ``chunks`` into host memory, if ``room`` host slots hold them, and wait; return the slots used.
        A failed read marks the pages lost; the caller looks."""
        # not wholly in host memory: on NVMe, or still on its way down (a wait for the write, then the read)
        below = [(space, seq) for space, seq in chunks if space.residency(seq)["nvme"]]
        need = sum(space.page_residency(seq)["nvme"] * space.num_regions for space, seq in below)
        if not below or need > room:
            return 0
        for space, seq in below:
            try:
                space.stage([seq]).result()
            except TransferError:
                pass
        return need

    def _recompute(self, state: Any) -> None:
        """``state`` lost its swapped KV: in the waiting line, it becomes a request for its whole context."""
        self._free_swapped(state.request_id)
        fresh = state.create_equivalent_initial_request()
        state._status = RequestStatus.FINISHED  # the engine's own way to retire a state it replaces
        state.is_cpu_offloaded = False
        self.scheduler.waiting_requests[state.request_id] = fresh
        self.engine.counts["soft_resets"] += 1
        self.engine.counts["lost"] += 1

    def stage_waiting(self) -> None:
        """Read the swapped requests in the engine's line from NVMe into host memory now, within the host's free
        slots: the read their restore would do, a step ahead, so that their restore crosses PCIe only and a
        request whose KV was lost below (a failing disk) is found while it can still be recomputed -- it becomes
        a request for its whole context. (Not up to the GPU: a chunk brought up is active again, and the next
        chunk swapped out would share its page and stay up with it.) Not under the manager's lock: a wait for a
        read lets the transfer worker commit."""
        if not self.swapped:  # the common step: nothing swapped, nothing to look at
            return
        room = self.engine.manager.tiering.free_slots("host")
        for request_id in list(self.scheduler.waiting_requests_order):
            state = self.scheduler.waiting_requests.get(request_id)
            if state is None or not state.is_cpu_offloaded:
                continue
            chunks = [(self.swap[name], seq) for name, seq, _ in self.swapped.get(request_id, [])]
            _settle(self.going_down.pop(request_id, []))  # landed (or stayed up, if a write failed)
            room -= self._stage_now(chunks, room)
            if any(space.residency(seq)["lost"] for space, seq in chunks):
                log.warning("continuous batching %r: waiting request %s lost its swapped KV; it is recomputed",
                            self.engine.name, request_id)
                self._recompute(state)

    # --- cleanup ---------------------------------------------------------------------------------------------
    def _free_swapped(self, request_id: str) -> None:
        _settle(self.going_down.pop(request_id, []))
        for name, seq, _ in self.swapped.pop(request_id, []):
            self.swap[name].free(seq)

    def free_request_cpu_cache(self, state: Any) -> None:
        if state.is_cpu_offloaded:
            self._free_swapped(state.request_id)
            state.is_cpu_offloaded = False

    def reset(self) -> None:
        self.free_all_waiting_cpu_caches()
        for request_id in list(self.swapped):
            self._free_swapped(request_id)

    def close(self) -> None:
        self.reset()
        for space in self.swap.values():
            self.engine.manager.drop_space(space.name)


def _settle(handles: list[Any]) -> None:
    """Wait for transfers down; a write that failed left its pages where they were (nothing lost)."""
    for handle in handles:
        try:
            handle.result()
        except TransferError:
            pass
    handles.clear()


def _halves(space: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A swap space's K and V regions as byte rows: one engine block is a K row followed by a V row."""
    k, v = space.kv(0)
    return k.view(k.shape[0], -1).view(torch.uint8), v.view(v.shape[0], -1).view(torch.uint8)


def _swap_bytes(space: Any, dst_blocks: list[int], src: torch.Tensor, device: Any) -> None:
    k, v = _halves(space)
    ids = torch.tensor(dst_blocks, device=device)
    half = k.shape[1]
    k.index_copy_(0, ids, src[:, :half])
    v.index_copy_(0, ids, src[:, half:])


def _swapped_bytes(space: Any, blocks: list[int], device: Any) -> torch.Tensor:
    k, v = _halves(space)
    ids = torch.tensor(blocks, device=device)
    return torch.cat([k.index_select(0, ids), v.index_select(0, ids)], dim=1)


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
        cache_args = dict(config=model.config.get_text_config(), continuous_batching_config=cb,
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
        scheduler = SCHEDULER_MAPPING.get(cb.scheduler_type, FIFOScheduler)(
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
            processor.offloading_manager = TieredOffloading(cache, scheduler, stream, self.distributed_helper,
                                                            engine)
        except BaseException:
            cache.close()
            raise
        engine.attach(cache, processor.offloading_manager)
        schedule = scheduler.schedule_batch

        def schedule_batch(*args: Any, **kwargs: Any) -> Any:
            # whether the last try scheduled nothing: the engine then asks to preempt or stop (see _wait_for_room)
            out = schedule(*args, **kwargs)
            processor.offloading_manager.nothing_scheduled = out[0] is None
            return out

        scheduler.schedule_batch = schedule_batch
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
                 staging_bytes: int | None, swap_tier: str, room_wait_s: float = 30.0) -> None:
        check_version()
        if swap_tier not in ("host", "nvme"):
            raise ConfigError(f"swap_tier must be 'host' (cascading to NVMe as the host fills) or 'nvme', got "
                              f"{swap_tier!r}")
        self.model, self.manager, self.name, self.priority = model, manager, name, priority
        self.swap_tier, self.room_wait_s = swap_tier, room_wait_s
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
                       "bytes_down": 0, "room_waits": 0}
        self.cache: ElasticCache | None = None
        self.offloading: TieredOffloading | None = None
        self.managers: weakref.WeakSet[ContinuousBatchingManager] = weakref.WeakSet()  # built inside the with
        self.stopping = threading.Event()
        self._peak_bytes = 0

    @staticmethod
    def bytes_per_block(config: Any, page_size: int, dtype: torch.dtype) -> int:
        return (config.num_hidden_layers * 2 * find_num_key_value_heads(config) * find_head_dim(config) *
                dtype.itemsize * page_size)

    def staging_pages(self) -> int:
        # a swap chunk of staging_bytes is half in its space's K region and half in V, each maybe straddling a page
        return 2 * (-(-self.staging_bytes // (2 * self.manager.page_size)) + 1)

    def make_buffer(self, nbytes: int) -> ElasticBuffer:
        return self.manager.create_buffer(f"{self.name}/kv", nbytes, self.priority, reserve_pages=self.staging_pages())

    def attach(self, cache: ElasticCache, offloading: TieredOffloading) -> None:
        self.cache, self.offloading = cache, offloading

    def detach(self) -> None:
        if self.cache is not None:
            self._peak_bytes = max(self._peak_bytes, self.cache.buffer.peak_pages * self.manager.page_size)
            self.offloading.close()
            self.cache.close()
            self.cache = self.offloading = None

    def stats(self) -> dict[str, Any]:
        live = self.cache.buffer.stats() if self.cache is not None else {}
        peak = max(self._peak_bytes, live.get("peak_bytes_mapped", 0))
        sectors = {"sectors_held": self.cache.pool.held, "peak_sectors_held": self.cache.pool.peak_held} \
            if self.cache is not None else {}
        return {"bytes_mapped": live.get("bytes_mapped", 0), "peak_bytes_mapped": peak, **sectors, **self.counts}


class kvtier_engine:  # noqa: N801 -- used as a context manager, like torch.no_grad
    """Run ``model``'s continuous batching on ``manager`` inside the ``with`` (see the module docstring).

    ``capacity_bytes``: the most KV the engine's cache may map (default: the pool's budget less the staging);
    ``staging_bytes``: pool room left to the engine's preemptions (default: a sixteenth of the budget);
    ``priority``: the swap spaces' priority under the tiers' policy; ``swap_tier``: where preempted requests go
    at once (``"host"``, whence the host's cascade takes them on to NVMe as it fills; or ``"nvme"``);
    ``room_wait_s``: how long an engine that can neither schedule nor preempt waits for pool room held by other
    engines or processes before it fails with OutOfPagesError (the engine as shipped fails at once)."""

    def __init__(self, model: Any, manager: TierManager, name: str | None = None, priority: int = 0,
                 capacity_bytes: int | None = None, staging_bytes: int | None = None,
                 swap_tier: str = "host", room_wait_s: float = 30.0) -> None:
        self.engine = KVTierEngine(model, manager, name or f"{model.config.model_type}-{id(model):x}", priority,
                                   capacity_bytes, staging_bytes, swap_tier, room_wait_s)

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
