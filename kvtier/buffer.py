"""A flat byte range of fixed address whose pages are mapped from the manager's pool while in use.

For an engine whose cache is one flat tensor with its own layout (transformers' continuous batching: sectors of
blocks over one ``uint8`` tensor), where a :class:`~kvtier.KVSpace`'s per-layer K/V geometry does not fit. The
engine says which byte spans it uses (``acquire``) and which it no longer does (``release``); a page is mapped
while any span on it is acquired and goes back to the pool once the last one is released and the work queued
on the given stream has finished. The tensor never moves, so kernels and CUDA graphs keep their pointers.

Freshly mapped pages are zeroed (the engines this serves start from ``torch.zeros`` and read a zeroed pad area).
``reserve_pages``: pages of the pool this buffer leaves to others -- e.g. the room its engine's preempted requests
are staged through on their way down.

**Sharing under contention.** Buffers on one pool borrow each other's unused pages freely; but while another
buffer of the same or a higher priority says it is short of room (``want``, said again at least every
``WANT_TTL_S``), a buffer may grow only to its fair share (``fair_share``: the budget split evenly among those
that want more, after what the others hold), and likewise a process against the device's ledger. So a burst on
one engine takes the whole pool while the other idles, and the two meet at half each when both are busy, instead
of the first keeping everything until its queue drains (H100, ``kvtier bench colocated`` at 952e6ad: the second
model's burst started 7 of 24 requests in 113 s on the shared pool against 14 on a static half).

Contract, as for the pool: ``missing(spans)`` and ``can_acquire(spans)`` have no side effects; ``acquire`` maps
every page the spans need or raises :class:`OutOfPagesError` having changed nothing.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Iterable

import torch

from kvtier.errors import InvalidArgumentError, OutOfPagesError
from kvtier.vmm.ledger import max_min_share
from kvtier.vmm.mapped_range import MappedRange

if TYPE_CHECKING:
    from kvtier.manager import TierManager

Span = tuple[int, int]  # [start, stop) in bytes
WANT_TTL_S = 1.0  # a want lapses unless said again within this (the engine says it every step it is short)


class ElasticBuffer:
    def __init__(self, manager: "TierManager", name: str, nbytes: int, priority: int = 0,
                 reserve_pages: int = 0, max_pages: int | None = None) -> None:
        self.name, self.priority = name, priority
        self._mgr = manager
        self.page_size = manager.page_size
        self.num_pages = -(-nbytes // self.page_size)
        self.nbytes = nbytes
        self.reserve_pages = reserve_pages
        self.max_pages = self.num_pages if max_pages is None else max_pages
        self.range = MappedRange(manager.backend, 1, self.num_pages, self.page_size,
                                 gate=manager.tiering.mapping)
        self.tensor = self.range.region(0, nbytes)  # uint8, never moves
        self._users = [0] * self.num_pages  # acquired spans touching each page
        self._empty: dict[int, Any] = {}  # mapped pages no span uses -> fence of their last readers
        self.peak_pages = 0
        self._wanted_at = -math.inf

    # --- books -------------------------------------------------------------------------------------------------
    def pages(self, span: Span) -> range:
        if not (isinstance(span, (tuple, list)) and len(span) == 2 and all(
                isinstance(x, int) and not isinstance(x, bool) for x in span)):
            raise InvalidArgumentError(f"buffer {self.name!r}: a span is a (start, stop) pair of byte offsets, got "
                                       f"{span!r}")
        start, stop = span
        if not 0 <= start < stop <= self.nbytes:
            raise InvalidArgumentError(f"buffer {self.name!r}: span {span} is outside [0, {self.nbytes})")
        return range(start // self.page_size, (stop - 1) // self.page_size + 1)

    @property
    def mapped_pages(self) -> int:
        return len(self.range.handles)

    def missing(self, spans: Iterable[Span]) -> int:
        """Pages that acquiring ``spans`` would map (no side effects)."""
        return len({p for span in spans for p in self.pages(span) if not self.range.is_mapped(p)})

    def available(self) -> int:
        """Fresh pages this buffer could map now: the pool's and the spaces' empty pages, less the reserve it
        leaves, within ``max_pages``, and within its fair share while others want room (see the module
        docstring)."""
        with self._mgr.lock:
            self._trim()
            free = self._mgr.pool.available() + sum(len(pages) * s.num_regions for s, pages in self._spaces_empties())
            room = min(free - self.reserve_pages, self.max_pages - self.mapped_pages)
            if self._contended():
                room = min(room, self.fair_share() - self.mapped_pages)
            ledger = self._mgr.pool.ledger
            if ledger is not None:
                share = ledger.fair_share()  # None unless another process wants room
                if share is not None:
                    room = min(room, share - ledger.reserved_cached())
            return max(0, room)

    def _spaces_empties(self) -> list[tuple[Any, list[int]]]:
        """The spaces' empty mapped pages (map-ahead reserves, pages waiting for their fences), lowest priority
        first: room, not a claim -- a buffer takes them as a space short of pages does. Unseen, they starved an
        engine on the pool: its swap spaces' reserves held the pages its next request needed, and the request
        failed (transformers' continuous batching, ``space_reserve_pages`` 8, CPU backend)."""
        return [(s, s.reclaimable()) for s in sorted(self._mgr.spaces.values(), key=lambda s: s.priority)]

    def settle_arrivals(self) -> bool:
        """Wait (without the lock) for room in transit: the pages the spaces are mapping ahead now (they land as
        empty pages) and those the pool is creating (they land free) -- meanwhile neither free nor empty, and an
        engine that counted its room then failed a request it had room for (CI, 36f7757 and e7a4a57). Returns
        whether there were any."""
        with self._mgr.lock:
            arriving = [s.arrival for s in self._mgr.spaces.values() if s.arrival is not None]
        for arrival in arriving:
            arrival.settle()
        return self._mgr.pool.settle() or bool(arriving)

    def _take_spaces_empties(self, handles: int) -> None:
        """Unmap spaces' empty pages (waiting for their fences) until the pool has ``handles`` free."""
        short = handles - self._mgr.pool.available()
        for space, pages in self._spaces_empties():
            if short <= 0:
                return
            take = pages[:-(-short // space.num_regions)]
            if take:
                space.reclaim(take)
                short -= len(take) * space.num_regions

    # --- sharing under contention ----------------------------------------------------------------------------
    def want(self, pages: int = 1) -> None:
        """Say this buffer is short of room now (its engine has work waiting for pages): for ``WANT_TTL_S``, others
        on the pool grow no further than their fair share, and other processes hear it through the ledger."""
        self._wanted_at = time.monotonic()
        ledger = self._mgr.pool.ledger
        if ledger is not None:
            ledger.want_throttled(pages)

    def wanting(self) -> bool:
        return time.monotonic() - self._wanted_at < WANT_TTL_S

    def _contended(self) -> bool:
        return any(b is not self and b.priority >= self.priority and b.wanting()
                   for b in list(self._mgr.buffers.values()))

    def yielding(self) -> bool:
        """Whether this buffer is held at its fair share now (others want room): waiting is then no failure."""
        ledger = self._mgr.pool.ledger
        return (self._contended() and self.mapped_pages >= self.fair_share()) or \
            (ledger is not None and ledger.fair_share() is not None
             and ledger.reserved_cached() >= ledger.fair_share())

    def fair_share(self) -> int:
        """Pages this buffer may hold while others want room: max-min fair over the pool's budget -- a buffer
        that wants nothing more keeps what it holds if that is under an even split, and the rest (this one and
        every one that wants) split what is left evenly, rounded up."""
        others = [b for b in list(self._mgr.buffers.values()) if b is not self]
        return max_min_share(self._mgr.pool.budget_pages, [None if b.wanting() else b.mapped_pages for b in others])

    def can_acquire(self, spans: Iterable[Span]) -> bool:
        return self.missing(spans) <= self.available()

    # --- acquire / release -------------------------------------------------------------------------------------
    def acquire(self, spans: Iterable[Span]) -> None:
        spans = list(spans)
        with self._mgr.lock:
            self._mgr.check_open()
            new = sorted({p for span in spans for p in self.pages(span) if not self.range.is_mapped(p)})
            if new:
                if len(new) > self.available():
                    raise OutOfPagesError(
                        f"buffer {self.name!r}: {len(new)} page(s) wanted, {self.available()} may be mapped "
                        f"(pool {self._mgr.pool.available()} free, {self.reserve_pages} left to others, "
                        f"{self.mapped_pages}/{self.max_pages} mapped); free some of its spans or raise pool_budget")
                self._take_spaces_empties(len(new))
                handles = self._mgr.pool.take(len(new))
                try:
                    self.range.map(new, handles)
                except BaseException:
                    self._mgr.give_pages(handles)
                    raise
                for p in new:
                    self.range.region_view(0, p).zero_()
            for span in spans:
                for p in self.pages(span):
                    self._users[p] += 1
                    self._empty.pop(p, None)
            self.peak_pages = max(self.peak_pages, self.mapped_pages)

    def release(self, spans: Iterable[Span], stream: Any = None) -> None:
        """Stop using ``spans``; pages no span uses go back once the work queued on ``stream`` (default: the
        current stream) has finished."""
        spans = list(spans)
        with self._mgr.lock:
            uses = Counter(p for span in spans for p in self.pages(span))
            over = [p for p, n in uses.items() if n > self._users[p]]
            if over:  # checked before anything changes
                raise InvalidArgumentError(f"buffer {self.name!r}: spans released more often than acquired (pages "
                                           f"{sorted(over)[:8]}); release each acquired span once")
            emptied = []
            for p, n in uses.items():
                self._users[p] -= n
                if self._users[p] == 0:
                    emptied.append(p)
            if emptied:
                fence = self._mgr.backend.record_fence(stream)
                for p in emptied:
                    self._empty[p] = fence
            self._trim()

    def _trim(self) -> None:
        """Unmap empty pages whose readers are done (never waits)."""
        done = [p for p, fence in self._empty.items() if fence is None or fence.query()]
        if done:
            for p in done:
                del self._empty[p]
            self._mgr.give_pages(self.range.unmap(done))

    # --- lifecycle -------------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {"bytes": self.nbytes, "pages_mapped": self.mapped_pages, "bytes_mapped":
                self.mapped_pages * self.page_size, "peak_bytes_mapped": self.peak_pages * self.page_size,
                "priority": self.priority, **self.range.stats()}

    def check(self) -> None:
        in_use = {p for p, n in enumerate(self._users) if n > 0}
        assert all(n >= 0 for n in self._users)
        assert set(self.range.handles) == in_use | set(self._empty), "mapped pages are neither used nor empty"
        assert not in_use & set(self._empty)

    def close(self) -> None:
        """Unmap every page (after the device is idle) and free the range. The engine must be done with it."""
        with self._mgr.lock:
            if self.range.handles:
                self._mgr.backend.synchronize()
                self._mgr.give_pages(self.range.unmap(list(self.range.handles)))
            self._empty.clear()
            self._users = [0] * self.num_pages
            self.range.close()
            self._mgr.buffers.pop(self.name, None)

    def __repr__(self) -> str:
        return (f"ElasticBuffer({self.name!r}, {self.nbytes} bytes, {self.mapped_pages}/{self.num_pages} pages "
                f"mapped)")

    @property
    def device(self) -> torch.device:
        return self.tensor.device
