"""Background demotion: a thread that keeps the GPU pool and each lower tier between their watermarks.

GPU: when fewer than ``gpu_low_watermark`` of the pool's pages are free, idle pages go down (policy order) until
``gpu_high_watermark`` is free. A lower tier with watermarks (the host tier: ``host_high_watermark``): above its
high mark kept copies are dropped first (it costs nothing), then its coldest pages cascade to the tiers below it
(where the policy places them) until its low mark -- once past its high mark a tier drains to its low mark over
as many ticks as it takes, counting the slots already on their way out. A tier whose size follows a shared budget
(``ElasticTier``: the peer tier) is rebalanced every tick, and what it owes goes down the same way. Every move is
planned and committed under the manager's lock, like any other.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from kvtier.config import Config
from kvtier.policies import PageRef
from kvtier.tiering.interfaces import Arrival, TieredSpace
from kvtier.tiering.state.tier import ElasticTier, LowerTier

if TYPE_CHECKING:
    from kvtier.tiering.engine.tiering import Tiering

log = logging.getLogger(__name__)


class Demoter:
    PERIOD = 0.02  # seconds between checks when nobody pokes it
    PRESSURE_PERIOD = 0.05  # seconds between looks at the device's ledger (other processes short of pages)
    MAX_BACKOFF = 1.0  # seconds between tries while checks keep failing

    def __init__(self, tiering: "Tiering", config: Config) -> None:
        self.tiering, self.config = tiering, config
        self._closed = False
        self._pressure_at = -1.0
        self._draining: set[int] = set()  # lower tiers that passed their high mark and are not yet at their low one
        self._stuck: set[int] = set()  # elastic tiers that owed slots with no tier below them (said once)
        self.errors = 0  # checks that raised (logged; the thread goes on)
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvtier-demoter", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Check now (a sequence went idle)."""
        self._wake.set()

    def _run(self) -> None:
        pause = self.PERIOD
        while not self._closed:
            self._wake.wait(pause)
            self._wake.clear()
            arriving: list[tuple[TieredSpace, Arrival]] = []
            try:
                with self.tiering.lock:
                    if self._closed:
                        return
                    self._tick()
                    if self.config.map_ahead:
                        self._start_map_ahead(arriving)
                pause = self.PERIOD
            except Exception:  # noqa: BLE001 - one bad tick must not end demotion (and answers to other processes)
                self.errors += 1
                pause = min(2 * pause, self.MAX_BACKOFF)
                log.exception("kvtier demoter: a check failed (%d so far); trying again in %.2f s", self.errors,
                              pause)
            finally:
                self._map_ahead(arriving)

    def _tick(self) -> None:
        self._keep_gpu()
        tiers = self.tiering.stack.tiers
        for tier in tiers:
            owed = tier.rebalance() if isinstance(tier, ElasticTier) else 0
            if tier is tiers[-1]:  # the last one has nowhere to cascade to
                if owed and tier.id not in self._stuck:
                    self._stuck.add(tier.id)
                    log.warning("kvtier demoter: the %s tier owes %d slots to the budget it shares but is the last "
                                "tier, so its pages cannot go down; put a tier after it in [tiers] order", tier.name,
                                owed)
                continue
            if owed > 0:
                self._give_back(tier, owed)
            elif tier.watermarks is not None:
                self._keep(tier, *tier.watermarks)
        self._answer_pressure()

    def _keep_gpu(self) -> None:
        cfg, pool = self.config, self.tiering.pool
        free = pool.available()
        if free < cfg.gpu_low_watermark * pool.budget_pages:
            want = math.ceil(cfg.gpu_high_watermark * pool.budget_pages) - free
            plan = self.tiering.plan_room(want)
            if plan.moves:
                self.tiering.start_demotion(plan)

    def _start_map_ahead(self, arriving: list[tuple[TieredSpace, Arrival]]) -> None:
        """Book the pages that top each space's empties up to its reserve while the pool stays above its low
        watermark (under the lock); ``_map_ahead`` maps them. Mapping here, off the allocate path: a mapping's
        set-access waits for device-to-host copies in flight, and this thread may."""
        pool = self.tiering.pool
        for space in self.tiering.directory.tiered_spaces():
            if not space.maps_ahead:
                continue
            if pool.available() - space.num_regions < self.config.gpu_low_watermark * pool.budget_pages:
                return
            arrival = space.start_map_ahead()
            if arrival is not None:
                arriving.append((space, arrival))

    def _map_ahead(self, arriving: list[tuple[TieredSpace, Arrival]]) -> None:
        """Map the booked pages without the lock (a page of 64 regions takes 2.1-2.7 ms: allocations go on
        meanwhile), then land them under it."""
        if not arriving:
            return
        for _, arrival in arriving:
            arrival.arrive()
        with self.tiering.lock:
            for space, arrival in arriving:
                try:
                    space.land_map_ahead(arrival)  # sets the arrival landed whatever happens
                except Exception:  # noqa: BLE001 - the others land still
                    self.errors += 1
                    log.exception("kvtier demoter: landing pages mapped ahead in space %r failed", space.name)

    def _answer_pressure(self) -> None:
        """Other processes on the device short of pages (the ledger): give back unused pages, then demote idle
        ones, when this process is next in line (lowest priority with idle pages). At most every
        ``PRESSURE_PERIOD``; each process moves only its own data."""
        pool = self.tiering.pool
        now = time.monotonic()
        if pool.ledger is None or now - self._pressure_at < self.PRESSURE_PERIOD:
            return
        self._pressure_at = now
        idle = self.tiering.plan_room(pool.budget_pages)  # what could go down now (no side effect)
        wanted = pool.ledger.pressure(idle.gpu_handles + pool.free_pages, self.tiering.directory.cache_counters())
        if wanted <= 0:
            return
        wanted -= pool.release_free(wanted)
        if wanted > 0:
            plan = self.tiering.plan_room(wanted)  # its pages come back to the pool, and go at the next look
            if plan.moves:
                self.tiering.start_demotion(plan)

    def _keep(self, tier: LowerTier, low_mark: float, high_mark: float) -> None:
        books = tier.books
        used = lambda: books.used - books.lent  # slots lent to a transfer as scratch come back by themselves
        if not books.total:
            return
        low = int(low_mark * books.total)
        if used() > high_mark * books.total:
            self._draining.add(tier.id)
        if tier.id not in self._draining:
            return
        if used() <= low:  # hysteresis: a round that left it just under its high mark does not end the drain
            self._draining.discard(tier.id)
            return
        # copies first, down to the low mark if they can
        self.tiering.drop_copies_until(tier.id, lambda b: b.free >= b.total - low)
        wanted = used() - self._leaving(tier) - low
        if wanted > 0:
            self._cascade(tier, wanted)

    def _give_back(self, tier: LowerTier, owed: int) -> None:
        """``tier`` owes ``owed`` of its used slots to the budget it shares: kept copies there are dropped first
        (it costs nothing), then its coldest pages go down; it gives the slots back once they are free."""
        self.tiering.drop_copies_until(tier.id, lambda b: b.free >= owed)
        wanted = owed - tier.books.free - self._leaving(tier)
        if wanted > 0:
            self._cascade(tier, wanted)

    def _leaving(self, tier: LowerTier) -> int:
        """Units of ``tier`` whose pages are already in flight out of it (they are freed when the moves land)."""
        return sum(self._units(tier, s, p) for s in self.tiering.directory.tiered_spaces()
                   for p in s.pages.moving if s.pages.tier_of(p) == tier.id)

    @staticmethod
    def _units(tier: LowerTier, space: TieredSpace, page: int) -> int:
        return sum(tier.books.size(slot) for slot in space.pages.slots[page])

    def _cascade(self, tier: LowerTier, slots: int) -> None:
        """Move the coldest pages of ``tier`` down until about ``slots`` of its units are on their way out."""
        t = self.tiering
        below = t.stack.below(tier.id)
        if all(t.health[b].backing_off() for b in below):  # writes keep failing: not every tick (tiering.health)
            return
        spaces = {s.name: s for s in t.directory.tiered_spaces()}
        refs = [PageRef(s.name, int(p)) for s in spaces.values()
                for p in np.flatnonzero((s.pages.tier == tier.id) & ~s.pages.moving_mask())]
        picks = []
        for ref in t.policy.victims(refs, len(refs)):
            if slots <= 0:
                break
            picks.append((spaces[ref.space], ref.page))
            slots -= self._units(tier, spaces[ref.space], ref.page)
        plan = t.plan(picks, automatic=True)
        if plan.moves:
            t.start_demotion(plan)

    def stop(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join()
