"""The NVMe tier: fixed-size slots in one file under the configured directory.

On a CUDA machine the I/O goes through kvikio's ``CuFile`` -- GPUDirect Storage where the driver has it, kvikio's
POSIX compatibility mode otherwise (``mode`` says which) -- and can read and write device pages directly. Where
there is no CUDA driver kvikio cannot run at all, so the CPU backend uses POSIX ``pread``/``pwrite`` on a thread
pool (through a :class:`FileLayer`, which tests replace with one that fails on cue), with ``O_DIRECT`` where the
filesystem allows it (not on tmpfs).

Every read and write checks its byte count, and every slot carries a digest of what was written (see
:mod:`kvtier.tiering.tiers.digest`): a short transfer or bytes that changed at rest are errors, never data.

Owners: the slot file is locked (``flock``) by the process that made it for as long as it lives, so a manager
starting on a directory removes the slot files no live process holds -- those of killed processes, whose KV
would otherwise stay readable there -- and never touches a live one's. A lock file serialises that scan with
the making of new slot files.

With ``persist``, the slot file has a fixed name in ``dir`` (``kvtier-cache.slots``), is kept at close, and a
journal beside it (:mod:`kvtier.tiering.tiers.nvme_journal`) says which cached blocks its slots hold, so that a
manager started later on the same directory finds them again; its lock keeps it to one process at
a time (another one started meanwhile gets a file of its own, not kept).

Settings: ``[nvme]`` (``dir``, ``size``, ``preallocate``, ``threads``, ``direct``, ``persist``). Its routes (GPU <-> disk, and
disk <-> each host-memory tier of the stack) are in :mod:`kvtier.tiering.tiers.nvme_routes`.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import errno
import fcntl
import glob
import logging
import os
import shutil
import tempfile
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

import torch
from pydantic import BaseModel, ConfigDict

from kvtier.errors import ConfigError
from kvtier.tiering.tiers.digest import Digests, side_stream
from kvtier.tiering.tiers.nvme_journal import SLOTS_NAME, SlotJournal
from kvtier.tiering.state.slots import SlotBooks
from kvtier.tiering.state.tier import IO_ALIGN, TierStack
from kvtier.vmm.tensor import memoryview_over

if TYPE_CHECKING:
    from kvtier.config import Config
    from kvtier.tiering.engine.mover import Mover
    from kvtier.tiering.tiers.registry import TierContext

log = logging.getLogger(__name__)

_LIBC = ctypes.CDLL(None, use_errno=True)
ALIGN = IO_ALIGN  # O_DIRECT wants buffers aligned to the logical block (our slots and tier memory are)


class FileLayer(Protocol):
    """Positioned I/O on an open file, as ``os.pwrite`` / ``os.preadv`` do it: return the bytes moved, raise
    ``OSError`` on failure."""

    def pwrite(self, fd: int, view: memoryview, offset: int) -> int: ...

    def pread(self, fd: int, view: memoryview, offset: int) -> int: ...


class PosixFiles:
    """The file layer of the POSIX path: the operating system's calls."""

    def pwrite(self, fd: int, view: memoryview, offset: int) -> int:
        return os.pwrite(fd, view, offset)

    def pread(self, fd: int, view: memoryview, offset: int) -> int:
        return os.preadv(fd, [view], offset)


DIR_LOCK_TIMEOUT_S = 10.0  # the directory's lock is held for a scan and a file's creation: milliseconds


