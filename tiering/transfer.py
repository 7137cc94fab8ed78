"""Transfers between tiers: the handle an engine waits on, and the mover that routes bytes by tier pair.

A transfer has a device part (copies enqueued on a dedicated stream, ending in an event) and/or a host part (NVMe
I/O, run by the tiering worker). Routes are looked up by ``(source tier, destination tier)``, so a new tier adds
handlers, not branches.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from kvtier.errors import TransferError

if TYPE_CHECKING:
    from kvtier.tiering.host import HostTier
    from kvtier.tiering.nvme import NvmeTier


@dataclass
class Move:
    """One page of one space going from ``src`` to ``dst``; ``taken`` are the destination's resources."""

    space: Any
    page: int
    src: str
    dst: str
    taken: list[Any]


@dataclass
class Work:
    """What a route started: a device event to wait on and/or host I/O still to run."""

    event: Any = None
    io: list[Callable[[], None]] = field(default_factory=list)


class TransferHandle:
    """Returned by ``offload`` and ``prefetch``. ``done()`` polls; ``wait(stream)`` makes ``stream`` wait on the
    device (no host sync when the data comes from host memory; NVMe reads must land first, so for them it blocks
    until they have); ``result()`` blocks until the transfer is complete and raises :class:`TransferError` if it
    failed."""

    def __init__(self, owner: Any, kind: str, moves: list[Move], work: Work | None = None) -> None:
        self.kind, self.moves, self._owner = kind, moves, owner
        self._event = work.event if work else None
        self._io = list(work.io) if work else []
        self._io_done = threading.Event()
        if not self._io:
            self._io_done.set()
        self.error: BaseException | None = None
        self.lost: list[Any] = []
        self.committed = not moves
        self.started = time.perf_counter()

    def run_io(self) -> None:
        """Run the host part (NVMe I/O). Called once, by the tiering worker or inline."""
        try:
            for step in self._io:
                step()
        except BaseException as exc:  # noqa: BLE001 - reported through result()
            self.error = exc
        finally:
            self._io_done.set()

    def ready(self) -> bool:
        return self._io_done.is_set() and (self._event is None or self._event.query())

    def done(self) -> bool:
        if not self.committed and self.ready():
            self._owner.commit(self)
        return self.committed

    def wait(self, stream: Any = None) -> None:
        """Make ``stream`` (default: the current one) wait until the data has landed."""
        if not self._io_done.is_set():  # NVMe reads must have landed before any stream may read
            start = time.perf_counter()
            self._io_done.wait()
            self._owner.stall_seconds.append(time.perf_counter() - start)
        if self.error is not None:
            self.result()  # raises
        if self._event is not None:
            self._owner.stream_wait(stream, self._event)

    def result(self, timeout: float | None = None) -> None:
        if not self._io_done.wait(timeout):
            raise TimeoutError("transfer still running")
        if self._event is not None:
            self._event.synchronize()
        if not self.committed:
            self._owner.commit(self)
        if self.error is not None:
            raise TransferError(f"{self.kind} failed: {self.error}", self.lost) from self.error


class Mover:
    """Moves bytes. Device copies run on two dedicated streams (one per direction, so both directions overlap);
    NVMe I/O is handed back as host steps."""

    def __init__(self, device: torch.device, host: "HostTier", nvme: "NvmeTier") -> None:
        self.device, self.host, self.nvme = device, host, nvme
        cuda = device.type == "cuda"
        self.down = torch.cuda.Stream(device) if cuda else None
        self.up = torch.cuda.Stream(device) if cuda else None
        self.routes: dict[tuple[str, str], Callable[[list[tuple[Any, Any]], Any], Work]] = {
            ("gpu", "host"): self._gpu_host, ("host", "gpu"): self._host_gpu,
            ("gpu", "nvme"): self._gpu_nvme, ("nvme", "gpu"): self._nvme_gpu,
            ("host", "nvme"): self._host_nvme, ("nvme", "host"): self._nvme_host,
        }
        self.paths: dict[str, dict[str, float]] = defaultdict(lambda: {"transfers": 0, "bytes": 0})

    def start(self, src: str, dst: str, pairs: list[tuple[Any, Any]], after: Any = None) -> Work:
        """Start moving ``pairs`` of (source, destination) buffers: device views (torch tensors) or slot ids."""
        path = self.paths[f"{src}->{dst}"]
        path["transfers"] += 1
        path["bytes"] += len(pairs) * self.host.slot_size
        return self.routes[(src, dst)](pairs, after)

    def _copy(self, stream: Any, pairs: list[tuple[torch.Tensor, torch.Tensor]], after: Any) -> Work:
        if stream is None:  # CPU backend: plain memcpy, done when it returns
            for src, dst in pairs:
                dst.copy_(src)
            return Work()
        with torch.cuda.stream(stream):
            if after is not None:
                stream.wait_event(after)
            for src, dst in pairs:
                dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return Work(event=event)

    def _gpu_host(self, pairs: list[tuple[Any, Any]], after: Any) -> Work:
        return self._copy(self.down, [(view, self.host.view(slot)) for view, slot in pairs], after)

    def _host_gpu(self, pairs: list[tuple[Any, Any]], after: Any) -> Work:
        return self._copy(self.up, [(self.host.view(slot), view) for slot, view in pairs], after)

    def _io(self, ops: list[Callable[[], Any]], after: Any = None) -> Work:
        def run() -> None:
            if after is not None:
                after.synchronize()  # the kernels that wrote the page are done before the disk reads it
            futures = [op() for op in ops]  # all submitted first: kvikio / the pool run them in parallel
            for f in futures:
                f.result()
        return Work(io=[run])

    def _gpu_nvme(self, pairs: list[tuple[Any, Any]], after: Any) -> Work:
        return self._io([lambda v=view, s=slot: self.nvme.write(s, v) for view, slot in pairs], after)

    def _nvme_gpu(self, pairs: list[tuple[Any, Any]], after: Any) -> Work:
        return self._io([lambda v=view, s=slot: self.nvme.read(s, v) for slot, view in pairs])

    def _host_nvme(self, pairs: list[tuple[Any, Any]], after: Any) -> Work:
        return self._io([lambda h=hs, n=ns: self.nvme.write(n, self.host.view(h)) for hs, ns in pairs], after)

    def _nvme_host(self, pairs: list[tuple[Any, Any]], after: Any) -> Work:
        return self._io([lambda n=ns, h=hs: self.nvme.read(n, self.host.view(h)) for ns, hs in pairs])
