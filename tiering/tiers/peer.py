"""The peer tier: slots in another GPU's memory on the same host, reached over NVLink (or PCIe peer-to-peer).

A peer GPU's spare memory is several times nearer than host memory (a peer copy measured ~375 GB/s on a two-GPU
machine here, against ~55 GB/s over PCIe), so it sits first below the GPU: ``[tiers] order = ["peer", "host",
"nvme"]``. Its slots are physical pages created *on the peer* (CUDA virtual memory, with this GPU granted access)
and mapped into a range of their own; this GPU's copy engines move the bytes on the mover's streams, both ways.

That memory belongs to the peer's own engines. With ``ledger_dir`` set, the tier takes its pages from the peer
device's ledger -- the books every kvtier process on that device shares -- as a process of its own, at
``priority`` (below the engines' by default): when a process there is short of pages, the tier is first in line to
give back; it hands over its free slots at once, and the background demoter moves the pages of the rest down (host,
then NVMe) until it has paid what was asked. It grows back toward ``size`` once nobody has asked for
``regrow_after_s``. Without a ledger it takes ``size`` at start, as far as the peer has memory free, and keeps it.

Where there is no peer (one GPU, no peer access between the two, the CPU backend with no stand-in named, a peer
ledger counting pages of another size) the tier is *unavailable*: no slots, no routes, and ``kvtier info``,
``config check`` and ``mgr.stats()`` say why; the manager runs without it. On the CPU backend ``device = "cpu:N"``
stands in for a second GPU: a second mapping of its own memory and its own ledger, so bytes really move.

Settings: ``[tiers.peer]`` (``device``, ``size``, ``priority``, ``regrow_after_s``,
``low_watermark``/``high_watermark``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from kvtier.config import Size
from kvtier.errors import KVTierError
from kvtier.tiering.engine.transfer import Work
from kvtier.tiering.state.slots import SlotBooks
from kvtier.tiering.state.tier import HostSlots, Tier, TierStack
from kvtier.vmm.host import HostBackend
from kvtier.vmm.ledger import Ledger
from kvtier.vmm.mapped_range import runs

if TYPE_CHECKING:
    from kvtier.tiering.engine.mover import Mover
    from kvtier.tiering.tiers.registry import TierContext

log = logging.getLogger(__name__)

LOOK_S = 0.05          # between looks at the peer's ledger (others short of pages)
GROW_SLOTS = 64        # slots created per demoter tick while growing (64 handles: ~2 ms of driver calls)


class PeerSettings(BaseModel):
    """``[tiers.peer]``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    device: str = "auto"  # "cuda:N", or "auto": the first other GPU this one has peer access to; "cpu:N" on CPU
    size: Size = 8 << 30  # at most this much of the peer's memory
    priority: int = -1    # on the peer's ledger: below its engines' (0), so the tier gives back first
    regrow_after_s: float = Field(10.0, ge=0)  # no one there asked for pages this long: grow back toward size
    low_watermark: float = Field(0.80, ge=0, le=1)
    high_watermark: float = Field(0.90, ge=0, le=1)


def find_peer(settings: PeerSettings, device: torch.device) -> tuple[torch.device | None, str | None]:
    """The peer device ``settings`` names for a manager on ``device``, or None and why there is none."""
    if settings.device == "auto":
        if device.type != "cuda":
            return None, "the CPU backend has no second GPU (name a stand-in with device = \"cpu:N\")"
        from kvtier.vmm.cuda import peer_access
        others = [i for i in range(torch.cuda.device_count()) if i != device.index]
        if not others:
            return None, f"{device} is the only GPU here"
        usable = [i for i in others if peer_access(device.index or 0, i)]
        if not usable:
            return None, f"{device} has no peer access to {', '.join(f'cuda:{i}' for i in others)} (no NVLink or P2P)"
        return torch.device("cuda", usable[0]), None
    try:
        peer = torch.device(settings.device)
    except (RuntimeError, TypeError):
        return None, f"device {settings.device!r} is not a device (\"auto\", \"cuda:N\" or, on CPU, \"cpu:N\")"
    index = peer.index or 0
    if peer.type != device.type:
        return None, f"the peer {settings.device} is not a {device.type} device like this manager's ({device})"
    if index == (device.index or 0):
        return None, f"the peer {settings.device} is this manager's own device"
    if peer.type == "cuda":
        from kvtier.vmm.cuda import peer_access
        if index >= torch.cuda.device_count():
            return None, f"{settings.device} does not exist (this machine has {torch.cuda.device_count()} GPU(s))"
        if not peer_access(device.index or 0, index):
            return None, f"{device} has no peer access to {settings.device} (no NVLink or P2P)"
    return torch.device(peer.type, index), None


