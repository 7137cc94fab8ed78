"""The per-device ledger: one page budget shared by every kvtier process on a machine, with no daemon.

A directory per device (``kvtier-ledger-<device>`` under ``ledger_dir``, e.g. ``/dev/shm``) holds the books
(``ledger.json``), the lock that serialises every change (``ledger.lock``, ``flock``), and one ``*.alive`` file
per process, locked by its owner for as long as it lives. A process reserves pages *before* creating them and
releases them after: the check and the reservation are one step under the lock, so processes cannot both see
room and both take it (the race kvcached's shared-memory accounting has). A process that dies -- even by
SIGKILL -- drops its lock with it; the next change by anyone finds its ``.alive`` file unlocked and takes its
pages off the books (the driver freed its memory when it died). Liveness is the lock, never a pid.

The books are a cache of facts that can be rebuilt. Each process's own record (its pages, name, priority, limit)
is its own truth: it is kept in memory and written into its ``.alive`` file under the lock. Books that are
missing, truncated, overwritten or not what kvtier writes are rebuilt from the live processes' ``.alive`` files;
a live process missing from the books is put back; a process whose ``.alive`` file was deleted while it runs is
still alive while the kernel shows its lock (``/proc/locks``), and makes the file again at its next change.
A release always happens (the pages are gone from the device); if the books cannot be written then, they
overcount this process -- the safe side -- until its next change that can be written.

Every wait for the lock is bounded (``KVTIER_LEDGER_LOCK_TIMEOUT``, seconds, default 2): a holder that does not
let go (stopped by SIGSTOP or a debugger) is named in a :class:`LedgerBusyError`, and for ``BUSY_BACKOFF_S``
after that the process plans on its own budget alone (it reserves nothing more) instead of waiting again.

Each process has a share: ``limit_pages`` (optional; ``kvtier limit`` changes it while it runs) and a priority
(which ``kvtier ls`` shows, and which pressure across processes orders by). A ``fork``ed child is not
registered: it drops its copy of the parent's ``.alive`` lock (else a killed parent would stay on the books).

The books are small JSON rewritten whole (to a temporary file, then renamed) under the lock: a change costs tens
of microseconds, and the page pool makes one per batch of pages it creates or releases, off the allocation path.
This module is a process's place on the ledger (``Ledger``); the files themselves -- the lock, the books, their
upkeep, the tools' reads -- are :mod:`kvtier.vmm.ledger_books`'s.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
import uuid
import weakref
from typing import Any, Iterator
from kvtier.errors import ConfigError, LedgerBusyError, LedgerError
from kvtier.vmm.ledger_books import (ALIVE, WANT_TTL_S, _warn, ledger_path, ledgers, live_page_sizes, locked_books,
                                     read_books, set_limit, snapshot)

# the tools' calls, re-exported: ``from kvtier.vmm.ledger import ledgers, snapshot`` as before
__all__ = ["Ledger", "ledger_path", "ledgers", "live_page_sizes", "locked_books", "max_min_share", "read_books",
           "set_limit", "snapshot"]

log = logging.getLogger(__name__)

BUSY_BACKOFF_S = 1.0  # after a lock wait timed out: fail at once for this long (a decode step is not held up)
ROOM_TTL_S = 0.002
SHARE_TTL_S = 0.01  # the share is planned with (num_free_sectors asks per request per step): read at most this often


class Ledger:
    """This process's place on one device's ledger. Only ``__init__`` raises (:class:`ConfigError`,
    :class:`LedgerError`); a ledger that fails later makes ``reserve`` grant nothing (``problem`` says why),
    ``release`` still release, and the pressure calls answer "nothing to do"."""

    _joined: "weakref.WeakSet[Ledger]" = weakref.WeakSet()

    def __init__(self, directory: str, device_key: str, budget_pages: int, page_size: int, name: str,
                 priority: int = 0, limit_pages: int | None = None) -> None:
        self.path = ledger_path(directory, device_key)
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"ledger_dir: cannot make {self.path!r} ({exc.strerror}); point it at a writable "
                              "directory shared by the processes (e.g. /dev/shm)") from None
        self.id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.page_size, self.name = page_size, name
        self._record: dict[str, Any] = {"pid": os.getpid(), "name": name, "priority": priority,
                                        "limit_pages": limit_pages, "pages": 0, "since": time.time(),
                                        "budget_pages": budget_pages, "page_size": page_size}
        self._room, self._room_at = 0, -1.0
        self._share: tuple[int | None, int, float] = (None, 0, -1.0)  # (fair share, reserved, when read)
        self._said_at = -1.0
        self._busy_until = -1.0
        self._forked = False
        self._joining = True
        self.problem: str | None = None  # the last failure, for error messages; None once a change went through
        self._alive, self._alive_written = -1, b""
        self._make_alive()
        try:
            with self._books() as books:
                others = {k: p for k, p in books["procs"].items() if k != self.id}
                if not others:  # no live process: the books start afresh with this one's settings
                    books["page_size"], books["budget_pages"] = page_size, budget_pages
                elif books["page_size"] != page_size:
                    raise ConfigError(f"ledger {self.path!r} counts pages of {books['page_size']} bytes for the "
                                      f"live processes {_names(others)}; this process uses {page_size}: give every "
                                      "process on the device one page_size")
                elif books["budget_pages"] != budget_pages:
                    log.warning("ledger %s: the device's budget stays %d pages, as the live processes %s set it; "
                                "this process asked for %d (ledger_budget applies once they have all ended)",
                                self.path, books["budget_pages"], _names(others), budget_pages)
        except BaseException:
            self._drop_alive()
            raise
        self._joining = False
        Ledger._joined.add(self)

    # --- the books, under the lock ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _books(self, write: bool = True) -> Iterator[dict[str, Any]]:
        """The books with this process's record in them (put back if they lost it), its pages as it counts them;
        its ``.alive`` file rewritten before the lock goes. Raises LedgerError, having changed nothing."""
        if self._forked:
            raise LedgerError(f"ledger {self.path!r}: this process is a fork of pid {self._record['pid']}, whose "
                              "place on the ledger it does not share; create a TierManager in the child")
        if time.monotonic() < self._busy_until:
            raise LedgerBusyError(f"{self.problem} (not waited for again for {BUSY_BACKOFF_S:g} s)")
        self._keep_alive_file()
        try:
            with locked_books(self.path, write, keep=self.id, holder=f"{os.getpid()} {self.name}") as books:
                mine = books["procs"].get(self.id)
                if mine is None:
                    if not self._joining:
                        log.warning("ledger %s: the books had lost this process (%s); put back with its %d page(s)",
                                    self.path, self.name, self._record["pages"])
                    mine = books["procs"][self.id] = {k: v for k, v in self._record.items()}
                mine["pages"], mine["ino"] = self._record["pages"], self._record["ino"]
                self._record["limit_pages"] = mine["limit_pages"]  # kvtier limit changes it in the books
                books.setdefault("page_size", self.page_size)
                books.setdefault("budget_pages", self._record["budget_pages"])
                yield books
                self._write_alive(mine)
        except LedgerBusyError as exc:
            self.problem, self._busy_until = str(exc), time.monotonic() + BUSY_BACKOFF_S
            raise
        except LedgerError as exc:
            self.problem = str(exc)
            raise
        self.problem = None

    def _mine(self, books: dict[str, Any]) -> dict[str, Any]:
        return books["procs"][self.id]

    # --- reserve / release -----------------------------------------------------------------------------------------
    def reserve(self, n: int, partial: bool = False) -> int:
        """Reserve ``n`` pages (or, with ``partial``, as many of them as there is room for); return how many were
        reserved: ``n``, or 0 when not all fit and not ``partial`` -- or when the ledger failed (``problem``).
        Room: the device's budget less every live process's pages, and this process's limit."""
        grant = 0
        try:
            with self._books() as books:
                grant = min(n, _room(books, self.id))
                if grant < n and not partial:
                    grant = 0
                self._record["pages"] += grant
                mine = self._mine(books)
                mine["pages"] = self._record["pages"]
                if grant:
                    mine.pop("wants", None)  # got pages: whatever it still lacks it says again when it plans again
                self._room_at = -1.0
        except LedgerError as exc:
            self._record["pages"] -= grant  # the books on disk never saw it
            _warn("ledger: reserving pages failed (the pool grants none meanwhile): %s", exc)
            return 0
        return grant

    def release(self, n: int) -> None:
        """Give ``n`` reserved pages back. Never raises: the pages are gone from the device whatever the books say;
        books that cannot be written now overcount this process until its next change goes through."""
        assert 0 <= n <= self._record["pages"], f"ledger: {n} page(s) released, {self._record['pages']} reserved"
        self._record["pages"] -= n
        self._room_at = -1.0
        try:
            with self._books():
                pass
        except LedgerError as exc:
            _warn("ledger: a release is not on the books yet (%s); they overcount this process until its next "
                  "change can be written", exc)

    def room(self, fresh: bool = False) -> int:
        """Pages this process could reserve now (read at most every ``ROOM_TTL_S`` unless ``fresh``: callers plan
        with it, and ``reserve`` is the one that decides); 0 while the ledger fails."""
        now = time.monotonic()
        if fresh or now - self._room_at > ROOM_TTL_S:
            try:
                with self._books(write=False) as books:
                    self._room = _room(books, self.id)
            except LedgerError:
                self._room = 0
            self._room_at = now
        return self._room

    def over_limit(self) -> int:
        """Pages this process holds beyond its limit (``kvtier limit`` lowered it): its pool gives them back."""
        try:
            with self._books(write=False):
                pass
        except LedgerError:
            pass  # the limit as last read
        limit = self._record["limit_pages"]
        return max(0, self._record["pages"] - limit) if limit is not None else 0

    def reserved(self) -> int:
        """Pages this process holds reserved (its own count: what the books say once written)."""
        return self._record["pages"]

    # --- pressure across processes ----------------------------------------------------------------------------------
    def want(self, n: int) -> None:
        """Say this process is short of ``n`` pages now (others' demoters may give theirs back). A want lapses
        after ``WANT_TTL_S`` unless said again: a waiting process says it each time it plans again."""
        with contextlib.suppress(LedgerError), self._books() as books:
            self._mine(books)["wants"] = [n, time.time()]

    def want_throttled(self, n: int) -> None:
        """``want``, written at most every ``WANT_TTL_S / 4`` (the engine says it every step it is short)."""
        now = time.monotonic()
        if now - self._said_at > WANT_TTL_S / 4:
            self._said_at = now
            self.want(n)

    def fair_share(self) -> int | None:
        """While another process of the same or a higher priority wants pages: the pages this process may hold
        (max-min fair over the budget: a process that wants nothing keeps what it holds if under an even split,
        the rest split what is left evenly); None while no one else wants. Read at most every ``SHARE_TTL_S``."""
        self._read_share()
        return self._share[0]

    def reserved_cached(self) -> int:
        """This process's reserved pages as of the last ``fair_share`` read."""
        self._read_share()
        return self._share[1]

    def _read_share(self) -> None:
        now = time.monotonic()
        if now - self._share[2] <= SHARE_TTL_S:
            return
        share = None
        with contextlib.suppress(LedgerError), self._books(write=False) as books:
            wall, mine = time.time(), self._mine(books)
            others = [p for pid, p in books["procs"].items() if pid != self.id]
            wants = [_fresh(p.get("wants"), wall) for p in others]
            if any(w and p["priority"] >= mine["priority"] for p, w in zip(others, wants)):
                share = max_min_share(books["budget_pages"], [None if w else p["pages"] for p, w in zip(others, wants)])
        self._share = (share, self._record["pages"], now)

    def others_idle(self) -> int:
        """Pages the other processes said (within ``WANT_TTL_S``) they could give back: worth waiting for."""
        with contextlib.suppress(LedgerError), self._books(write=False) as books:
            now = time.time()
            return sum(p["idle"][0] for pid, p in books["procs"].items() if pid != self.id and _fresh(p.get("idle"), now))
        return 0

    def others_pages(self) -> int:
        """Pages the other live processes hold now (0 while the ledger fails)."""
        with contextlib.suppress(LedgerError), self._books(write=False) as books:
            return sum(p["pages"] for pid, p in books["procs"].items() if pid != self.id)
        return 0

    def pressure(self, idle_pages: int, cache: dict[str, int] | None = None) -> int:
        """Publish this process's idle pages (and its cache's counters, ``cache``: ``kvtier top`` shows them);
        return how many pages it should give back now: what others want, if it is the lowest-priority process with
        idle pages besides them (a lower priority's idle go first). Read-mostly: the books are rewritten only when
        the count changed or half its life has passed (counters alone: at most every quarter of it)."""
        now = time.time()
        try:
            with self._books(write=False) as books:
                mine = self._mine(books)
                said = mine.get("idle")
                stale = not said or said[0] != idle_pages or now - said[1] > WANT_TTL_S / 2 or (
                    cache is not None and mine.get("cache") != cache and now - said[1] > WANT_TTL_S / 4)
                others = [p for pid, p in books["procs"].items() if pid != self.id]
                wanting = [p for p in others if _fresh(p.get("wants"), now)]
                lower = [p for p in others if p not in wanting and p["priority"] < mine["priority"]
                         and _fresh(p.get("idle"), now) and p["idle"][0] > 0]
            if stale:
                with self._books() as books:
                    self._mine(books)["idle"] = [idle_pages, now]
                    if cache is not None:
                        self._mine(books)["cache"] = dict(cache)
        except LedgerError:
            return 0  # no one can be heard: keep what this process holds
        return 0 if not wanting or lower else sum(p["wants"][0] for p in wanting)

    def close(self) -> None:
        """Leave the books (every page this process reserved must have been released or died with it). Never
        raises: a process that cannot write the books leaves them at its next look by anyone (its lock goes)."""
        Ledger._joined.discard(self)
        if self._forked:
            return  # the parent's place, not this process's
        with contextlib.suppress(LedgerError), self._books() as books:
            books["procs"].pop(self.id, None)
        self._drop_alive()

    # --- this process's ``.alive`` file ---------------------------------------------------------------------------
    def _make_alive(self) -> None:
        """Create, lock and name this process's ``.alive`` file (made under a temporary name and renamed once
        locked, so that no one ever sees it unlocked and takes it for a dead process's)."""
        final = os.path.join(self.path, self.id + ALIVE)
        tmp = os.path.join(self.path, f".{self.id}{ALIVE}.{uuid.uuid4().hex[:6]}")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise LedgerError(f"ledger {self.path!r}: cannot create this process's .alive file ({exc.strerror}); "
                              "check that ledger_dir is writable and not full") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held for life: the proof this process is alive
            self._record["ino"] = os.fstat(fd).st_ino
            os.replace(tmp, final)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise LedgerError(f"ledger {self.path!r}: cannot make this process's .alive file ({exc.strerror})") \
                from None
        old, self._alive = self._alive, fd
        self._alive_written = b""  # a new file: written at the next change of the books
        if old >= 0:
            os.close(old)

    def _keep_alive_file(self) -> None:
        """Someone deleted this process's ``.alive`` file (or the whole directory): make it again."""
        try:
            if os.fstat(self._alive).st_nlink > 0:
                return
            os.makedirs(self.path, exist_ok=True)
            self._make_alive()
        except (OSError, LedgerError) as exc:
            log.debug("ledger: could not make the .alive file again: %s", exc)
            return
        log.warning("ledger %s: this process's .alive file had been deleted; made again", self.path)

    def _write_alive(self, record: dict[str, Any]) -> None:
        """The record into the ``.alive`` file, when it changed (reads of the books, most calls, change nothing)."""
        data = json.dumps(record).encode()
        if data == self._alive_written:
            return
        try:
            os.pwrite(self._alive, data, 0)
            os.ftruncate(self._alive, len(data))
            self._alive_written = data
        except OSError as exc:  # a full directory: the books still hold the record
            log.debug("ledger: could not write this process's .alive record: %s", exc)

    def _drop_alive(self) -> None:
        if self._alive < 0:
            return
        with contextlib.suppress(OSError):
            if os.fstat(self._alive).st_nlink > 0:
                os.unlink(os.path.join(self.path, self.id + ALIVE))
        os.close(self._alive)
        self._alive = -1

    def _after_fork(self) -> None:
        """In a ``fork``ed child: let go of the copy of the parent's lock (the parent's death must show)."""
        self._forked = True
        if self._alive >= 0:
            os.close(self._alive)
            self._alive = -1