@contextlib.contextmanager
def _directory_locked(directory: str, timeout: float | None = None) -> Iterator[None]:
    """The directory's lock, waited for at most ``timeout`` seconds (a holder stopped by SIGSTOP or a debugger
    must not hold up every manager after it): raises BlockingIOError then."""
    timeout = DIR_LOCK_TIMEOUT_S if timeout is None else timeout
    fd = os.open(os.path.join(directory, ".kvtier.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BlockingIOError(errno.EWOULDBLOCK, f"its lock (.kvtier.lock) has been held by another "
                                          f"process for over {timeout:g} s; is one stopped?") from None
                time.sleep(0.005)
        yield
    finally:
        os.close(fd)  # releases the lock


def _reserve(fd: int, size: int) -> bool:
    """Allocate the file's blocks with ``fallocate(2)`` (no zeroing); False where the filesystem cannot, rather
    than glibc's ``posix_fallocate`` fallback, which writes every block (hours for a large tier on some filesystems).
    A disk short of room raises ``OSError`` (ENOSPC)."""
    call = getattr(_LIBC, "fallocate64", None) or getattr(_LIBC, "fallocate", None)
    if call is None:
        return False
    call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if call(fd, 0, 0, size) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        log.info("nvme tier: this filesystem cannot reserve the slot file's blocks; it stays sparse")
        return False
    raise OSError(err, os.strerror(err))


def reclaim_dead_owners(directory: str) -> list[str]:
    """Remove the slot files in ``directory`` whose owner is gone (nobody holds their lock); return their
    paths. Call with the directory locked."""
    removed = []
    for path in glob.glob(os.path.join(directory, "kvtier-*.slots")):
        if os.path.basename(path) == SLOTS_NAME:
            continue  # kept on purpose ([nvme] persist): its lock keeps it to one process at a time
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # gone meanwhile, or not ours to open
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a live owner holds it
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def sweep_abandoned_dirs(parent: str, min_age_s: float = 60.0) -> list[str]:
    """Remove the temporary slot directories (``kvtier-nvme-*``, made where ``nvme_dir`` is unset by earlier
    versions, or by a process killed while starting) under ``parent`` that no live process holds a slot file in;
    return them. Only directories older than ``min_age_s``: a process making its own has not locked it yet."""
    removed = []
    now = time.time()
    for directory in glob.glob(os.path.join(parent, "kvtier-nvme-*")):
        try:
            if not os.path.isdir(directory) or now - os.stat(directory).st_mtime < min_age_s:
                continue
            with _directory_locked(directory, timeout=0):  # busy: someone is at work there, leave it
                reclaim_dead_owners(directory)
                if glob.glob(os.path.join(directory, "kvtier-*.slots")):
                    continue  # a live owner
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
        except OSError:
            continue  # not ours (another user's), or gone meanwhile
    if removed:
        log.info("nvme tier: removed %d abandoned temporary slot director%s: %s", len(removed),
                 "y" if len(removed) == 1 else "ies", ", ".join(removed))
    return removed


def io_mode(device: torch.device) -> str:
    """How NVMe I/O would run here: kvikio with GDS, kvikio's POSIX compat mode, or plain POSIX."""
    if device.type != "cuda":
        return "posix (no CUDA driver: kvikio cannot run)"
    try:
        import kvikio.defaults
        return "kvikio compat (POSIX)" if kvikio.defaults.is_compat_mode_preferred() else "kvikio GDS"
    except ImportError:
        return "posix (kvikio not installed)"


class NvmeSettings(BaseModel):
    """The NVMe tier's settings (``[nvme]``: ``nvme_size`` and the others)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    dir: str | None = None
    size: int = 4 << 30
    preallocate: bool = True
    threads: int = 4
    direct: bool = True
    persist: bool = False
    pieces: int = 4


class NvmeTier:
    """Slots of one file (see the module docstring)."""

    name = "nvme"
    Settings = NvmeSettings
    watermarks = None  # nothing below it to cascade to
    failed_read_loses = True  # a read back that fails means the bytes cannot be had: the page is lost

    @classmethod
    def settings_from(cls, config: "Config") -> NvmeSettings:
        return NvmeSettings(dir=config.nvme_dir, size=config.nvme_size, preallocate=config.nvme_preallocate,
                            threads=config.nvme_threads, direct=config.nvme_direct, persist=config.nvme_persist,
                            pieces=config.nvme_pieces)

    @classmethod
    def open(cls, settings: NvmeSettings, context: "TierContext") -> "NvmeTier":
        """The tier in ``settings.dir``; with none, in a temporary directory whose file is unlinked once open (no
        one else looks there: the file lives as long as its descriptors, however the process ends)."""
        own_dir = settings.dir is None
        if settings.persist and own_dir:
            raise ConfigError("nvme persist: a cache kept across restarts needs a directory of its own; set "
                              "[nvme] dir (KVTIER_NVME_DIR)")
        if own_dir:
            sweep_abandoned_dirs(tempfile.gettempdir())
        directory = settings.dir or tempfile.mkdtemp(prefix="kvtier-nvme-")
        try:
            tier = cls(context.device, context.slot_size, directory, settings.size, settings.threads,
                       settings.direct, context.files, settings.preallocate, settings.persist, settings.pieces)
        except BaseException:
            if own_dir:
                shutil.rmtree(directory, ignore_errors=True)
            raise
        if own_dir:
            tier.unlink()
            shutil.rmtree(directory, ignore_errors=True)
        return tier

    @staticmethod
    def summary(settings: NvmeSettings, device: torch.device) -> str:
        """One line for ``kvtier info``."""
        return (f"{settings.size / 2**30:.3g} GiB in {settings.dir or 'a temporary file, deleted once open'} "
                f"({'reserved' if settings.preallocate else 'sparse'}; I/O: {io_mode(device)}"
                f"{'; kept across restarts' if settings.persist else ''})")

    def register_routes(self, mover: "Mover", stack: TierStack) -> None:
        from kvtier.tiering.tiers.nvme_routes import register
        register(self, mover, stack)

    def wait_ready(self, timeout: float | None = None) -> bool:
        return True

    def __init__(self, device: torch.device, slot_size: int, directory: str, size: int, threads: int,
                 direct: bool, files: FileLayer | None = None, preallocate: bool = True,
                 persist: bool = False, pieces: int = 4) -> None:
        self.slot_size, self.slots = slot_size, size // slot_size
        while pieces > 1 and (slot_size % pieces or (slot_size // pieces) % ALIGN):
            pieces //= 2  # a piece starts on an O_DIRECT block
        self.unit = slot_size // pieces
        self.id = 0  # set by its TierStack
        self._held: dict[int, int] = {}  # slot -> bytes it holds, where less than the slot (see write)
        if files is not None and device.type == "cuda":
            raise ConfigError("files: a file layer replaces the POSIX I/O of the CPU backend; on CUDA the NVMe tier "
                              "reads and writes device pages through kvikio")
        self.files = files or PosixFiles()
        self.anonymous = False  # unlink() removed its name
        self.journal: SlotJournal | None = None
        self.path = os.path.join(directory, SLOTS_NAME)
        fd = self._take_kept_file(directory, preallocate) if persist else None
        if fd is None:
            self.path = os.path.join(directory, f"kvtier-{os.getpid()}-{id(self):x}.slots")
            fd = self._make_slot_file(directory, preallocate)  # first: a disk short of room stops here
        self._owner_fd = fd
        try:
            self._open(device, threads, direct, files)
            if persist and self.path.endswith(SLOTS_NAME):
                try:
                    self.journal = SlotJournal(directory, fd, slot_size, self.slots, pieces)
                except OSError as exc:
                    raise ConfigError(f"nvme persist: cannot write the journal in {directory!r} "
                                      f"({exc.strerror or exc}); free room there or turn persist off") from None
        except BaseException:
            if self.journal is None and not self.path.endswith(SLOTS_NAME):
                os.unlink(self.path)
            os.close(self._owner_fd)
            raise
        self.books = SlotBooks("nvme", self.slots, pieces)
        self.books.grow(0, self.slots)
        self.digests = Digests(self.books.total)
        if self.journal is not None:
            self._reserve_restored()

    def _open(self, device: torch.device, threads: int, direct: bool, files: FileLayer | None) -> None:
        self._kvikio = None
        if device.type == "cuda" and files is None and self.slots:  # with no slots, nothing is ever read or written
            try:
                import kvikio
                import kvikio.defaults
            except ImportError:  # POSIX I/O cannot read into device memory
                raise ConfigError("nvme_size: the NVMe tier on CUDA needs kvikio (install kvtier[cu12] or "
                                  "kvtier[cu13]), or set nvme_size = 0") from None
            # O_DIRECT both ways where kvikio falls back to POSIX (measured: buffered reads ran ~0.7x raw)
            kvikio.defaults.set({"num_threads": threads, "auto_direct_io_read": direct,
                                 "auto_direct_io_write": direct})
            self._kvikio = kvikio.CuFile(self.path, "r+")
            compat = kvikio.defaults.is_compat_mode_preferred()
            self.mode = "kvikio-compat (POSIX)" if compat else "kvikio-gds"
            return
        self._fd, self.mode = self._open_posix(direct)
        self._pool = cf.ThreadPoolExecutor(threads, thread_name_prefix="kvtier-nvme")

    def _make_slot_file(self, directory: str, preallocate: bool) -> int:
        """Create and lock the slot file (after removing dead owners' files); return the fd holding the lock."""
        try:
            os.makedirs(directory, exist_ok=True)
            with _directory_locked(directory):
                removed = reclaim_dead_owners(directory)
                if removed:
                    log.info("nvme tier: removed %d slot file(s) of processes that are gone: %s", len(removed),
                             ", ".join(os.path.basename(p) for p in removed))
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            size = self.slots * self.slot_size
            try:  # reserved: on the H100 VM (ext4) first writes into a sparse file ran at ~0.7 of a raw write
                # into allocated blocks, rewrites at 0.98; and a full disk is found now, not by the cascade later
                if not (preallocate and size and _reserve(fd, size)):
                    os.ftruncate(fd, size)
            except OSError:
                os.close(fd)
                raise
            return fd
        except OSError as exc:
            if os.path.exists(self.path):
                os.unlink(self.path)
            raise ConfigError(f"nvme_dir: cannot make the slot file in {directory!r} ({exc.strerror or exc}); "
                              "point it at a writable directory with room for nvme_size") from None

    def _take_kept_file(self, directory: str, preallocate: bool) -> int | None:
        """Open (or make) and lock the kept slot file at its size; None where a live process holds it."""
        try:
            os.makedirs(directory, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(f"nvme_dir: cannot open the kept slot file {self.path!r} ({exc.strerror or exc}); "
                              "point it at a writable directory with room for nvme_size") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            log.warning("nvme tier: %s is in use by another live process; this one uses a slot file of its own, "
                        "not kept (give each process its own nvme_dir to keep both)", self.path)
            return None
        size = self.slots * self.slot_size
        try:
            if os.fstat(fd).st_size > size:
                os.ftruncate(fd, size)
            if not (preallocate and size and _reserve(fd, size)):
                os.ftruncate(fd, size)
        except OSError as exc:
            os.close(fd)
            raise ConfigError(f"nvme_dir: cannot size the kept slot file {self.path!r} to {size} bytes "
                              f"({exc.strerror or exc}); free room on that disk or lower nvme_size") from None
        return fd

    def _reserve_restored(self) -> None:
        """The slots of the pages the journal restored are held for the spaces that will take them."""
        assert self.journal is not None
        good = []
        for record in self.journal.pending:
            if any(h > self.slot_size or h % ALIGN for h in record.held):
                continue
            for slot, held, value in zip(record.slots, record.held, record.digests):
                self.digests.seal(slot, (value[0], value[1]))
                self._held[slot] = held
            good.append(record)
        self.journal.pending = good
        self.books.claim([s for r in good for s in r.slots], [self.journal.span(h) for r in good for h in r.held])
        if good:
            log.info("nvme tier: %d page(s) of cached blocks restored from %s (verified when first read)",
                     len(good), self.path)

    def _open_posix(self, direct: bool) -> tuple[int, str]:
        if direct and hasattr(os, "O_DIRECT"):
            try:
                return os.open(self.path, os.O_RDWR | os.O_DIRECT), "posix O_DIRECT"
            except OSError as exc:  # tmpfs and some others refuse O_DIRECT
                log.info("nvme tier: O_DIRECT refused on %s (%s); using buffered I/O", self.path, exc)
        return os.open(self.path, os.O_RDWR), "posix buffered"

    # --- I/O: each returns a future whose result() is the byte count, checked, and the data verified ------------
    def write(self, slot: int, src: torch.Tensor, value: tuple[int, int] | None = None) -> Any:
        """Write ``src`` (the slot's size or a prefix of it, in whole ``ALIGN`` blocks) into the slot, which then
        holds that many bytes; ``value``: its digest where the caller has it (verified above)."""
        size, whole = src.numel() * src.element_size(), self.books.size(slot) * self.unit
        if size > whole or size % ALIGN:
            raise ValueError(f"nvme tier: slot {slot} takes up to {whole} bytes in blocks of {ALIGN}, not {size}")
        self.digests.open(slot)
        if size == whole:
            self._held.pop(slot, None)
        else:
            self._held[slot] = size
        value = value or self.digests.compute(src)
        return _Checked(self._submit(True, slot, src), size, True, slot,
                        then=lambda: self.digests.seal(slot, value))

    def held(self, slot: int) -> int:
        """Bytes the slot holds: what was last written into it."""
        held = self._held.get(slot)
        return self.books.size(slot) * self.unit if held is None else held

    def read(self, slot: int, dst: torch.Tensor, then: Callable[[tuple[int, int]], None] | None = None) -> Any:
        """Read the bytes the slot holds into the start of ``dst`` (all of them, or a prefix when ``dst`` is
        shorter), verified against its digest before the future completes; ``then(digest)`` runs after."""
        size, held = dst.numel() * dst.element_size(), self.held(slot)
        align = 8 if dst.is_cuda or self.mode != "posix O_DIRECT" else ALIGN  # the digest's words; O_DIRECT's blocks
        whole = size >= held and dst.data_ptr() % align == 0
        flat = dst.view(torch.uint8).view(-1)
        buf = flat[:held] if whole else _aligned(held, dst.device)  # the digest covers what the slot holds

        def verify() -> None:
            value = self.digests.verify(slot, buf, "nvme")
            if not whole:
                _copy_prefix(buf, dst)
            if then is not None:
                then(value)
        return _Checked(self._submit(False, slot, buf), held, False, slot, then=verify)

    def _submit(self, write: bool, slot: int, buf: torch.Tensor) -> Any:
        offset, size = slot * self.unit, buf.numel() * buf.element_size()
        if self._kvikio is not None:
            target = buf if buf.is_cuda else buf.numpy()
            return (self._kvikio.pwrite if write else self._kvikio.pread)(target, size, offset)
        op = self.files.pwrite if write else self.files.pread
        return self._pool.submit(op, self._fd, memoryview_over(buf), offset)

    def describe(self) -> dict[str, object]:
        path = "a temporary file, deleted once open (freed when the process ends)" if self.anonymous else self.path
        return {"slots": self.books.total, "slot_bytes": self.unit, "pieces": self.books.pieces, "path": path,
                "mode": self.mode,
                "checksums": self.digests.counts(), "kept": self.journal is not None and self.journal.kept}

    def unlink(self) -> None:
        """Remove the slot file's name now (its descriptors keep it): a temporary tier that nothing can leave
        behind, not even a SIGKILL -- the kernel frees its blocks with the last descriptor."""
        os.unlink(self.path)
        self.anonymous = True
        self.path = f"/proc/self/fd/{self._owner_fd}"  # still opens the file, from this process

    def close(self) -> None:
        if self._kvikio is not None:
            self._kvikio.close()
        else:
            self._pool.shutdown(wait=True)
            os.close(self._fd)
        if self.journal is not None:
            self.journal.close()
        elif not self.anonymous:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        os.close(self._owner_fd)  # after the unlink: no scan may see a file without its owner's lock


def _aligned(nbytes: int, device: torch.device) -> torch.Tensor:
    """A scratch buffer of ``nbytes`` aligned for O_DIRECT and GPUDirect Storage."""
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, device=device)
    skip = -raw.data_ptr() % ALIGN
    return raw[skip:skip + nbytes]


def _copy_prefix(src: torch.Tensor, dst: torch.Tensor) -> None:
    n = min(dst.numel() * dst.element_size(), src.numel())  # the shorter: dst's prefix, or what the slot holds
    flat = dst.view(torch.uint8).view(-1)[:n]
    if not flat.is_cuda:
        flat.copy_(src[:n])
        return
    stream = side_stream(flat.device)  # not the I/O thread's default stream, which would wait for the engine's
    with torch.cuda.stream(stream):
        flat.copy_(src[:n], non_blocking=True)
    stream.synchronize()  # landed before the read reports done


class _Checked:
    """A kvikio IOFuture or concurrent future, whose ``result()`` raises OSError on a short transfer and runs
    ``then`` (verification) once the bytes are there."""

    def __init__(self, future: Any, expected: int, write: bool, slot: int,
                 then: Callable[[], None] | None = None) -> None:
        self._future, self._expected, self._write, self._slot, self._then = future, expected, write, slot, then

    def result(self) -> int:
        done = self._future.get() if hasattr(self._future, "get") else self._future.result()
        if done != self._expected:
            what = "write to" if self._write else "read from"
            raise OSError(f"short {what} NVMe slot {self._slot}: {done} of {self._expected} bytes")
        if self._then is not None:
            self._then()
        return done
