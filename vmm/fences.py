"""Fences on CUDA streams: driver events kept in a pool and recorded again, for ``CudaBackend.record_fence``.

Why not a ``torch.cuda.Event`` each time: a free that empties a page records one, and its creation, record and
(when the page is taken again) destruction were a sixth of an alloc + free of one block -- recording 4.6 us
against 1.4 for a pooled driver event on the raw current stream; the pair 42.4 -> 36.0 us (H100,
``docs/experiments/alloc_variants.py`` at 7755088). A fence answers ``query``, ``synchronize`` and ``wait(stream)``
as a torch event does (``torch.cuda.Stream.wait_event`` calls ``event.wait(stream)``), so streams wait on it alike.

Its event goes back to the pool when the last holder lets go of the fence (empty pages share their free's one),
never while a holder could still ask it: an event recorded again would answer for the new point.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch

try:
    from cuda.bindings import driver as _drv
except ImportError:  # pragma: no cover - depends on the install
    _drv = None

# the current stream as its raw handle: no torch Stream object made (~1.5 us of a record); older builds lack it
_current_raw_stream: Callable[[int], int] | None = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def stream_handle(stream: Any, index: int) -> int:
    """The raw handle of a torch stream, or of device ``index``'s current stream when ``stream`` is None."""
    if stream is not None:
        return stream.cuda_stream
    if _current_raw_stream is not None:
        return _current_raw_stream(index)
    return torch.cuda.current_stream(index).cuda_stream


class EventPool:
    """Driver events of one context, made as needed (timing off) and reused; ``bind`` makes that context current
    on the calling thread, ``check(call, result)`` raises ``CudaError`` for a failed driver call (the backend's)."""

    def __init__(self, bind: Callable[[], None], index: int, check: Callable[[str, Any], Any]) -> None:
        self.bind, self.index, self.check = bind, index, check
        self._free: list[Any] = []
        self._lock = threading.Lock()
        self.closed = False
        self.made = 0

    def record(self, stream: Any = None) -> DriverFence:
        """A fence after the work queued so far on ``stream`` (a torch stream; default: the current one)."""
        self.bind()
        with self._lock:
            event = self._free.pop() if self._free else None
        if event is None:
            event = self.check("cuEventCreate", _drv.cuEventCreate(_drv.CUevent_flags.CU_EVENT_DISABLE_TIMING))
            self.made += 1
        try:
            self.check("cuEventRecord", _drv.cuEventRecord(event, stream_handle(stream, self.index)))
        except BaseException:
            self.give(event)
            raise
        return DriverFence(event, self)

    def give(self, event: Any) -> None:
        with self._lock:
            if not self.closed:
                self._free.append(event)
                return
        self._destroy([event])

    def close(self) -> None:
        """Destroy the pooled events; those of fences still held are destroyed as they are let go."""
        with self._lock:
            self.closed = True
            events, self._free = self._free, []
        self._destroy(events)

    def _destroy(self, events: list[Any]) -> None:
        try:
            self.bind()
            for event in events:
                _drv.cuEventDestroy(event)
        except Exception:  # noqa: BLE001 - a fence let go after the context went: nothing left to free
            pass


class DriverFence:
    """A point on a stream (``EventPool.record``)."""

    __slots__ = ("_event", "_pool")

    def __init__(self, event: Any, pool: EventPool) -> None:
        self._event, self._pool = event, pool

    def query(self) -> bool:
        """Whether the work before the fence has finished."""
        self._pool.bind()
        err = _drv.cuEventQuery(self._event)[0]
        if err == _drv.CUresult.CUDA_ERROR_NOT_READY:
            return False
        self._pool.check("cuEventQuery", err)
        return True

    def synchronize(self) -> None:
        """Wait on the host until the work before the fence has finished."""
        self._pool.bind()
        self._pool.check("cuEventSynchronize", _drv.cuEventSynchronize(self._event))

    def wait(self, stream: Any = None) -> None:
        """Make ``stream`` (default: the current one) wait on the device for the work before the fence."""
        self._pool.bind()
        handle = stream_handle(stream, self._pool.index)
        self._pool.check("cuStreamWaitEvent", _drv.cuStreamWaitEvent(handle, self._event, 0))

    def __del__(self) -> None:
        try:
            self._pool.give(self._event)
        except Exception:  # noqa: BLE001 - at interpreter exit the modules may be gone; so is the context
            pass
