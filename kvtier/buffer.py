"""A flat byte range of fixed address whose pages are mapped from the manager's pool while in use.

For an engine whose cache is one flat tensor with its own layout (transformers' continuous batching: sectors of
blocks over one ``uint8`` tensor), where a :class:`~kvtier.KVSpace`'s per-layer K/V geometry does not fit. The
engine says which byte spans it uses (``acquire``) and which it no longer does (``release``); a page is mapped
while any span on it is acquired and goes back to the pool once the last one is released and the work queued
on the given stream has finished. The tensor never moves, so kernels and CUDA graphs keep their pointers.

Freshly mapped pages are zeroed (the engines this serves start from ``torch.zeros`` and read a zeroed pad area).
``reserve_pages``: pages of the pool this buffer leaves to others -- e.g. the room its engine's preempted requests
are staged through on their way down.

Contract, as for the pool: ``missing(spans)`` and ``can_acquire(spans)`` have no side effects; ``acquire`` maps
every page the spans need or raises :class:`OutOfPagesError` having changed nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import torch

from kvtier.errors import InvalidArgumentError, OutOfPagesError
from kvtier.vmm.mapped_range import MappedRange

if TYPE_CHECKING:
    from kvtier.manager import TierManager

Span = tuple[int, int]  # [start, stop) in bytes


class ElasticBuffer:
    def __init__(self, manager: "TierManager", name: str, nbytes: int, priority: int = 0,
                 reserve_pages: int = 0, max_pages: int | None = None) -> None:
        self.name, self.priority = name, priority
        self._mgr = manager
        self.page_size = manager.page_size
        self.num_pages = -(-nbytes // self.page_size)
        self.nbytes = nbytes
        self.reserve_pages = reserve_pages
        self.max_pages = self.num_pages if max_pages is None else max_pages
        self.range = MappedRange(manager.backend, 1, self.num_pages, self.page_size,
                                 gate=manager.tiering.mapping)
        self.tensor = self.range.region(0, nbytes)  # uint8, never moves
        self._users = [0] * self.num_pages  # acquired spans touching each page
        self._empty: dict[int, Any] = {}  # mapped pages no span uses -> fence of their last readers
        self.peak_pages = 0

    # --- books -------------------------------------------------------------------------------------------------
    def pages(self, span: Span) -> range:
        start, stop = span
        if not 0 <= start < stop <= self.nbytes:
            raise InvalidArgumentError(f"buffer {self.name!r}: span {span} is outside [0, {self.nbytes})")
        return range(start // self.page_size, (stop - 1) // self.page_size + 1)

    @property
    def mapped_pages(self) -> int:
        return len(self.range.handles)

    def missing(self, spans: Iterable[Span]) -> int:
        """Pages that acquiring ``spans`` would map (no side effects)."""
        return len({p for span in spans for p in self.pages(span) if not self.range.is_mapped(p)})

    def available(self) -> int:
        """Fresh pages this buffer could map now: the pool's, less the reserve it leaves, within ``max_pages``."""
        self._trim()
        return max(0, min(self._mgr.pool.available() - self.reserve_pages, self.max_pages - self.mapped_pages))

    def can_acquire(self, spans: Iterable[Span]) -> bool:
        return self.missing(spans) <= self.available()

    # --- acquire / release -------------------------------------------------------------------------------------
    def acquire(self, spans: Iterable[Span]) -> None:
        spans = list(spans)
        with self._mgr.lock:
            self._mgr.check_open()
            new = sorted({p for span in spans for p in self.pages(span) if not self.range.is_mapped(p)})
            if new:
                if len(new) > self.available():
                    raise OutOfPagesError(
                        f"buffer {self.name!r}: {len(new)} page(s) wanted, {self.available()} may be mapped "
                        f"(pool {self._mgr.pool.available()} free, {self.reserve_pages} left to others, "
                        f"{self.mapped_pages}/{self.max_pages} mapped); free some of its spans or raise pool_budget")
                handles = self._mgr.pool.take(len(new))
                try:
                    self.range.map(new, handles)
                except BaseException:
                    self._mgr.give_pages(handles)
                    raise
                for p in new:
                    self.range.region_view(0, p).zero_()
            for span in spans:
                for p in self.pages(span):
                    self._users[p] += 1
                    self._empty.pop(p, None)
            self.peak_pages = max(self.peak_pages, self.mapped_pages)

    def release(self, spans: Iterable[Span], stream: Any = None) -> None:
        """Stop using ``spans``; pages no span uses go back once the work queued on ``stream`` (default: the
        current stream) has finished."""
        with self._mgr.lock:
            emptied = []
            for span in spans:
                for p in self.pages(span):
                    assert self._users[p] > 0, f"buffer {self.name!r}: page {p} released more than acquired"
                    self._users[p] -= 1
                    if self._users[p] == 0:
                        emptied.append(p)
            if emptied:
                fence = self._mgr.backend.record_fence(stream)
                for p in emptied:
                    self._empty[p] = fence
            self._trim()

    def _trim(self) -> None:
        """Unmap empty pages whose readers are done (never waits)."""
        done = [p for p, fence in self._empty.items() if fence is None or fence.query()]
        if done:
            for p in done:
                del self._empty[p]
            self._mgr.give_pages(self.range.unmap(done))

    # --- lifecycle -------------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        return {"bytes": self.nbytes, "pages_mapped": self.mapped_pages, "bytes_mapped":
                self.mapped_pages * self.page_size, "peak_bytes_mapped": self.peak_pages * self.page_size,
                "priority": self.priority, **self.range.stats()}

    def check(self) -> None:
        in_use = {p for p, n in enumerate(self._users) if n > 0}
        assert all(n >= 0 for n in self._users)
        assert set(self.range.handles) == in_use | set(self._empty), "mapped pages are neither used nor empty"
        assert not in_use & set(self._empty)

    def close(self) -> None:
        """Unmap every page (after the device is idle) and free the range. The engine must be done with it."""
        with self._mgr.lock:
            if self.range.handles:
                self._mgr.backend.synchronize()
                self._mgr.give_pages(self.range.unmap(list(self.range.handles)))
            self._empty.clear()
            self._users = [0] * self.num_pages
            self.range.close()
            self._mgr.buffers.pop(self.name, None)

    def __repr__(self) -> str:
        return (f"ElasticBuffer({self.name!r}, {self.nbytes} bytes, {self.mapped_pages}/{self.num_pages} pages "
                f"mapped)")

    @property
    def device(self) -> torch.device:
        return self.tensor.device
