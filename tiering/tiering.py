"""The tiering engine of one manager: starts demotions and promotions, commits them, and keeps the GPU pool
between its watermarks in the background.

Locking: every method that reads or changes page tables runs under the manager's lock. The worker runs NVMe I/O
and waits on device events *without* the lock and takes it only to commit, and no code waits on the worker while
holding the lock, so the two cannot deadlock. Transfers started by ``allocate`` to make room run inline.
"""

from __future__ import annotations

import logging
import math
import queue
import shutil
import tempfile
import threading
import time
from collections import defaultdict, deque
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np
import torch


from kvtier.policies import PageRef, make_policy
from kvtier.tiering.host import HostTier
from kvtier.tiering.nvme import NvmeTier
from kvtier.tiering.pagetable import HOST, LOST, NVME, TIER_CODE, TIER_NAME
from kvtier.tiering.transfer import Move, Mover, TransferHandle, Work

if TYPE_CHECKING:
    from kvtier.manager import TierManager

log = logging.getLogger(__name__)

STALLS_KEPT = 100_000  # stall samples kept for the stats' percentiles
STALL_EVENTS_PENDING = 256  # unread stall timings (event pairs) above which they are read as they complete


class Tiering:
    def __init__(self, mgr: "TierManager") -> None:
        cfg = mgr.config
        self.mgr, self.lock, self.config = mgr, mgr._lock, cfg
        self.host = HostTier(mgr.backend, mgr.page_size, cfg.host_size, cfg.host_chunk)
        self._own_dir = cfg.nvme_dir is None
        directory = cfg.nvme_dir or tempfile.mkdtemp(prefix="kvtier-nvme-")
        self.nvme = NvmeTier(mgr.device, mgr.page_size, directory, cfg.nvme_size, cfg.nvme_threads,
                             cfg.nvme_direct)
        self._gate = threading.Condition()
        self._mapping = 0
        self.mover = Mover(mgr.device, self.host, self.nvme, gate=self._wait_gate)
        self.policy = make_policy(cfg.policy, nvme_min_uses=cfg.nvme_min_uses, **dict(cfg.policy_params))
        self.stall_seconds: deque[float] = deque(maxlen=STALLS_KEPT)
        self.copies_reused = 0  # clean demotions: pages unmapped without a copy, their kept copy reused
        self._stall_events: deque[tuple[Any, Any]] = deque()
        self.path_seconds: dict[str, float] = defaultdict(float)
        self._queue: queue.Queue[TransferHandle | None] = queue.Queue()
        self._inflight: set[TransferHandle] = set()
        self._closed = False
        self._wake = threading.Event()
        self._worker = threading.Thread(target=self._work, name="kvtier-transfers", daemon=True)
        self._worker.start()
        self._demoter = None
        if cfg.background_demotion:
            self._demoter = threading.Thread(target=self._keep_watermarks, name="kvtier-demoter", daemon=True)
            self._demoter.start()

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

    # --- starting transfers (the caller holds the lock) -----------------------------------------------------------
    def demote(self, space: Any, pages: Iterable[int], dst: str | None = None, after: Any = None,
               inline: bool = False) -> TransferHandle:
        """Start moving ``pages`` of ``space`` one tier (or to ``dst``) down. Pages that fit nowhere stay. A GPU
        page whose kept copy lies in the tier it goes to is a clean move: unmapped once ``after`` has passed,
        nothing copied."""
        R, table = space.num_regions, space.pages
        moves: list[Move] = []
        pairs: dict[tuple[str, str], list[tuple[Any, Any, Move]]] = defaultdict(list)
        for p in pages:
            src = TIER_NAME[int(table.tier[p])]
            copy = table.copies.get(p)
            room = src == "gpu" and (copy is not None and copy[0] == HOST or self._room("host", R, space, p))
            if dst is None:  # the policy decides (it may keep a page where it is)
                want = self.policy.target_tier(PageRef(space.name, p), src, room)
            else:  # the engine asked; a full host tier still spills to NVMe
                want = "nvme" if src == "host" or (dst == "host" and not room) else dst
            if want is None:
                continue
            if copy is not None and TIER_NAME[copy[0]] == want:
                del table.copies[p]
                self.copies_reused += 1
                moves.append(Move(space, p, src, want, copy[1], clean=True))
                continue
            self.drop_copies(space, [p])  # going elsewhere: the copy would be a stale second home
            if not self._room(want, R, space, p):
                log.debug("demote: no room below for page %d of %s", p, space.name)
                continue
            slots = self._lower(want).take(R)
            moves.append(Move(space, p, src, want, slots))
            for r in range(R):
                source = space.region_view(r, p) if src == "gpu" else table.slots[p][r]
                pairs[(src, want)].append((source, slots[r], moves[-1]))
        work = Work(event=after) if any(m.clean for m in moves) else None  # unmap only after the step's kernels
        return self._launch("demote", moves, pairs, after, inline, work)

    # --- kept copies (see PageTable) ----------------------------------------------------------------------------------
    def drop_copies(self, space: Any, pages: Iterable[int]) -> None:
        """Forget the kept copies of ``pages`` (their bytes on the GPU changed, or they leave it). A page still
        coming up keeps no copy when it lands."""
        copies, moving = space.pages.copies, space.pages.moving
        for p in pages:
            if p in moving and moving[p].kind == "promote":
                space.pages.written_in_flight.add(p)
            copy = copies.pop(p, None)
            if copy is not None:
                self._lower(TIER_NAME[copy[0]]).give(copy[1])

    def _room(self, tier: str, slots: int, space: Any = None, page: int = -1) -> bool:
        """Whether ``tier`` can take ``slots`` more, dropping kept copies (other pages' first) to make it so."""
        books = self._lower(tier)
        if books.can_take(slots):
            return True
        code = TIER_CODE[tier]
        for s in self.mgr.spaces.values():
            for p in [p for p, (c, _) in s.pages.copies.items() if c == code and (s is not space or p != page)]:
                self.drop_copies(s, [p])
                if books.can_take(slots):
                    return True
        return False

    def promote(self, space: Any, pages: list[int], inline: bool = False) -> TransferHandle:
        """Map ``pages`` (in host or NVMe) and start copying them up. Raises OutOfPagesError, changing nothing,
        when no GPU page can be had. Pages are mapped one by one, each copy enqueued right after its mapping, so
        the driver's mapping work overlaps the copies already running."""
        R, table = space.num_regions, space.pages
        handles = self.mgr._acquire(space, len(pages) * R, keep=set(pages))
        moves, pairs = [], defaultdict(list)
        work = Work()
        for i, p in enumerate(pages):
            src = TIER_NAME[int(table.tier[p])]
            space._map([p], handles[i * R:(i + 1) * R])
            moves.append(Move(space, p, src, "gpu", []))
            step = self.mover.start(src, "gpu", [(table.slots[p][r], space.region_view(r, p)) for r in range(R)])
            work.event = step.event or work.event  # one stream: the last event covers every earlier copy
            work.io += step.io
        return self._launch("promote", moves, pairs, None, inline, work)

    def read(self, space: Any, pages: list[int], target: Any, after: Any = None) -> TransferHandle:
        """Start copying host and NVMe ``pages`` into the engine's buffers (``target(region, page)``: the device
        view to fill), after ``after``; nothing is mapped or moved. The pages stay put until the read is done."""
        table, work = space.pages, Work()
        handle = TransferHandle(self, "read", [])
        by_tier: dict[str, list[tuple[Any, Any, int]]] = defaultdict(list)
        for p in pages:
            by_tier[TIER_NAME[int(table.tier[p])]] += [(table.slots[p][r], target(r, p), p)
                                                        for r in range(space.num_regions)]
            table.reading[p] = handle
        for src, items in by_tier.items():
            step = self.mover.start(src, "gpu", [(a, b) for a, b, _ in items], after, tags=[p for *_, p in items],
                                    label=f"{src}->read")
            work.event = step.event or work.event
            work.io += step.io
        handle.attach(work)
        if work.io:  # NVMe reads: run by the worker, in order with the transfers queued before
            self._queue.put(handle)
        return handle

    def stage(self, space: Any, pages: list[int]) -> TransferHandle:
        """Start reading NVMe ``pages`` up into host slots (so a later fault-back crosses PCIe only). Pages that
        find no host slot stay on NVMe."""
        R, table = space.num_regions, space.pages
        moves: list[Move] = []
        pairs: dict[tuple[str, str], list[tuple[Any, Any, Move]]] = defaultdict(list)
        for p in pages:
            if not self._room("host", R):
                break
            slots = self.host.books.take(R)
            moves.append(Move(space, p, "nvme", "host", slots))
            pairs[("nvme", "host")] += [(a, b, moves[-1]) for a, b in zip(table.slots[p], slots)]
        return self._launch("stage", moves, pairs, None, False)

    def _launch(self, kind: str, moves: list[Move], pairs: dict[tuple[str, str], list[tuple[Any, Any, Move]]],
                after: Any, inline: bool, work: Work | None = None) -> TransferHandle:
        handle = TransferHandle(self, kind, moves)
        work = work or Work()
        for (src, dst), prs in pairs.items():
            step = self.mover.start(src, dst, [(a, b) for a, b, _ in prs], after if src == "gpu" else None,
                                    tags=[m for _, _, m in prs], on_done=lambda m: self.commit(handle, [m]))
            work.event = step.event or work.event
            work.io += step.io
        handle.attach(work)
        for m in moves:
            m.space.pages.moving[m.page] = handle
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
        final = moves is None
        failed = final and handle.error is not None
        for m in handle.moves if final else moves:
            if id(m) in handle.done_moves:
                continue
            handle.done_moves.add(id(m))
            if failed:
                self._undo_move(handle, m)
            else:
                self._apply_move(m)
        self.mgr._changed.notify_all()  # pages may have come free: waiting allocations try again
        if not final:
            return
        elapsed = time.perf_counter() - handle.started
        for path in {f"{m.src}->{m.dst}" for m in handle.moves}:
            self.path_seconds[path] += elapsed
        handle.committed = True
        self._inflight.discard(handle)
        if failed:
            log.warning("%s of %d page(s) failed: %s", handle.kind, len(handle.moves), handle.error)

    def gpu_handles_leaving(self) -> int:
        """GPU handles that transfers in flight will give back when they commit."""
        return sum(m.space.num_regions for h in self._inflight if h.kind == "demote"
                   for m in h.moves if m.src == "gpu" and id(m) not in h.done_moves)

    def _lower(self, tier: str) -> Any:
        return self.host.books if tier == "host" else self.nvme.books

    def _apply_move(self, m: Move) -> None:
        space, p, table = m.space, m.page, m.space.pages
        table.moving.pop(p, None)
        written = p in table.written_in_flight
        table.written_in_flight.discard(p)
        if m.src == "gpu":
            if self.config.debug_checks:  # poison what stays behind: a missed copy up then reads garbage
                for r in range(space.num_regions):
                    space.region_view(r, p).fill_(0xA5)
                self.mgr.backend.synchronize()  # the fill must finish before the unmap
            space._unmap([p])
        elif m.dst == "gpu" and self.config.keep_copies and not written:
            table.copies[p] = (TIER_CODE[m.src], table.slots.pop(p))  # equal to the page's bytes until written
        else:
            self._lower(m.src).give(table.slots.pop(p))
        table.tier[p] = TIER_CODE[m.dst]
        if m.dst != "gpu":
            table.slots[p] = m.taken

    def _undo_move(self, handle: TransferHandle, m: Move) -> None:
        space, p, table = m.space, m.page, m.space.pages
        table.moving.pop(p, None)
        table.written_in_flight.discard(p)
        if m.dst != "gpu":
            self._lower(m.dst).give(m.taken)
            return
        space._unmap([p])
        table.tier[p] = TIER_CODE[m.src]  # _unmap cleared it; the data is still below
        if m.src == "nvme":  # the bytes on disk could not be read back: the page is lost
            self._lower("nvme").give(table.slots.pop(p))
            table.tier[p] = LOST
            handle.lost += [q for q in space._sequences_on(p) if q not in handle.lost]

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
            try:
                handle.result()
            except Exception:  # noqa: BLE001 - the handle's owner sees it; draining must go on
                pass

    # --- stalls ------------------------------------------------------------------------------------------------------
    def stream_wait(self, stream: Any, event: Any) -> None:
        """Device-side wait of ``stream`` on ``event``, timed with two events around it (read lazily)."""
        stream = stream or torch.cuda.current_stream(self.mgr.device)
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record(stream)
        stream.wait_event(event)
        after.record(stream)
        with self.lock:
            self._stall_events.append((before, after))
            if len(self._stall_events) > 2 * STALL_EVENTS_PENDING:  # a long decode: fold finished ones in
                self._fold_stalls()

    def stalls(self) -> deque[float]:
        """Seconds each step's stream waited on a fault-back (completed waits only; the last ``STALLS_KEPT``)."""
        with self.lock:
            self._fold_stalls()
        return self.stall_seconds

    def _fold_stalls(self) -> None:
        while self._stall_events and self._stall_events[0][1].query():  # in stream order: oldest first
            before, after = self._stall_events.popleft()
            self.stall_seconds.append(before.elapsed_time(after) / 1e3)

    # --- background demotion ------------------------------------------------------------------------------------------
    def idle_pages(self) -> list[PageRef]:
        return [PageRef(s.name, p) for s in self.mgr.spaces.values() for p in s._idle_pages()]

    def make_room(self, handles_needed: int, inline: bool, avoid_space: str | None = None,
                  avoid_pages: Iterable[int] = ()) -> int:
        """Demote idle pages (coldest first, per the policy) until ``handles_needed`` GPU handles are freed or
        on their way; returns how many. Pages ``avoid_pages`` of space ``avoid_space`` stay."""
        avoid = set(avoid_pages)
        refs = [r for r in self.idle_pages() if not (r.space == avoid_space and r.page in avoid)]
        spaces = self.mgr.spaces
        victims = self.policy.victims(refs, len(refs))
        chosen: dict[str, list[int]] = defaultdict(list)
        freed = 0
        for ref in victims:
            if freed >= handles_needed:
                break
            chosen[ref.space].append(ref.page)
            freed += spaces[ref.space].num_regions
        for name, pages in chosen.items():
            space = spaces[name]
            self.demote(space, pages, after=space._offload_fence, inline=inline)
        return freed

    def _keep_watermarks(self) -> None:
        cfg = self.config
        while not self._closed:
            self._wake.wait(0.02)
            self._wake.clear()
            with self.lock:
                if self._closed:
                    return
                pool = self.mgr.pool
                free = pool.available()
                if free < cfg.gpu_low_watermark * pool.budget_pages:
                    want = math.ceil(cfg.gpu_high_watermark * pool.budget_pages) - free
                    self.make_room(want, inline=False)
                books = self.host.books
                if books.total and books.used > cfg.host_high_watermark * books.total:
                    # kept copies go first (dropping them costs nothing), down to the low mark if they can
                    self._room("host", books.total - int(cfg.host_low_watermark * books.total))
                    if books.used > cfg.host_high_watermark * books.total:
                        self._cascade(books.used - int(cfg.host_low_watermark * books.total))

    def _cascade(self, slots: int) -> None:
        """Move the coldest host pages to NVMe until about ``slots`` host slots are on their way out."""
        refs = [PageRef(s.name, int(p)) for s in self.mgr.spaces.values()
                for p in np.flatnonzero((s.pages.tier == HOST) & ~s.pages.moving_mask())]
        chosen: dict[str, list[int]] = defaultdict(list)
        for ref in self.policy.victims(refs, len(refs)):
            if slots <= 0:
                break
            chosen[ref.space].append(ref.page)
            slots -= self.mgr.spaces[ref.space].num_regions
        for name, pages in chosen.items():
            self.demote(self.mgr.spaces[name], pages)

    def poke(self) -> None:
        self._wake.set()

    # --- books and lifecycle --------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        stalls = sorted(self.stalls())
        pct = (lambda q: stalls[min(len(stalls) - 1, int(q * (len(stalls) - 1)))] if stalls else 0.0)
        paths = {name: dict(v, seconds=self.path_seconds.get(name, 0.0)) for name, v in self.mover.paths.items()}
        kept = sum(len(s.pages.copies) for s in self.mgr.spaces.values())
        return {"host": dict(self.host.describe(), slots_used=self.host.books.used),
                "nvme": dict(self.nvme.describe(), slots_used=self.nvme.books.used),
                "paths": paths, "in_flight": len(self._inflight),
                "copies": {"kept_pages": kept, "reused_pages": self.copies_reused},
                "stalls": {"count": len(stalls), "total_seconds": sum(stalls), "p50_seconds": pct(0.5),
                           "p99_seconds": pct(0.99)}}

    def check(self) -> None:
        """Every slot taken is held by a page below, a kept copy, or a move in flight."""
        held = {HOST: 0, NVME: 0}
        for s in self.mgr.spaces.values():
            for p, slots in s.pages.slots.items():
                if s.pages.tier[p] in held:
                    held[int(s.pages.tier[p])] += len(slots)
            for code, slots in s.pages.copies.values():
                held[code] += len(slots)
        for h in self._inflight:
            for m in h.moves:
                if m.dst in ("host", "nvme") and id(m) not in h.done_moves:
                    held[TIER_CODE[m.dst]] += len(m.taken)
        self.host.books.check(held[HOST])
        self.nvme.books.check(held[NVME])

    def stop(self) -> None:
        """Finish what is in flight and stop the threads. Call without holding the manager's lock."""
        self.drain()
        self._closed = True
        self._wake.set()
        self._queue.put(None)
        self._worker.join()
        if self._demoter is not None:
            self._demoter.join()

    def close(self) -> None:
        """Release the host memory and the NVMe file (after :meth:`stop`, once the spaces are closed)."""
        self.nvme.close()
        self.host.close()
        if self._own_dir:
            shutil.rmtree(self.nvme.path.rsplit("/", 1)[0], ignore_errors=True)
