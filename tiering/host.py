"""The host tier: slots of page-locked host memory, pinned in chunks by a background thread.

Pinning costs ~0.5 s/GiB, so a large tier pinned up front would block start-up. Chunks are mapped (exact size,
``mmap``) and pinned (``cuMemHostRegister``) one at a time by a worker; each chunk's slots become usable as soon as
it is pinned, so the tier serves while it grows. On the CPU backend the memory is plain (nothing to DMA from).
"""

from __future__ import annotations

import logging
import math
import threading
import time

import torch

from kvtier.errors import ConfigError
from kvtier.tiering.digest import Digests
from kvtier.tiering.slots import SlotBooks
from kvtier.tiering.tier import Tier
from kvtier.vmm.base import Backend
from kvtier.vmm.host import map_anonymous, unmap_anonymous
from kvtier.vmm.tensor import tensor_over

log = logging.getLogger(__name__)


def memory_limit() -> tuple[int, str]:
    """Bytes of host memory this process may still take, and where the figure comes from: the smaller of the
    kernel's MemAvailable and what the cgroup (v2 ``memory.max``, v1 ``limit_in_bytes``) leaves."""
    limit, what = 1 << 62, "no limit found"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limit, what = int(line.split()[1]) * 1024, "MemAvailable"
    except OSError:
        pass
    for path, used in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                       ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(path) as f, open(used) as g:
                raw, taken = f.read().strip(), int(g.read())
            if raw != "max" and int(raw) - taken < limit:
                limit, what = int(raw) - taken, f"the cgroup's limit ({path})"
        except (OSError, ValueError):
            continue
    return limit, what


class HostTier:
    tier = Tier.HOST
    name = "host"

    def __init__(self, backend: Backend, slot_size: int, size: int, chunk: int, checksums: bool = False) -> None:
        limit, what = memory_limit()
        if size > limit:  # pinned later, in the background: too late to fail cleanly (the OOM killer would)
            raise ConfigError(f"host_size: {size} bytes is more than the {limit} bytes this process may use "
                              f"({what}); lower host_size")
        self.backend, self.slot_size = backend, slot_size
        self.slots_per_chunk = max(1, chunk // slot_size)
        total = size // slot_size
        self.books = SlotBooks("host", total)
        self._held: dict[int, int] = {}  # slot -> bytes it holds, where less than the slot (see hold)
        self.digests = Digests(total) if checksums else None  # host checksums: an option (they cost CPU time)
        self._chunks: list[tuple[int, int, torch.Tensor]] = []  # (address, bytes, uint8 view)
        self._views: dict[int, torch.Tensor] = {}  # slot -> its view, made once (see ``view``)
        self._closed = False
        self.pin_seconds = 0.0
        self._n_chunks = math.ceil(total / self.slots_per_chunk) if total else 0
        self._ready = threading.Event()
        self._worker = threading.Thread(target=self._pin_all, name="kvtier-host-pin", daemon=True)
        self._worker.start()

    def _pin_all(self) -> None:
        try:
            for i in range(self._n_chunks):
                if self._closed:
                    return
                count = min(self.slots_per_chunk, self.books.total - i * self.slots_per_chunk)
                nbytes = count * self.slot_size
                start = time.perf_counter()
                address = map_anonymous(nbytes)
                self.backend.pin(address, nbytes)
                self._chunks.append((address, nbytes, tensor_over(address, nbytes, torch.device("cpu"))))
                self.pin_seconds += time.perf_counter() - start
                self.books.grow(i * self.slots_per_chunk, count)
        except Exception:  # noqa: BLE001 - the tier keeps what it pinned; say so
            log.exception("host tier: pinning stopped at %d of %d chunks", len(self._chunks), self._n_chunks)
        finally:
            self._ready.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until every chunk is pinned (tests and benchmarks; the engine need not)."""
        return self._ready.wait(timeout)

    def view(self, slot: int) -> torch.Tensor:
        """The slot's memory as a ``uint8`` CPU tensor. Made once per slot: a move of a 4 GiB sequence takes 512
        views each way, and a tensor slice costs microseconds of the call that starts the move."""
        view = self._views.get(slot)
        if view is None:
            chunk, index = divmod(slot, self.slots_per_chunk)
            view = self._views[slot] = self._chunks[chunk][2][index * self.slot_size:(index + 1) * self.slot_size]
        return view

    def address(self, slot: int) -> int:
        """Where the slot's memory starts (pinned host memory: copies to and from the device run at PCIe speed)."""
        chunk, index = divmod(slot, self.slots_per_chunk)
        return self._chunks[chunk][0] + index * self.slot_size

    def held(self, slot: int) -> int:
        return self._held.get(slot, self.slot_size)

    def hold(self, slot: int, nbytes: int) -> None:
        """The slot now holds ``nbytes`` (a page moves only its live blocks' bytes: a prefix of each region)."""
        if nbytes == self.slot_size:
            self._held.pop(slot, None)
        else:
            self._held[slot] = nbytes

    def data(self, slot: int) -> torch.Tensor:
        """The bytes the slot holds (the prefix last written into it)."""
        held = self._held.get(slot)
        return self.view(slot) if held is None else self.view(slot)[:held]

    def describe(self) -> dict[str, object]:
        return {"slots": self.books.total, "slot_bytes": self.slot_size, "ready_slots": self.books.capacity,
                "pinned": self.backend.name == "cuda", "pin_seconds": self.pin_seconds,
                "checksums": self.digests.counts() if self.digests is not None else "off"}

    def close(self) -> None:
        self._closed = True
        self._worker.join()
        for address, nbytes, _ in self._chunks:
            self.backend.unpin(address)
            unmap_anonymous(address, nbytes)
        self._chunks.clear()
        self._views.clear()
