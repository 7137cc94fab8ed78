"""The room planner: how a space gets GPU handles -- from the pool, from empty pages spaces keep mapped, by
demoting idle pages -- planned with no side effect, then taken, under the manager's lock; and the one helper that
waits and plans again. Spaces are handed it (``TierManager.room``) and ask it for room; it asks them only what
:class:`RoomUser` offers."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, TypeVar

from kvtier.config import Config
from kvtier.errors import OutOfPagesError, PagesInFlight
from kvtier.tiering import DemotionPlan, Tiering
from kvtier.vmm import PagePool

T = TypeVar("T")


class RoomUser(Protocol):
    """A space, as the planner sees it.

    - ``within_quota(n)``: whether ``n`` more mapped pages stay within its quota.
    - ``reclaimable(keep)``: its empty mapped pages that may be unmapped for others (never those in ``keep``), in
      the order to take them; ``reclaim(pages)`` unmaps them and gives their handles to the pool.
    - ``idle_pages()``: its GPU pages that could be demoted now. ``priority``: lower gives room first.
    - ``evict_cached(pages)``: drop cached blocks no sequence holds (oldest first) until about ``pages`` pages,
      in any tier, came free; returns how many did. The last resort before a request is refused.
    - ``arrival``: its fresh pages being mapped ahead without the lock, if any (empties, reclaimable, once they
      land: ``settle()`` waits for that).
    """

    name: str
    priority: int
    num_regions: int
    arrival: Any

    def within_quota(self, new_pages: int) -> bool: ...

    def reclaimable(self, keep: Iterable[int] = ()) -> list[int]: ...

    def reclaim(self, pages: list[int]) -> None: ...

    def idle_pages(self) -> list[int]: ...

    def evict_cached(self, pages: int, blocks: int = 0) -> int: ...


@dataclass
class RoomPlan:
    """How ``handles`` GPU handles will be had: from the pool, from empty pages spaces keep mapped
    (``reclaim``: space and pages, in the order to take them), and by demoting idle pages (``demotion``)."""

    handles: int
    reclaim: list[tuple[RoomUser, list[int]]] = field(default_factory=list)
    demotion: DemotionPlan | None = None


class RoomPlanner:
    """GPU room for the spaces of one manager. ``lock`` is the manager's; ``changed`` is notified (under it)
    whenever transfers commit; ``spaces()`` lists the open spaces."""

    def __init__(self, lock: threading.RLock, changed: threading.Condition, pool: PagePool, tiering: Tiering,
                 config: Config, spaces: Callable[[], list[Any]]) -> None:
        self.lock, self._changed, self.pool, self.tiering, self.config = lock, changed, pool, tiering, config
        self.spaces = spaces

    def run_planned(self, attempt: Callable[[], T], timeout: float = 30.0) -> T:
        """Run ``attempt`` under the lock. It plans against the books and either commits and returns, or raises
        :class:`PagesInFlight` having changed nothing: with handles, the pages it needs are in flight (wait for
        those, without the lock, so the worker can commit them); without, the room it needs is on its way down
        (wait until transfers commit, at most ``timeout`` seconds in all). Then it plans again from the start."""
        deadline = None
        while True:
            with self.lock:
                try:
                    return attempt()
                except PagesInFlight as wait:
                    pending = wait.handles
                    if wait.again:
                        continue
                    if not pending:
                        deadline = deadline or time.monotonic() + timeout
                        if time.monotonic() > deadline:
                            raise OutOfPagesError(f"{wait}: still short after {timeout:.0f} s") from None
                        self._changed.wait(0.05)
                        continue
            for handle in pending:
                handle.settle()

    # --- pages for spaces (under the lock) -----------------------------------------------------------------------
    def can_back(self, space: RoomUser, pages: int) -> bool:
        """Whether ``pages`` fresh pages of ``space`` could be mapped now (pool, empties of other spaces, idle
        pages, quota). No side effects."""
        if not space.within_quota(pages):
            return False
        reclaimable = sum(len(s.reclaimable()) * s.num_regions for s in self.spaces() if s is not space)
        if self.config.demote_on_allocate:
            reclaimable += sum(len(s.idle_pages()) * s.num_regions for s in self.spaces())
        return pages * space.num_regions <= self.pool.available() + reclaimable

    def plan_room(self, space: RoomUser, n: int, keep: set[int]) -> RoomPlan:
        """Plan how ``space`` gets ``n`` handles, with no side effect. When the pool is short: empty pages kept
        mapped by spaces (lower priority first, ``space`` last and never its pages in ``keep``), then idle pages
        demoted inline if ``demote_on_allocate`` (never ``space``'s pages in ``keep``). Raises OutOfPagesError
        when that cannot be enough, PagesInFlight when demotions in flight will make it so -- or, as the last
        resort, after dropping cached blocks no sequence holds (the one side effect: a cache giving way), so that
        the caller plans again with their room."""
        available = self.pool.available()
        short = n - available
        if short <= 0:
            return RoomPlan(n)
        order = sorted(self.spaces(), key=lambda s: (s is space, s.priority))
        empties = [(s, s.reclaimable(keep if s is space else ())) for s in order]
        reclaimable = sum(len(pages) * s.num_regions for s, pages in empties)
        demotion = None
        if short > reclaimable and self.config.demote_on_allocate:
            plan = self.tiering.plan_room(short - reclaimable, avoid={(space.name, p) for p in keep}, on_demand=True)
            if plan.gpu_handles >= short - reclaimable:  # demote only when that will be enough
                demotion = plan
        covered = reclaimable + (demotion.gpu_handles if demotion else 0)
        if short > covered:
            arriving = [s.arrival for s in self.spaces() if s.arrival is not None]
            if arriving:  # the background demoter maps pages ahead: empties, reclaimable, within milliseconds
                raise PagesInFlight(f"space {space.name!r}: waiting for pages being mapped ahead", arriving)
            if short <= covered + self.tiering.gpu_handles_leaving():
                raise PagesInFlight(f"space {space.name!r}: waiting for pages on their way down")
            wanted = -(-(short - covered) // max(1, space.num_regions))
            if any(s.evict_cached(wanted) for s in sorted(self.spaces(), key=lambda s: s.priority)):  # lowest first
                # cached blocks no sequence holds gave way (their pages, and slots below, came free): the caller's
                # plan was made before that, so it plans again from the start
                raise PagesInFlight(f"space {space.name!r}: cached blocks dropped for room", again=True)
            if demotion is None and self.config.demote_on_allocate and self.tiering.retry_soon() \
                    and any(s.idle_pages() for s in self.spaces()):
                # room may be below, in a tier whose writes just failed: wait for its next try if it comes soon
                # (a flaky disk); a dead one, backed off for longer, is not waited for
                raise PagesInFlight(f"space {space.name!r}: waiting for a tier that failed writes to be tried again")
            ledger = self.pool.ledger
            if ledger is not None and self.pool.available(fresh=True) > available:
                # the ledger's room was read up to ROOM_TTL_S ago, before another process gave pages back: a
                # false refusal (a process freed and another asked within those 2 ms, CPU machine): plan again
                raise PagesInFlight(f"space {space.name!r}: the device's room grew", again=True)
            if ledger is not None and ledger.others_idle() > 0:
                # other processes on the device hold idle pages: their demoters give them back (see the ledger)
                ledger.want(short - covered)
                raise PagesInFlight(f"space {space.name!r}: waiting for other processes on the device to give "
                                    "idle pages back")
            shared = "" if ledger is None else (
                f"; the device's ledger, shared with other processes, leaves this one {ledger.room()} more (kvtier "
                "ls shows who holds the rest)" if ledger.problem is None else f"; the device's ledger failed: "
                f"{ledger.problem}")
            raise OutOfPagesError(
                f"space {space.name!r}: {n} page(s) wanted, the pool has {self.pool.available()} and "
                f"{covered} more could be reclaimed or demoted (budget {self.pool.budget_pages} pages of "
                f"{self.pool.page_size} bytes{shared}); free or offload sequences, or raise pool_budget")
        return RoomPlan(n, [(s, pages) for s, pages in empties if pages], demotion)

    def take_room(self, plan: RoomPlan) -> list[Any]:
        """Carry out a room plan made under the same lock; return its handles. If an inline demotion's write
        failed (a disk error), its pages stayed on the GPU and the room is short: raises PagesInFlight, so that
        the caller plans again from the books as they now are (the demoted pages' moves are consistent; the
        failing tier is backed off from, so the next plan looks elsewhere or says OutOfPagesError)."""
        if plan.demotion is not None:
            self.tiering.start_demotion(plan.demotion, inline=True)
        short = plan.handles - self.pool.available()
        for space, pages in plan.reclaim:
            if short <= 0:
                break
            take = pages[:-(-short // space.num_regions)]
            space.reclaim(take)
            short -= len(take) * space.num_regions
        if not self.pool.can_take(plan.handles):
            raise PagesInFlight("room fell short: a demotion made for it failed; planning again")
        return self.pool.take(plan.handles)

    def give_pages(self, handles: list[Any]) -> None:
        """Handles a space unmapped, back to the pool."""
        self.pool.give(handles)
