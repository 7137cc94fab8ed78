"""TierManager: one device's page pool and the KV spaces (models) that share it."""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch

from kvtier.config import Config
from kvtier.errors import ClosedError, ConfigError, InvalidArgumentError, OutOfPagesError, PagesInFlight
from kvtier.space import KVSpace, parse_dtype
from kvtier.tiering import Tiering
from kvtier.vmm import PagePool, open_backend, resolve_device

log = logging.getLogger(__name__)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidArgumentError(f"{name} must be a positive int, got {value!r}")
    return value


class TierManager:
    """Owns one device's page pool; spaces made with :meth:`create_space` share it.

    Use as a context manager or call :meth:`close`. Thread-safe: one lock guards the books of the pool and of
    every space, so calls from several threads serialise (each call is short: planning plus driver calls).
    """

    def __init__(self, config: Config | None = None, **overrides: Any) -> None:
        self.config = (config or Config()).replace(**overrides) if overrides else (config or Config())
        self.device = resolve_device(self.config.device)
        self.backend = open_backend(self.device)
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
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # notified when transfers commit (pages come free)
        self.pool = PagePool(self.backend, self.page_size, budget_pages, self.config.pool_ready // self.page_size)
        self.spaces: dict[str, KVSpace] = {}
        self.closed = False
        self.tiering = Tiering(self)
        log.info("kvtier: %s backend on %s, page %d bytes, budget %d pages", self.backend.name, self.device,
                 self.page_size, budget_pages)

    def create_space(self, name: str, num_layers: int, num_kv_heads: int, head_dim: int,
                     dtype: torch.dtype | str = torch.bfloat16, block_size: int = 16, max_tokens: int = 131072,
                     priority: int | None = None, quota_bytes: int | None = None) -> KVSpace:
        """Reserve virtual space for ``max_tokens`` tokens of one model (no memory is used until allocate).
        ``priority`` and ``quota_bytes`` default to the config's ``spaces[name]`` entry, else 0 and no quota."""
        defaults = self.config.spaces.get(name, {}) if isinstance(name, str) else {}
        priority = defaults.get("priority", 0) if priority is None else priority
        quota_bytes = defaults.get("quota_bytes") if quota_bytes is None else quota_bytes
        with self._lock:
            self._check_open()
            if not isinstance(name, str) or not name:
                raise InvalidArgumentError(f"space name must be a non-empty str, got {name!r}")
            if name in self.spaces:
                raise InvalidArgumentError(f"a space named {name!r} exists already; pick another name")
            for arg, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                               ("block_size", block_size), ("max_tokens", max_tokens)):
                _positive_int(arg, value)
            if isinstance(priority, bool) or not isinstance(priority, int):
                raise InvalidArgumentError(f"priority must be an int, got {priority!r}")
            if quota_bytes is not None:
                _positive_int("quota_bytes", quota_bytes)
            space = KVSpace(self, name, num_layers, num_kv_heads, head_dim, parse_dtype(dtype), block_size,
                            max_tokens, priority, quota_bytes)
            self.spaces[name] = space
            return space

    def drop_space(self, name: str) -> None:
        """Close one space: unmap its pages (after the device is idle) and give its range back."""
        with self._lock:
            self._check_open()
            if name not in self.spaces:
                raise InvalidArgumentError(f"no space named {name!r} (spaces: {', '.join(self.spaces) or 'none'})")
            self.spaces.pop(name)._close()

    # --- pages for spaces -------------------------------------------------------------------------------------------
    def _can_back(self, space: KVSpace, pages: int) -> bool:
        """Whether ``pages`` fresh pages of ``space`` could be mapped now (pool, reclaimable empties of other
        spaces, quota) -- no side effects."""
        if not space._within_quota(pages):
            return False
        reclaimable = sum(len(s._empty) * s.num_regions for s in self.spaces.values() if s is not space)
        if self.config.demote_on_allocate:
            reclaimable += sum(len(s._idle_pages()) * s.num_regions for s in self.spaces.values())
        return pages * space.num_regions <= self.pool.available() + reclaimable

    def _acquire(self, space: KVSpace, n: int, keep: set[int]) -> list[Any]:
        """``n`` handles for ``space``. When the pool is short: empty pages kept mapped by spaces are reclaimed
        (other spaces first), then idle pages are demoted synchronously if ``demote_on_allocate``. Raises
        OutOfPagesError and changes nothing if it is still short."""
        short = n - self.pool.available()
        reclaimable = sum(len(s._empty) * s.num_regions for s in self.spaces.values() if s is not space)
        reclaimable += sum(1 for p in space._empty if p not in keep) * space.num_regions
        if short > reclaimable and self.config.demote_on_allocate:
            demotable = sum(len(s._idle_pages()) * s.num_regions for s in self.spaces.values())
            if short <= reclaimable + demotable:  # demote only when that will be enough
                self.tiering.make_room(short - reclaimable, inline=True, avoid_space=space.name,
                                       avoid_pages=keep)
                short = n - self.pool.available()
        if short > reclaimable:
            if short <= reclaimable + self.tiering.gpu_handles_leaving():
                raise PagesInFlight(f"space {space.name!r}: waiting for pages on their way down")
            raise OutOfPagesError(
                f"space {space.name!r}: {n} page(s) wanted, the pool has {self.pool.available()} and "
                f"{reclaimable} more could be reclaimed (budget {self.pool.budget_pages} pages of "
                f"{self.page_size} bytes); free or offload sequences, or raise pool_budget")
        for other in sorted(self.spaces.values(), key=lambda s: (s is space, s.priority)):
            if short <= 0:
                break
            freed = other._reclaim(-(-short // other.num_regions), keep if other is space else set())
            short -= freed * other.num_regions
        return self.pool.take(n)

    def _retrying(self, call: Any, timeout: float = 30.0) -> Any:
        """Run ``call`` under the lock; while pages on their way down would make room, wait for them to land
        (the wait releases the lock, so the transfers can commit) and run it again from the start."""
        deadline = None
        with self._lock:
            while True:
                try:
                    return call()
                except PagesInFlight as exc:
                    import time
                    deadline = deadline or time.monotonic() + timeout
                    if time.monotonic() > deadline:
                        raise OutOfPagesError(f"{exc}: still short after {timeout:.0f} s") from None
                    self._changed.wait(0.05)

    def _release(self, handles: list[Any]) -> None:
        self.pool.give(handles)

    # --- lifecycle and stats --------------------------------------------------------------------------------------
    def _check_open(self, space: KVSpace | None = None) -> None:
        if self.closed:
            raise ClosedError("this TierManager is closed; create a new one")
        if space is not None and space.closed:
            raise ClosedError(f"space {space.name!r} was dropped; create it again")

    def drain(self) -> None:
        """Block until every transfer started so far has landed and been committed (failures are reported to
        whoever holds their handles)."""
        self.tiering.drain()

    def stats(self) -> dict[str, Any]:
        """A plain dict: per-space pages and bytes, mapping counts and times; the pool's books."""
        with self._lock:
            spaces = {name: s.stats() for name, s in self.spaces.items()}
            pool = self.pool
            return {
                "device": str(self.device), "backend": self.backend.name, "page_size": self.page_size,
                "pool": {"budget_pages": pool.budget_pages, "pages_free": pool.free_pages,
                         "pages_in_use": pool.in_use_pages, "bytes_in_use": pool.in_use_pages * self.page_size,
                         "peak_bytes_in_use": pool.peak_in_use * self.page_size,
                         "bytes_created": pool.created_pages * self.page_size,
                         "peak_bytes_created": pool.peak_created * self.page_size,
                         "creations": pool.creations, "releases": pool.releases,
                         "create_seconds": pool.create_seconds},
                "spaces": spaces,
                "tiers": self.tiering.stats(),
                "total": {key: sum(s[key] for s in spaces.values())
                          for key in ("pages_mapped", "bytes_mapped", "map_calls", "map_seconds", "unmap_calls",
                                      "unmap_seconds")},
            }

    def check(self) -> None:
        """Integrity check of every book: each space's, the pool's, and that they agree."""
        with self._lock:
            for space in self.spaces.values():
                space.check()
            self.pool.check()
            self.tiering.check()
            in_spaces = sum(len(s.pages.handles) * s.num_regions for s in self.spaces.values())
            assert in_spaces == self.pool.in_use_pages, (in_spaces, self.pool.in_use_pages)

    def close(self) -> None:
        """Drop every space and release every page. Tensors from ``space.kv`` must not be used afterwards."""
        with self._lock:
            if self.closed:
                return
        self.tiering.stop()  # without the lock: the worker commits what is in flight
        with self._lock:
            for name in list(self.spaces):
                self.spaces.pop(name)._close()
            self.tiering.close()
            self.pool.close()
            self.backend.close()
            self.closed = True

    def __enter__(self) -> "TierManager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; close() is the contract
        try:
            if not getattr(self, "closed", True):
                self.close()
        except Exception:  # noqa: BLE001
            pass
