"""The NVMe tier's routes: device pages to and from the disk, and the slots of each host-memory tier of the stack to
and from it. Every one is I/O run by the tiering worker (host steps), each pair's failure reported on its own.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable

import torch

from kvtier.tiering.state.tier import HostSlots, Tier, TierStack
from kvtier.tiering.engine.transfer import Work

if TYPE_CHECKING:
    from kvtier.tiering.engine.mover import Mover
    from kvtier.tiering.tiers.nvme import NvmeTier


def register(nvme: "NvmeTier", mover: "Mover", stack: TierStack) -> None:
    """GPU <-> ``nvme``, and ``nvme`` <-> every host-memory tier of ``stack``. Device pages going down are staged
    through slots lent by the nearest host-memory tier (see :func:`_from_gpu`)."""
    hosts = [t for t in stack if isinstance(t, HostSlots)]
    staging = hosts[0] if hosts else None
    mover.register(Tier.GPU, nvme.id, functools.partial(_from_gpu, nvme, staging, mover))
    mover.register(nvme.id, Tier.GPU, functools.partial(_to_gpu, nvme, mover))
    for host in hosts:
        mover.register(host.id, nvme.id, functools.partial(_from_host, nvme, host, mover))
        mover.register(nvme.id, host.id, functools.partial(_to_host, nvme, host, mover))


def _from_gpu(nvme: "NvmeTier", staging: HostSlots | None, mover: "Mover", pairs: list[tuple[Any, Any]], after: Any,
              tags: Any, on_done: Any, on_part: Any = None) -> Work:
    """Device pages to disk. Without GPUDirect Storage they are staged through free pinned host slots (lent for the
    transfer): a copy down at PCIe speed, then the write from pinned memory. Measured on an H100 (kvikio compat
    mode, ext4): kvikio's own bounce reached 0.56-0.66 of a raw O_DIRECT write; host -> NVMe from pinned slots
    0.92. The CPU backend stages too (its pages are memfd mappings; O_DIRECT from them ran at ~0.5 of a write from
    plain memory here), so the same route runs in CI."""
    if nvme.mode == "kvikio-gds" or staging is None:
        return mover.io([_op(nvme.write, slot, view) for view, slot in pairs], after, tags, on_done, gated=True)
    return Work(io=[lambda: _from_gpu_staged(nvme, staging, mover, pairs, after, tags, on_done)])


def _to_gpu(nvme: "NvmeTier", mover: "Mover", pairs: list[tuple[Any, Any]], after: Any, tags: Any,
            on_done: Any = None, on_part: Any = None) -> Work:
    return mover.io([_op(nvme.read, slot, view) for slot, view in pairs], after, tags)


def _op(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """``fn(*args)``, started later (one item of an I/O batch)."""
    return lambda: fn(*args)


def _from_gpu_staged(nvme: "NvmeTier", staging: HostSlots, mover: "Mover", pairs: list[tuple[Any, Any]],
                     after: Any, tags: Any, on_done: Any) -> None:
    """``DEPTH`` batches in flight, each copied down into its own lent slots, then written from them; the digest is
    taken of the device page, so the disk is checked against the GPU's bytes."""
    if after is not None:
        after.synchronize()
    depth = mover.DEPTH
    lent = mover.lend(staging, depth * mover.BATCH)
    if len(lent) < depth:  # the host tier is (nearly) full: straight from the device pages
        staging.books.give_lent(lent)
        ops = [_op(nvme.write, slot, view) for view, slot in pairs]
        mover.pipeline(lambda idx: mover.futures({i: ops[i] for i in idx}), len(ops), tags, on_done)
        return
    batch, rounds = len(lent) // depth, [0]

    def submit(indices: list[int]) -> Any:
        ring = lent[(rounds[0] % depth) * batch:][:batch]  # free again: batch - DEPTH has retired
        rounds[0] += 1
        views = [pairs[i][0] for i in indices]
        values = [nvme.digests.compute(v) for v in views]
        if mover.down is None:  # CPU backend: a memcpy, done when it returns
            for v, slot in zip(views, ring):
                staging.view(slot)[:v.numel()].copy_(v.view(-1))
        else:
            with torch.cuda.stream(mover.down):
                for v, slot in zip(views, ring):
                    staging.view(slot)[:v.numel()].copy_(v.view(-1), non_blocking=True)
                landed = torch.cuda.Event()
                landed.record(mover.down)
            landed.synchronize()
        return mover.futures({i: _op(nvme.write, pairs[i][1], staging.view(ring[k])[:views[k].numel()], values[k])
                              for k, i in enumerate(indices)})
    try:
        mover.pipeline(submit, len(pairs), tags, on_done, batch=batch)
    finally:
        staging.books.give_lent(lent)


def _from_host(nvme: "NvmeTier", host: HostSlots, mover: "Mover", pairs: list[tuple[Any, Any]], after: Any,
               tags: Any, on_done: Any, on_part: Any = None) -> Work:
    digests = host.digests  # with host checksums, bytes that went bad in host memory are not sealed below
    def write(h: int, n: int) -> Any:
        value = digests.verify(h, host.data(h), host.name) if digests is not None else None
        return nvme.write(n, host.data(h), value)
    return mover.io([_op(write, hs, ns) for hs, ns in pairs], tags=tags)


def _to_host(nvme: "NvmeTier", host: HostSlots, mover: "Mover", pairs: list[tuple[Any, Any]], after: Any,
             tags: Any, on_done: Any, on_part: Any = None) -> Work:
    digests = host.digests
    for ns, hs in pairs:
        host.hold(hs, nvme.held(ns))  # the slot below holds a page's live bytes: so will this one
        if digests is not None:
            digests.open(hs)
    def read(n: int, h: int) -> Any:
        then = functools.partial(digests.seal, h) if digests is not None else None
        return nvme.read(n, host.data(h), then)
    return mover.io([_op(read, ns, hs) for ns, hs in pairs], tags=tags)
