"""The host tier: slots of page-locked host memory, pinned in chunks by a background thread.

Pinning costs ~0.5 s/GiB, so a large tier pinned up front would block start-up. Chunks are mapped (exact size,
``mmap``) and pinned (``cuMemHostRegister``) one at a time -- the first as the tier opens, the rest by a worker;
each chunk's slots become usable as soon as it is pinned, so the tier serves while it grows. On the CPU backend the
memory is plain (nothing to DMA from).

Its routes: GPU <-> its slots (``cuMemcpyAsync`` on the mover's streams), and between its slots and those of any
other host-memory tier of the stack (a memcpy by the worker). Settings: ``[host]`` (``size``, ``chunk``,
``checksums``, ``pieces``, the cascade's ``low_watermark``/``high_watermark``).

A slot is one page of one region, split into ``pieces`` (see ``SlotBooks``): a page moves only its live blocks'
bytes, and takes slots of the size they need -- a half, a quarter ... of a page, each starting on an ``IO_ALIGN``
boundary (NVMe reads into them with ``O_DIRECT``).
"""

from __future__ import annotations

import logging
import math
import threading
import time

from typing import TYPE_CHECKING, Any, Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from kvtier.errors import ConfigError
from kvtier.tiering.tiers.digest import ROW, Digests, PendingDigests, digests_of
from kvtier.tiering.state.slots import SlotBooks
from kvtier.tiering.state.tier import IO_ALIGN, HostSlots, Tier, TierStack
from kvtier.tiering.engine.transfer import PairsFailed, Work
from kvtier.vmm.base import Backend
from kvtier.vmm.host import map_anonymous, unmap_anonymous
from kvtier.vmm.tensor import tensor_over

if TYPE_CHECKING:
    from kvtier.config import Config
    from kvtier.tiering.engine.mover import Mover
    from kvtier.tiering.tiers.registry import TierContext

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