class PeerTier:
    """Slots of one page each in another device's memory (see the module docstring)."""

    name = "peer"
    Settings = PeerSettings
    failed_read_loses = False  # the peer's memory is still there after a copy that failed

    @staticmethod
    def summary(settings: PeerSettings, device: torch.device) -> str:
        """One line for ``kvtier info``."""
        peer, why = find_peer(settings, device)
        if peer is None:
            return f"unavailable: {why}; kvtier runs without it"
        return f"up to {settings.size / 2**30:.3g} GiB of {peer}'s memory (priority {settings.priority} there)"

    @staticmethod
    def problem(settings: PeerSettings, device: torch.device) -> str | None:
        """What ``config check`` says about the tier on this machine (None: it would be there)."""
        peer, why = find_peer(settings, device)
        return None if peer is not None else f"the peer tier is unavailable here: {why}; kvtier would run without it"

    @classmethod
    def open(cls, settings: PeerSettings, context: "TierContext") -> "PeerTier":
        return cls(settings, context)

    def __init__(self, settings: PeerSettings, context: "TierContext") -> None:
        self.id = 0  # set by its TierStack
        self.settings, self.own, self.slot_size = settings, context.backend, context.slot_size
        self.watermarks: tuple[float, float] | None = (settings.low_watermark, settings.high_watermark)
        self.books = SlotBooks(self.name, 0)
        self.max_slots = settings.size // self.slot_size
        self.peer: torch.device | None = None
        self.why: str | None = None  # why the tier is unavailable
        self.backend: Any = None
        self.ledger: Ledger | None = None
        self.base = 0
        self._cuda = False  # the peer is a GPU: its backend's calls keep this thread's context (``_on_peer``)
        self._handles: dict[int, Any] = {}  # slot -> its physical page on the peer
        self._held: dict[int, int] = {}     # slot -> bytes it holds, where less than the slot
        self._owed = 0                      # used slots to empty and give back (the peer's processes want them)
        self._looked = -1.0
        self._asked_at = -settings.regrow_after_s  # when a process on the peer last asked for pages
        self.given_back = self.grown = 0    # slots, over the tier's life
        peer, why = find_peer(settings, context.device)
        if peer is None or not self.max_slots:
            self._unavailable(why or f"size {settings.size} is less than one slot of {self.slot_size} bytes")
            return
        try:
            self._open(peer, context)
        except (KVTierError, OSError) as exc:  # a ledger of another page size, a driver that refuses: no tier
            self.close()
            self._unavailable(str(exc))
            return
        self.peer = peer
        self._grow(self.max_slots)  # what it may take now; the rest later, as the peer's ledger allows
        if self.ledger is not None:  # said at once: a process there short of pages waits for these, not in vain
            self.ledger.pressure(self.books.capacity)
        log.info("peer tier: %d slots on %s (up to %d)", self.books.capacity, peer, self.max_slots)

    def _unavailable(self, why: str) -> None:
        self.why, self.watermarks = why, None
        log.warning("peer tier unavailable: %s; kvtier runs without it", why)

    def _on_peer(self) -> Any:
        """Around calls to the peer's backend: it makes the peer's context current for them, and the thread's own
        (this GPU's, which torch reads as the current device) is current again after."""
        if self._cuda:
            from kvtier.vmm.cuda import context_kept
            return context_kept()
        return contextlib.nullcontext()

    def _open(self, peer: torch.device, context: "TierContext") -> None:
        self._cuda = peer.type == "cuda"
        with self._on_peer():
            self._open_backend(peer, context)

    def _open_backend(self, peer: torch.device, context: "TierContext") -> None:
        if peer.type == "cuda":
            from kvtier.vmm.cuda import CudaBackend
            self.backend = CudaBackend(peer.index or 0)
            self.backend.grant(context.device.index or 0)  # this GPU's copy engines read and write its slots
        else:
            self.backend = HostBackend(peer.index or 0)
        if self.slot_size % self.backend.granularity:
            raise KVTierError(f"page size {self.slot_size} is not a multiple of {peer}'s granularity "
                              f"{self.backend.granularity}")
        self.base = self.backend.reserve(self.max_slots * self.slot_size, self.slot_size)
        config = context.config
        if config is not None and config.ledger_dir is not None:
            # the device's budget as a manager on the peer would set it (the first process on a ledger sets it)
            share = config.pool_budget
            device_bytes = config.ledger_budget or (int(self.backend.free_memory() * share)
                                                    if isinstance(share, float) else share)
            budget = device_bytes // self.slot_size
            self.ledger = Ledger(config.ledger_dir, self.backend.device_key, budget, self.slot_size,
                                 f"peer tier of {config.ledger_name or f'pid {os.getpid()}'}",
                                 self.settings.priority, limit_pages=self.max_slots)

    # --- slots ------------------------------------------------------------------------------------------------------
    def address(self, slot: int) -> int:
        return self.base + slot * self.slot_size

    def peer_view(self, slot: int) -> torch.Tensor:
        """The slot's memory, as a tensor on the peer (tests look at what landed there)."""
        return self.backend.tensor(self.address(slot), self.slot_size)

    def held(self, slot: int) -> int:
        return self._held.get(slot, self.slot_size)

    def _hold(self, slot: int, nbytes: int) -> None:
        if nbytes == self.slot_size:
            self._held.pop(slot, None)
        else:
            self._held[slot] = nbytes

    def _grow(self, n: int) -> int:
        """Create and map up to ``n`` more slots, as the peer's ledger (or free memory) allows; how many."""
        with self._on_peer():
            return self._grow_on_peer(n)

    def _grow_on_peer(self, n: int) -> int:
        n = min(n, self.max_slots - self.books.capacity)
        if self.ledger is None:
            n = min(n, max(0, self.backend.free_memory() - (1 << 30)) // self.slot_size)  # 1 GiB left to the peer
        elif n > 0:
            n = self.ledger.reserve(n, partial=True)
        if n <= 0:
            return 0
        fresh = [s for s in range(self.max_slots) if s not in self._handles][:n]
        made: list[int] = []
        try:
            for first, count in runs(fresh):
                handles = [self.backend.create(self.slot_size) for _ in range(count)]
                try:
                    self.backend.map(self.address(first), self.slot_size, handles)
                except BaseException:
                    for handle in handles:
                        self.backend.release(handle)
                    raise
                self._handles.update(zip(range(first, first + count), handles))
                made += range(first, first + count)
        except (KVTierError, OSError) as exc:  # the peer is out of memory: keep what was made
            log.warning("peer tier: %d of %d slots made on %s (%s)", len(made), n, self.peer, exc)
            self._asked_at = time.monotonic()  # not again at once
        if self.ledger is not None and len(made) < n:
            self.ledger.release(n - len(made))
        self.books.add(made)
        self.grown += len(made)
        return len(made)

    def _shrink(self, n: int) -> int:
        """Give up to ``n`` free slots' memory back to the peer; how many."""
        gone = sorted(self.books.remove_free(n))
        with self._on_peer():
            for first, count in runs(gone):
                self.backend.unmap(self.address(first), count * self.slot_size)
                for slot in range(first, first + count):
                    self.backend.release(self._handles.pop(slot))
                    self._held.pop(slot, None)
        if self.ledger is not None and gone:
            self.ledger.release(len(gone))
        self.given_back += len(gone)
        return len(gone)

    def rebalance(self) -> int:
        """Called by the background demoter every tick, under the manager's lock (see ``ElasticTier``): look at the
        peer's ledger; pay what its processes ask for with free slots; grow back once they have stopped asking.
        Return the used slots still owed (their pages must go down first)."""
        if self.why is not None:
            return 0
        now = time.monotonic()
        if self.ledger is not None and now - self._looked >= LOOK_S:
            self._looked = now
            wanted = self.ledger.pressure(self.books.capacity)
            if wanted > 0:
                self._asked_at = now
                self._owed = min(self.books.capacity, max(self._owed, wanted))
        if self._owed:
            self._owed -= self._shrink(self._owed)
            if self._owed:
                return self._owed
        if now - self._asked_at >= self.settings.regrow_after_s and self.books.capacity < self.max_slots:
            self._grow(GROW_SLOTS)
        return 0

    def describe(self) -> dict[str, object]:
        return {"available": self.why is None, "why": self.why, "device": str(self.peer) if self.peer else None,
                "slots": self.books.capacity, "max_slots": self.max_slots, "slot_bytes": self.slot_size,
                "owed": self._owed, "given_back": self.given_back, "grown": self.grown,
                "ledger": self.ledger.path if self.ledger is not None else None}

    def wait_ready(self, timeout: float | None = None) -> bool:
        return True

    def close(self) -> None:
        if self.backend is None:
            return
        with self._on_peer():
            self._close_on_peer()

    def _close_on_peer(self) -> None:
        if self._handles:
            for first, count in runs(sorted(self._handles)):
                self.backend.unmap(self.address(first), count * self.slot_size)
            for handle in self._handles.values():
                self.backend.release(handle)
            if self.ledger is not None:
                self.ledger.release(len(self._handles))
            self._handles.clear()
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None
        if self.base:
            self.backend.free_reservation(self.base, self.max_slots * self.slot_size)
            self.base = 0
        self.backend.close()
        self.backend = None

    # --- routes -----------------------------------------------------------------------------------------------------
    def register_routes(self, mover: "Mover", stack: TierStack) -> None:
        """GPU <-> the peer's slots, and the peer's slots -> each host-memory tier (its cascade goes there)."""
        if self.why is not None:
            return
        mover.register(Tier.GPU, self.id, lambda *a: self._from_gpu(mover, *a))
        mover.register(self.id, Tier.GPU, lambda *a: self._to_gpu(mover, *a))
        for other in stack:
            if isinstance(other, HostSlots):
                mover.register(self.id, other.id, lambda *a, other=other: self._to_host(mover, other, *a))

    def _from_gpu(self, mover: "Mover", pairs: list[tuple[Any, Any]], after: Any, tags: Any, on_done: Any,
                  on_part: Any = None) -> Work:
        for view, slot in pairs:  # a page's live bytes: the slot holds that prefix
            self._hold(slot, view.numel())
        copies = [(self.address(slot), view.data_ptr(), view.numel()) for view, slot in pairs]
        return mover.copies_down(copies, self.own.copy_async, after, tags, on_done, on_part=on_part)

    def _to_gpu(self, mover: "Mover", pairs: list[tuple[Any, Any]], after: Any, tags: Any, on_done: Any,
                on_part: Any = None) -> Work:
        """Enqueued at once on the stream up (device-to-device copies hold up no mapping); one event covers them."""
        copies = [(view.data_ptr(), self.address(slot), min(view.numel(), self.held(slot))) for slot, view in pairs]
        return mover.copies_up(copies, self.own.copy_async, after)

    def _to_host(self, mover: "Mover", host: HostSlots, pairs: list[tuple[Any, Any]], after: Any, tags: Any,
                 on_done: Any, on_part: Any = None) -> Work:
        """The cascade: slots of the peer into a host-memory tier's, sealed there where it keeps digests."""
        digests = host.digests
        for a, b in pairs:
            host.hold(b, self.held(a))
            if digests is not None:
                digests.open(b)
        landed = None
        if digests is not None:
            def landed(indices: list[int]) -> None:
                for i in indices:
                    b = pairs[i][1]
                    digests.seal(b, digests.compute(host.data(b)))
        copies = [(host.address(b), self.address(a), self.held(a)) for a, b in pairs]
        return mover.copies_down(copies, self.own.copy_async, after, tags, on_done, landed)
