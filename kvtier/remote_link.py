"""The remote cache's line to its store: the client, the two threads that call it, the deadlines and the back-off.

The client is made on the write thread, from the start and again after a failure (Mooncake's setup retries for
tens of seconds against a master that is down): a read never waits for a connection. Reads run on a thread of their
own, so that a lookup never queues behind a write, and are waited for at most ``remote_timeout_s``; a read still
running past its deadline keeps its thread and backs the store off, so the reads after it are misses at once (a
read whose caller stopped early is waited for, within the next one's deadline). A call that
fails, or passes its deadline, leaves the store alone for a while (doubling, up to ``MAX_BACKOFF_S``), said once
in the log and counted; the first answer after it says so too. A missing client package turns the cache off.

Resources a read lends the store's client (staging slots) come back through the ``give`` callbacks the caller
passes: at once when the read never ran or failed, or -- after a deadline -- when the call finally returns.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import queue
import threading
import time
from collections import Counter
from typing import Any, Callable, Generator, Sequence

import numpy as np

from kvtier.config import Config
from kvtier.errors import ConfigError
from kvtier.remote_store import RemoteStore, open_store

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0


class Miss(Exception):
    """The store cannot answer now (down, busy past a deadline, an error): a miss."""


class StoreLink:
    """See the module docstring. ``lock`` guards ``counts`` and whatever the ``give`` callbacks touch."""

    def __init__(self, config: Config, buffer: np.ndarray, lock: threading.Lock, counts: Counter[str]) -> None:
        self.config, self.buffer, self.lock, self.counts = config, buffer, lock, counts
        self.store: RemoteStore | None = None
        self.disabled: str | None = None  # a problem no retry mends (the client package is missing)
        self._down_until = 0.0
        self._backoff = 0.0
        self._busy = False  # a read under way (perhaps past its deadline)
        self._idle = threading.Condition(lock)  # notified when a read returns
        self._reads, self._writer = _Worker("kvtier-remote-read"), _Worker("kvtier-remote-write")
        self._writes: list[cf.Future[Any]] = []
        self._connecting = self._writer.submit(self.connect)

    @property
    def up(self) -> bool:
        """Whether the store is being asked (not disabled, not backing off after a failure)."""
        return self.disabled is None and time.monotonic() >= self._down_until

    def connect(self) -> RemoteStore | None:
        """The store's client (on the write thread); None while there is none."""
        if self.store is None and self.up:
            try:
                self.store = open_store(self.config, self.buffer)
                self.answered()
            except Exception as exc:  # noqa: BLE001 - a store not there yet is a miss, whatever its client raised
                self.failed("connection", exc)
        return self.store

    def wait_connected(self, timeout: float | None = None) -> bool:
        try:
            self._connecting.result(timeout)
        except cf.TimeoutError:
            pass
        return self.store is not None

    def answered(self) -> None:
        with self.lock:
            if self._backoff:
                log.warning("remote store answers again; the remote cache is back")
            self._backoff = 0.0

    def failed(self, kind: str, exc: BaseException | str) -> None:
        if isinstance(exc, ConfigError):  # the client package is missing: no retry mends that
            self.disabled = str(exc)
            log.error("remote cache off: %s", exc)
            return
        with self.lock:
            self.counts["errors"] += 1
            if not self._backoff:
                log.warning("remote store (%s) failed a %s: %s; kvtier goes on without it and tries again",
                            self.config.remote_backend, kind, exc)
            self._backoff = min(max(2 * self._backoff, 0.25), MAX_BACKOFF_S)
            self._down_until = time.monotonic() + self._backoff

    # --- reads ------------------------------------------------------------------------------------------------------
    def read(self, fn: Callable[[RemoteStore], Any], give: Callable[[], None] = lambda: None) -> Any:
        """``fn(store)`` on the read thread within the deadline; raises :class:`Miss` (see ``stream``)."""
        stream = self.stream([fn], [give])
        try:
            return next(stream)
        finally:
            stream.close()

    def stream(self, fns: Sequence[Callable[[RemoteStore], Any]],
               gives: Sequence[Callable[[], None]]) -> Generator[Any, None, None]:
        """``fns`` run one after the other on the read thread, their results yielded as they come, all within one
        deadline; raises :class:`Miss`. The caller owns what call ``i`` used once its result is yielded; the
        ``gives`` of the others are called exactly once, whenever the stream ends (at once if their calls never
        ran, when they return if they were under way). Close the stream when done with it."""
        with self.lock:
            waited = time.monotonic() + self.config.remote_timeout_s
            while self._busy and self.up and time.monotonic() < waited:  # one stopped early, finishing a call
                self._idle.wait(waited - time.monotonic())
            if not self.up or self._busy or self.store is None:
                self.counts["reads_skipped"] += 1
                for give in gives:
                    give()
                if self.store is None and self.disabled is None:
                    self._writer.submit(self.connect)  # not connected (yet, or again): a miss, and a try
                raise Miss()
            self._busy = True
        results: queue.Queue[tuple[bool, Any]] = queue.Queue()
        state = {"stop": False, "done": False, "handed": 0}
        store = self.store

        def run() -> None:
            try:
                for fn in fns:
                    if state["stop"]:
                        break
                    results.put((True, fn(store)))
            except Exception as exc:  # noqa: BLE001 - whatever the client raises is a miss
                results.put((False, exc))
            finally:
                with self.lock:
                    self._busy, state["done"] = False, True
                    self._idle.notify_all()
                    if state["stop"]:
                        for give in gives[state["handed"]:]:
                            give()
        self._reads.submit(run)
        deadline = time.monotonic() + self.config.remote_timeout_s
        try:
            for i in range(len(fns)):
                try:
                    ok, value = results.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    self.failed("read", f"no answer within {self.config.remote_timeout_s:g} s")
                    raise Miss() from None
                if not ok:
                    self.failed("read", value)
                    raise Miss()
                with self.lock:
                    state["handed"] = i + 1
                yield value
            self.answered()
        finally:
            with self.lock:
                if state["handed"] < len(fns):
                    state["stop"] = True
                    if state["done"]:
                        for give in gives[state["handed"]:]:
                            give()

    # --- writes -----------------------------------------------------------------------------------------------------
    def write(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the write thread (it calls :meth:`connect` and handles its own failures); not waited for."""
        self._writes = [f for f in self._writes if not f.done()] + [self._writer.submit(fn)]

    def call_on_writer(self, fn: Callable[[RemoteStore], Any]) -> cf.Future[Any]:
        """``fn(store)`` on the write thread, after the writes queued before it (an erase must follow them)."""
        def run() -> Any:
            store = self.connect()
            if store is None:
                raise OSError("not connected")
            return fn(store)
        return self._writer.submit(run)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for the writes under way; whether all are done."""
        done, pending = cf.wait(list(self._writes), timeout)
        return not pending

    def close(self) -> None:
        """Writes under way finish (waited for up to ``remote_put_timeout_s``), then the client is let go. A call
        stuck in the client past that keeps its thread (a daemon), and the client is left open."""
        stuck = not self.flush(self.config.remote_put_timeout_s)
        for worker in (self._writer, self._reads):
            stuck |= not worker.stop(0 if stuck else self.config.remote_timeout_s)
        if stuck:
            log.warning("remote store: a call is still under way at close; its client is left open")
        elif self.store is not None:
            try:
                self.store.close()
            except Exception as exc:  # noqa: BLE001 - a store gone away must not fail the manager's close
                log.warning("remote store: close failed: %s", exc)
            self.store = None


class _Worker:
    """One daemon thread running submitted calls in order (a call stuck in a store's client must not hold up the
    interpreter's exit, as an executor's thread would)."""

    def __init__(self, name: str) -> None:
        self._queue: queue.Queue[tuple[Callable[[], Any], cf.Future[Any]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any]) -> cf.Future[Any]:
        future: cf.Future[Any] = cf.Future()
        self._queue.put((fn, future))
        return future

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                    future.set_exception(exc)

    def stop(self, timeout: float) -> bool:
        """Ask the thread to end after what is queued; whether it did within ``timeout`` seconds."""
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()