class HostSettings(BaseModel):
    """A host-memory tier's settings (the built-in one's are ``[host]``: ``host_size`` and the others)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    size: int = 1 << 30
    chunk: int = 128 << 20
    checksums: bool = True
    pieces: int = Field(4, ge=1, le=64)
    low_watermark: float = 0.80
    high_watermark: float = 0.90

    @field_validator("pieces")
    @classmethod
    def _power_of_two(cls, pieces: int) -> int:
        if pieces & (pieces - 1):
            raise ValueError(f"{pieces} is not a power of two (1, 2, 4 ... 64)")
        return pieces


class HostTier:
    """Slots of pinned host memory (see the module docstring)."""

    name = "host"
    Settings = HostSettings
    failed_read_loses = False  # a failed read back leaves the page here (its bytes are in memory)

    @classmethod
    def settings_from(cls, config: "Config") -> HostSettings:
        return HostSettings(size=config.host_size, chunk=config.host_chunk, checksums=config.host_checksums,
                            pieces=config.host_pieces, low_watermark=config.host_low_watermark,
                            high_watermark=config.host_high_watermark)

    @staticmethod
    def summary(settings: HostSettings, device: torch.device) -> str:
        """One line for ``kvtier info``."""
        limit, where = memory_limit()
        return (f"{settings.size / 2**30:.3g} GiB ({'pinned' if device.type == 'cuda' else 'plain memory'}, "
                f"checksums {'on' if settings.checksums else 'off'}; this process may use {limit / 2**30:.3g} GiB: "
                f"{where})")

    @classmethod
    def open(cls, settings: HostSettings, context: "TierContext") -> "HostTier":
        return cls(context.backend, context.slot_size, settings.size, settings.chunk, settings.checksums,
                   (settings.low_watermark, settings.high_watermark), settings.pieces)

    def __init__(self, backend: Backend, slot_size: int, size: int, chunk: int, checksums: bool = True,
                 watermarks: tuple[float, float] | None = (0.80, 0.90), pieces: int = 4) -> None:
        limit, what = memory_limit()
        if size > limit:  # pinned later, in the background: too late to fail cleanly (the OOM killer would)
            setting = "host_size" if self.name == "host" else f"[tiers.{self.name}] size"
            raise ConfigError(f"{setting}: {size} bytes is more than the {limit} bytes this process may use "
                              f"({what}); lower {setting}")
        self.backend, self.slot_size, self.watermarks = backend, slot_size, watermarks
        self.id = 0  # set by its TierStack
        self.slots_per_chunk = max(1, chunk // slot_size)
        while pieces > 1 and (slot_size % pieces or (slot_size // pieces) % IO_ALIGN):
            pieces //= 2  # a piece starts on an I/O block
        self.unit = slot_size // pieces
        self.frames = total = size // slot_size  # page-sized frames (the books count units: see SlotBooks)
        self.books = SlotBooks(self.name, total, pieces)
        self._held: dict[int, int] = {}  # slot -> bytes it holds, where less than the slot (see hold)
        self.digests = Digests(self.books.total) if checksums else None  # on by default: taken on the GPU
        self._chunks: list[tuple[int, int, torch.Tensor]] = []  # (address, bytes, uint8 view)
        self._views: dict[tuple[int, int], torch.Tensor] = {}  # (slot, size) -> its view, made once (see ``view``)
        self._closed = False
        self.pin_seconds = 0.0
        self._n_chunks = math.ceil(total / self.slots_per_chunk) if total else 0
        self._ready = threading.Event()
        # the first chunk here, so that the tier takes pages from the moment it opens (an engine's first offload
        # found no room while the worker had not yet run: pages stayed on the GPU); the rest in the background
        first = self._pin_chunks(range(min(1, self._n_chunks)))
        self._worker = threading.Thread(target=self._pin_chunks, args=(range(1, self._n_chunks) if first else (),),
                                        name=f"kvtier-{self.name}-pin", daemon=True)
        self._worker.start()

    def _warm_digests(self) -> None:
        """Take a digest on the device both ways once, off the engine's path: CUDA loads a kernel at its first
        launch: the first offload of an 8192-token Llama-3-8B sequence (1 GiB) in a process took 94 ms with checksums,
        the first of a later manager 30-35 ms with or without them, every later one 14 ms (H100, c26f179,
        docs/experiments/first_offload.py); warmed this way, the first of the process took 27.5-29 ms (70c754c)."""
        device = self.backend.device
        if self.digests is None or device.type != "cuda":
            return
        try:
            regions = torch.zeros((2, 2 * ROW), dtype=torch.uint8, device=device)  # a run of two, as a page's are
            for lane in ("down", "up"):
                digests_of([regions[0, :ROW], regions[1, :ROW]], lane=lane).values()
        except Exception:  # noqa: BLE001 - only a warm-up: the first real digest pays for it instead
            log.debug("%s tier: warming the digests failed", self.name, exc_info=True)

    def _pin_chunks(self, chunks: range | tuple[()]) -> bool:
        """Pin ``chunks`` in order; whether all were (the tier keeps what it pinned before a failure, and says so).
        The worker's call sets ``_ready`` when it ends (after warming the digests first)."""
        if threading.current_thread() is getattr(self, "_worker", None):
            self._warm_digests()
        try:
            for i in chunks:
                if self._closed:
                    return False
                count = min(self.slots_per_chunk, self.frames - i * self.slots_per_chunk)
                nbytes = count * self.slot_size
                start = time.perf_counter()
                address = map_anonymous(nbytes)
                try:
                    self.backend.pin(address, nbytes)
                except BaseException:
                    unmap_anonymous(address, nbytes)
                    raise
                self._chunks.append((address, nbytes, tensor_over(address, nbytes, torch.device("cpu"))))
                self.pin_seconds += time.perf_counter() - start
                self.books.grow(i * self.slots_per_chunk, count)
            return True
        except Exception:  # noqa: BLE001 - the tier keeps what it pinned; say so
            log.exception("%s tier: pinning stopped at %d of %d chunks", self.name, len(self._chunks), self._n_chunks)
            return False
        finally:
            if threading.current_thread() is getattr(self, "_worker", None):
                self._ready.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until every chunk is pinned (tests and benchmarks; the engine need not)."""
        return self._ready.wait(timeout)

    def view(self, slot: int) -> torch.Tensor:
        """The slot's memory as a ``uint8`` CPU tensor. Made once per slot and size: a move of a 4 GiB sequence
        takes 512 views each way, and a tensor slice costs microseconds of the call that starts the move."""
        size = self.books.size(slot)
        view = self._views.get((slot, size))
        if view is None:
            chunk, index = divmod(slot, self.slots_per_chunk * self.books.pieces)
            start = index * self.unit
            view = self._views[(slot, size)] = self._chunks[chunk][2][start:start + size * self.unit]
        return view

    def address(self, slot: int) -> int:
        """Where the slot's memory starts (pinned host memory: copies to and from the device run at PCIe speed)."""
        chunk, index = divmod(slot, self.slots_per_chunk * self.books.pieces)
        return self._chunks[chunk][0] + index * self.unit

    def held(self, slot: int) -> int:
        held = self._held.get(slot)
        return self.books.size(slot) * self.unit if held is None else held

    def hold(self, slot: int, nbytes: int) -> None:
        """The slot now holds ``nbytes`` (a page moves only its live blocks' bytes: a prefix of each region)."""
        whole = self.books.size(slot) * self.unit
        assert nbytes <= whole, f"{self.name} slot {slot}: {nbytes} bytes do not fit its {whole}"
        if nbytes == whole:
            self._held.pop(slot, None)
        else:
            self._held[slot] = nbytes

    def data(self, slot: int) -> torch.Tensor:
        """The bytes the slot holds (the prefix last written into it)."""
        held = self._held.get(slot)
        return self.view(slot) if held is None else self.view(slot)[:held]

    def describe(self) -> dict[str, object]:
        return {"slots": self.books.total, "slot_bytes": self.unit, "pieces": self.books.pieces,
                "ready_slots": self.books.capacity,
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

    # --- routes ------------------------------------------------------------------------------------------------------
    def register_routes(self, mover: "Mover", stack: TierStack) -> None:
        """GPU <-> this tier, and this tier -> every other host-memory tier of ``stack``."""
        mover.register(Tier.GPU, self.id, lambda *a: self._from_gpu(mover, *a))
        mover.register(self.id, Tier.GPU, lambda *a: self._to_gpu(mover, *a))
        for other in stack:
            if other is not self and isinstance(other, HostSlots):
                mover.register(self.id, other.id, lambda *a, other=other: _host_to_host(self, other, *a))

    def _from_gpu(self, mover: "Mover", pairs: list[tuple[Any, Any]], after: Any, tags: Any, on_done: Any,
                  on_part: Any = None) -> Work:
        """Fed in batches by the worker (see ``Mover``); a page's regions are reported (``on_part``) as their
        copies land, so that they can be unmapped while the rest copy. With checksums each batch's digests are
        taken of the pages on the GPU, beside their copies (``digests_of``: on the side stream, a run of regions
        at a time); as the batch lands the worker waits for the sums to have read its pages -- before any region
        is unmapped -- and the slots are sealed with their values when those are asked for (``seal_later``)."""
        copies = [(self.address(slot), view.data_ptr(), view.numel()) for view, slot in pairs]
        for view, slot in pairs:  # a page's live bytes: the slot holds that prefix
            self.hold(slot, view.numel())
        digests = self.digests
        if digests is None:
            return mover.copies_down(copies, self.backend.copy_async, after, tags, on_done, None, on_part)
        for _, slot in pairs:
            digests.open(slot)
        taking: dict[int, tuple[PendingDigests, int]] = {}  # pair -> its batch's digests, its place there

        def started(indices: list[int]) -> None:
            pending = digests_of([pairs[i][0] for i in indices], after, lane="down")
            taking.update((i, (pending, k)) for k, i in enumerate(indices))

        def landed(indices: list[int]) -> None:
            batches: dict[int, tuple[PendingDigests, list[tuple[int, int]]]] = {}
            for i in indices:
                pending, k = taking.pop(i)
                batches.setdefault(id(pending), (pending, []))[1].append((pairs[i][1], k))
            for pending, places in batches.values():
                pending.read()  # the sums have read the pages: they may be unmapped now
                digests.seal_later(pending, places)
        return mover.copies_down(copies, self.backend.copy_async, after, tags, on_done, landed, on_part, started)

    def _to_gpu(self, mover: "Mover", pairs: list[tuple[Any, Any]], after: Any, tags: Any, on_done: Any,
                on_part: Any = None) -> Work:
        """Enqueued at once (host-to-device copies do not hold up mapping); the event covers them all. What the
        slot holds lands at the start of the view (a view shorter than that takes its first bytes). With checksums
        the bytes are verified where they landed, on the GPU (``digests_of`` once the copies are done, queued when
        the caller is done mapping: ``Work.later``), by an I/O step the transfer waits for: no stream reads them
        before (a page that fails is lost). A view shorter than what its slot holds is verified on the host before
        its copy."""
        failed: dict[Any, BaseException] = {}
        digests = self.digests
        after_copy: list[tuple[int, Any, int, torch.Tensor]] = []  # (pair, tag, slot, landed bytes)

        def checked() -> Iterator[tuple[int, int, int] | None]:
            for i, (slot, view) in enumerate(pairs):
                tag = tags[i] if tags is not None else i
                held, n, ptr = self.held(slot), view.numel(), view.data_ptr()  # per page and region: read once
                if digests is not None and n >= held and ptr % 8 == 0 and view.is_contiguous():
                    after_copy.append((i, tag, slot, view if n == held else view[:held]))
                elif tag in failed or self._bad_slot(slot, tag, failed):
                    yield None
                    continue
                yield ptr, self.address(slot), min(n, held)
        work = mover.copies_up(checked(), self.backend.copy_async, after)
        if not after_copy:
            work.io = [lambda: _raise(PairsFailed(failed))] if failed else []
            return work
        launched: list[PendingDigests] = []

        def launch() -> None:  # the digests, queued after the copies (see Work.start_later)
            if not launched:
                launched.append(digests_of([buf for *_, buf in after_copy], work.event, lane="up"))

        def verify() -> None:
            assert digests is not None
            launch()
            bad = digests.check_all([slot for _, _, slot, _ in after_copy], launched[0].array(),
                                    [buf.numel() for *_, buf in after_copy], self.name)
            for k, exc in bad.items():
                failed.setdefault(after_copy[k][1], exc)
            if failed:
                raise PairsFailed(failed)
        work.io, work.local = [verify], True  # a check of these copies only: a waiter may run it
        work.later.append(launch)
        return work

    def _bad_slot(self, slot: int, tag: Any, failed: dict[Any, BaseException]) -> bool:
        """With checksums: whether the slot's bytes changed at rest (then ``failed[tag]`` says so)."""
        if self.digests is None:
            return False
        try:
            self.digests.verify(slot, self.data(slot), self.name)
            return False
        except OSError as exc:
            failed[tag] = exc
            return True


def _host_to_host(src: HostSlots, dst: HostSlots, pairs: list[tuple[Any, Any]], after: Any, tags: Any,
                  on_done: Any, on_part: Any = None) -> Work:
    """Slots of one host-memory tier into another's, by the worker: verified against the source's digest where it
    keeps one, sealed in the destination's."""
    def run() -> None:
        failed: dict[Any, BaseException] = {}
        for i, (a, b) in enumerate(pairs):
            tag = tags[i] if tags is not None else i
            if tag in failed:
                continue
            try:
                data = src.data(a)
                if src.digests is not None:
                    src.digests.verify(a, data, src.name)
                if dst.digests is not None:
                    dst.digests.open(b)
                dst.hold(b, data.numel())
                dst.view(b)[:data.numel()].copy_(data)
                if dst.digests is not None:
                    dst.digests.seal(b, dst.digests.compute(dst.data(b)))
            except Exception as exc:  # noqa: BLE001 - this page failed; the others go on
                failed[tag] = exc
        if failed:
            raise PairsFailed(failed)
    return Work(io=[run])


def _raise(exc: BaseException) -> None:
    raise exc
