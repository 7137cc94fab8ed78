"""TierManager: one device's page pool and the KV spaces (models) that share it."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import weakref
from collections import Counter
from typing import Any, Callable, TypeVar

import torch

from kvtier.checks import INT64, int_arg
from kvtier.config import Config
from kvtier.errors import ClosedError, ConfigError, InvalidArgumentError, PagesInFlight
from kvtier.metrics import MetricsServer
from kvtier.buffer import ElasticBuffer
from kvtier.vmm.ledger import Ledger
from kvtier.space import KVSpace, parse_dtype
from kvtier.remote import RemoteCache
from kvtier.room import RoomPlanner
from kvtier.tiering import FileLayer, Tiering
from kvtier.vmm import Backend, PagePool, open_backend, resolve_device

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_RESERVATION = 1 << 47  # bytes of address space one buffer may reserve (x86-64 user space is 2^47)
MAX_BLOCKS = 1 << 32  # blocks a space may have: ~40 GiB of host books, and 2^36 16-token blocks of reservation


_open: "weakref.WeakSet[TierManager]" = weakref.WeakSet()  # managers not closed yet, for the exit below


@atexit.register
def _close_at_exit() -> None:
    """At a normal exit (the script's end, an unhandled exception, Ctrl-C), close the managers left open while their
    threads and torch still run: pages go back to the device's ledger, files close. ``__del__`` would close them
    during the interpreter's teardown, which works only while the threads a close joins may still run."""
    for mgr in list(_open):
        try:
            mgr.close()
        except Exception:  # noqa: BLE001 - at exit: say so and let the others close
            log.warning("kvtier: closing a manager at exit failed", exc_info=True)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidArgumentError(f"{name} must be a positive int, got {value!r}")
    return value


class TierManager:
    """Owns one device's page pool; spaces made with :meth:`create_space` share it.

    Use as a context manager or call :meth:`close`. Thread-safe: one lock (``lock``) guards the books of the pool
    and of every space, so calls from several threads serialise (each call is short: planning plus driver calls).

    ``clock``: the policy's clock and the spaces' reserves' (seconds; default ``time.monotonic``), e.g. a trace's
    time in a replay.
    ``files``: the file layer under the NVMe tier's POSIX path (default: the operating system's calls); tests pass
    one that fails on cue (CPU backend only: on CUDA the tier's I/O is kvikio's).
    ``backend``: the device layer (default: the one for ``config.device``); tests pass a CPU backend whose copies
    fail on cue, as a device error in mid-transfer would.
    """

    def __init__(self, config: Config | None = None, clock: Callable[[], float] | None = None,
                 files: FileLayer | None = None, backend: Backend | None = None, **overrides: Any) -> None:
        self.config = (config or Config()).replace(**overrides) if overrides else (config or Config())
        self.closed = True  # until everything below has started
        self._closing = False
        self.device = resolve_device(self.config.device)
        self.backend = backend if backend is not None else open_backend(self.device)
        try:  # a manager that fails to start leaves nothing behind: pool, threads, pinned memory, files, backend
            self._start(clock, files)
        except BaseException:
            self.backend.close()
            raise
        self.closed = False
        _open.add(self)
        log.info("kvtier: %s backend on %s, page %d bytes, budget %d pages", self.backend.name, self.device,
                 self.page_size, self.pool.budget_pages)

    def _start(self, clock: Callable[[], float] | None, files: FileLayer | None) -> None:
        """Everything a manager holds, in order; a failure closes what was opened before it."""
        gran = self.backend.granularity
        self.page_size = self.config.page_size or self.backend.default_page_size
        if self.page_size % gran:
            raise ConfigError(f"page_size: {self.page_size} is not a multiple of the {self.backend.name} "
                              f"backend's granularity {gran} (use e.g. {max(gran, self.page_size // gran * gran)})")
        budget = self.config.pool_budget
        budget_bytes = int(self.backend.free_memory() * budget) if isinstance(budget, float) else budget
        budget_pages = budget_bytes // self.page_size
        if budget_pages < 1:
            raise ConfigError(f"pool_budget: {budget_bytes} bytes is less than one page of {self.page_size} bytes")
        self.clock = clock or time.monotonic
        self.lock = threading.RLock()
        self._changed = threading.Condition(self.lock)  # notified when transfers commit (pages come free)
        self.spaces: dict[str, KVSpace] = {}
        self.buffers: dict[str, ElasticBuffer] = {}
        ledger = self._join_ledger(budget_pages)
        try:
            self.pool = PagePool(self.backend, self.page_size, budget_pages, self.config.pool_ready // self.page_size,
                                 ledger)
        except BaseException:
            if ledger is not None:
                ledger.close()
            raise
        try:
            self.tiering = Tiering(self.config, self.device, self.backend, self.pool, self, clock, files)
        except BaseException:
            self._close_pool()
            raise
        self.room = RoomPlanner(self.lock, self._changed, self.pool, self.tiering, self.config,
                                lambda: list(self.spaces.values()))
        mover = self.tiering.mover
        self.pool.yield_to = lambda: mover.down_in_flight > 0  # refills wait for copies down (see PagePool)
        self.pool.stocked = lambda: sum(s.stocked_pages for s in list(self.spaces.values()))  # reserves: ready too
        # the remote cache ([remote]): offer/find whole blocks by content through a store shared by machines
        self.remote = RemoteCache(self.config, self.device) if self.config.remote_backend else None
        self.metrics: MetricsServer | None = None
        if self.config.metrics_port is not None:
            try:
                self.metrics = MetricsServer(self, self.config.metrics_port, self.config.metrics_addr)
            except BaseException:
                if self.remote is not None:
                    self.remote.close()
                self.tiering.stop()
                self.tiering.close()
                self._close_pool()
                raise

    def _join_ledger(self, budget_pages: int) -> Ledger | None:
        """The device's ledger shared with the machine's other kvtier processes (``ledger_dir``), if set: this
        process's pool budget is its limit there."""
        cfg = self.config
        if cfg.ledger_dir is None:
            return None
        device_budget = budget_pages if cfg.ledger_budget is None else cfg.ledger_budget // self.page_size
        return Ledger(cfg.ledger_dir, self.backend.device_key, device_budget, self.page_size,
                      cfg.ledger_name or f"pid {os.getpid()}", cfg.ledger_priority, limit_pages=budget_pages)

    def _close_pool(self) -> None:
        self.pool.close()
        if self.pool.ledger is not None:
            self.pool.ledger.close()

    def create_space(self, name: str, num_layers: int, num_kv_heads: int, head_dim: int,
                     dtype: torch.dtype | str = torch.bfloat16, block_size: int = 16, max_tokens: int = 131072,
                     priority: int | None = None, quota_bytes: int | None = None,
                     map_ahead: bool | None = None) -> KVSpace:
        """Reserve virtual space for ``max_tokens`` tokens of one model (no memory is used until allocate).
        ``priority`` and ``quota_bytes`` default to the config's ``spaces[name]`` entry, else 0 and no quota;
        ``map_ahead`` to the config's (off for a space whose owner maps ahead of need itself)."""
        defaults = self.config.spaces.get(name) if isinstance(name, str) else None
        priority = (defaults.priority if defaults else 0) if priority is None else priority
        quota_bytes = (defaults.quota_bytes if defaults else None) if quota_bytes is None else quota_bytes
        with self.lock:
            self.check_open()
            if not isinstance(name, str) or not name:
                raise InvalidArgumentError(f"space name must be a non-empty str, got {name!r}")
            if name in self.spaces:
                raise InvalidArgumentError(f"a space named {name!r} exists already; pick another name")
            for arg, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                               ("block_size", block_size), ("max_tokens", max_tokens)):
                _positive_int(arg, value)
            int_arg("priority", priority, -INT64, INT64 - 1)
            if quota_bytes is not None:
                _positive_int("quota_bytes", quota_bytes)
            if map_ahead is not None and not isinstance(map_ahead, bool):
                raise InvalidArgumentError(f"map_ahead must be a bool or None (the config's), got {map_ahead!r}")
            blocks = -(-max_tokens // block_size)
            if blocks > MAX_BLOCKS:  # its books (a few bytes a block) and its reservation would not fit
                raise InvalidArgumentError(f"max_tokens {max_tokens} is {blocks} blocks of {block_size} tokens, more "
                                           f"than the {MAX_BLOCKS} a space may have; lower max_tokens or raise "
                                           "block_size")
            space = KVSpace(self, name, num_layers, num_kv_heads, head_dim, parse_dtype(dtype), block_size,
                            max_tokens, priority, quota_bytes)
            space.maps_ahead = self.config.map_ahead if map_ahead is None else map_ahead
            self.spaces[name] = space
            restored = space.sharing.restore()  # a kept NVMe tier's cached blocks of a space of this name
            if restored:
                log.info("space %r: %d cached block(s) restored from the kept NVMe tier", name, restored)
            return space

    def create_buffer(self, name: str, nbytes: int, priority: int = 0, reserve_pages: int = 0,
                      max_pages: int | None = None) -> ElasticBuffer:
        """Reserve a flat ``nbytes`` range whose pages are mapped from the pool while spans of it are acquired
        (see :class:`~kvtier.buffer.ElasticBuffer`): for an engine whose cache has a layout of its own."""
        with self.lock:
            self.check_open()
            if not isinstance(name, str) or not name:
                raise InvalidArgumentError(f"buffer name must be a non-empty str, got {name!r}")
            if name in self.buffers or name in self.spaces:
                raise InvalidArgumentError(f"a space or buffer named {name!r} exists already; pick another name")
            int_arg("nbytes", nbytes, 1, MAX_RESERVATION)
            int_arg("reserve_pages", reserve_pages)
            if max_pages is not None:
                int_arg("max_pages", max_pages, 1)
            int_arg("priority", priority, -INT64, INT64 - 1)
            buffer = ElasticBuffer(self, name, nbytes, priority, reserve_pages, max_pages)
            self.buffers[name] = buffer
            return buffer

    def drop_space(self, name: str) -> None:
        """Close one space: wait for its transfers, unmap its pages (after the device is idle), give its slots
        and its range back."""
        def drop() -> None:
            self.check_open()
            if not isinstance(name, str) or name not in self.spaces:
                raise InvalidArgumentError(f"no space named {name!r} (spaces: {', '.join(self.spaces) or 'none'})")
            pending = self.spaces[name].in_flight()
            if pending:
                raise PagesInFlight(f"space {name!r}: transfers in flight", pending)
            self.spaces.pop(name).close()
        self.run_planned(drop)

    # --- room: the planner's (kvtier/room.py) ----------------------------------------------------------------------
    def run_planned(self, attempt: Callable[[], T], timeout: float = 30.0) -> T:
        """See :meth:`RoomPlanner.run_planned`."""
        return self.room.run_planned(attempt, timeout)

    # --- what tiering needs (kvtier.tiering.SpaceDirectory) ----------------------------------------------------------
    def tiered_spaces(self) -> list[KVSpace]:
        return list(self.spaces.values())

    def pages_changed(self) -> None:
        self._changed.notify_all()

    def cache_counters(self) -> dict[str, int]:
        """What the spaces' prefix caches (and the remote cache) found, summed: ``kvtier top`` shows it."""
        out: Counter[str] = Counter()
        for space in self.spaces.values():
            index = space.prefix
            out["hit_blocks"] += index.hits
            out["tokens_saved"] += index.tokens_shared
            out["lookups_short"] += index.misses
            for place, n in index.shared.items():
                out[f"from_{place}"] += n
        if self.remote is not None:
            out["from_remote"] += self.remote.counts["hit_blocks"]
        return dict(out)

    def give_pages(self, handles: list[Any]) -> None:
        self.pool.give(handles)

    # --- lifecycle and stats --------------------------------------------------------------------------------------
    def check_open(self) -> None:
        if self.closed or self._closing:
            raise ClosedError("this TierManager is closed; create a new one")

    def drain(self) -> None:
        """Block until every transfer started so far has landed and been committed (failures are reported to
        whoever holds their handles)."""
        self.tiering.drain()

    def stats(self) -> dict[str, Any]:
        """A plain dict: per-space pages and bytes, mapping counts and times; the pool's books."""
        with self.lock:
            spaces = {name: s.stats() for name, s in self.spaces.items()}
            pool = self.pool
            return {
                "device": str(self.device), "backend": self.backend.name, "page_size": self.page_size,
                "pool": {"budget_pages": pool.budget_pages, "pages_free": pool.free_pages,
                         "pages_in_use": pool.in_use_pages, "extra_mappings": pool.extra_mappings, "bytes_in_use": pool.in_use_pages * self.page_size,
                         "peak_bytes_in_use": pool.peak_in_use * self.page_size,
                         "bytes_created": pool.created_pages * self.page_size,
                         "peak_bytes_created": pool.peak_created * self.page_size,
                         "creations": pool.creations, "releases": pool.releases,
                         "create_seconds": pool.create_seconds},
                "spaces": spaces,
                "buffers": {name: b.stats() for name, b in self.buffers.items()},
                "tiers": self.tiering.stats(),
                "remote": self.remote.stats() if self.remote is not None else None,
                "total": {key: sum(s[key] for s in spaces.values())
                          for key in ("stripes_mapped", "bytes_mapped", "map_calls", "map_seconds", "unmap_calls",
                                      "unmap_seconds")},
            }

    def check(self) -> None:
        """Integrity check of every book: each space's, the pool's, and that they agree."""
        with self.lock:
            for space in self.spaces.values():
                space.check()
            self.pool.check()
            self.tiering.check()
            for buffer in self.buffers.values():
                buffer.check()
            in_spaces = sum(s.range.handle_count() for s in self.spaces.values())
            in_spaces += sum(b.mapped_pages for b in self.buffers.values())
            # a handle two spaces map (``share_pages``) is one page in use
            in_use = self.pool.in_use_pages + self.pool.extra_mappings
            assert in_spaces == in_use, (in_spaces, self.pool.in_use_pages, self.pool.extra_mappings)

    def close(self) -> None:
        """Drop every space and release every page. Tensors from ``space.kv`` must not be used afterwards. Safe
        while other threads use the manager: from here on their calls raise :class:`ClosedError`, and the
        transfers they started before land and commit (their handles complete) before anything is released."""
        with self.lock:
            if self.closed or self._closing:
                return
            self._closing = True  # no new call gets past check_open: nothing new can start below
            self._changed.notify_all()
        if self.metrics is not None:
            self.metrics.close()
        if self.remote is not None:
            self.remote.close()  # its writes under way finish first (they read its own staging memory only)
        self.tiering.stop()  # without the lock: the worker commits what is in flight
        with self.lock:
            for name in list(self.spaces):
                self.spaces.pop(name).close()
            for buffer in list(self.buffers.values()):
                buffer.close()
            self.tiering.close()
            self._close_pool()
            self.backend.close()
            self.closed = True
        _open.discard(self)

    def __enter__(self) -> "TierManager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; close() is the contract
        if sys.is_finalizing():  # the threads a close joins cannot run any more; the exit hook closed it if it could
            return
        try:
            if not getattr(self, "closed", True):
                self.close()
        except Exception:  # noqa: BLE001
            pass
