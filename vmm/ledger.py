"""The per-device ledger: one page budget shared by every kvtier process on a machine, with no daemon.

A directory per device (``kvtier-ledger-<device>`` under ``ledger_dir``, e.g. ``/dev/shm``) holds the books
(``ledger.json``), the lock that serialises every change (``ledger.lock``, ``flock``), and one ``*.alive`` file
per process, locked by its owner for as long as it lives. A process reserves pages *before* creating them and
releases them after: the check and the reservation are one step under the lock, so processes cannot both see
room and both take it (the race kvcached's shared-memory accounting has). A process that dies -- even by
SIGKILL -- drops its lock with it; the next change by anyone finds its ``.alive`` file unlocked and takes its
pages off the books (the driver freed its memory when it died). Liveness is the lock, never a pid.

Each process has a share: ``limit_pages`` (optional; ``kvtier limit`` changes it while it runs) and a priority
(which ``kvtier ls`` shows, and which pressure across processes will order by).

The books are small JSON rewritten whole (to a temporary file, then renamed) under the lock: a change costs tens
of microseconds, and the page pool makes one per batch of pages it creates or releases, off the allocation path.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import time
import uuid
from typing import Any, Iterator

from kvtier.errors import ConfigError, InvalidArgumentError

log = logging.getLogger(__name__)

BOOKS, LOCK = "ledger.json", "ledger.lock"
ROOM_TTL_S = 0.002
WANT_TTL_S = 1.0
SHARE_TTL_S = 0.01  # the share is planned with (num_free_sectors asks per request per step): read at most this often


def ledger_path(directory: str, device_key: str) -> str:
    return os.path.join(directory, "kvtier-ledger-" + re.sub(r"[^A-Za-z0-9_.-]", "_", device_key))


class Ledger:
    def __init__(self, directory: str, device_key: str, budget_pages: int, page_size: int, name: str,
                 priority: int = 0, limit_pages: int | None = None) -> None:
        self.path = ledger_path(directory, device_key)
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"ledger_dir: cannot make {self.path!r} ({exc.strerror}); point it at a writable "
                              "directory shared by the processes (e.g. /dev/shm)") from None
        self.id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._room, self._room_at = 0, -1.0
        self._share: tuple[int | None, int, float] = (None, 0, -1.0)  # (fair share, reserved, when read)
        self._said_at = -1.0
        self.page_size = page_size
        self._alive = os.open(os.path.join(self.path, f"{self.id}.alive"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._alive, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held for life: the proof we are alive
        try:
            with self._books() as books:
                if books.setdefault("page_size", page_size) != page_size:
                    raise ConfigError(f"ledger {self.path!r} counts pages of {books['page_size']} bytes; this "
                                      f"process uses {page_size}: give every process on the device one page_size")
                if books.setdefault("budget_pages", budget_pages) != budget_pages:
                    log.info("ledger %s: the device's budget is %d pages (set by the first process), not %d",
                             self.path, books["budget_pages"], budget_pages)
                books["procs"][self.id] = {"pid": os.getpid(), "name": name, "priority": priority,
                                           "limit_pages": limit_pages, "pages": 0, "since": time.time()}
        except BaseException:
            self._drop_alive()
            raise

    # --- the books, under the lock ---------------------------------------------------------------------------------
    def _books(self, write: bool = True) -> contextlib.AbstractContextManager[dict[str, Any]]:
        return locked_books(self.path, write, keep=self.id)

    def _mine(self, books: dict[str, Any]) -> dict[str, Any]:
        return books["procs"][self.id]

    # --- reserve / release -----------------------------------------------------------------------------------------
    def reserve(self, n: int, partial: bool = False) -> int:
        """Reserve ``n`` pages (or, with ``partial``, as many of them as there is room for); return how many were
        reserved: ``n``, or 0 when not all fit and not ``partial``. Room: the device's budget less every live
        process's pages, and this process's limit."""
        with self._books() as books:
            grant = min(n, _room(books, self.id))
            if grant < n and not partial:
                return 0
            mine = self._mine(books)
            mine["pages"] += grant
            if grant:
                mine.pop("wants", None)  # got pages: whatever it still lacks it says again when it plans again
            self._room_at = -1.0
            return grant

    def release(self, n: int) -> None:
        with self._books() as books:
            mine = self._mine(books)
            assert mine["pages"] >= n, f"ledger: {n} page(s) released, {mine['pages']} reserved"
            mine["pages"] -= n
            self._room_at = -1.0

    def room(self) -> int:
        """Pages this process could reserve now (read at most every ``ROOM_TTL_S``: callers plan with it, and
        ``reserve`` is the one that decides)."""
        now = time.monotonic()
        if now - self._room_at > ROOM_TTL_S:
            with self._books(write=False) as books:
                self._room, self._room_at = _room(books, self.id), now
        return self._room

    def over_limit(self) -> int:
        """Pages this process holds beyond its limit (``kvtier limit`` lowered it): its pool gives them back."""
        with self._books(write=False) as books:
            mine = self._mine(books)
            return max(0, mine["pages"] - mine["limit_pages"]) if mine["limit_pages"] is not None else 0

    def reserved(self) -> int:
        with self._books(write=False) as books:
            return self._mine(books)["pages"]

    # --- pressure across processes ----------------------------------------------------------------------------------
    def want(self, n: int) -> None:
        """Say this process is short of ``n`` pages now (others' demoters may give theirs back). A want lapses
        after ``WANT_TTL_S`` unless said again: a waiting process says it each time it plans again."""
        with self._books() as books:
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
        with self._books(write=False) as books:
            wall, mine = time.time(), self._mine(books)
            others = [p for pid, p in books["procs"].items() if pid != self.id]
            wants = [bool(p.get("wants")) and wall - p["wants"][1] < WANT_TTL_S for p in others]
            share = None
            if any(w and p["priority"] >= mine["priority"] for p, w in zip(others, wants)):
                share = max_min_share(books["budget_pages"], [None if w else p["pages"] for p, w in zip(others, wants)])
            self._share = (share, mine["pages"], now)

    def others_idle(self) -> int:
        """Pages the other processes said (within ``WANT_TTL_S``) they could give back: worth waiting for."""
        with self._books(write=False) as books:
            now = time.time()
            return sum(p["idle"][0] for pid, p in books["procs"].items()
                       if pid != self.id and p.get("idle") and now - p["idle"][1] < WANT_TTL_S)

    def pressure(self, idle_pages: int) -> int:
        """Publish this process's idle pages; return how many pages it should give back now: what others want,
        if it is the lowest-priority process with idle pages besides them (a lower priority's idle go first).
        Read-mostly: the books are rewritten only when the count changed or half its life has passed."""
        now = time.time()
        with self._books(write=False) as books:
            mine = self._mine(books)
            said = mine.get("idle")
            stale = not said or said[0] != idle_pages or now - said[1] > WANT_TTL_S / 2
            wanting = [p for pid, p in books["procs"].items() if pid != self.id
                       and p.get("wants") and now - p["wants"][1] < WANT_TTL_S]
            lower = [p for pid, p in books["procs"].items() if pid != self.id and p not in wanting
                     and p["priority"] < mine["priority"] and p.get("idle") and p["idle"][0] > 0
                     and now - p["idle"][1] < WANT_TTL_S]
        if stale:
            with self._books() as books:
                self._mine(books)["idle"] = [idle_pages, now]
        return 0 if not wanting or lower else sum(p["wants"][0] for p in wanting)

    def close(self) -> None:
        """Leave the books (every page this process reserved must have been released or died with it)."""
        with self._books() as books:
            books["procs"].pop(self.id, None)
        self._drop_alive()

    def _drop_alive(self) -> None:
        os.close(self._alive)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.path, f"{self.id}.alive"))


# --- for the tools (kvtier ls, kvtier limit) and the books' own upkeep ------------------------------------------------
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


def read_books(path: str) -> dict[str, Any]:
    try:
        with open(os.path.join(path, BOOKS)) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def _alive(path: str, proc_id: str) -> bool:
    """Whether the owner of ``proc_id`` still holds its lock."""
    try:
        fd = os.open(os.path.join(path, f"{proc_id}.alive"), os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _reap(path: str, books: dict[str, Any], keep: str | None = None) -> None:
    """Take the processes that are gone off the books (their memory went with them)."""
    for proc_id in [p for p in books["procs"] if p != keep and not _alive(path, p)]:
        gone = books["procs"].pop(proc_id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(path, f"{proc_id}.alive"))
        log.info("ledger %s: process %s (%s) is gone; its %d page(s) are free again", path, gone["pid"],
                 gone["name"], gone["pages"])


def _room(books: dict[str, Any], proc_id: str) -> int:
    free = books["budget_pages"] - sum(p["pages"] for p in books["procs"].values())
    mine = books["procs"][proc_id]
    if mine["limit_pages"] is not None:
        free = min(free, mine["limit_pages"] - mine["pages"])
    return max(0, free)


def ledgers(directory: str) -> list[str]:
    """The ledger directories under ``directory``."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    return [os.path.join(directory, n) for n in names if n.startswith("kvtier-ledger-")]


@contextlib.contextmanager
def locked_books(path: str, write: bool = True, keep: str | None = None) -> Iterator[dict[str, Any]]:
    """The books of the ledger at ``path`` under its lock, the dead taken off; written back (whole, by rename)
    when the block ends, if ``write``."""
    fd = os.open(os.path.join(path, LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        books = read_books(path)
        books.setdefault("procs", {})
        _reap(path, books, keep)
        yield books
        if write:
            tmp = os.path.join(path, f".{BOOKS}.{os.getpid()}")
            with open(tmp, "w") as f:
                json.dump(books, f)
            os.replace(tmp, os.path.join(path, BOOKS))
    finally:
        os.close(fd)  # the lock goes with it


def snapshot(path: str) -> dict[str, Any]:
    """The books of one ledger as they stand (the dead taken off)."""
    with locked_books(path) as books:
        return books


def set_limit(path: str, pid: int, limit_pages: int | None) -> int:
    """Change the limit of the live processes with ``pid`` (``None``: no limit); return how many matched."""
    if limit_pages is not None and limit_pages < 0:
        raise InvalidArgumentError(f"a limit must be >= 0 pages, got {limit_pages}")
    with locked_books(path) as books:
        matched = [p for p in books["procs"].values() if p["pid"] == pid]
        for proc in matched:
            proc["limit_pages"] = limit_pages
        return len(matched)
