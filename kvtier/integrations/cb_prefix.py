"""The engine's prefix sharing through kvtier's tiers (see continuous_batching).

The engine keeps the full blocks of finished requests cached on the GPU and shares them with new requests
whose prompts start the same way (``allow_block_sharing``, its default), but under memory pressure it forgets
them all at once. Here, before it does, their bytes are copied into a kvtier space, published under kvtier's
content keys and sent down the tiers; a later request whose prompt goes on past what the GPU still holds finds
the rest there: fresh blocks of the engine's are filled from the tiers before the step that reads them (read
straight from host memory or NVMe into them where an engine block spans whole kvtier pages, as a large model's
do; otherwise brought up through the prefix space's staging room a chunk at a time), and enter the engine's own
index again. Keys are kvtier's 128-bit chained keys of the blocks' tokens (the engine's
own hashes are 64-bit); a block whose tokens were never seen here (it entered the engine before) is not kept.
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING, Any, Callable, Hashable

import torch
from transformers.generation.continuous_batching.cache_allocators.cache_allocator import compute_block_hash
from transformers.generation.continuous_batching.utils import stream_context

from kvtier.errors import KVTierError, OutOfPagesError
from kvtier.integrations.cb_preemption import get_blocks, put_blocks
from kvtier.prefix import ROOT, block_keys, fingerprint

if TYPE_CHECKING:
    from kvtier.integrations.cb_cache import ElasticCache
    from kvtier.integrations.continuous_batching import KVTierEngine
    from kvtier.space import KVSpace

log = logging.getLogger(__name__)


class TieredPrefixes:
    """Cached blocks of the engine kept in kvtier's tiers when the engine forgets them, and found again there."""

    def __init__(self, engine: "KVTierEngine", layout: tuple[int, int, int, str], model_id: str) -> None:
        self.engine, self.layout, self.model_id = engine, layout, model_id
        self.spaces: dict[str, "KVSpace"] = {}  # per allocator (layer group); kept across the engine's sessions
        self.layouts: dict[str, bytes] = {}
        self._cache: "ElasticCache | None" = None
        self.stream: Any = None
        self.chunk_blocks: dict[str, int] = {}
        # engine block -> (the engine's hash of it, kvtier's key of it, its position in the prompt's chain, the key
        # before it): valid while the engine's hash is the same
        self.keys: dict[str, dict[int, tuple[int, bytes, int, bytes]]] = {}
        self.going_down: list[tuple[str, Hashable, Any]] = []  # (allocator, kept or hit sequence, its offload or read)
        self.short: set[str] = set()  # requests whose lookup found blocks below with no room for them yet
        self.looked: set[str] = set()  # requests looked up (their finds counted), until they finish
        self.found: dict[str, int] = {}  # request -> the tokens it held after its last lookup that found any below
        self.after_lookup: dict[str, int] = {}  # request -> the tokens it held after its last lookup (if any)
        self._ids = itertools.count()

    @property
    def cache(self) -> "ElasticCache":
        assert self._cache is not None, "TieredPrefixes used while no cache is bound"
        return self._cache

    def bind(self, cache: "ElasticCache", stream: Any, max_tokens: Callable[[int, int], int]) -> None:
        """Serve ``cache`` (a new session's), on its compute ``stream``; the blocks kept by earlier sessions of
        the same layout are found again."""
        mgr, engine = self.engine.manager, self.engine
        for name, a in cache.cache_allocators.items():
            space = self.spaces.get(name)
            if space is not None and space.kv(0)[0].shape[-1] * 4 != a.bytes_per_block:  # another block size
                mgr.drop_space(space.name)
                space = None
            if space is None:
                # one kvtier token = one engine block (its K and V halves in the two regions), as the swap spaces
                self.spaces[name] = mgr.create_space(
                    f"{engine.name}/prefix/{name}", num_layers=1, num_kv_heads=1, head_dim=a.bytes_per_block // 4,
                    dtype=torch.float16, block_size=1, max_tokens=max_tokens(a.bytes_per_block, a.num_blocks),
                    priority=engine.priority, map_ahead=False)
            # what makes bytes interchangeable: the model's layout and id, the block size, the layer group
            self.layouts[name] = fingerprint(*self.layout, a.tokens_per_page, model=f"{self.model_id}/{name}")
            self.chunk_blocks[name] = max(1, engine.staging_bytes // a.bytes_per_block)
            self.keys[name] = {}
        self._cache, self.stream = cache, stream
        self.short, self.looked, self.found, self.after_lookup = set(), set(), {}, {}
        cache.prefixes = self

    def unbind(self) -> None:
        """The session ends: its cached blocks go down the tiers (found by the next session), and it lets go."""
        if self._cache is None:
            return
        try:
            self.keep()
            self.settle(wait=True)
        finally:
            self._cache.prefixes = None
            self._cache, self.stream = None, None
            self.keys = {}

    # --- keys -------------------------------------------------------------------------------------------------
    def note_complete(self, request_id: str, token_ids: list[int]) -> None:
        """The engine hashed the request's completed blocks: key them too, chained from the first (not those of a
        request marked ``do_not_retain``: a block with no key is never kept)."""
        if request_id in self.engine.private:
            return
        for name, allocator in self.cache.cache_allocators.items():
            hashes, keys, tpp = allocator.ledger.block_to_hash, self.keys[name], allocator.tokens_per_page
            parent = ROOT
            for i, block in enumerate(allocator.block_table.get(request_id, [])):
                h = hashes.get(block)
                if h is None:
                    break
                known = keys.get(block)
                if known is None or known[0] != h:
                    tokens = token_ids[i * tpp:(i + 1) * tpp]
                    if len(tokens) < tpp:
                        break
                    known = (h, block_keys(tokens, tpp, self.layouts[name], parent=parent)[0], i, parent)
                    keys[block] = known
                parent = known[1]

    def _key(self, name: str, block: int) -> bytes | None:
        known = self.keys[name].get(block)
        h = self.cache.cache_allocators[name].ledger.block_to_hash.get(block)
        return known[1] if known is not None and h is not None and known[0] == h else None

    # --- down: the engine is about to forget its cached blocks -------------------------------------------------
    def keep(self) -> None:
        """Copy the engine's cached blocks not yet kept into the spaces, publish them and send them down."""
        self.settle(wait=False)
        for name, allocator in self.cache.cache_allocators.items():
            space, todo = self.spaces[name], []
            for block in allocator.ledger.cached_blocks:
                key = self._key(name, block)
                if key is not None:
                    todo.append((block, key))
            known = space.indexed([k for _, k in todo])
            todo = _chains([bk for bk, seen in zip(todo, known) if not seen], self.keys[name])
            step = self.chunk_blocks[name]
            for start in range(0, len(todo), step):
                if not self._keep_chunk(name, todo[start:start + step]):
                    self.engine.counts["prefix_not_kept"] += len(todo) - start
                    break

    def _keep_chunk(self, name: str, part: list[tuple[int, bytes]]) -> bool:
        space, allocator = self.spaces[name], self.cache.cache_allocators[name]
        seq = ("kept", next(self._ids))
        try:
            dst = space.allocate(seq, len(part))
        except OutOfPagesError:  # the staging room is on its way down with earlier chunks
            self.settle(wait=True)
            try:
                dst = space.allocate(seq, len(part))
            except OutOfPagesError:
                return False  # no room even to stage: they are forgotten, as the engine would
        device = self.cache.device
        with stream_context(self.stream):
            src = allocator._copy_view.index_select(0, torch.tensor([b for b, _ in part], device=device))
            put_blocks(space, dst, src, device)
        space.publish(seq, [k for _, k in part])
        remote = self.engine.manager.remote
        if remote is not None:  # runs of one chain go to the store too (the blocks are on the GPU until landed)
            for at, stop, position in _runs(part, self.keys[name]):
                remote.send(space, dst[at:stop], [k for _, k in part[at:stop]], position, self.stream)
        self._send_down(name, seq)
        self.engine.counts["prefix_kept_blocks"] += len(part)
        return True

    def _send_down(self, name: str, seq: Hashable) -> None:
        """Offload ``seq`` after the work queued on the stream (the copies), and let it go once it landed."""
        space = self.spaces[name]
        try:
            handle = space.offload(seq, tier=self.engine.swap_tier, stream=self.stream)
        except KVTierError as exc:  # e.g. the tier is full: it stays up, cached, for the demoter
            log.debug("continuous batching %r: kept blocks stay on the GPU (%s)", self.engine.name, exc)
            space.free(seq, stream=self.stream)
            return
        self.going_down.append((name, seq, handle))

    def settle(self, wait: bool) -> None:
        """Let go of the kept sequences whose blocks have landed below (or all, waiting, if ``wait``): their
        blocks stay cached in the spaces, found by key."""
        left = []
        for name, seq, handle in self.going_down:
            if not wait and not handle.done():
                left.append((name, seq, handle))
                continue
            handle.settle()  # a failed write left the pages where they were: still cached
            self.spaces[name].free(seq)
        self.going_down = left

    # --- up: a new request's prompt goes on past what the engine's GPU cache holds ---------------------------
    def extend(self, request_id: str, prompt_ids: list[int], matched: int) -> int:
        """The engine matched ``matched`` tokens of the prompt on the GPU (and gave the request those blocks);
        look for the blocks after them in the tiers, bring them into fresh blocks of the engine's and index them
        there. Return the tokens the request now holds."""
        held = self._extend(request_id, prompt_ids, matched)
        if held:
            self.after_lookup[request_id] = held
        return held

    def _extend(self, request_id: str, prompt_ids: list[int], matched: int) -> int:
        allocators = self.cache.cache_allocators
        tpp = {a.tokens_per_page for a in allocators.values()}
        if len(tpp) != 1:
            return matched
        (tokens_per_block,) = tpp
        first, last = matched // tokens_per_block, (len(prompt_ids) - 1) // tokens_per_block  # never the whole
        if last <= first:
            return matched
        remote = self.engine.manager.remote
        # looked up to the prompt's last whole block (a store's object may end there), taken up to ``last``
        whole = len(prompt_ids) // tokens_per_block
        keys = {name: block_keys(prompt_ids[:whole * tokens_per_block], tokens_per_block, self.layouts[name])
                for name in allocators}
        here = min(_leading(self.spaces[name].indexed(keys[name][first:last])) for name in allocators)
        try:
            # room first: a hit with nowhere to go would be brought up for nothing (a document's 24 blocks were, on
            # a full cache: 14 GB up in one bench run, and every one of them computed again)
            want = self._room(here if remote is None else last - first, sure=here)
        except KVTierError as exc:  # the pool moved under the count: a miss
            log.info("continuous batching %r: no room for the prefix of request %s (%s)", self.engine.name,
                     request_id, exc)
            return matched
        if request_id not in self.looked:  # counted at a request's first lookup (not again when resumed)
            self.looked.add(request_id)
            self.engine.counts["prefix_found_below"] += here
            self.engine.counts["prefix_short_of_room"] += max(0, here - want)
        if want < here:
            self.short.add(request_id)  # looked for again before its next chunk is computed (``resume``)
        else:
            self.short.discard(request_id)
        if remote is None and want and self._direct():  # straight from where they rest into the engine's blocks
            count = self._read_in(request_id, prompt_ids, first, want, keys)
            return self._took(request_id, matched, count, tokens_per_block)
        # through the spaces' staging room a chunk at a time (a document's hit is larger than it); a store's
        # objects are read whole, at once
        step = want if remote is not None else min(self.chunk_blocks.values())
        count = 0
        while count < want:
            n = min(step, want - count)
            got = self._bring_in(request_id, prompt_ids, first + count, n, keys)
            count += got
            if got < n:
                break
            self.settle(wait=count < want)  # the chunk's staging back before the next takes it
        return self._took(request_id, matched, count, tokens_per_block)

    def _took(self, request_id: str, matched: int, count: int, tokens_per_block: int) -> int:
        if count:
            self.engine.counts["prefix_hit_blocks"] += count
            self.engine.counts["prefix_hit_tokens"] += count * tokens_per_block
        if count or request_id in self.short:
            self.found[request_id] = matched + count * tokens_per_block
        return matched + count * tokens_per_block

    def _direct(self) -> bool:
        """Whether hits can be read from where they rest straight into the engine's blocks: every space's blocks
        span whole pages (an engine block of 32 MiB, a Llama-3-8B shape's 256 tokens, does on 8 MiB pages; the
        1B shape's 8 MiB blocks share a page between two and go through the staging room)."""
        return all(space.block_bytes % space.page_size == 0 for space in self.spaces.values())

    def _read_in(self, request_id: str, prompt_ids: list[int], at: int, n: int, keys: dict[str, list[bytes]]
                 ) -> int:
        """Blocks ``at..at+n`` of the prompt read from the tiers straight into fresh blocks of the request (no
        staging room, no mapping: the copies land in the engine's blocks, checked there before any step reads
        them); as many as were found from ``at``. A failed check or a lost page: a miss, the blocks given back."""
        self.settle(wait=False)  # earlier hits whose copies the stream got past let go of their blocks
        seq: Hashable = ("hit", next(self._ids))
        held: list[str] = []
        count = n
        try:
            for name in self.cache.cache_allocators:
                found = self.spaces[name].share_prefix(seq, keys[name][at:at + n])
                if found:
                    held.append(name)
                count = min(count, found)
            if not count:
                return 0
            fresh = {name: a.pool.get_free_blocks(a.index, count) for name, a in self.cache.cache_allocators.items()}
            try:
                handles = []
                for name, allocator in self.cache.cache_allocators.items():
                    rows, half = allocator._copy_view, allocator.bytes_per_block // 2
                    blocks = fresh[name]

                    def dst(region: int, i: int, rows: torch.Tensor = rows, blocks: list[int] = blocks,
                            half: int = half) -> torch.Tensor:  # K in the first half of the engine's block, V after
                        return rows[blocks[i], region * half:(region + 1) * half]
                    handles.append(self.spaces[name].read_blocks(seq, dst, count, stream=self.stream))
                for handle in handles:
                    handle.result()  # copied and checked: no step reads them before
            except BaseException:
                for name, allocator in self.cache.cache_allocators.items():
                    allocator.pool.free_blocks(allocator.index, fresh[name])
                raise
            self._index(request_id, prompt_ids, at, fresh)
            return count
        except KVTierError as exc:  # lost below (a failed check), or the pool moved: a miss
            log.info("continuous batching %r: prefix of request %s not read from the tiers (%s)", self.engine.name,
                     request_id, exc)
            return 0
        finally:
            # let go once the engine's stream got past the copies of pages met on the GPU (queued there, not waited
            # for): held till then, the pages are not idle, so no demotion can unmap them under a pending copy
            fence = _Fence(self.engine.manager.backend.record_fence(self.stream)) if held else None
            for name in held:  # the blocks stay cached in the space, where they rest
                self.going_down.append((name, seq, fence))

    def waits_for_room(self, request_id: str, held: int) -> bool:
        """Whether the request, holding ``held`` tokens, holds only what its last lookup gave it (the engine's
        match on the GPU, blocks brought up for it) and has computed nothing since: it waits for room where it is
        while a batch runs. Swapped out, it would copy down blocks that are cached or rest below already, go to
        the back of the line and keep new requests out until one finishes (the H100 trace of 91a7480: documents
        swapped out at their lookup holding the system prompt's two blocks waited 10-13 s for a first batch)."""
        return self.after_lookup.get(request_id) == held

    def holds_only_found(self, request_id: str, held: int) -> bool:
        """Whether the request, holding ``held`` tokens, holds only what its lookups found below (and the engine's
        match) and has computed nothing since: when the engine must preempt it, it is requeued from its prompt
        (its blocks rest below; its next lookup finds them) rather than copied down again (one that computed
        since is not: requeued, it would lose that)."""
        return self.found.get(request_id) == held

    def resume(self, request_id: str, prompt_ids: list[int], held: int) -> int:
        """A request part-way through its prompt (``held`` tokens of ``prompt_ids`` in its blocks) whose lookup
        found blocks below with no room for them: look again before its next chunk is computed (a document's
        request waits its turn on a cache full of others' prefills; room comes as they finish). Only at a block
        boundary with every block held hashed (the chain goes on from the last). Return the tokens it holds."""
        if request_id not in self.short:
            return held
        for allocator in self.cache.cache_allocators.values():
            table, tpp = allocator.block_table.get(request_id, []), allocator.tokens_per_page
            if held % tpp or len(table) != held // tpp or (table and table[-1] not in allocator.ledger.block_to_hash):
                return held  # mid-block, or blocks allocated ahead: the engine computes on
        only_found = self.found.get(request_id) == held
        got = self.extend(request_id, prompt_ids, held)
        if not only_found:  # it computed chunks since its first lookup: requeued, it would lose them
            self.found.pop(request_id, None)
        return got

    def forget(self, request_id: str) -> None:
        """The request is done (or lost its blocks): no lookup is resumed for it."""
        self.short.discard(request_id)
        self.looked.discard(request_id)
        self.found.pop(request_id, None)
        self.after_lookup.pop(request_id, None)

    def _bring_in(self, request_id: str, prompt_ids: list[int], at: int, n: int, keys: dict[str, list[bytes]]
                  ) -> int:
        """Blocks ``at..at+n`` of the prompt from the tiers (or the store) into fresh blocks of the request, as
        many as were found from ``at``; how many."""
        seq: Hashable = ("hit", next(self._ids))
        held: list[str] = []  # the allocators whose space holds ``seq`` now
        remote, count = self.engine.manager.remote, n
        try:
            for name in self.cache.cache_allocators:
                found = self.spaces[name].share_prefix(seq, keys[name][at:at + n]) if remote is None \
                    else remote.find(self.spaces[name], seq, keys[name], self.stream, start=at)
                if found:
                    held.append(name)
                count = min(count, found)
            if count:
                for name in held:  # up from wherever they rest
                    self.spaces[name].ensure_resident([seq])
                self._copy_in(request_id, prompt_ids, at, count, seq)
        except KVTierError as exc:  # lost below (the tiers' checks), no room to bring them up: a miss
            log.info("continuous batching %r: prefix of request %s not brought up from the tiers (%s)",
                     self.engine.name, request_id, exc)
            count = 0
        finally:
            for name in held:  # the blocks stay cached in the space, back down once copied (a kept copy: cheap)
                self._send_down(name, seq)
        return count

    def _room(self, count: int, sure: int) -> int:
        """How many of ``count`` fresh blocks every allocator can take now, the sectors for them taken. Short of
        room for the ``sure`` first (indexed in the spaces: a hit in hand), the engine's cached blocks are evicted
        first, as it does itself under pressure (they go down the tiers) -- never for a lookup that may miss.
        OutOfPagesError: the pool moved."""
        pool, allocators = self.cache.pool, list(self.cache.cache_allocators.values())

        def need(n: int) -> list[int]:
            return [max(0, -(-(n - pool.count_free_blocks(a.index)) // a.blocks_per_sector)) for a in allocators]
        if sure and sum(need(min(count, sure))) > pool.num_free_sectors and self.cache.evict_cached_blocks():
            pool.try_to_free_sectors()
        fits = count
        while fits and sum(need(fits)) > pool.num_free_sectors:  # a few steps: a sector holds many blocks
            fits -= 1
        for a, sectors in zip(allocators, need(fits)):
            if sectors:
                pool.allocate_sectors(a.index, sectors)
        return fits

    def _copy_in(self, request_id: str, prompt_ids: list[int], first: int, count: int, seq: Hashable) -> None:
        device, fresh = self.cache.device, {}
        for name, allocator in self.cache.cache_allocators.items():
            space = self.spaces[name]
            fresh[name] = allocator.pool.get_free_blocks(allocator.index, count)
            with stream_context(self.stream):
                src = get_blocks(space, space.blocks(seq)[:count], device)
                allocator._copy_view.index_copy_(0, torch.tensor(fresh[name], device=device), src)
        self._index(request_id, prompt_ids, first, fresh)

    def _index(self, request_id: str, prompt_ids: list[int], first: int, fresh: dict[str, list[int]]) -> None:
        """The blocks filled for prompt blocks ``first...`` enter the request's table and the engine's index."""
        for name, allocator in self.cache.cache_allocators.items():
            tpp = allocator.tokens_per_page
            table = allocator.block_table.setdefault(request_id, [])
            hashes = allocator.ledger.block_to_hash
            parent = hashes.get(table[-1]) if table else None
            for i, block in enumerate(fresh[name], start=first):
                parent = compute_block_hash(parent, prompt_ids[i * tpp:(i + 1) * tpp])
                allocator.ledger.register_new_hash(block, parent)  # a duplicate registered meanwhile: unhashed
            table.extend(fresh[name])
        # the engine hashed them: kvtier's keys for them, chained from the start of the prompt
        self.note_complete(request_id, prompt_ids)

    def stats(self) -> dict[str, Any]:
        """Blocks kept, where their stripes rest, and the blocks found by prompts by where they rested."""
        kept, hits, stripes = 0, dict[str, int](), dict[str, int]()
        for space in self.spaces.values():
            s = space.stats()
            kept += s["cached_blocks"]
            for tier, n in s["prefix"]["shared_blocks"].items():
                hits[tier] = hits.get(tier, 0) + n
            for key, n in s.items():
                if key.startswith("stripes_") and key not in ("stripes_reserved", "stripes_empty", "stripes_shared"):
                    stripes[key[len("stripes_"):]] = stripes.get(key[len("stripes_"):], 0) + n
        return {"cached_blocks": kept, "hit_blocks_by_tier": hits, "stripes": stripes}

    def close(self) -> None:
        """Forget every kept block (the engine's ``with`` ends)."""
        self.unbind()
        for space in self.spaces.values():
            self.engine.manager.drop_space(space.name)
        self.spaces = {}



class _Fence:
    """The engine's stream past a point (a fence, or None where copies are synchronous), as the handles of
    ``going_down`` are waited for."""

    def __init__(self, fence: Any) -> None:
        self.fence = fence

    def done(self) -> bool:
        return self.fence is None or self.fence.query()

    def settle(self) -> None:
        if self.fence is not None:
            self.fence.synchronize()


def _chains(todo: list[tuple[int, bytes]], keys: dict[int, tuple[int, bytes, int, bytes]]) -> list[tuple[int, bytes]]:
    """``todo`` ordered so that the blocks of one prompt's chain follow each other, from its first block."""
    by_key = {k: (b, k) for b, k in todo}
    children: dict[bytes, list[tuple[int, bytes]]] = {}
    for b, k in todo:
        children.setdefault(keys[b][3], []).append((b, k))
    ordered, seen = [], set()
    for b, k in todo:
        if keys[b][3] in by_key or k in seen:
            continue  # not a chain's first block here
        stack = [(b, k)]
        while stack:
            entry = stack.pop()
            if entry[1] not in seen:
                seen.add(entry[1])
                ordered.append(entry)
                stack.extend(reversed(children.get(entry[1], [])))
    return ordered + [e for e in todo if e[1] not in seen]


def _leading(flags: list[bool]) -> int:
    """How many of ``flags`` are True before the first False."""
    return next((i for i, f in enumerate(flags) if not f), len(flags))


def _runs(part: list[tuple[int, bytes]], keys: dict[int, tuple[int, bytes, int, bytes]]) -> list[tuple[int, int, int]]:
    """The runs of ``part`` that are consecutive blocks of one chain: (first index, stop index, chain position)."""
    runs, at = [], 0
    for i in range(1, len(part) + 1):
        if i == len(part) or keys[part[i][0]][3] != part[i - 1][1]:
            runs.append((at, i, keys[part[at][0]][2]))
            at = i
    return runs
