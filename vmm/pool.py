"""The page pool: physical pages of one device, shared by every space on it.

Pages are created ahead of need by a background thread (creation costs 10-20 us a handle on CUDA, too slow for
the allocation path) and kept between ``ready/2`` and ``2*ready`` unused pages: below the low mark it refills to
``ready``, above the high mark it releases down to ``ready`` (hysteresis, so a workload that breathes does not
create and release in a loop). The pool never holds more than ``budget_pages`` pages, mapped or not.

``ready`` counts the pages kept mapped empty ahead of need elsewhere (``stocked``: the spaces' reserves, which any
space or buffer short of pages takes first): the worker creates only the rest. Both are stock for the next
allocation, and held twice they were GPU memory for nothing -- a Llama-3-8B space's reserve of one page is 64
handles of 8 MiB, twice the default ``pool_ready`` (``bench peers``, H100: 1962 MiB held against kvcached's 1792).

Contract: ``can_take(n)`` has no side effects; ``take(n)`` either returns exactly ``n`` handles or raises
:class:`OutOfPagesError` and changes nothing; ``give(handles)`` of handles from ``take`` is always safe.

A handle may be mapped at more than one place (two spaces reading the same KV: ``TieredCache``'s copies):
``share(handles)`` counts each further mapping, and ``give`` then takes one mapping away; the handle comes back to
the free list only with its last.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Sequence

from kvtier.errors import CudaError, OutOfPagesError
from kvtier.vmm.base import Backend, Handle
from kvtier.vmm.ledger import Ledger

log = logging.getLogger(__name__)

LIMIT_CHECK_S = 0.1
REFILL_CHUNK = 16  # pages the worker creates between looks at ``yield_to``


def _key(handle: Handle) -> int:
    """A handle as a dict key: its value (cuda-python's handle objects convert to the driver's integer)."""
    try:
        return int(handle)
    except TypeError:
        return id(handle)  # a backend whose handles are opaque objects: the pool gives back the same objects


class PagePool:
    def __init__(self, backend: Backend, page_size: int, budget_pages: int, ready_pages: int,
                 ledger: Ledger | None = None) -> None:
        self.backend, self.page_size = backend, page_size
        self.ledger = ledger  # the device's budget shared with other processes: pages are reserved there first
        self._limit_checked = -1.0
        self.budget_pages, self.ready_pages = budget_pages, min(ready_pages, budget_pages)
        self._free: list[Handle] = []
        self._shares: dict[int, int] = {}  # handle's key -> its mappings beyond the first (see ``share``)
        self._created = 0            # pages that exist
        self._creating = 0           # pages being created now (count against the budget, not yet in the books)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._made = threading.Condition(self._lock)  # notified as pages being created land (``settle``)
        self._closed = False
        self.creations = self.releases = 0
        self.peak_in_use = 0  # most pages ever taken at once
        self.peak_created = 0  # most pages ever in existence at once (the GPU memory the pool held)
        self.create_seconds = 0.0
        self.refill_waits = 0  # times the worker waited for copies down to drain before creating
        # true while copies down are in flight: the worker then refills only below a quarter of ``ready_pages``
        # (an H100 run gave GPU -> host 0.43 of a pinned copy while the worker created ~540 handles beside it)
        self.yield_to: Callable[[], bool] = lambda: False
        # pages mapped empty ahead of need elsewhere (set by the manager: its spaces' reserves); read under this
        # pool's lock without theirs, so a count at most a page stale -- it only moves when the worker refills
        self.stocked: Callable[[], int] = lambda: 0
        self._worker: threading.Thread | None = None
        if self.ready_pages:
            self._create(self.ready_pages)  # warm at start: the first allocations find pages ready
            self._worker = threading.Thread(target=self._keep_ready, name="kvtier-pool", daemon=True)
            self._worker.start()

    # --- books -----------------------------------------------------------------------------------------------
    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def in_use_pages(self) -> int:
        return self._created - len(self._free)

    def _room(self, fresh: bool = False) -> int:
        own = self.budget_pages - self._created - self._creating
        return min(own, self.ledger.room(fresh)) if self.ledger is not None and own > 0 else own

    @property
    def created_pages(self) -> int:
        return self._created

    def ready_target(self) -> int:
        """Unused pages the worker keeps created now: ``ready_pages`` less those stocked elsewhere."""
        return max(0, self.ready_pages - self.stocked())

    def reset_peak(self) -> None:
        """Start the peak counters afresh from now (like ``torch.cuda.reset_peak_memory_stats``)."""
        with self._lock:
            self.peak_created, self.peak_in_use = self._created, self.in_use_pages

    def available(self, fresh: bool = False) -> int:
        """Pages a ``take`` could return now: ready ones plus those the budget still allows creating (``fresh``:
        the device's ledger read now, not within its last ``ROOM_TTL_S``)."""
        with self._lock:
            return len(self._free) + self._room(fresh)

    def settle(self, timeout: float = 5.0) -> bool:
        """Wait (at most ``timeout`` s) until no page is being created; return whether any was. Such pages are
        neither free nor room (``available``) until they land, so a caller that judges its room meanwhile sees
        too little: an engine failed a request it had room for while the worker refilled (transformers'
        continuous batching on a tight pool, CPU backend, CI at e7a4a57)."""
        with self._lock:
            if not self._creating:
                return False
            self._made.wait_for(lambda: not self._creating, timeout)
            return True

    def can_take(self, n: int) -> bool:
        return n <= self.available()

    # --- take / give -----------------------------------------------------------------------------------------
    def take(self, n: int) -> list[Handle]:
        with self._lock:
            short = n - len(self._free)
            if short > self._room():
                raise OutOfPagesError(
                    f"page pool exhausted: {n} page(s) of {self.page_size} bytes wanted, {len(self._free)} free "
                    f"and {self._room()} more allowed by the budget of {self.budget_pages} "
                    "pages; free or offload sequences, or raise pool_budget")
            short = n - len(self._free)
            if short > 0 and self.ledger is not None and not self.ledger.reserve(short):
                if self.ledger.problem is not None:  # the ledger failed: plan on the pages this process holds
                    raise OutOfPagesError(f"page pool: {short} page(s) to create, but the device's ledger failed "
                                          f"({self.ledger.problem}); the pages held can still be used")
                raise OutOfPagesError(  # another process took the room since _room() looked
                    f"page pool: {short} page(s) to create, but the device's ledger has no room for them now "
                    "(other processes hold it); free or offload sequences, or raise the ledger's budget")
            taken = self._free[len(self._free) - min(n, len(self._free)):]
            del self._free[len(self._free) - len(taken):]
            short = n - len(taken)
            self._creating += short  # held for this call under the same lock as the check
            self.peak_in_use = max(self.peak_in_use, self._created + self._creating - len(self._free))
            if len(self._free) < self.ready_target() // 2:
                self._wake.notify()
        if short > 0:  # the warm pool ran dry: create on the caller's path (and log it, it is slow)
            log.debug("pool: creating %d page(s) on the allocation path", short)
            try:
                taken += self._make(short, into_free=False)
            except CudaError as exc:
                self.give(taken)
                if exc.code != "CUDA_ERROR_OUT_OF_MEMORY":
                    raise
                raise OutOfPagesError(  # the budget allowed it, but others (torch's allocator) hold the memory
                    f"page pool: the device is out of memory after {self._created} pages of {self.page_size} bytes "
                    f"(budget {self.budget_pages}): other allocations hold the rest; lower pool_budget or free "
                    "memory") from exc
            except Exception:
                self.give(taken)
                raise
        return taken

    def share(self, handles: Sequence[Handle]) -> None:
        """``handles`` (taken) are mapped once more: each comes back only when ``give`` has had it once per
        mapping."""
        with self._lock:
            for key in map(_key, handles):
                self._shares[key] = self._shares.get(key, 0) + 1

    def is_shared(self, handle: Handle) -> bool:
        """Whether ``handle`` is mapped at more than one place now."""
        with self._lock:
            return _key(handle) in self._shares

    @property
    def extra_mappings(self) -> int:
        """Mappings beyond the first, over every handle (spaces' mapped handles = pages in use + this)."""
        with self._lock:
            return sum(self._shares.values())

    def give(self, handles: Sequence[Handle]) -> None:
        with self._lock:
            if self._shares:
                handles = [h for h in handles if not self._unshare_locked(h)]
            self._free.extend(handles)
            if self.ledger is not None:
                self._give_back_over_limit()
            if self.ready_pages and len(self._free) > 2 * self.ready_pages:
                self._wake.notify()
            elif not self.ready_pages:
                self._release_locked(len(self._free))

    def _unshare_locked(self, handle: Handle) -> bool:
        """One mapping of ``handle`` went; whether another still holds it."""
        key = _key(handle)
        left = self._shares.get(key, 0)
        if not left:
            return False
        if left == 1:
            del self._shares[key]
        else:
            self._shares[key] = left - 1
        return True

    def release_free(self, n: int) -> int:
        """Release up to ``n`` unused pages now (another process on the device wants them); return how many."""
        with self._lock:
            return self._release_locked(min(n, len(self._free)))

    def _give_back_over_limit(self) -> None:
        """``kvtier limit`` lowered this process's share below what it holds: release unused pages down to it
        (looked at most every ``LIMIT_CHECK_S``; pages in use go when they come back)."""
        now = time.monotonic()
        if now - self._limit_checked < LIMIT_CHECK_S:
            return
        self._limit_checked = now
        over = self.ledger.over_limit() if self.ledger is not None else 0
        if over:
            self._release_locked(min(over, len(self._free)))

    # --- internals ---------------------------------------------------------------------------------------------
    def _create(self, n: int) -> int:
        """Create up to ``n`` pages, as the budget (and the device's ledger) allows; return how many."""
        with self._lock:
            n = max(0, min(n, self.budget_pages - self._created - self._creating))
            if n and self.ledger is not None:
                n = self.ledger.reserve(n, partial=True)
            self._creating += n
        self._make(n)
        return n

    def _refill(self) -> None:
        """Create pages up to ``ready_target()``, ``REFILL_CHUNK`` at a time; while ``yield_to()`` says copies
        down are in flight and a quarter of them are still free, wait for them instead (a take that drains the
        pool below that quarter, or the copies landing, lets the refill go on)."""
        while not self._closed:
            with self._lock:
                target = self.ready_target()
                want = target - len(self._free)
                if want <= 0:
                    return
                if self.yield_to() and len(self._free) >= target // 4:
                    self.refill_waits += 1
                    self._wake.wait(0.005)
                    continue
            if self._create(min(want, REFILL_CHUNK)) == 0:
                return  # the budget (or the ledger) allows no more

    def _make(self, n: int, into_free: bool = True) -> list[Handle]:
        """Create ``n`` pages already counted in ``_creating``, outside the lock; add them to the free list or
        return them (counted in use)."""
        start = time.perf_counter()
        fresh: list[Handle] = []
        made_all = False
        try:
            for _ in range(n):
                fresh.append(self.backend.create(self.page_size))
            made_all = True
        finally:  # a failed creation gives its budget back; the pages made before it go to the free list
            with self._lock:
                self._creating -= n
                self._made.notify_all()
                self._created += len(fresh)
                if self.ledger is not None and len(fresh) < n:
                    self.ledger.release(n - len(fresh))
                self.peak_created = max(self.peak_created, self._created)
                if into_free or not made_all:
                    self._free.extend(fresh)
                self.creations += len(fresh)
                self.create_seconds += time.perf_counter() - start
        return [] if into_free else fresh

    def _release_locked(self, n: int) -> int:
        for _ in range(n):
            self.backend.release(self._free.pop())
        self._created -= n
        self.releases += n
        if self.ledger is not None and n:
            self.ledger.release(n)
        return n

    def _keep_ready(self) -> None:
        while True:
            with self._lock:
                while not self._closed and self.ready_target() // 2 <= len(self._free) <= 2 * self.ready_pages:
                    self._wake.wait()
                if self._closed:
                    return
                if len(self._free) > 2 * self.ready_pages:
                    self._release_locked(len(self._free) - self.ready_target())
                    continue
                want = self.ready_target() - len(self._free)
            if want > 0:
                try:
                    self._refill()
                except Exception:  # noqa: BLE001 - keep serving; take() creates on demand and raises properly
                    log.exception("pool: background page creation failed")
            with self._lock:  # nothing more can be created (budget): sleep until the next take/give
                if len(self._free) < self.ready_target() // 2 and not self._closed:
                    self._wake.wait()

    def close(self) -> None:
        """Release every unused page and stop the worker. Pages still taken are the caller's to give first."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()
        if self._worker is not None:
            self._worker.join()
        with self._lock:
            self._release_locked(len(self._free))

    def check(self) -> None:
        """Integrity check of the books (raises AssertionError on a broken invariant)."""
        with self._lock:
            assert 0 <= len(self._free) <= self._created <= self.budget_pages, \
                (len(self._free), self._created, self.budget_pages)
            assert not self._shares.keys() & set(map(_key, self._free)), "a handle mapped twice is on the free list"
