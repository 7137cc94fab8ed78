"""The tiering engine of one manager: carries out demotion plans, promotions, stages and reads, and commits them.

Two phases. Whoever moves pages first plans against the books with no side effect (``plan_demote``,
``plan_room``; the space plans promotions and reads itself), then commits the plan in the same critical section
(``start_demotion``, ``promote``, ``stage``, ``read``): slots are taken, copies are enqueued, and the pages are
listed as in flight. The bytes land later; the worker (or ``TransferHandle.result``) then commits the moves to the
page tables: the destination becomes the truth and the source is released. A failed transfer leaves the source
the truth, or reports the page lost.

Locking: every method that reads or changes page tables runs under the directory's lock. The worker runs NVMe I/O
and waits on device events *without* the lock and takes it only to commit, and no code waits on the worker while
holding the lock, so the two cannot deadlock. Transfers started inline (to make room for an ``allocate``) run and
commit under the lock.
"""

from __future__ import annotations

import bisect
import logging
import queue
import threading
import time
from collections import defaultdict, deque
from contextlib import contextmanager
from typing import Any, Callable, Collection, Iterable, Iterator

import torch

from kvtier.config import Config
from kvtier.policies import PageRef, make_policy
from kvtier.tiering.engine.background import Demoter
from kvtier.tiering.interfaces import SpaceDirectory, TieredSpace
from kvtier.tiering.tiers.digest import ChecksumMismatch
from kvtier.tiering.tiers.nvme_journal import PageRecord, SlotJournal
from kvtier.tiering.engine.health import WriteHealth
from kvtier.tiering.state.plans import DemotionPlan, PlannedMove, plan_demotion, room_below, slot_size
from kvtier.tiering.state.slots import FreePieces, SlotBooks
from kvtier.tiering.tiers.registry import TierContext, open_stack
from kvtier.tiering.state.tier import HostSlots, LowerTier, Tier, TierStack, is_lower
from kvtier.tiering.engine.mover import Mover
from kvtier.tiering.engine.transfer import Move, TransferHandle, Work
from kvtier.vmm import Backend, PagePool

log = logging.getLogger(__name__)

PROMOTE_GROUPS = 8  # a page's regions are mapped and copied up in this many groups (see promote)
STALLS_KEPT = 100_000  # stall samples kept for the stats' percentiles
STALL_EVENTS_PENDING = 256  # unread stall timings (event pairs) above which they are read as they complete
STALL_BUCKETS = (1e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.5, 1.0)  # seconds (metrics histogram)


