"""The engine's paged cache on an elastic buffer: sectors mapped while handed out (see continuous_batching)."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import torch
from transformers.generation.continuous_batching.cache import PagedAttentionCache
from transformers.generation.continuous_batching.cache_allocators import CachePool

from kvtier.buffer import ElasticBuffer
from kvtier.errors import OutOfPagesError

if TYPE_CHECKING:
    from kvtier.integrations.cb_prefix import TieredPrefixes
    from kvtier.integrations.continuous_batching import KVTierEngine

ROOM_POLL_S = 0.005
WANT_EVERY_S = 0.1  # said again well within the ledger's WANT_TTL_S (a write under its lock each time)


def wait_for_room(buffer: ElasticBuffer, enough: Callable[[int], bool], wanted: int, seconds: float,
                  stopping: threading.Event | None = None) -> bool:
    """Wait up to ``seconds`` until ``enough(buffer.available())``, saying meanwhile that this buffer wants
    ``wanted`` more pages: other engines on the pool stop growing past their fair share, and other processes'
    demoters give idle pages back (through the device's ledger). Returns whether the room came (not if
    ``stopping`` was set first)."""
    start, said = time.monotonic(), float("-inf")
    while time.monotonic() - start < seconds:
        if stopping is not None and stopping.is_set():
            return False
        if enough(buffer.available()):
            return True
        if time.monotonic() - said > WANT_EVERY_S:
            buffer.want(max(1, wanted))
            said = time.monotonic()
        time.sleep(ROOM_POLL_S)
    return enough(buffer.available())


class ElasticSectors(CachePool):
    """The engine's sector pool over an elastic buffer: a sector is mapped when it is handed out and released
    when it is free again. Counts a sector free only if the pages it needs could be mapped now."""

    def __init__(self, buffer: ElasticBuffer, bytes_per_sector: int, num_sectors: int, num_allocators: int,
                 room_wait_s: float = 0.0) -> None:
        self.buffer, self.bytes_per_sector = buffer, bytes_per_sector
        self.peak_held = 0
        self.stream: Any = None  # the engine's compute stream: pages go back after its queued work
        self._counted: tuple[Any, int] = (None, 0)  # (what num_free_sectors depended on, its answer)
        self.room_limited = False  # the last count stopped at the pool's room, not at the free sectors
        self._changes = 0  # bumped whenever the free sectors change
        super().__init__(num_sectors, num_allocators)
        pads = [self.span(0), self.span(1)]  # the pad sectors (read and write trash): always there
        need = buffer.missing(pads)  # others may hold the room now (idle pages of another process): wait for it
        wait_for_room(buffer, lambda room: room >= need, need - buffer.available(), room_wait_s)
        buffer.acquire(pads)  # the pool's error if it did not come

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
            # sectors on mapped pages cost nothing; the others cost the unmapped pages they touch, each page once
            # (several sectors share a page when sectors are smaller than pages): cheapest first, in page order
            counted: set[int] = set()
            count = 0
            for _, sector in sorted((self._cost(s), s) for s in self.free_sectors):
                new = [p for p in self.buffer.pages(self.span(sector))
                       if p not in counted and not self.buffer.range.is_mapped(p)]
                if len(new) <= room:
                    room, count = room - len(new), count + 1
                    counted.update(new)
            self._counted = (key, count)
            self.room_limited = count < len(self.free_sectors)
        return self._counted[1]

    def allocate_sector(self, index: int) -> None:
        # the cheapest free sector (on pages mapped already), the most recently freed among equals
        self.allocate_sectors(index, 1)

    def allocate_sectors(self, index: int, n: int) -> None:
        """``n`` free sectors for allocator ``index``, chosen and mapped at once: the cheapest by their cost now,
        the most recently freed among equals (one sector at a time scanned every free sector's cost for each:
        0.75 s of a 4096-token hit's 1.8 s here). OutOfPagesError (or fewer than ``n`` free): nothing changed."""
        if n > len(self.free_sectors):
            raise OutOfPagesError(f"{n} sector(s) wanted, {len(self.free_sectors)} free")
        chosen = sorted(reversed(self.free_sectors), key=self._cost)[:n]  # stable: recency among equal costs
        self.buffer.acquire([self.span(sector) for sector in chosen])
        for sector in chosen:
            self.free_sectors.remove(sector)
            self._free_blocks[index].add_tree(sector)
        self._changes += 1
        self.peak_held = max(self.peak_held, self.held)

    def try_to_free_sectors(self) -> None:
        before = len(self.free_sectors)
        super().try_to_free_sectors()
        freed = self.free_sectors[before:]
        if freed:
            self._changes += 1
            self.buffer.release([self.span(s) for s in freed], self.stream)


class ElasticCache(PagedAttentionCache):
    """The engine's paged cache with its tensor on an elastic buffer (sized, laid out and used as the engine's)."""

    pool: ElasticSectors  # the engine's CachePool, on the buffer

    def __init__(self, engine: "KVTierEngine", device: torch.device | str, **kwargs: Any) -> None:
        super().__init__(device="meta", **kwargs)  # sizes and lays out everything; the meta tensor holds nothing
        self.device = device
        bps = self.bytes_per_sector
        self.buffer = engine.make_buffer((self.num_sectors + 2) * bps)
        try:
            self.pool = ElasticSectors(self.buffer, bps, self.num_sectors, len(self.cache_allocators),
                                       engine.room_wait_s)
        except BaseException:  # no room even for the pad sectors: nothing is left behind
            self.buffer.close()
            raise
        self.cache_tensor = self.buffer.tensor
        for allocator in self.cache_allocators.values():
            allocator.register_cache_tensor(bps, self.num_sectors * bps, self.cache_tensor, self.pool)
        self._lock = engine.manager.lock
        self.holding = False  # while preempting: freed blocks keep their pages until they are copied
        self.prefixes: "TieredPrefixes | None" = None  # cached blocks kept in the tiers (cb_prefix), if sharing

    def can_store_request_tokens(self, *args: Any, **kwargs: Any) -> bool:
        with self._lock:  # check and allocation at once: another engine on the pool cannot come between
            try:
                return super().can_store_request_tokens(*args, **kwargs)
            except OutOfPagesError:  # the pool moved under the count (another process): no room, as the engine
                return False         # would say; sectors handed out before it stay its free blocks

    def prepare_fork_request(self, *args: Any, **kwargs: Any) -> list[str]:
        with self._lock:
            return super().prepare_fork_request(*args, **kwargs)

    # --- prefix sharing through the tiers (cb_prefix) -------------------------------------------------------------
    def search_prefix_match(self, request_id: str, prompt_ids: list[int]) -> int:
        matched = super().search_prefix_match(request_id, prompt_ids)  # what the GPU cache holds
        if self.prefixes is None:
            return matched
        # and after it, what the tiers hold (not under the manager's lock: a wait for a read lets transfers commit)
        return self.prefixes.extend(request_id, prompt_ids, matched)

    def resume_prefix(self, state: Any) -> None:
        """Before the next chunk of a request part-way through its prompt is computed: the blocks after what it
        holds that its lookup found below with no room for them then, brought in now if room came."""
        held, prompt = state.position_offset, state.initial_tokens
        if self.prefixes is None or held + len(state.remaining_prefill_tokens) != len(prompt):
            return
        got = self.prefixes.resume(state.request_id, prompt, held)
        if got > held:
            state.remaining_prefill_tokens = state.remaining_prefill_tokens[got - held:]
            state.position_offset = got

    def mark_complete_blocks(self, state: Any, complete_blocks: dict[str, int]) -> None:
        super().mark_complete_blocks(state, complete_blocks)
        if self.prefixes is not None and complete_blocks and state.request_id in self._tables():
            self.prefixes.note_complete(state.request_id, state.initial_tokens + state.generated_tokens)

    def _tables(self) -> dict[str, Any]:
        return next(iter(self.cache_allocators.values())).block_table

    def evict_cached_blocks(self) -> bool:
        if self.prefixes is not None:
            self.prefixes.keep()  # their bytes go down the tiers before the engine forgets them
        return super().evict_cached_blocks()

    def free_blocks(self, request_id: str, no_cache: bool = False) -> None:
        super().free_blocks(request_id, no_cache)
        if self.prefixes is not None and not self.holding:  # finished (a preempted one comes back where it was)
            self.prefixes.forget(request_id)
        if not self.holding:
            self.pool.try_to_free_sectors()  # a finished request's pages go back to the pool

    def free_all_requests(self, clear_ledgers: bool = False) -> None:
        super().free_all_requests()
        if clear_ledgers:  # the engine forgets its cached blocks (a reset): they go down first
            self.evict_cached_blocks()
            for allocator in self.cache_allocators.values():
                allocator.ledger.reset()
        self.pool.try_to_free_sectors()

    def close(self) -> None:
        if self.prefixes is not None:
            self.prefixes.unbind()
        self.buffer.close()
