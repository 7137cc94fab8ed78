"""Tiered preemption for the engine: preempted requests' blocks through kvtier's tiers instead of the engine's
static swap pool, and a bounded wait for pool room others hold (see continuous_batching)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Hashable

import torch
from transformers.generation.continuous_batching.offloading_manager import OffloadingManager
from transformers.generation.continuous_batching.requests import RequestStatus
from transformers.generation.continuous_batching.utils import stream_context

from kvtier.errors import OutOfPagesError, TransferError
from kvtier.integrations.cb_cache import ElasticCache, wait_for_room
from kvtier.tiering import HostSlots

if TYPE_CHECKING:
    from kvtier.integrations.continuous_batching import KVTierEngine

log = logging.getLogger(__name__)


class TieredOffloading(OffloadingManager):
    """Preempted requests go down through kvtier's tiers instead of the engine's static swap pool."""

    MAX_SWAP_BLOCKS = 1 << 20  # ~10 MB of books a swap space at most
    cache: ElasticCache  # the engine's PagedAttentionCache, elastic

    def __init__(self, cache: ElasticCache, scheduler: Any, compute_stream: Any, distributed_helper: Any,
                 engine: "KVTierEngine") -> None:
        super().__init__(cache, scheduler, 0.0, 1.0, compute_stream, distributed_helper)  # no pinned pool
        self.engine = engine
        mgr = engine.manager
        self.swap = {name: mgr.create_space(f"{engine.name}/swap/{name}", num_layers=1, num_kv_heads=1,
                                            head_dim=a.bytes_per_block // 4, dtype=torch.float16, block_size=1,
                                            max_tokens=self.swap_tokens(a.bytes_per_block, a.num_blocks),
                                            priority=engine.priority,
                                            map_ahead=False)  # staging room only while a chunk goes down
                     for name, a in cache.cache_allocators.items()}
        self.chunk_blocks = {name: max(1, engine.staging_bytes // a.bytes_per_block)
                             for name, a in cache.cache_allocators.items()}
        self.swapped: dict[str, list[tuple[str, Hashable, int]]] = {}  # request -> (allocator, swap seq, offset)
        self.going_down: dict[str, list[Any]] = {}  # request -> its chunks' transfers down
        self.nothing_scheduled = False  # the scheduler's last try found no room for any request
        self.room_seen = 0  # the buffer's room just after that try

    def swap_tokens(self, bytes_per_block: int, num_blocks: int) -> int:
        """Blocks the (virtual) swap space of one allocator is sized for. Requests swapped out may together hold
        far more blocks than the cache (each was preempted for the next), and a page below takes no new blocks, so
        each chunk keeps a page to itself until it comes back: room for every page the tiers below can hold plus
        the staging pages, in blocks -- capped, since the space's books cost a few bytes a block (past the cap, a
        swap-out finds no room and the request is recomputed: the engine's own fallback)."""
        mgr = self.engine.manager
        slots = sum(t.books.total for t in mgr.tiering.stack)  # a unit holds at most one page of one region
        pages = slots // 2 + self.engine.staging_pages() + 2 * num_blocks
        return max(num_blocks, min(pages * 2 * mgr.page_size // bytes_per_block, self.MAX_SWAP_BLOCKS))

    # --- down -------------------------------------------------------------------------------------------------
    def offload_requests(self) -> bool:
        prefixes = self.cache.prefixes
        if prefixes is not None and prefixes.after_lookup and not self.nothing_scheduled:
            # a batch runs, so room comes: a request holding only what its lookup gave it waits for it where it is
            # (one that found more below than it had room for is looked up again before its next chunk); swapped
            # out, its blocks would go back down just up (or those the engine matched, cached, be copied down),
            # and it would wait behind later requests, keeping new ones out
            starved = self.scheduler.starved_requests
            starved[:] = [(s, n) for s, n in starved if not prefixes.waits_for_room(s.request_id, s.position_offset)]
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
        and let the engine schedule again; after ``room_wait_s`` with no change, a clear OutOfPagesError. Room
        held by its own prefix spaces' blocks on their way down comes back first (waited for: they land soon;
        a hit brought up whole had held the room the engine needed next, and the engine failed the request)."""
        sectors = self.cache.pool
        if not sectors.free_sectors:  # its own cache is full: the engine's own error
            return False
        buffer, engine = self.cache.buffer, self.engine
        before = buffer.available()
        if before > self.room_seen:  # room came since the scheduler looked (pages landed, freed or made): again
            self.room_seen = before
            return True
        prefixes = self.cache.prefixes
        if prefixes is not None and prefixes.going_down:  # its own kept or found blocks on their way down
            prefixes.settle(wait=True)
            if buffer.available() > before:
                return True
        if buffer.settle_arrivals() and buffer.available() > before:  # spaces' reserves being mapped: room soon
            return True
        wanted = min(sectors._cost(s) for s in sectors.free_sectors) - before
        holders = self._others_holding()
        if not holders:  # no one else holds the room it lacks: waiting cannot help
            raise OutOfPagesError(
                f"continuous batching {engine.name!r}: no request can be scheduled and none preempted, and nothing "
                f"else holds pool room this engine could wait for: it maps {buffer.mapped_pages} page(s) of the "
                f"pool's {engine.manager.pool.budget_pages} ({buffer.reserve_pages} kept for staging its "
                "preemptions), too few for the next request -- a prompt longer than the engine's cache can take; "
                "raise pool_budget (or capacity_bytes), or shorten the prompt or max_new_tokens")
        while True:
            if wait_for_room(buffer, lambda room: room > before, wanted, engine.room_wait_s, engine.stopping):
                engine.counts["room_waits"] += 1
                return True
            if engine.stopping.is_set():
                raise OutOfPagesError(f"continuous batching {engine.name!r}: stopped while waiting for pool room")
            if not buffer.yielding():  # held at its fair share while others are short: no failure, wait on
                break
        raise OutOfPagesError(
            f"continuous batching {self.engine.name!r}: no request can be scheduled and none preempted, and the "
            f"pool's room for this engine ({before} page(s)) did not grow in {self.engine.room_wait_s:g} s; it is "
            f"held by {', '.join(holders)}; raise pool_budget, lower their capacity_bytes, or raise room_wait_s")

    def _others_holding(self) -> list[str]:
        """Who else holds pages this engine could get back by waiting: other buffers and spaces on the pool, other
        processes on the device's ledger."""
        mgr, own = self.engine.manager, {self.cache.buffer.name} | {s.name for s in self.swap.values()}
        with mgr.lock:
            held = [f"buffer {b.name!r} ({b.mapped_pages} page(s))" for b in mgr.buffers.values()
                    if b.name not in own and b.mapped_pages]
            held += [f"space {s.name!r} ({s.range.handle_count()} page(s))" for s in mgr.spaces.values()
                     if s.name not in own and s.range.handles]
        ledger = mgr.pool.ledger
        others = ledger.others_pages() if ledger is not None else 0
        if others:
            held.append(f"other processes on the device ({others} page(s); kvtier ls names them)")
        return held

    def _offload_to_cpu(self, victims: list[Any], victim_block_tables: dict[str, dict[str, list[int]]]) -> set[str]:
        done = set()
        prefixes = self.cache.prefixes
        for state in victims:
            table = {name: blocks for name, blocks in victim_block_tables[state.request_id].items() if blocks}
            if not table:
                continue
            if prefixes is not None and prefixes.holds_only_found(state.request_id, state.position_offset):
                # it holds only blocks its lookup found (they rest below, and the engine's matched ones stay
                # cached): requeued from its prompt, it finds them again -- no copy down of what is already there
                self.engine.counts["prefix_requeued"] += 1
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
                    put_blocks(space, dst, src, self.cache.device)
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
                        src = get_blocks(space, space.blocks(seq)[:len(gpu_blocks)], self.cache.device)
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

    def _stage_now(self, chunks: list[tuple[Any, Hashable]], room: int) -> int:
        """Bring ``chunks`` into host memory, if ``room`` host slots hold them, and wait; return the slots used.
        A failed read marks the pages lost; the caller looks."""
        tiering = self.engine.manager.tiering
        disks = [t.name for t in tiering.stack if tiering.stage_target(t.id) is not None]  # what stage reads up
        # not wholly in host memory: on a disk, or still on its way down (a wait for the write, then the read)
        below = [(space, seq) for space, seq in chunks if any(space.residency(seq)[d] for d in disks)]
        need = sum(space.stripe_residency(seq)[d] * space.num_regions for space, seq in below for d in disks)
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
        tiering = self.engine.manager.tiering
        room = sum(tiering.free_slots(t.name) for t in tiering.stack if isinstance(t, HostSlots))
        for request_id in list(self.scheduler.waiting_requests_order):
            state = self.scheduler.waiting_requests.get(request_id)
            if state is None or not state.is_cpu_offloaded:
                continue
            chunks = [(self.swap[name], seq) for name, seq, _ in self.swapped.get(request_id, [])]
            _settle(self.going_down.pop(request_id, []))  # landed (or stayed up, if a write failed)
            staged = self._stage_now(chunks, room)
            if staged:
                room -= staged
                self.engine.counts["staged"] += 1
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


def put_blocks(space: Any, dst_blocks: list[int], src: torch.Tensor, device: Any) -> None:
    """Engine blocks' bytes ``src`` (one row each) into blocks ``dst_blocks`` of a space laid out as the swap
    spaces are (one kvtier token per engine block)."""
    k, v = _halves(space)
    ids = torch.tensor(dst_blocks, device=device)
    half = k.shape[1]
    k.index_copy_(0, ids, src[:, :half])
    v.index_copy_(0, ids, src[:, half:])


def get_blocks(space: Any, blocks: list[int], device: Any) -> torch.Tensor:
    """The bytes of ``blocks`` of such a space, one engine block a row."""
    k, v = _halves(space)
    ids = torch.tensor(blocks, device=device)
    return torch.cat([k.index_select(0, ids), v.index_select(0, ids)], dim=1)