class Tiering:
    def __init__(self, config: Config, device: torch.device, backend: Backend, pool: PagePool,
                 directory: SpaceDirectory, clock: Callable[[], float] | None = None,
                 files: Any = None) -> None:
        self.config, self.device, self.backend, self.pool = config, device, backend, pool
        self.directory, self.lock = directory, directory.lock
        self.policy = make_policy(config.policy, nvme_min_uses=config.nvme_min_uses, clock=clock,
                                  **dict(config.policy_params))
        self.stack: TierStack = open_stack(config, TierContext(device, backend, pool.page_size, files))
        self.health = {t.id: WriteHealth(t.name) for t in self.stack}
        self._gate = threading.Condition()
        self._mapping = 0
        self.mover = Mover(device, self.stack, gate=self._wait_gate, lend=self._lend)
        self.stall_seconds: deque[float] = deque(maxlen=STALLS_KEPT)
        self.stall_counts = [0] * (len(STALL_BUCKETS) + 1)  # every stall ever, per bucket (the last: above all)
        self.stall_sum = 0.0
        self.pages_lost = 0  # pages ever lost (a read back failed, or bytes failed their checksum)
        self.copies_reused = 0  # clean demotions: pages unmapped without a copy, their kept copy reused
        self._stall_events: deque[tuple[Any, Any]] = deque()
        self.path_seconds: dict[str, float] = defaultdict(float)
        self._queue: queue.Queue[TransferHandle | None] = queue.Queue()
        self._inflight: set[TransferHandle] = set()
        self._worker = threading.Thread(target=self._work, name="kvtier-transfers", daemon=True)
        self._worker.start()
        self.demoter = Demoter(self, config) if config.background_demotion else None

    # --- the mapping gate (see Mover) -------------------------------------------------------------------------------
    @contextmanager
    def mapping(self) -> Iterator[None]:
        """Held while pages are mapped: no new device-to-host batch starts meanwhile."""
        with self._gate:
            self._mapping += 1
        try:
            yield
        finally:
            with self._gate:
                self._mapping -= 1
                self._gate.notify_all()

    def _wait_gate(self) -> None:
        with self._gate:
            while self._mapping:
                self._gate.wait()

    def _lend(self, tier: HostSlots, n: int) -> list[int]:
        """Up to ``n`` free whole slots of ``tier``, at most half of those free (the other half stays for pages),
        as a transfer's scratch space; under the lock, so that no plan counts them meanwhile."""
        with self.lock:
            books = tier.books
            return books.lend(min(n, books.free_pieces().fits(books.pieces) // 2))

    def books(self, tier: int) -> Any:
        return self.stack[tier].books

    def tier(self, name: str) -> LowerTier:
        """The lower tier called ``name``."""
        return self.stack[self.stack.named(name)]

    def free_slots(self, tier: str) -> int:
        """Whole slots (a page of one region each) that could be taken now in the tier called ``tier``; a page
        that holds less takes less (see ``SlotBooks``)."""
        books = self.books(self.stack.named(tier))
        return books.free_pieces().fits(books.pieces)

    def page_bytes(self, space: TieredSpace, page: int) -> int:
        """Bytes per region ``page`` holds, what each of its slots below must hold: its live blocks' on the GPU
        (a page moves only those), what its slots hold below."""
        place = space.pages.tier_of(page)
        if is_lower(place):
            tier = self.stack[place]
            return max(tier.held(s) for s in space.pages.slots[page])
        live = space.live_bytes(page)
        return live if 0 < live < space.page_size else space.page_size

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until every tier is built whole (the host tier pins in the background): tests and benchmarks."""
        return all([t.wait_ready(timeout) for t in self.stack])

    def stage_target(self, src: int) -> int | None:
        """Where ``stage`` takes a page in ``src``: the nearest host-memory tier above it that it has a route to
        (None: it is in host memory already, or there is none)."""
        if not is_lower(src) or isinstance(self.stack[src], HostSlots):
            return None
        return next((t.id for t in self.stack if t.id < src and isinstance(t, HostSlots) and
                     self.mover.has_route(src, t.id)), None)

    def _move(self, space: TieredSpace, page: int, src: int, dst: int, taken: list[Any],
              clean: bool = False) -> Move:
        return Move(space, page, src, dst, taken, clean=clean,
                    path=f"{self.stack.label(src)}->{self.stack.label(dst)}")

    def poke(self) -> None:
        """A sequence went idle: let the background demoter look now."""
        if self.demoter is not None:
            self.demoter.poke()

    # --- plans (no side effects) -------------------------------------------------------------------------------
    def _free_slots(self, automatic: bool = False, on_demand: bool = False) -> dict[int, FreePieces]:
        """Free slots per lower tier; for ``automatic`` plans, none in a tier backing off after failed writes
        (``on_demand``: room a request waits for, see ``WriteHealth.backing_off``)."""
        return {t: FreePieces.none(self.books(t).pieces) if automatic and self.health[t].backing_off(on_demand)
                else self.books(t).free_pieces() for t in self.stack.ids}

    def retry_soon(self) -> bool:
        """Whether a lower tier left alone after failed writes will be tried again shortly (worth waiting for)."""
        return any(h.retry_soon() for h in self.health.values())

    def plan(self, picks: list[tuple[TieredSpace, int]], dst: int | None = None, automatic: bool = False,
             on_demand: bool = False) -> DemotionPlan:
        """Where each ``(space, page)`` of ``picks`` would go down (to ``dst``, or where the policy says among the
        tiers below it that a route reaches), and which find room (see ``plan_demotion``)."""
        return plan_demotion(picks, dst, self.policy, self.directory.tiered_spaces(),
                             self._free_slots(automatic, on_demand), self.stack, self.page_bytes,
                             self.mover.has_route)

    def plan_demote(self, space: TieredSpace, pages: Iterable[int], dst: int | None = None) -> DemotionPlan:
        """Where ``pages`` of ``space`` would go down (or to ``dst``), and which find room."""
        return self.plan([(space, p) for p in pages], dst)

    def plan_drop(self, space: TieredSpace, pages: Iterable[int]) -> DemotionPlan:
        """GPU ``pages`` whose data the engine will never read again: unmapped (after the fence the plan is
        started with), nothing copied. Lower pages are dropped at once by :meth:`drop_below`."""
        return DemotionPlan([PlannedMove(space, p, Tier.GPU, Tier.DROPPED, clean=True) for p in pages])

    def drop_below(self, space: TieredSpace, pages: Iterable[int]) -> None:
        """Lower ``pages`` (not in flight) whose data the engine will never read again: their slots go back."""
        self.give_back([space.pages.dropped(p) for p in pages])

    def plan_room(self, handles_needed: int, avoid: Collection[tuple[str, int]] = (),
                  on_demand: bool = False) -> DemotionPlan:
        """Idle GPU pages to demote, coldest first per the policy, until ``handles_needed`` GPU handles would
        come free (fewer if the tiers below cannot take enough). ``(space name, page)`` pairs in ``avoid`` stay.
        ``on_demand``: for a request waiting for the room (not the background demoter)."""
        spaces = {s.name: s for s in self.directory.tiered_spaces()}
        refs = [PageRef(s.name, p) for s in spaces.values() for p in s.idle_pages() if (s.name, p) not in avoid]
        picks = [(spaces[r.space], r.page) for r in self.policy.victims(refs, len(refs))]
        return self.plan(picks, automatic=True, on_demand=on_demand).cut(handles_needed)

    def gpu_handles_leaving(self) -> int:
        """GPU handles that transfers in flight will give back when they commit."""
        return sum(m.space.num_regions - len(m.released) for h in self._inflight if h.kind == "demote"
                   for m in h.moves if m.src == Tier.GPU and id(m) not in h.done_moves)

    # --- commits: starting transfers (the caller holds the lock) ---------------------------------------------------
    def start_demotion(self, plan: DemotionPlan, after: Any = None, inline: bool = False) -> list[TransferHandle]:
        """Carry out a plan made under the same lock: one transfer per space. Copies from a GPU page wait for
        ``after`` (default: the space's ``idle_fence``); a clean move unmaps once it has passed."""
        exclude = {(m.space.name, m.page) for m in plan.moves}
        wanted: dict[int, list[tuple[int, int]]] = defaultdict(list)  # tier -> (slots, size) a page, in order
        for m in plan.moves:
            if not m.clean:
                self.drop_copies(m.space, [m.page])  # going elsewhere: the copy would be a stale second home
                wanted[m.dst].append((m.space.num_regions, slot_size(self.stack[m.dst], m.nbytes)))
        for tier, slots in wanted.items():
            self._make_room(tier, slots, exclude)
        return [self._demote(space, moves, after if after is not None else space.idle_fence, inline)
                for space, moves in plan.by_space().values()]

    def _demote(self, space: TieredSpace, planned: list[PlannedMove], after: Any, inline: bool) -> TransferHandle:
        R, table = space.num_regions, space.pages
        moves: list[Move] = []
        pairs: dict[tuple[int, int], list[tuple[Any, Any, Move, int]]] = defaultdict(list)
        for pm in planned:
            p = pm.page
            if pm.dst == Tier.DROPPED:
                self.drop_copies(space, [p])
                moves.append(self._move(space, p, pm.src, pm.dst, [], clean=True))  # unmapped after ``after``
                continue
            if pm.clean:
                slots = table.take_copy(p)
                self.copies_reused += 1
                moves.append(self._move(space, p, pm.src, pm.dst, slots, clean=True))
                continue
            # the plan counted this room, and start_demotion made it: it cannot fail here
            slots = self.books(pm.dst).take(R, slot_size(self.stack[pm.dst], pm.nbytes))
            moves.append(self._move(space, p, pm.src, pm.dst, slots))
            live = space.live_bytes(p) if pm.src == Tier.GPU else 0  # only its live blocks' bytes
            for r in range(R):
                source: Any
                if pm.src == Tier.GPU:
                    source = space.region_view(r, p)
                    source = source[:live] if 0 < live < source.numel() else source
                else:
                    source = table.slots[p][r]
                pairs[(pm.src, pm.dst)].append((source, slots[r], moves[-1], r))
        work = Work(event=after) if any(m.clean for m in moves) else None  # unmap only after the step's kernels
        return self._launch("demote", moves, pairs, after, inline, work)

    def promote(self, space: TieredSpace, pages: list[int], handles: list[Any]) -> TransferHandle:
        """Map ``pages`` (in host or NVMe; not in flight) with ``handles`` (``num_regions`` per page) and start
        copying them up. Pages are mapped one by one, and within a page region after region, each group of
        regions' copies enqueued right after their mapping, so the driver's mapping work overlaps the copies
        already running. (H100, 952e6ad: a 1024-token Llama-3-8B sequence is one page of 64 regions; mapped whole
        before its copies, fault-back took 7.2 ms against 2.6 ms of copy, 3.4 ms of it mapping.)"""
        R, table = space.num_regions, space.pages
        moves: list[Move] = []
        work = Work()
        every = max(1, R // PROMOTE_GROUPS)
        for i, p in enumerate(pages):
            src = table.tier_of(p)
            move = self._move(space, p, src, Tier.GPU, [])

            def copy_up(r: int, p: int = p, src: int = src, move: Move = move) -> None:
                if (r + 1) % every and r + 1 < R:
                    return
                group = range(r + 1 - ((r % every) + 1), r + 1)  # the regions mapped since the last group
                step = self.mover.start(src, Tier.GPU, [(table.slots[p][g], space.region_view(g, p)) for g in group],
                                        tags=[move] * len(group), pages=int(group.start == 0))
                work.add(step)  # one stream: the last event covers every earlier copy

            try:
                space.map_pages([p], handles[i * R:(i + 1) * R], copy_up)  # on failure its handles go back
            except BaseException:
                # the pages mapped so far go back too (once their queued copies have landed), and the handles
                # not yet used: everything stays below, as before the call
                if moves:
                    self.backend.synchronize()
                    space.unmap_pages([m.page for m in moves], still_below=True)
                self.pool.give(handles[(i + 1) * R:])
                raise
            moves.append(move)
        return self._launch("promote", moves, {}, None, False, work)

    def stage(self, space: TieredSpace, pages: list[int]) -> TransferHandle:
        """Start reading ``pages`` (in a tier that is not host memory) up into the nearest host-memory tier above
        them (``stage_target``), so that a later fault-back crosses PCIe only. Pages past that tier's room (free
        slots and droppable copies) stay where they are."""
        R, table = space.num_regions, space.pages
        room = room_below(self.directory.tiered_spaces(), self._free_slots(), set(), self.stack)
        chosen: list[tuple[int, int, int, int]] = []
        wanted: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for p in pages:
            src = table.tier_of(p)
            dst = self.stage_target(src)
            size = slot_size(self.stack[dst], self.page_bytes(space, p)) if dst is not None else 0
            if dst is None or not room[dst].can_take(R, size):
                continue
            room[dst].take(R, size)
            chosen.append((p, src, dst, size))
            wanted[dst].append((R, size))
        for tier, slots in wanted.items():
            self._make_room(tier, slots, set())
        moves: list[Move] = []
        pairs: dict[tuple[int, int], list[tuple[Any, Any, Move, int]]] = defaultdict(list)
        for p, src, dst, size in chosen:
            slots = self.books(dst).take(R, size)
            moves.append(self._move(space, p, src, dst, slots))
            pairs[(src, dst)] += [(a, b, moves[-1], r) for r, (a, b) in enumerate(zip(table.slots[p], slots))]
        return self._launch("stage", moves, pairs, None, False)

    def read(self, space: TieredSpace, pages: list[int], target: Callable[[int, int], torch.Tensor],
             stream: Any = None) -> TransferHandle:
        """Copy ``pages`` (none in flight, none lost) into the engine's buffers, ``target(region, page)`` being
        the view to fill. GPU pages are copied on ``stream`` at once; host and NVMe pages after the work queued
        on ``stream`` so far. Nothing is mapped or moved; the lower pages stay put until the read is done."""
        table, R = space.pages, space.num_regions
        table.forget_finished_reads()
        tiers = table.tier[pages]
        self.mover.copy_on(stream, [(space.region_view(r, p), target(r, p))
                                    for p, t in zip(pages, tiers) if t == Tier.GPU for r in range(R)])
        lower = [p for p, t in zip(pages, tiers) if t != Tier.GPU]
        handle = TransferHandle(self, "read", [])
        handle.source = (space, lower)
        if not lower:
            return handle
        after = self.backend.record_fence(stream)
        work = Work()
        by_tier: dict[int, list[tuple[Any, Any, int]]] = defaultdict(list)
        for p in lower:
            by_tier[table.tier_of(p)] += [(table.slots[p][r], target(r, p), p) for r in range(R)]
            table.start_read(p, handle)
        for src, items in by_tier.items():
            step = self.mover.start(src, Tier.GPU, [(a, b) for a, b, _ in items], after,
                                    tags=[p for *_, p in items], label=f"{self.stack.label(src)}->read")
            work.add(step)
        handle.attach(work)
        work.start_later()
        if work.io:  # NVMe reads (or failed checks): run by the worker, in order with the transfers queued before
            handle.committed = False  # pages that fail to read are marked lost when it commits
            self._queue.put(handle)
        return handle

    def _launch(self, kind: str, moves: list[Move],
                pairs: dict[tuple[int, int], list[tuple[Any, Any, Move, int]]], after: Any, inline: bool,
                work: Work | None = None) -> TransferHandle:
        """Start every path's copies ((source, destination, move, region) per pair) and list the moves in flight.
        A GPU page going down may give its regions back as their copies land (``_release``), where its route says
        so (host memory does; NVMe does not: a write that fails later leaves the GPU page the truth)."""
        handle = TransferHandle(self, kind, moves)
        work = work or Work()
        for (src, dst), prs in pairs.items():
            regions = [r for *_, r in prs]
            on_part = (lambda m, idx, regions=regions: self._release(handle, m, [regions[i] for i in idx])) \
                if src == Tier.GPU else None
            step = self.mover.start(src, dst, [(a, b) for a, b, *_ in prs], after if src == Tier.GPU else None,
                                    tags=[m for _, _, m, _ in prs], on_done=lambda m: self.commit(handle, [m]),
                                    on_part=on_part)
            work.add(step)
        handle.attach(work)
        work.start_later()  # after the mapping (a promotion's): see Work.start_later
        for m in moves:
            m.space.pages.start_move(m.page, handle)
        if moves:
            self._inflight.add(handle)
            if inline:
                handle.run_io()
                if handle._event is not None:
                    handle._event.synchronize()
                self._commit_locked(handle)
            else:
                self._queue.put(handle)
        return handle

    def _release(self, handle: TransferHandle, m: Move, regions: list[int]) -> None:
        """Some regions of a GPU page going down have landed below: unmap them now, while the page's other
        regions copy (see ``MappedRange.unmap_regions``), and let waiting callers plan again with the handles."""
        with self.lock:
            if id(m) in handle.done_moves:
                return
            m.space.unmap_regions(m.page, regions)
            m.released += regions
            self.directory.pages_changed()

    # --- kept copies (see PageTable) ----------------------------------------------------------------------------------
    def drop_copies(self, space: TieredSpace, pages: Iterable[int]) -> None:
        """Forget the kept copies of ``pages`` (their bytes on the GPU changed, or they leave it). A page still
        coming up keeps no copy when it lands."""
        self.give_back([space.pages.written(p) for p in pages])

    def give_back(self, freed: Iterable[tuple[int, list[int]] | None]) -> None:
        """Slots a page-table transition let go of, back to their tiers' books."""
        for item in freed:
            if item is not None:
                self.books(item[0]).give(item[1])

    def drop_copies_until(self, tier: int, enough: Callable[[SlotBooks], bool],
                          exclude: Collection[tuple[str, int]] = ()) -> bool:
        """Drop kept copies in ``tier`` (pages not in ``exclude``) until ``enough(its books)``; whether it is."""
        books = self.books(tier)
        for s in self.directory.tiered_spaces():
            if enough(books):
                return True
            for p in [p for p, (t, _) in s.pages.copies.items() if t == tier and (s.name, p) not in exclude]:
                self.drop_copies(s, [p])
                if enough(books):
                    return True
        return enough(books)

    def _make_room(self, tier: int, wanted: list[tuple[int, int]], exclude: set[tuple[str, int]]) -> None:
        """Room in ``tier`` for every ``(n, size)`` of ``wanted`` (``n`` slots of ``size`` units, taken in that
        order), that a plan counted: kept copies go for it, before any is taken -- dropped as each take needs, a
        quarter taken from a whole free slot could leave a later whole one short though the copies' pieces, free,
        would have made room for both."""
        if not self.drop_copies_until(tier, lambda books: books.free_pieces().can_take_all(wanted), exclude):
            raise AssertionError(f"a plan counted room in the {self.stack.label(tier)} tier that is not there")

    # --- pages that hold nothing live any more ------------------------------------------------------------------------
    def release(self, space: TieredSpace, pages: Iterable[int]) -> None:
        """``pages`` lost their last live block: their copies and lower slots go back; lower and lost pages
        become vacant. (GPU pages stay mapped: the space unmaps them once their readers are done.)"""
        for p in pages:
            self.give_back(space.pages.released(p))

    def close_space(self, space: TieredSpace) -> None:
        """Give back every slot ``space`` holds below (its transfers have been waited for)."""
        self.give_back(space.pages.cleared())

    # --- committing -------------------------------------------------------------------------------------------------
    def commit(self, handle: TransferHandle, moves: list[Move] | None = None) -> None:
        with self.lock:
            self._commit_locked(handle, moves)

    def _commit_locked(self, handle: TransferHandle, moves: list[Move] | None = None) -> None:
        """Apply finished moves (all of the handle's by default) to the page tables: the destination becomes the
        truth and the source is released. If the transfer failed, its uncommitted moves leave the source the
        truth (a failed NVMe read loses the page: its sequences are reported in ``handle.lost``)."""
        if handle.committed:
            return
        if handle.kind == "read":
            self._commit_read(handle)
            return
        final = moves is None
        for m in handle.moves if moves is None else moves:
            if id(m) in handle.done_moves:
                continue
            handle.done_moves.add(id(m))
            error = handle.failure(m) if final else None
            if is_lower(m.dst) and not m.clean and not isinstance(error, ChecksumMismatch):  # how its writes go
                if error is None:
                    self.health[m.dst].succeeded()
                else:
                    self.health[m.dst].failed(error, attempt=handle)
            if error is not None:
                self._undo_move(handle, m, error)
            else:
                self._apply_move(m)
        self.directory.pages_changed()  # pages may have come free: waiting callers plan again
        if not final:
            return
        elapsed = time.perf_counter() - handle.started
        for path in {m.path for m in handle.moves}:
            self.path_seconds[path] += elapsed
        handle.committed = True
        self._inflight.discard(handle)
        if handle.error is not None and handle.kind != "demote":  # failed writes: see self.health
            log.warning("%s of %d page(s) failed: %s", handle.kind, len(handle.moves), handle.error)

    def _apply_move(self, m: Move) -> None:
        space, p = m.space, m.page
        if m.src == Tier.GPU:
            if self.config.debug_checks:  # poison what stays behind: a missed copy up then reads garbage
                for r in space.mapped_regions(p):
                    space.region_view(r, p).fill_(0xA5)
                self.backend.synchronize()  # the fill must finish before the unmap
            space.unmap_pages([p], leaving=True)
        keep = m.dst == Tier.GPU and self.config.keep_copies and not space.takes_writes(p)
        self.give_back([space.pages.landed(p, m.src, m.dst, m.taken, keep)])
        journal = self._journal(m.dst) if is_lower(m.dst) else None
        if journal is not None:
            self._record_landing(journal, self.stack[m.dst], space, p, m.taken)

    # --- kept tiers ([nvme] persist: see kvtier.tiering.tiers.nvme_journal) ----------------------------------------
    def _journal(self, tier: int) -> SlotJournal | None:
        """The journal of a tier kept across restarts (None: the tier is not kept)."""
        journal = getattr(self.stack[tier], "journal", None)
        return journal if isinstance(journal, SlotJournal) else None

    def _record_landing(self, journal: SlotJournal, tier: Any, space: TieredSpace, page: int, slots: list[int]) -> None:
        """Note in a kept tier's journal which indexed blocks the page that landed in ``slots`` holds (with none,
        or a slot without its digest, the note only says the slots' old contents are gone)."""
        values = [tier.digests.value(s) for s in slots]
        blocks = space.prefix_blocks(page) if all(v is not None for v in values) else []
        journal.landed(PageRecord(space.name, space.layout_tag, list(slots), [tier.held(s) for s in slots],
                                  [list(v) if v is not None else [0, 0] for v in values],
                                  [[i, k.hex(), salt.hex()] for i, k, salt in blocks]))

    def restorable(self, space: TieredSpace) -> list[tuple[int, Any]]:
        """Pages of ``space`` that kept tiers restored at start, as ``(tier id, PageRecord)``: the space owns
        their slots now (and gives back those it cannot use)."""
        return [(t, r) for t in self.stack.ids if (j := self._journal(t)) is not None
                for r in j.take(space.name, space.layout_tag)]

    def erased(self, space: TieredSpace, salt: bytes) -> None:
        """A tenant's blocks were erased from ``space``: no kept tier restores them again."""
        for t in self.stack.ids:
            if (journal := self._journal(t)) is not None:
                journal.erased(space.name, salt)

    def _undo_move(self, handle: TransferHandle, m: Move, error: BaseException) -> None:
        """The move did not land: the source stays the truth -- unless its bytes are known bad (they failed their
        checksum) or could not be read back from NVMe into the GPU; then the page is lost."""
        space, p, table = m.space, m.page, m.space.pages
        table.failed(p)
        if is_lower(m.dst):
            self.books(m.dst).give(m.taken)
        if m.released:  # some regions had landed below and left the GPU: neither side holds the whole page
            space.unmap_pages([p], leaving=True)
            self.give_back([table.lost(p)])
            self.pages_lost += 1
            handle.lost += [q for q in space.sequences_on([p]) if q not in handle.lost]
            return
        if m.dst == Tier.GPU:
            space.unmap_pages([p], still_below=True)  # the data is still below, where the table says
        if isinstance(error, ChecksumMismatch) or (m.dst == Tier.GPU and self.stack[m.src].failed_read_loses):
            self._lose(handle, space, [p])

    def _lose(self, handle: TransferHandle, space: TieredSpace, pages: list[int]) -> None:
        """``pages`` (in a lower tier, not in flight) hold data that cannot be had back: their slots go back, they
        are LOST, and the sequences on them are reported in ``handle.lost``."""
        freed = [space.pages.lost(p) for p in pages]
        for item in freed:
            if item is not None and (journal := self._journal(item[0])) is not None:
                journal.void(item[1])  # bad bytes: not restored again
        self.give_back(freed)
        self.pages_lost += len(pages)
        handle.lost += [q for q in space.sequences_on(pages) if q not in handle.lost]

    def _commit_read(self, handle: TransferHandle) -> None:
        """A read that failed for some pages: those from NVMe, or whose bytes failed their checksum, are lost
        (their data cannot be had back); a read never changes the pages it read from otherwise."""
        handle.committed = True  # its pages stay listed as being read until now (PageTable.reads_pending)
        if handle.error is None:
            return
        space, pages = handle.source
        if space.name not in {s.name for s in self.directory.tiered_spaces()}:
            return  # dropped meanwhile
        table = space.pages
        bad = [p for p in pages if is_lower(table.tier_of(p)) and p not in table.moving and
               (isinstance(handle.failure(p), ChecksumMismatch) or
                (handle.failure(p) is not None and self.stack[table.tier_of(p)].failed_read_loses))]
        if bad:
            self._lose(handle, space, bad)

    def _work(self) -> None:
        while True:
            handle = self._queue.get()
            if handle is None:
                return
            handle.run_io()
            if handle._event is not None:
                handle._event.synchronize()
            self.commit(handle)

    def drain(self) -> None:
        """Wait (without the lock) until every transfer started so far has committed."""
        with self.lock:
            pending = list(self._inflight)
        for handle in pending:
            handle.settle()

    # --- stalls ------------------------------------------------------------------------------------------------------
    def stream_wait(self, stream: Any, event: Any) -> None:
        """Device-side wait of ``stream`` on ``event``, timed with two events around it (read lazily)."""
        stream = stream or torch.cuda.current_stream(self.device)
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record(stream)
        stream.wait_event(event)
        after.record(stream)
        with self.lock:
            self._stall_events.append((before, after))
            if len(self._stall_events) > 2 * STALL_EVENTS_PENDING:  # a long decode: fold finished ones in
                self._fold_stalls()

    def stalls(self) -> list[float]:
        """Seconds each step's stream waited on a fault-back (completed waits only; the last ``STALLS_KEPT``)."""
        with self.lock:
            self._fold_stalls()
            return list(self.stall_seconds)

    def _fold_stalls(self) -> None:
        while self._stall_events and self._stall_events[0][1].query():  # in stream order: oldest first
            before, after = self._stall_events.popleft()
            seconds = before.elapsed_time(after) / 1e3
            self.stall_seconds.append(seconds)
            self.stall_counts[bisect.bisect_left(STALL_BUCKETS, seconds)] += 1
            self.stall_sum += seconds

    # --- books and lifecycle --------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        stalls = sorted(self.stalls())
        pct = (lambda q: stalls[min(len(stalls) - 1, int(q * (len(stalls) - 1)))] if stalls else 0.0)
        paths = {name: dict(v, seconds=self.path_seconds.get(name, 0.0)) for name, v in self.mover.paths.items()}
        kept = sum(len(s.pages.copies) for s in self.directory.tiered_spaces())
        return {**{t.name: dict(t.describe(), slots_used=t.books.used, health=self.health[t.id].describe())
                   for t in self.stack},
                "order": self.stack.names, "paths": paths, "in_flight": len(self._inflight),
                "copies": {"kept_stripes": kept, "reused_stripes": self.copies_reused}, "lost_stripes": self.pages_lost,
                "stall_histogram": {"le": list(STALL_BUCKETS), "counts": list(self.stall_counts),
                                    "sum_seconds": self.stall_sum},
                "stalls": {"count": len(stalls), "total_seconds": sum(stalls), "p50_seconds": pct(0.5),
                           "p99_seconds": pct(0.99)}}

    def check(self) -> None:
        """Every slot taken is held by a page below, a kept copy, a move in flight, or a restored page no space
        has taken yet."""
        held: dict[int, list[int]] = {t: [s for r in j.pending for s in r.slots]
                                      if (j := self._journal(t)) is not None else [] for t in self.stack.ids}
        for s in self.directory.tiered_spaces():
            for p, slots in s.pages.slots.items():
                held[s.pages.tier_of(p)] += slots
            for tier, slots in s.pages.copies.values():
                held[tier] += slots
        for h in self._inflight:
            for m in h.moves:
                if is_lower(m.dst) and id(m) not in h.done_moves:
                    held[m.dst] += m.taken
        for t in self.stack.ids:
            self.books(t).check(held[t])

    def stop(self) -> None:
        """Finish what is in flight and stop the threads. Call without holding the directory's lock."""
        if self.demoter is not None:  # first: it starts no demotion after the drain
            self.demoter.stop()
        self.drain()
        self._queue.put(None)
        self._worker.join()

    def close(self) -> None:
        """Release every tier, farthest first (after :meth:`stop`, once the spaces are closed)."""
        for tier in reversed(self.stack.tiers):
            tier.close()
