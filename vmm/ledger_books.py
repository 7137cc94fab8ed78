"""The files of a device's ledger (see :mod:`kvtier.vmm.ledger`): the books under their lock -- waited for a bounded
time, the holder named when it does not let go -- rebuilt when unreadable, the dead taken off and the live put back
from their ``.alive`` records, leftovers swept; and what the operator's tools read (``kvtier ls``, ``limit``).
Everything here is called with the directory's path; the process's own place on the ledger is ``Ledger``'s."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import time
from typing import Any, Iterator

from kvtier.errors import InvalidArgumentError, LedgerBusyError, LedgerError

log = logging.getLogger("kvtier.vmm.ledger")

BOOKS, LOCK, ALIVE = "ledger.json", "ledger.lock", ".alive"
LOCK_TIMEOUT_S = float(os.environ.get("KVTIER_LEDGER_LOCK_TIMEOUT", "2.0"))
STALE_TEMP_S = 60.0   # a half-made ``.alive`` file older than this, unlocked, was left by a killed process
WANT_TTL_S = 1.0  # a want or an idle count said in the books lapses after this

_warned: dict[str, float] = {}


def _warn(message: str, *args: Any, every_s: float = 10.0) -> None:
    """Log a warning, the same one at most every ``every_s`` (a failing ledger is met on every allocation)."""
    now = time.monotonic()
    if now - _warned.get(message, -every_s) >= every_s:
        _warned[message] = now
        log.warning(message, *args)


def ledger_path(directory: str, device_key: str) -> str:
    return os.path.join(directory, "kvtier-ledger-" + re.sub(r"[^A-Za-z0-9_.-]", "_", device_key))


def _int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _said(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)


def _record_ok(record: Any) -> bool:
    """Whether a process record is one kvtier writes (anything else is not trusted)."""
    return (isinstance(record, dict) and _int(record.get("pid"), 1) and isinstance(record.get("name"), str)
            and _int(record.get("priority"), -2**63) and _int(record.get("pages"))
            and (record.get("limit_pages") is None or _int(record.get("limit_pages")))
            and all(_said(record[k]) for k in ("wants", "idle") if k in record)
            and ("cache" not in record or isinstance(record["cache"], dict)
                 and all(isinstance(k, str) and _int(v) for k, v in record["cache"].items())))


def _books_ok(books: Any) -> bool:
    return (isinstance(books, dict) and isinstance(books.get("procs"), dict)
            and all(isinstance(k, str) and _record_ok(r) for k, r in books["procs"].items())
            and all(_int(books[k], 1) for k in ("page_size", "budget_pages") if k in books))


def read_books(path: str) -> dict[str, Any]:
    """The books as written, or ``{"procs": {}}`` when they are missing or not what kvtier writes (the caller
    rebuilds them from the live processes). No lock: a rename makes each write whole."""
    try:
        with open(os.path.join(path, BOOKS), "rb") as f:
            books = json.loads(f.read() or b"null")
    except FileNotFoundError:
        return {"procs": {}}
    except (OSError, ValueError) as exc:
        _warn("ledger %s: the books cannot be read (%s); rebuilt from the live processes", path, exc)
        return {"procs": {}}
    if not _books_ok(books):
        _warn("ledger %s: the books are not what kvtier writes; rebuilt from the live processes", path)
        return {"procs": {}}
    return books


def _locks_held() -> set[tuple[int, int]]:
    """(pid, inode) of every flock the kernel shows (``/proc/locks``); empty where it cannot be read."""
    held = set()
    with contextlib.suppress(OSError):
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 6 and fields[1] == "FLOCK":
                    with contextlib.suppress(ValueError, IndexError):
                        held.add((int(fields[4]), int(fields[5].split(":")[2])))
    return held


def _locked(file: str) -> bool | None:
    """Whether someone holds the lock on ``file`` (None: there is no such file)."""
    try:
        fd = os.open(file, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _alive(path: str, proc_id: str, record: dict[str, Any], locks: dict[str, set[tuple[int, int]]]) -> bool:
    """Whether the owner of ``proc_id`` still holds its lock: on its ``.alive`` file, or -- the file deleted
    under it -- on the inode the kernel still shows it locking."""
    held = _locked(os.path.join(path, proc_id + ALIVE))
    if held is not None:
        return held
    if "held" not in locks:
        locks["held"] = _locks_held()
    return (record.get("pid"), record.get("ino")) in locks["held"]


def _read_alive(file: str) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        with open(file, "rb") as f:
            record = json.loads(f.read())
        if _record_ok(record):
            return record
    return None


def _upkeep(path: str, books: dict[str, Any], keep: str | None = None) -> None:
    """Under the lock: take the processes that are gone off the books (their memory went with them), put back
    live ones the books lost (from their ``.alive`` records), sweep files killed processes left behind."""
    locks: dict[str, set[tuple[int, int]]] = {}
    procs = books["procs"]
    for proc_id in [p for p in procs if p != keep and not _alive(path, p, procs[p], locks)]:
        gone = procs.pop(proc_id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(path, proc_id + ALIVE))
        log.info("ledger %s: process %s (%s) is gone; its %d page(s) are free again", path, gone["pid"],
                 gone["name"], gone["pages"])
    now = time.time()
    for name in os.listdir(path):
        file = os.path.join(path, name)
        if name.startswith(f".{BOOKS}."):  # a write killed between its temporary file and the rename
            with contextlib.suppress(OSError):
                os.unlink(file)
        elif name.endswith(ALIVE) and name[:-len(ALIVE)] not in procs and name[:-len(ALIVE)] != keep:
            if _locked(file):
                record = _read_alive(file)
                if record is not None:
                    procs[name[:-len(ALIVE)]] = record
                    log.info("ledger %s: live process %s (%s) put back on the books", path, record["pid"],
                             record["name"])
            else:
                with contextlib.suppress(OSError):
                    os.unlink(file)
        elif name.startswith(".") and ALIVE + "." in name:  # a process killed while making its .alive file
            with contextlib.suppress(OSError):
                if now - os.stat(file).st_mtime > STALE_TEMP_S and _locked(file) is False:
                    os.unlink(file)
    for proc in procs.values():  # the device's facts, if the books lost them: as the live processes joined
        for key in ("page_size", "budget_pages"):
            if key not in books and _int(proc.get(key), 1):
                books[key] = proc[key]


def ledgers(directory: str) -> list[str]:
    """The ledger directories under ``directory``."""
    try:
        names = sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [os.path.join(directory, n) for n in names if n.startswith("kvtier-ledger-")]


def _lock(path: str, timeout: float) -> int:
    """Open and take the ledger's lock within ``timeout`` seconds; return its fd. Raises LedgerError."""
    try:
        fd = os.open(os.path.join(path, LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:  # the directory was deleted: make it again (its processes make their files again)
        try:
            os.makedirs(path, exist_ok=True)
            fd = os.open(os.path.join(path, LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise LedgerError(f"ledger {path!r}: cannot open its lock ({exc.strerror})") from None
    except OSError as exc:
        raise LedgerError(f"ledger {path!r}: cannot open its lock ({exc.strerror}); check ledger_dir") from None
    deadline, pause = time.monotonic() + timeout, 0.00005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = _holder(fd)
                os.close(fd)
                raise _busy(path, holder, timeout) from None
            time.sleep(pause)
            pause = min(2 * pause, 0.005)


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return os.pread(fd, 256, 0).decode().strip()
    return ""


def _busy(path: str, holder: str, timeout: float) -> LedgerBusyError:
    pid_text, _, name = holder.partition(" ")
    pid = int(pid_text) if pid_text.isdigit() else None
    state = ""
    with contextlib.suppress(OSError, IndexError):
        with open(f"/proc/{pid}/stat") as f:
            code = f.read().rsplit(")", 1)[1].split()[0]
        state = {"T": ", stopped", "t": ", stopped by a debugger", "Z": ", a zombie"}.get(code, "")
    who = f"pid {pid} ({name}{state})" if pid is not None else "another process"
    return LedgerBusyError(f"ledger {path!r}: its lock has been held for over {timeout:g} s by {who}; resume or end "
                           f"that process (kill -CONT / kill {pid if pid is not None else '<pid>'}), or raise "
                           "KVTIER_LEDGER_LOCK_TIMEOUT", pid)


def _store(file: str, data: bytes) -> None:
    """The one write of a file of the books (the storage edge: tests fill the disk here)."""
    with open(file, "wb") as f:
        f.write(data)


def _write_books(path: str, books: dict[str, Any]) -> None:
    """Write the books whole: a temporary file, then a rename. Raises LedgerError (the old books stay)."""
    tmp = os.path.join(path, f".{BOOKS}.{os.getpid()}")
    try:
        _store(tmp, json.dumps(books).encode())
        os.replace(tmp, os.path.join(path, BOOKS))
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise LedgerError(f"ledger {path!r}: cannot write its books ({exc.strerror}); free room in that directory "
                          "or point ledger_dir elsewhere") from None


@contextlib.contextmanager
def locked_books(path: str, write: bool = True, keep: str | None = None, holder: str | None = None,
                 timeout: float | None = None) -> Iterator[dict[str, Any]]:
    """The books of the ledger at ``path`` under its lock (waited for at most ``timeout`` seconds, default
    ``LOCK_TIMEOUT_S``), rebuilt if unreadable, the dead taken off; written back (whole, by rename) when the
    block ends, if ``write``. Raises LedgerError."""
    fd = _lock(path, LOCK_TIMEOUT_S if timeout is None else timeout)
    try:
        with contextlib.suppress(OSError):  # who holds it, for a waiter that gives up
            data = (holder or f"{os.getpid()} kvtier").encode()
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        books = read_books(path)
        try:
            _upkeep(path, books, keep)
        except OSError as exc:
            raise LedgerError(f"ledger {path!r}: cannot list its processes ({exc.strerror})") from None
        yield books
        if write:
            _write_books(path, books)
    finally:
        os.close(fd)  # the lock goes with it


def live_page_sizes(path: str) -> dict[str, int]:
    """``"pid N (name)" -> page size`` of the live processes on the ledger at ``path``, from their ``.alive``
    records; read only (no lock taken on the books, nothing written): for ``config check``."""
    sizes = {}
    with contextlib.suppress(OSError):
        for name in os.listdir(path):
            file = os.path.join(path, name)
            if name.endswith(ALIVE) and _locked(file):
                record = _read_alive(file)
                if record is not None and _int(record.get("page_size"), 1):
                    sizes[f"pid {record['pid']} ({record['name']})"] = record["page_size"]
    return sizes


def snapshot(path: str) -> dict[str, Any]:
    """The books of one ledger as they stand (the dead taken off). Raises LedgerError."""
    with locked_books(path, holder=f"{os.getpid()} kvtier ls") as books:
        return books


def set_limit(path: str, pid: int, limit_bytes: int | None) -> int:
    """Change the limit of the live processes with ``pid`` (``None``: no limit) to ``limit_bytes`` in whole pages;
    return how many matched. Raises LedgerError."""
    if limit_bytes is not None and limit_bytes < 0:
        raise InvalidArgumentError(f"a limit must be >= 0 bytes, got {limit_bytes}")
    with locked_books(path, holder=f"{os.getpid()} kvtier limit") as books:
        matched = [p for p in books["procs"].values() if p["pid"] == pid]
        page = books.get("page_size", 1)
        for proc in matched:
            proc["limit_pages"] = None if limit_bytes is None else limit_bytes // page
        return len(matched)

