"""The NVMe tier: fixed-size slots in one file under the configured directory.

On a CUDA machine the I/O goes through kvikio's ``CuFile`` -- GPUDirect Storage where the driver has it, kvikio's
POSIX compatibility mode otherwise (``mode`` says which) -- and can read and write device pages directly. Where
there is no CUDA driver kvikio cannot run at all, so the CPU backend uses POSIX ``pread``/``pwrite`` on a thread
pool, with ``O_DIRECT`` where the filesystem allows it (not on tmpfs).

Every read and write checks its byte count: a short transfer is an error, never silently accepted.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import mmap
import os
from typing import Any

import torch

from kvtier.errors import ConfigError
from kvtier.tiering.slots import SlotBooks
from kvtier.vmm.tensor import memoryview_over
from kvtier.tiering.tier import Tier

log = logging.getLogger(__name__)


ALIGN = 4096  # O_DIRECT wants buffers aligned to the logical block (our slots and tier memory are)


def _read_bounced(fd: int, view: memoryview, offset: int) -> int:
    """Read into an unaligned buffer through a page-aligned one (anonymous maps are page-aligned)."""
    with mmap.mmap(-1, -(-len(view) // ALIGN) * ALIGN) as bounce:
        done = min(os.preadv(fd, [bounce], offset), len(view))
        view[:done] = bounce[:done]
        return done


class NvmeTier:
    tier = Tier.NVME
    name = "nvme"

    def __init__(self, device: torch.device, slot_size: int, directory: str, size: int, threads: int,
                 direct: bool) -> None:
        self.slot_size = slot_size
        self.books = SlotBooks("nvme", size // slot_size)
        self.books.grow(0, self.books.total)
        self.path = os.path.join(directory, f"kvtier-{os.getpid()}-{id(self):x}.slots")
        try:
            os.makedirs(directory, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, self.books.total * slot_size)
            finally:
                os.close(fd)
        except OSError as exc:
            if os.path.exists(self.path):
                os.unlink(self.path)
            raise ConfigError(f"nvme_dir: cannot make the slot file in {directory!r} ({exc.strerror or exc}); "
                              "point it at a writable directory with room for nvme_size") from None
        self._kvikio = None
        if device.type == "cuda":
            try:
                import kvikio
                import kvikio.defaults
                # O_DIRECT both ways where kvikio falls back to POSIX (measured: buffered reads ran ~0.7x raw)
                kvikio.defaults.set({"num_threads": threads, "auto_direct_io_read": direct,
                                     "auto_direct_io_write": direct})
                self._kvikio = kvikio.CuFile(self.path, "r+")
                compat = kvikio.defaults.is_compat_mode_preferred()
                self.mode = "kvikio-compat (POSIX)" if compat else "kvikio-gds"
            except ImportError:
                log.warning("nvme tier: kvikio is not installed (kvtier[cu12]/[cu13]); using POSIX I/O")
        if self._kvikio is None:
            self._fd, self.mode = self._open_posix(direct)
            self._pool = cf.ThreadPoolExecutor(threads, thread_name_prefix="kvtier-nvme")

    def _open_posix(self, direct: bool) -> tuple[int, str]:
        if direct and hasattr(os, "O_DIRECT"):
            try:
                return os.open(self.path, os.O_RDWR | os.O_DIRECT), "posix O_DIRECT"
            except OSError as exc:  # tmpfs and some others refuse O_DIRECT
                log.info("nvme tier: O_DIRECT refused on %s (%s); using buffered I/O", self.path, exc)
        return os.open(self.path, os.O_RDWR), "posix buffered"

    # --- I/O: each returns a future whose result() is the byte count (checked here) ----------------------------
    def write(self, slot: int, src: torch.Tensor) -> Any:
        return self._io(True, slot, src)

    def read(self, slot: int, dst: torch.Tensor) -> Any:
        return self._io(False, slot, dst)

    def _io(self, write: bool, slot: int, buf: torch.Tensor) -> Any:
        offset, size = slot * self.slot_size, buf.numel() * buf.element_size()  # a read may take a prefix
        if self._kvikio is not None:
            target = buf if buf.is_cuda else buf.numpy()
            op = self._kvikio.pwrite if write else self._kvikio.pread
            return _Checked(op(target, size, offset), size, write, slot)
        view = memoryview_over(buf)
        if write:
            return _Checked(self._pool.submit(os.pwrite, self._fd, view, offset), size, write, slot)
        if self.mode == "posix O_DIRECT" and buf.data_ptr() % ALIGN:  # an engine's buffer: through an aligned one
            return _Checked(self._pool.submit(_read_bounced, self._fd, view, offset), size, write, slot)
        return _Checked(self._pool.submit(os.preadv, self._fd, [view], offset), size, write, slot)

    def describe(self) -> dict[str, object]:
        return {"slots": self.books.total, "slot_bytes": self.slot_size, "path": self.path, "mode": self.mode}

    def close(self) -> None:
        if self._kvikio is not None:
            self._kvikio.close()
        else:
            self._pool.shutdown(wait=True)
            os.close(self._fd)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class _Checked:
    """A kvikio IOFuture or concurrent future, whose ``result()`` raises OSError on a short transfer."""

    def __init__(self, future: Any, expected: int, write: bool, slot: int) -> None:
        self._future, self._expected, self._write, self._slot = future, expected, write, slot

    def result(self) -> int:
        done = self._future.get() if hasattr(self._future, "get") else self._future.result()
        if done != self._expected:
            what = "write to" if self._write else "read from"
            raise OSError(f"short {what} NVMe slot {self._slot}: {done} of {self._expected} bytes")
        return done
