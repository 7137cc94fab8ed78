"""Transfers between tiers: what was asked to move (``Move``), what a route started (``Work``), and the handle an
engine waits on (``TransferHandle``). The routes that move the bytes are in :mod:`kvtier.tiering.engine.mover`.

A transfer has a device part (copies enqueued on a dedicated stream, ending in an event) and/or a host part (NVMe
I/O, run by the tiering worker). Two phases: whoever starts a transfer has already planned it against the books;
the handle's moves are committed to the page tables by the tiering worker (or by ``result()``) once the bytes have
landed. Pages fail one by one (``PairsFailed``). Queries (``ready``, ``done``) only report.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from kvtier.errors import TransferError

Route = Callable[..., "Work"]

log = logging.getLogger(__name__)


class PairsFailed(Exception):
    """Some pairs of a transfer failed: ``failures`` maps each failed pair's tag (its page's move, or its page)
    to why. The other pairs landed."""

    def __init__(self, failures: dict[Any, BaseException]) -> None:
        self.failures = failures
        first = next(iter(failures.values()))
        super().__init__(f"{len(failures)} page(s) failed, e.g.: {first}")

    @staticmethod
    def merge(errors: list[BaseException]) -> BaseException:
        """One error for several steps' failures: per pair where every one says which pairs failed."""
        if len(errors) == 1 or not all(isinstance(e, PairsFailed) for e in errors):
            return errors[0]
        return PairsFailed({tag: exc for e in errors for tag, exc in e.failures.items()})  # type: ignore[attr-defined]


@dataclass(eq=False)  # compared and hashed by identity: each is one page's move
class Move:
    """One page of one space going from ``src`` to ``dst``; ``taken`` are the destination's resources. A
    ``clean`` move copies nothing: ``taken`` already holds the page's bytes (a kept copy). ``released``: the
    regions of a GPU page going down already unmapped, their copies landed, before the move is committed."""

    space: Any
    page: int
    src: int  # a page-table value: Tier.GPU or a lower tier's id
    dst: int
    taken: list[Any]
    clean: bool = False
    released: list[int] = field(default_factory=list)
    path: str = ""  # "src->dst" by the tiers' names (the stats' path)


@dataclass
class Work:
    """What a route started: a device event to wait on and/or host I/O still to run. ``local``: the host steps
    wait for nothing queued before them (checks of bytes already copied), so whoever waits for the transfer may
    run them rather than wait for the worker to reach them behind others' I/O."""

    event: Any = None
    io: list[Callable[[], None]] = field(default_factory=list)
    local: bool = False
    later: list[Callable[[], None]] = field(default_factory=list)  # see start_later

    def add(self, step: "Work") -> None:
        """``step``'s work too (copies on one stream: its event covers every earlier one)."""
        if step.io:
            self.local = step.local and (self.local or not self.io)
            self.io += step.io
        self.event = step.event or self.event
        self.later += step.later

    def start_later(self) -> None:
        """Start the device work a route put off until its caller is done mapping (the checks of copies up: launched
        between a promotion's mappings, which hold back copies down, they kept copies down from starting for 70 ms
        of a 4 GiB promotion; both directions at once went from 1.14x to 1.24x one way this way, H100, 70c754c and
        256a039). Each step also starts itself when its host step runs, if no one did: calling this is an
        optimization, not a duty -- and never raises, because its caller has mapped pages and booked moves by now:
        a start that fails here is tried again by its host step, whose failure the transfer reports as a copy's."""
        for launch in self.later:
            try:
                launch()
            except Exception:  # noqa: BLE001 - see above: reported with the transfer
                log.debug("a deferred start failed; its host step tries again", exc_info=True)
        self.later.clear()


class TransferHandle:
    """Returned by ``offload``, ``prefetch`` and ``read``. ``done()`` polls; ``wait(stream)`` makes ``stream`` wait
    on the device (no host sync when the data comes from host memory; NVMe reads must land first, so for them it blocks
    until they have); ``result()`` blocks until the transfer is complete and raises :class:`TransferError` if it
    failed."""

    def __init__(self, owner: Any, kind: str, moves: list[Move]) -> None:
        self.kind, self.moves, self._owner = kind, moves, owner
        self._event: Any = None
        self._io: list[Callable[[], None]] = []
        self._io_done = threading.Event()
        self._io_done.set()
        self._io_local = False
        self._io_claimed = threading.Lock()  # held by whoever runs the host steps (once)
        self.done_moves: set[int] = set()
        self.error: BaseException | None = None
        self.lost: list[Any] = []
        self.committed = not moves
        self.source: Any = None  # a read's (space, pages read from below)
        self.started = time.perf_counter()

    def attach(self, work: Work) -> None:
        """What the routes started: a device event to wait on, host steps for the worker."""
        self._event, self._io, self._io_local = work.event, list(work.io), work.local
        if self._io:
            self._io_done.clear()

    def run_io(self) -> None:
        """Run the host part (NVMe I/O, checks): every step, even after one failed (each page stands alone). Run
        once, by the tiering worker, inline, or -- ``local`` steps -- by a caller waiting for them; another caller
        waits until it is done."""
        if not self._io_claimed.acquire(blocking=False):
            self._io_done.wait()
            return
        errors: list[BaseException] = []
        try:
            for step in self._io:
                try:
                    step()
                except BaseException as exc:  # noqa: BLE001 - reported through result()
                    errors.append(exc)
        finally:
            if errors:
                self.error = PairsFailed.merge(errors)
            self._io_done.set()

    def failure(self, tag: Any) -> BaseException | None:
        """Why the pairs tagged ``tag`` failed, or None if they landed."""
        if isinstance(self.error, PairsFailed):
            return self.error.failures.get(tag)
        return self.error  # not said per pair: every pair not committed yet counts as failed

    def ready(self) -> bool:
        return self._io_done.is_set() and (self._event is None or self._event.query())

    def done(self) -> bool:
        """Whether the transfer has landed and its moves are in the books (a report: it commits nothing)."""
        return self.committed and self.ready()  # a read moves no page: it is committed from the start

    def settle(self) -> None:
        """Wait for a transfer someone else started; its failure is reported to whoever holds the handle."""
        try:
            self.result()
        except TransferError:
            pass

    def wait(self, stream: Any = None) -> None:
        """Make ``stream`` (default: the current one) wait until the data has landed."""
        if not self._io_done.is_set():  # NVMe reads must have landed (and checks passed) before any stream reads
            start = time.perf_counter()
            if self._io_local:
                self.run_io()
            self._io_done.wait()
            self._owner.stall_seconds.append(time.perf_counter() - start)
        if self.error is not None:
            self.result()  # raises
        if self._event is not None:
            self._owner.stream_wait(stream, self._event)

    def result(self, timeout: float | None = None) -> None:
        if self._io_local and not self._io_done.is_set():
            self.run_io()
        if not self._io_done.wait(timeout):
            raise TimeoutError("transfer still running")
        if self._event is not None:
            self._event.synchronize()
        if not self.committed:
            self._owner.commit(self)
        if self.error is not None:
            raise TransferError(f"{self.kind} failed: {self.error}", self.lost) from self.error