def _forget_ledgers_in_child() -> None:
    for ledger in list(Ledger._joined):
        ledger._after_fork()
    Ledger._joined = weakref.WeakSet()


os.register_at_fork(after_in_child=_forget_ledgers_in_child)


# --- shares and the books' records ------------------------------------------------
def max_min_share(budget: int, others: list[int | None]) -> int:
    """The pages one claimant may hold of ``budget`` when it wants more: max-min fair -- each other claimant that
    wants nothing more keeps what it holds (``others[i]``) if that is under an even split, and the rest (this one
    and every other that wants: ``None``) split what is left evenly, rounded up (the budget stays the hard limit).
    Used for processes on the ledger and for buffers on one pool."""
    demands = sorted([float("inf")] + [float("inf") if d is None else d for d in others])
    left = budget
    for n, demand in zip(range(len(demands), 0, -1), demands):
        even = -(-left // n)
        if demand >= even:
            return even
        left -= int(demand)
    return left  # not reached: this claimant's own demand is unbounded


def _fresh(said: Any, now: float) -> bool:
    """Whether a ``[count, time]`` said in the books is recent."""
    return bool(said) and now - said[1] < WANT_TTL_S


def _names(procs: dict[str, Any]) -> str:
    return ", ".join(f"pid {p['pid']} ({p['name']})" for p in procs.values())


def _room(books: dict[str, Any], proc_id: str) -> int:
    free = books["budget_pages"] - sum(p["pages"] for p in books["procs"].values())
    mine = books["procs"][proc_id]
    if mine["limit_pages"] is not None:
        free = min(free, mine["limit_pages"] - mine["pages"])
    return max(0, free)


