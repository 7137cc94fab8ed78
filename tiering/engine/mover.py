"""The mover: routes bytes between tiers by ``(source, destination)``, so a new tier adds routes
(``Mover.register``, called from its ``register_routes``), not branches. It owns what routes share: two device
streams, the gated batch pipeline for device-to-host traffic, I/O batches handed back as host steps for the
tiering worker, and the per-path counts. Each route reports its failures per page (``PairsFailed``).
"""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict, deque
from typing import Any, Callable, Iterable

import torch

from kvtier.tiering.state.tier import HostSlots, TierStack, is_lower
from kvtier.tiering.engine.transfer import PairsFailed, Route, Work


class Mover:
    """Moves bytes. Device copies run on two dedicated streams (one per direction, so both directions overlap);
    NVMe I/O is handed back as host steps.

    Device-to-host traffic (copies down, and kvikio's writes from device pages) is fed in batches by the worker,
    at most ``DEPTH`` batches in flight, and no new batch starts while someone is mapping pages (``gate``).
    Why: measured on an H100 (driver 580), mapping waits for every device-to-host copy in flight (but not for
    host-to-device or device-to-device copies, nor kernels): its ``cuMemSetAccess`` does -- ``cuMemMap`` itself
    takes ~2 us and waits for nothing; set-access ~25 us per 8 MiB handle idle, and with 1 GiB going down 64 of
    them took 20.7 ms -- so a 4 GiB demotion queued at once would stall an ``allocate`` or ``prefetch`` for
    ~80 ms. Fed this way the stall is a few batches (~5 ms), and pages are committed as their batches land
    instead of at the end (unmapping does not wait for copies in flight: a page's regions are unmapped as their
    own copies land, see ``MappedRange.unmap_regions``).
    """

    BATCH = 8   # copies (pages of one region) per batch: 64 MiB with 8 MiB pages
    DEPTH = 4   # 256 MiB in flight: a mapper waits ~5 ms at most; commits between batches do not drain it

    def __init__(self, device: torch.device, stack: TierStack, gate: Callable[[], None] = lambda: None,
                 lend: Callable[[HostSlots, int], list[int]] = lambda tier, n: []) -> None:
        """``gate()`` blocks while pages are being mapped; ``lend(tier, n)`` lends up to ``n`` free slots of a
        host-memory tier as a transfer's scratch space (given back with ``tier.books.give_lent``)."""
        self.device, self.stack, self.gate, self.lend = device, stack, gate, lend
        cuda = device.type == "cuda"
        self.down = torch.cuda.Stream(device) if cuda else None
        self.up = torch.cuda.Stream(device) if cuda else None
        self.routes: dict[tuple[int, int], Route] = {}
        for tier in stack:
            tier.register_routes(self, stack)
        self.paths: dict[str, dict[str, float]] = defaultdict(lambda: {"stripes": 0, "bytes": 0})
        self.down_in_flight = 0  # batches of device-to-host traffic submitted and not yet retired (all routes)
        self._counting = threading.Lock()

    def _moved(self, src: int, a: Any, b: Any) -> int:
        """Bytes a pair moves: the source view's, or what the source slot holds (at most the destination's)."""
        if isinstance(a, torch.Tensor) or not is_lower(src):
            return a.numel() * a.element_size()
        held = self.stack[src].held(a)
        return min(held, b.numel() * b.element_size()) if isinstance(b, torch.Tensor) else held

    def _count_down(self, delta: int) -> None:
        with self._counting:
            self.down_in_flight += delta

    def register(self, src: int, dst: int, route: Route) -> None:
        """Serve copies from ``src`` to ``dst`` with ``route(pairs, after, tags, on_done, on_part) -> Work``."""
        self.routes[(src, dst)] = route

    def has_route(self, src: int, dst: int) -> bool:
        return (src, dst) in self.routes

    def start(self, src: int, dst: int, pairs: list[tuple[Any, Any]], after: Any = None,
              tags: list[Any] | None = None, on_done: Callable[[Any], None] | None = None,
              label: str | None = None, pages: int | None = None,
              on_part: Callable[[Any, list[int]], None] | None = None) -> Work:
        """Start moving ``pairs`` of (source, destination) buffers: device views (torch tensors) or slot ids.
        ``tags[i]`` names the page pair ``i`` belongs to; routes that finish pages progressively call
        ``on_done(tag)`` once every pair of a tag has landed, and (GPU -> host) ``on_part(tag, indices)`` when some
        of a tag's pairs have landed and others are still to come. ``label``: the path's name in the stats;
        ``pages``: the pages it counts there (default: one per tag; a page moved in several calls counts once)."""
        path = self.paths[label or f"{self.stack.label(src)}->{self.stack.label(dst)}"]
        path["stripes"] += pages if pages is not None else len(set(tags)) if tags else 1
        path["bytes"] += sum(self._moved(src, a, b) for a, b in pairs)
        return self.routes[(src, dst)](pairs, after, tags, on_done, on_part)

    @staticmethod
    def copy_on(stream: Any, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Device-to-device copies of (source, destination) views enqueued on ``stream`` (default: current); a
        destination shorter than its source takes the source's first bytes."""
        if not pairs:
            return
        cuda = pairs[0][1].is_cuda
        with torch.cuda.stream(stream) if cuda and stream is not None else contextlib.nullcontext():
            for src, dst in pairs:
                dst.copy_(src[:dst.numel()], non_blocking=cuda)

    def pipeline(self, submit: Callable[[list[int]], Any], n: int, tags: list[Any] | None,
                  on_done: Callable[[Any], None] | None, landed: Callable[[list[int]], None] | None = None,
                  batch: int | None = None, on_part: Callable[[Any, list[int]], None] | None = None) -> None:
        """Submit ``n`` items in gated batches, ``DEPTH`` in flight; ``submit(indices)`` returns something whose
        ``synchronize()`` returns the failed indices ({index: error}); ``landed(indices)`` runs on each batch's
        items that succeeded, then each tag is reported done when its last item has landed and none failed, and
        ``on_part(tag, indices)`` gets a batch's items of a tag with more items still to come. Raises
        :class:`PairsFailed` at the end if any item failed."""
        tags = tags if tags is not None else list(range(n))
        last = {tag: i for i, tag in enumerate(tags)}
        failed: dict[Any, BaseException] = {}
        inflight: deque[tuple[Any, list[int]]] = deque()

        def retire() -> None:
            waiter, indices = inflight.popleft()
            try:
                errors = waiter.synchronize() or {}
            finally:
                self._count_down(-1)  # landed (or failed): no longer in flight
            for i, exc in errors.items():
                failed.setdefault(tags[i], exc)
            good = [i for i in indices if i not in errors]
            if landed is not None and good:
                try:
                    landed(good)
                except Exception as exc:  # noqa: BLE001 - those pages failed
                    for i in good:
                        failed.setdefault(tags[i], exc)
            parts: dict[Any, list[int]] = {}
            for i in good:
                if tags[i] in failed:
                    continue
                if last[tags[i]] == i:
                    parts.pop(tags[i], None)  # its last item: the tag is done, the whole of it
                    if on_done is not None:
                        on_done(tags[i])
                elif on_part is not None:
                    parts.setdefault(tags[i], []).append(i)
            for tag, indices in parts.items():
                on_part(tag, indices)  # type: ignore[misc]

        batch = batch or self.BATCH
        try:
            for first in range(0, n, batch):
                while len(inflight) >= self.DEPTH:
                    retire()
                self.gate()
                indices = list(range(first, min(first + batch, n)))
                self._count_down(1)  # in flight from its submission (the CPU backend copies inside submit)
                try:
                    inflight.append((submit(indices), indices))
                except BaseException:
                    self._count_down(-1)
                    raise
            while inflight:
                retire()
        finally:
            self._count_down(-len(inflight))  # batches left behind by an error are no longer watched
        if failed:
            raise PairsFailed(failed)

    def copies_down(self, copies: list[tuple[int, int, int]], copy: Callable[..., None], after: Any, tags: Any,
                    on_done: Any, landed: Callable[[list[int]], None] | None = None, on_part: Any = None,
                    started: Callable[[list[int]], None] | None = None) -> Work:
        """Copies ``(dst, src, nbytes)`` that leave the GPU's pages, by ``copy(dst, src, nbytes, stream)`` (a
        backend's ``copy_async``) on the stream down after ``after``, fed in gated batches (:meth:`pipeline`) by
        the worker; each batch reported as it lands (``landed``, then ``on_part``/``on_done``), and to
        ``started(indices)`` once its copies are enqueued. On the CPU backend each copy is done when ``copy``
        returns."""
        stream = self.down

        def submit(indices: list[int]) -> Any:
            waiter = _submit(indices)
            if started is not None:
                started(indices)
            return waiter

        def _submit(indices: list[int]) -> Any:
            if stream is None:
                for i in indices:
                    copy(*copies[i])
                return _Landed()
            with torch.cuda.stream(stream):
                if indices[0] == 0 and after is not None:
                    stream.wait_event(after)  # never copy a page the engine's kernels are still writing
                for i in indices:
                    copy(*copies[i], stream)
                event = torch.cuda.Event()
                event.record(stream)
            return event
        return Work(io=[lambda: self.pipeline(submit, len(copies), tags, on_done, landed, on_part=on_part)])

    def copies_up(self, copies: Iterable[tuple[int, int, int] | None], copy: Callable[..., None],
                  after: Any) -> Work:
        """Copies ``(dst, src, nbytes)`` into the GPU's pages, enqueued now on the stream up after ``after`` (they
        hold up no mapping); one event covers them all. ``copies`` is consumed as they are enqueued (a route may
        check each source just before its copy); ``None`` items are skipped."""
        up = self.up
        with torch.cuda.stream(up) if up is not None else contextlib.nullcontext():
            if up is not None and after is not None:
                up.wait_event(after)  # the destination may still be read by the engine's kernels
            for item in copies:
                if item is not None:
                    copy(*item, up)
            if up is None:
                return Work()
            event = torch.cuda.Event()
            event.record(up)
        return Work(event=event)

    def futures(self, ops: dict[int, Callable[[], Any]]) -> "_Futures":
        """A batch of I/O started now (``ops[i]()`` starts item ``i`` and returns its future), for a
        :meth:`pipeline`'s ``submit``."""
        return _Futures(ops)

    def io(self, ops: list[Callable[[], Any]], after: Any = None, tags: Any = None, on_done: Any = None,
           gated: bool = False) -> Work:
        """Host steps running ``ops`` (each starts one slot's I/O and returns its future); a pair whose op or
        future fails is reported in :class:`PairsFailed`, the others land. ``gated``: reads from device pages,
        device-to-host traffic fed like the copies down."""
        def run() -> None:
            if after is not None:
                after.synchronize()  # the kernels that wrote the page are done before the disk reads it
            if gated:
                self.pipeline(lambda idx: _Futures({i: ops[i] for i in idx}), len(ops), tags, on_done)
                return
            batch = _Futures({i: op for i, op in enumerate(ops)})  # all submitted first: they run in parallel
            errors = batch.synchronize()
            if errors:
                raise PairsFailed({(tags[i] if tags is not None else i): exc for i, exc in errors.items()})
        return Work(io=[run])


class _Landed:
    """A batch of copies done when submitted (the CPU backend's): nothing failed."""

    def synchronize(self) -> dict[int, BaseException]:
        return {}


class _Futures:
    """A batch of I/O started together (``ops[i]()`` starts item ``i`` and returns its future); ``synchronize``
    waits for all of them and returns the failed items' errors, by index."""

    def __init__(self, ops: dict[int, Callable[[], Any]]) -> None:
        self.futures: dict[int, Any] = {}
        self.errors: dict[int, BaseException] = {}
        for i, op in ops.items():
            try:
                self.futures[i] = op()
            except Exception as exc:  # noqa: BLE001 - this item failed to start; the others run
                self.errors[i] = exc

    def synchronize(self) -> dict[int, BaseException]:
        for i, f in self.futures.items():
            try:
                f.result()
            except Exception as exc:  # noqa: BLE001
                self.errors[i] = exc
        return self.errors
