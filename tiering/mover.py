"""The mover: routes bytes between tiers by ``(source tier, destination tier)``, so a new tier adds handlers
(``Mover.register``), not branches. Device copies run on two dedicated streams; NVMe I/O is handed back as host
steps for the tiering worker; each route reports its failures per page (``PairsFailed``).
"""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict, deque
from typing import TYPE_CHECKING, Any, Callable

import torch

from kvtier.tiering.tier import Tier
from kvtier.tiering.transfer import PairsFailed, Route, Work

if TYPE_CHECKING:
    from kvtier.tiering.host import HostTier
    from kvtier.tiering.nvme import NvmeTier


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

    def __init__(self, device: torch.device, host: "HostTier", nvme: "NvmeTier",
                 gate: Callable[[], None] = lambda: None,
                 lend: Callable[[int], list[int]] = lambda n: []) -> None:
        self.device, self.host, self.nvme, self.gate, self.lend = device, host, nvme, gate, lend
        cuda = device.type == "cuda"
        self.down = torch.cuda.Stream(device) if cuda else None
        self.up = torch.cuda.Stream(device) if cuda else None
        self.routes: dict[tuple[Tier, Tier], Route] = {}
        G, H, N = Tier.GPU, Tier.HOST, Tier.NVME
        for src, dst, route in ((G, H, self._gpu_host), (H, G, self._host_gpu), (G, N, self._gpu_nvme),
                                (N, G, self._nvme_gpu), (H, N, self._host_nvme), (N, H, self._nvme_host)):
            self.register(src, dst, route)
        self.paths: dict[str, dict[str, float]] = defaultdict(lambda: {"stripes": 0, "bytes": 0})
        self.down_in_flight = 0  # batches of device-to-host traffic submitted and not yet retired (all routes)
        self._counting = threading.Lock()

    def _moved(self, src: Tier, a: Any, b: Any) -> int:
        """Bytes a pair moves: the source view's, or what the source slot holds (at most the destination's)."""
        if isinstance(a, torch.Tensor):
            return a.numel() * a.element_size()
        held = (self.host if src == Tier.HOST else self.nvme).held(a)
        return min(held, b.numel() * b.element_size()) if isinstance(b, torch.Tensor) else held

    def _count_down(self, delta: int) -> None:
        with self._counting:
            self.down_in_flight += delta

    def register(self, src: Tier, dst: Tier, route: Route) -> None:
        """Serve copies from ``src`` to ``dst`` with ``route(pairs, after, tags, on_done, on_part) -> Work``."""
        self.routes[(src, dst)] = route

    def start(self, src: Tier, dst: Tier, pairs: list[tuple[Any, Any]], after: Any = None,
              tags: list[Any] | None = None, on_done: Callable[[Any], None] | None = None,
              label: str | None = None, pages: int | None = None,
              on_part: Callable[[Any, list[int]], None] | None = None) -> Work:
        """Start moving ``pairs`` of (source, destination) buffers: device views (torch tensors) or slot ids.
        ``tags[i]`` names the page pair ``i`` belongs to; routes that finish pages progressively call
        ``on_done(tag)`` once every pair of a tag has landed, and (GPU -> host) ``on_part(tag, indices)`` when some
        of a tag's pairs have landed and others are still to come. ``label``: the path's name in the stats;
        ``pages``: the pages it counts there (default: one per tag; a page moved in several calls counts once)."""
        path = self.paths[label or f"{src.label}->{dst.label}"]
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

    def _pipeline(self, submit: Callable[[list[int]], Any], n: int, tags: list[Any] | None,
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

    def _gpu_host(self, pairs: list[tuple[Any, Any]], after: Any, tags: Any, on_done: Any,
                  on_part: Any = None) -> Work:
        stream, backend = self.down, self.host.backend
        copies = [(self.host.address(slot), view.data_ptr(), view.numel()) for view, slot in pairs]
        for view, slot in pairs:  # a page's live bytes: the slot holds that prefix
            self.host.hold(slot, view.numel())
        digests = self.host.digests
        landed = None
        if digests is not None:  # host checksums: taken of the bytes as they landed
            for _, slot in pairs:
                digests.open(slot)
            landed = lambda idx: [digests.seal(pairs[i][1], digests.compute(self.host.data(pairs[i][1]))) for i in idx]

        def submit(indices: list[int]) -> Any:
            if stream is None:  # CPU backend: plain memcpy, done when it returns
                for i in indices:
                    backend.copy_async(*copies[i])
                return _Done()
            with torch.cuda.stream(stream):
                if indices[0] == 0 and after is not None:
                    stream.wait_event(after)  # never copy a page the engine's kernels are still writing
                for i in indices:
                    backend.copy_async(*copies[i], stream)
                event = torch.cuda.Event()
                event.record(stream)
            return event

        return Work(io=[lambda: self._pipeline(submit, len(copies), tags, on_done, landed, on_part=on_part)])

    def _host_gpu(self, pairs: list[tuple[Any, Any]], after: Any, tags: Any, on_done: Any,
                  on_part: Any = None) -> Work:
        """Enqueued at once (host-to-device copies do not hold up mapping); the event covers them all. What the
        slot holds lands at the start of the view (a view shorter than that takes its first bytes). With host
        checksums each slot is verified on the host
        just before its copy is enqueued (so the copies run while the next slots are checked); a page that
        fails is copied no further, and an I/O step reports it."""
        failed: dict[Any, BaseException] = {}
        cuda, backend = self.up is not None, self.host.backend
        with torch.cuda.stream(self.up) if cuda else contextlib.nullcontext():
            if cuda and after is not None:
                self.up.wait_event(after)  # the destination may still be read by the engine's kernels
            for i, (slot, view) in enumerate(pairs):
                tag = tags[i] if tags is not None else i
                if tag in failed or self._bad_host_slot(slot, tag, failed):
                    continue
                backend.copy_async(view.data_ptr(), self.host.address(slot), min(view.numel(), self.host.held(slot)),
                                   self.up)
            event = None
            if cuda:
                event = torch.cuda.Event()
                event.record(self.up)
        return Work(event=event, io=[lambda: _raise(PairsFailed(failed))] if failed else [])

    def _bad_host_slot(self, slot: int, tag: Any, failed: dict[Any, BaseException]) -> bool:
        """With host checksums: whether the slot's bytes changed at rest (then ``failed[tag]`` says so)."""
        if self.host.digests is None:
            return False
        try:
            self.host.digests.verify(slot, self.host.data(slot), "host")
            return False
        except OSError as exc:
            failed[tag] = exc
            return True

    def _io(self, ops: list[Callable[[], Any]], after: Any = None, tags: Any = None, on_done: Any = None,
            gated: bool = False) -> Work:
        """Host steps running ``ops`` (each starts one slot's I/O and returns its future); a pair whose op or
        future fails is reported in :class:`PairsFailed`, the others land."""
        def run() -> None:
            if after is not None:
                after.synchronize()  # the kernels that wrote the page are done before the disk reads it
            if gated:  # reads from device pages: device-to-host traffic, fed like the copies down
                self._pipeline(lambda idx: _Futures({i: ops[i] for i in idx}), len(ops), tags, on_done)
                return
            batch = _Futures({i: op for i, op in enumerate(ops)})  # all submitted first: they run in parallel
            errors = batch.synchronize()
            if errors:
                raise PairsFailed({(tags[i] if tags is not None else i): exc for i, exc in errors.items()})
        return Work(io=[run])

    def _gpu_nvme(self, pairs: list[tuple[Any, Any]], after: Any, tags: Any, on_done: Any,
                  on_part: Any = None) -> Work:
        """Device pages to disk. Without GPUDirect Storage they are staged through free pinned host slots (lent
        for the transfer): a copy down at PCIe speed, then the write from pinned memory. Measured on an H100
        (kvikio compat mode, ext4): kvikio's own bounce reached 0.56-0.66 of a raw O_DIRECT write; host -> NVMe
        from pinned slots 0.92. The CPU backend stages too (its pages are memfd mappings; O_DIRECT from them ran at
        ~0.5 of a write from plain memory here), so the same route runs in CI."""
        if self.nvme.mode != "kvikio-gds":
            return Work(io=[lambda: self._gpu_nvme_staged(pairs, after, tags, on_done)])
        ops = [lambda v=view, s=slot: self.nvme.write(s, v) for view, slot in pairs]
        return self._io(ops, after, tags, on_done, gated=True)

    def _gpu_nvme_staged(self, pairs: list[tuple[Any, Any]], after: Any, tags: Any, on_done: Any) -> None:
        """``DEPTH`` batches in flight, each copied down into its own lent slots, then written from them; the
        digest is taken of the device page, so the disk is checked against the GPU's bytes."""
        if after is not None:
            after.synchronize()
        lent = self.lend(self.DEPTH * self.BATCH)
        if len(lent) < self.DEPTH:  # the host tier is (nearly) full: straight from the device pages
            self.host.books.give_lent(lent)
            ops = [lambda v=view, s=slot: self.nvme.write(s, v) for view, slot in pairs]
            self._pipeline(lambda idx: _Futures({i: ops[i] for i in idx}), len(ops), tags, on_done)
            return
        batch, rounds = len(lent) // self.DEPTH, [0]

        def submit(indices: list[int]) -> Any:
            ring = lent[(rounds[0] % self.DEPTH) * batch:][:batch]  # free again: batch - DEPTH has retired
            rounds[0] += 1
            views = [pairs[i][0] for i in indices]
            values = [self.nvme.digests.compute(v) for v in views]
            if self.down is None:  # CPU backend: a memcpy, done when it returns
                for v, slot in zip(views, ring):
                    self.host.view(slot)[:v.numel()].copy_(v.view(-1))
            else:
                with torch.cuda.stream(self.down):
                    for v, slot in zip(views, ring):
                        self.host.view(slot)[:v.numel()].copy_(v.view(-1), non_blocking=True)
                    landed = torch.cuda.Event()
                    landed.record(self.down)
                landed.synchronize()
            return _Futures({i: (lambda i=i, k=k: self.nvme.write(pairs[i][1],
                                                                  self.host.view(ring[k])[:views[k].numel()],
                                                                  values[k]))
                             for k, i in enumerate(indices)})
        try:
            self._pipeline(submit, len(pairs), tags, on_done, batch=batch)
        finally:
            self.host.books.give_lent(lent)

    def _nvme_gpu(self, pairs: list[tuple[Any, Any]], after: Any, tags: Any, on_done: Any,
                  on_part: Any = None) -> Work:
        return self._io([lambda v=view, s=slot: self.nvme.read(s, v) for slot, view in pairs], after, tags)

    def _host_nvme(self, pairs: list[tuple[Any, Any]], after: Any, tags: Any, on_done: Any,
                   on_part: Any = None) -> Work:
        digests = self.host.digests  # with host checksums, bytes that went bad in host memory are not sealed below
        verified = (lambda h: digests.verify(h, self.host.data(h), "host")) if digests else (lambda h: None)
        return self._io([lambda h=hs, n=ns: self.nvme.write(n, self.host.data(h), verified(h)) for hs, ns in pairs],
                        tags=tags)

    def _nvme_host(self, pairs: list[tuple[Any, Any]], after: Any, tags: Any, on_done: Any,
                   on_part: Any = None) -> Work:
        digests = self.host.digests
        for ns, hs in pairs:
            self.host.hold(hs, self.nvme.held(ns))  # the slot below holds a page's live bytes: so will this one
            if digests is not None:
                digests.open(hs)
        seal = (lambda h: (lambda value: digests.seal(h, value))) if digests is not None else (lambda h: None)
        return self._io([lambda n=ns, h=hs: self.nvme.read(n, self.host.data(h), seal(h)) for ns, hs in pairs],
                        tags=tags)


def _raise(exc: BaseException) -> None:
    raise exc


class _Done:
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
