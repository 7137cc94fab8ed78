"""Page checksums: what a lower tier keeps per slot so that bytes it hands back are known to be the ones given.

The digest must be computable where the bytes are -- on the GPU for kvikio's direct reads and writes of device
pages, on the host for the cascade and for staging -- and give the same value on both, so it is plain integer
arithmetic torch runs on any device: the slot's bytes as rows of 4 KiB (512 64-bit words), the sum of each row
and of each column (mod 2^64), each folded with its position. A changed, zeroed, shifted, swapped or torn 4 KiB
block changes it; it guards against what disks and stray writes do, not against someone forging a collision.

Cost, measured (``kvtier bench tiers``, H100 at eaa0d2a): 89 GB/s on the GPU (two reductions and a 20 KB copy of
the sums to the host: ~90 us an 8 MiB page, mostly launches and the sync), 24 GB/s on that machine's CPU; a hash
such as xxhash would have needed the bytes on the host.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from typing import Any, Iterator

import numpy as np
import torch

from kvtier.vmm.cuda import device_address
from kvtier.vmm.tensor import tensor_over

log = logging.getLogger(__name__)

ROW = 4096  # bytes per row: the digest covers whole rows (every slot is a multiple of it)
WORDS = ROW // 8

_streams: dict[tuple[torch.device, str], torch.cuda.Stream] = {}
_streams_lock = threading.Lock()


class ChecksumMismatch(OSError):
    """Bytes read back from a tier do not match the digest taken when they were written: the data is corrupt."""


def digest(buf: torch.Tensor) -> tuple[int, int]:
    """The digest of ``buf`` (contiguous bytes, a multiple of 4 KiB, 8-byte aligned) on its own device. On the
    GPU it runs on a side stream: the caller must know the bytes have landed (a synchronized event, a finished
    read), and it waits for its result."""
    words = _words(buf)
    if buf.is_cuda:
        with torch.cuda.stream(side_stream(buf.device)):
            sums = torch.cat((words.sum(1), words.sum(0))).cpu()  # the copy to the host waits for the sums
    else:
        sums = torch.cat((words.sum(1), _column_sums(words)))
    return _fold(sums.numpy().view(np.uint64), words.shape[0])


def digest_of_rows(rows: torch.Tensor) -> torch.Tensor:
    """The digest of the bytes of ``rows`` read row after row -- ``[n, length]`` bytes, each row contiguous and a
    multiple of 4 KiB, 8-byte aligned, the rows anywhere (a space's regions: ``block_rows``) -- as two int64 words
    on their device (``.numpy().view(np.uint64)`` of them on the host is what :func:`digest` gives for those bytes
    one after another), queued on the current stream, not waited for. What a remote object's payload copied
    straight into a run of blocks is checked with, where it landed."""
    n, length = rows.shape
    if length % ROW or rows.stride(1) != 1 or rows.data_ptr() % 8 or rows.stride(0) % 8:
        raise ValueError(f"a digest of rows needs rows of whole {ROW}-byte rows, each contiguous and 8-byte aligned; "
                         f"got {tuple(rows.shape)} with strides {rows.stride()} at {rows.data_ptr():#x}")
    words = rows.view(torch.int64).view(n, length // ROW, WORDS)
    count = n * (length // ROW)
    weights = _weights(rows.device, max(count, WORDS))  # int64 products and sums wrap: mod 2^64, as _fold
    return torch.stack(((words.sum(2).reshape(-1) * weights[:count]).sum(),
                        (words.sum(1).sum(0) * weights[:WORDS]).sum()))  # sum((0, 1)): 69 ms, not 6, a 128 MiB on a CPU


class PendingDigests:
    """The digests of several buffers, under way (see :func:`digests_of`): ``read`` once the buffers may change,
    ``values`` when the digests are needed."""

    def __init__(self, folded: torch.Tensor, event: Any = None, reduced: Any = None,
                 order: list[int] | None = None) -> None:
        """``order``: the buffers' indices in the order ``folded`` has their digests (None: as given)."""
        self._folded, self._event, self._reduced, self._order = folded, event, reduced, order
        self._values: list[tuple[int, int]] | None = None

    def read(self) -> None:
        """Wait until the buffers have been read (their sums taken): after it they may change or be unmapped.
        Their values may still be on their way to the host."""
        if self._reduced is not None:
            self._reduced.synchronize()

    def ready(self) -> bool:
        """Whether :meth:`values` would not wait."""
        return self._values is not None or self._event is None or bool(self._event.query())

    def values(self) -> list[tuple[int, int]]:
        """One digest per buffer, in order (waits for them once)."""
        if self._values is None:
            self._values = [(a, b) for a, b in self.array().tolist()]
        return self._values

    def array(self) -> np.ndarray:
        """The digests as a ``[buffers, 2]`` uint64 array (waits for them)."""
        if self._event is not None:
            self._event.synchronize()
        folded = self._folded.numpy().view(np.uint64)
        if self._order is None:
            return folded
        out = np.empty_like(folded)
        out[self._order] = folded
        return out


def _words(buf: torch.Tensor) -> torch.Tensor:
    nbytes = buf.numel() * buf.element_size()
    if nbytes % ROW or buf.data_ptr() % 8 or not buf.is_contiguous():
        raise ValueError(f"a digest needs contiguous, 8-byte aligned whole rows of {ROW} bytes; got {nbytes} bytes "
                         f"at {buf.data_ptr():#x}")
    return buf.view(torch.uint8).view(torch.int64).view(-1, WORDS)


def _column_sums(words: torch.Tensor) -> torch.Tensor:
    """The sums of ``words`` (``[..., rows, WORDS]``) over its rows. On a CPU the rows are summed in 64 pieces
    first, then the pieces: torch reduces the outer dimension of a 128 MiB ``[rows, 512]`` int64 tensor in 7.2 ms on
    the CPU machine's 2 cores, in 4.5 ms this way (the whole host digest: 11.8 -> 10.0 ms)."""
    rows = words.shape[-2]
    if words.is_cuda or rows % 64 or rows < 128:
        return words.sum(-2)
    return words.view(*words.shape[:-2], 64, rows // 64, WORDS).sum(-2).sum(-2)


def _runs(bufs: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, int]]:
    """``bufs`` as 3-d word tensors, (buffers, rows, words): a run of buffers of one length, one storage and one
    address step -- the regions of one page, side by side in a space's range -- is one strided tensor, so that
    its sums take two reductions, not two a buffer."""
    i = 0
    while i < len(bufs):
        first = _words(bufs[i])  # checked once: the rest of a run has its length, dtype and alignment
        numel, dtype, storage = bufs[i].numel(), bufs[i].dtype, bufs[i].untyped_storage().data_ptr()
        j, step = i + 1, 0
        while j < len(bufs) and bufs[j].numel() == numel and bufs[j].dtype == dtype and bufs[j].is_contiguous():
            gap = bufs[j].data_ptr() - bufs[j - 1].data_ptr()
            if gap <= 0 or gap % 8 or (step and gap != step) or bufs[j].untyped_storage().data_ptr() != storage:
                break
            step, j = gap, j + 1
        rows = first.shape[0]
        run = first.as_strided((j - i, rows, WORDS), (step // 8, WORDS, 1)) if j > i + 1 else first.view(1, rows, WORDS)
        yield run, j - i
        i = j


def digests_of(bufs: list[torch.Tensor], after: Any = None, lane: str = "") -> PendingDigests:
    """The digests of ``bufs`` (as :func:`digest` takes each), started now where they are: on the GPU on the side
    stream once ``after`` (an event: the bytes are there and stay until the results are waited for), folded there
    too (two words a buffer come back, to pinned host memory); ``values()`` waits for them. H200, a 1024-token
    Llama-3-8B sequence down and up: checks added 10.4 ms with the sums folded on the host (721501f; the fold
    alone 2 ms), 6.5 ms folded here (ddf0c00). ``lane``:
    a side stream of its own (the copies down and the copies up each have one: on one stream, digests of pages
    going down queued behind those waiting for copies coming up, and both directions at once ran at 0.90x one
    way, ddf0c00 on the H200)."""
    if not bufs:
        return PendingDigests(torch.zeros((0, 2), dtype=torch.int64))
    # by address, so that runs form (_runs): a read lists its pages region after region within each page, and
    # taken in that order every buffer was a run of its own -- 64 runs and ~450 launches a streamed layer's read
    # of 1 GiB; a 65k-token decode step streaming 16 GiB took 389-393 ms with checks, 370 ms in address order,
    # 322 without (H100, 4aa1f8c and 8b92b9d, docs/experiments/streamed_checks.py)
    order: list[int] | None = sorted(range(len(bufs)), key=lambda i: bufs[i].data_ptr())
    if order == list(range(len(bufs))):
        order = None
    else:
        bufs = [bufs[i] for i in order]  # type: ignore[union-attr]
    cuda = bufs[0].is_cuda
    parts = []
    with torch.cuda.stream(side_stream(bufs[0].device, lane)) if cuda else contextlib.nullcontext():
        if cuda and after is not None:
            torch.cuda.current_stream(bufs[0].device).wait_event(after)
        for words, _ in _runs(bufs):
            rows = words.shape[1]
            weights = _weights(words.device, max(rows, WORDS))  # int64 products and sums wrap: mod 2^64, as _fold
            parts.append(torch.stack(((words.sum(2) * weights[:rows]).sum(1),
                                      (_column_sums(words) * weights[:WORDS]).sum(1)), dim=1))
        folded = torch.cat(parts) if len(parts) > 1 else parts[0]
        if not cuda:
            return PendingDigests(folded, order=order)
        reduced = torch.cuda.Event()
        reduced.record()
        host = _to_host(folded)
        event = torch.cuda.Event()
        event.record()
        _keep_until(event, host)
    return PendingDigests(host, event, reduced, order)


_mapped_ok: dict[torch.device, bool] = {}
_kept: deque[tuple[Any, torch.Tensor]] = deque()  # pinned results a kernel may still write: kept until it is done
_kept_lock = threading.Lock()


def _to_host(folded: torch.Tensor) -> torch.Tensor:
    """``folded`` (int64 on the GPU) into pinned host memory, on the current stream: written by a kernel through
    the memory's device address (the GPU's stores cross PCIe; no copy engine), so that the result does not queue
    behind page copies -- a copy of it did, behind every copy enqueued before it on the same engine. Where the
    driver gives no device address for the memory, or the first write does not arrive, a copy."""
    host = torch.empty(folded.shape, dtype=folded.dtype, pin_memory=True)
    address = device_address(host.data_ptr()) if _mapped_ok.get(folded.device, True) else None
    if address is not None:
        try:
            view = tensor_over(address, host.numel() * 8, folded.device).view(torch.int64).view(host.shape)
            torch.bitwise_or(folded, 0, out=view)
            if folded.device not in _mapped_ok:  # the first time: the bytes must arrive, else copy from now on
                torch.cuda.current_stream(folded.device).synchronize()
                _mapped_ok[folded.device] = torch.equal(host, folded.cpu())
                if not _mapped_ok[folded.device]:
                    log.warning("digests: %s cannot write pinned host memory; copying the sums", folded.device)
            if _mapped_ok[folded.device]:
                return host
        except (RuntimeError, ValueError) as exc:
            _mapped_ok[folded.device] = False
            log.warning("digests: %s cannot write pinned host memory (%s); copying the sums", folded.device, exc)
    host.copy_(folded, non_blocking=True)
    return host


def _keep_until(event: Any, host: torch.Tensor) -> None:
    """Hold ``host`` until ``event`` (after the kernel writing it) is done: torch's pinned-memory cache knows of
    copies it made, not of a kernel writing the memory through another tensor."""
    with _kept_lock:
        while _kept and _kept[0][0].query():
            _kept.popleft()
        _kept.append((event, host))


_weight_cache: dict[tuple[torch.device, int], torch.Tensor] = {}


def _weights(device: torch.device, n: int) -> torch.Tensor:
    """1 .. n as int64 on ``device`` (made once)."""
    w = _weight_cache.get((device, n))
    if w is None:
        w = _weight_cache[(device, n)] = torch.arange(1, n + 1, dtype=torch.int64, device=device)
    return w


def _fold(sums: np.ndarray, rows: int) -> tuple[int, int]:
    weights = np.arange(1, max(rows, WORDS) + 1, dtype=np.uint64)
    return int((sums[:rows] * weights[:rows]).sum()), int((sums[rows:] * weights[:WORDS]).sum())  # wraps: mod 2^64


def side_stream(device: torch.device, lane: str = "") -> torch.cuda.Stream:
    with _streams_lock:  # several I/O threads may digest at once
        if (device, lane) not in _streams:
            _streams[(device, lane)] = torch.cuda.Stream(device)
        return _streams[(device, lane)]


class Digests:
    """The digest of each slot of a tier, set once the slot's bytes are written and cleared before they change.
    A slot read back without one (never written, or its write failed) is treated as corrupt."""

    def __init__(self, slots: int) -> None:
        self._values = np.zeros((slots, 2), dtype=np.uint64)
        self._sealed = np.zeros(slots, dtype=bool)
        self._later: dict[int, tuple[PendingDigests, int]] = {}  # slot -> digest still on its way to the host
        self._batches: deque[tuple[PendingDigests, list[int]]] = deque()  # in the order they were taken
        self._lock = threading.Lock()  # a waiter's check and the worker may settle the same slot
        self.verified = self.verified_bytes = self.mismatches = 0

    @staticmethod
    def compute(buf: torch.Tensor) -> tuple[int, int]:
        return digest(buf)

    def open(self, slot: int) -> None:
        """The slot's bytes are about to change: it has no digest until :meth:`seal`."""
        with self._lock:
            self._sealed[slot] = False
            self._later.pop(slot, None)

    def seal(self, slot: int, value: tuple[int, int]) -> None:
        with self._lock:
            self._later.pop(slot, None)
            self._values[slot] = value
            self._sealed[slot] = True

    def seal_later(self, pending: PendingDigests, places: list[tuple[int, int]]) -> None:
        """Seal each ``(slot, k)`` of ``places`` with ``pending``'s ``k``-th value once it is asked for (the caller
        has waited for :meth:`PendingDigests.read`, and the slots hold the bytes digested). Waiting for the values
        at once made the worker wait for the small copy of the sums behind the page copies queued after them on the
        copy engine: gpu -> host ran at 0.81 of the pinned copy that way (dd0df62, H200). Batches whose values
        have come are settled here, so that few stay pending."""
        with self._lock:
            for slot, k in places:
                self._later[slot] = (pending, k)
            self._batches.append((pending, [slot for slot, _ in places]))
            while self._batches and self._batches[0][0].ready():
                done, done_slots = self._batches.popleft()
                for slot in done_slots:
                    self._settle(slot, done)

    def _settle(self, slot: int, only: PendingDigests | None = None) -> None:
        later = self._later.get(slot)
        if later is None or (only is not None and later[0] is not only):
            return
        del self._later[slot]
        self._values[slot] = later[0].values()[later[1]]
        self._sealed[slot] = True

    def value(self, slot: int) -> tuple[int, int] | None:
        with self._lock:
            self._settle(slot)
            return (int(self._values[slot, 0]), int(self._values[slot, 1])) if self._sealed[slot] else None

    def verify(self, slot: int, buf: torch.Tensor, tier: str) -> tuple[int, int]:
        """Raise :class:`ChecksumMismatch` unless ``buf`` holds what was sealed in ``slot``; return its digest."""
        return self.check(slot, digest(buf), buf.numel() * buf.element_size(), tier)

    def check(self, slot: int, got: tuple[int, int], nbytes: int, tier: str) -> tuple[int, int]:
        """:meth:`verify` of a digest taken elsewhere (of ``nbytes``: on the GPU, where the bytes went)."""
        want = self.value(slot)
        if got != want:
            self.mismatches += 1
            raise ChecksumMismatch(f"{tier} slot {slot}: checksum mismatch (" +
                                   ("no digest: never written whole" if want is None else "the bytes changed at rest")
                                   + ")")
        self.verified += 1
        self.verified_bytes += nbytes
        return got

    def check_all(self, slots: list[int], got: np.ndarray, nbytes: list[int], tier: str) -> dict[int, OSError]:
        """:meth:`check` of many slots at once (``got``: their digests, ``[n, 2]`` uint64, as
        :meth:`PendingDigests.array` gives them): the failures, by index into ``slots``. One comparison of arrays,
        not a call a slot: a streamed layer's read checks hundreds of slots while the step waits for it."""
        with self._lock:
            for slot in slots:
                if slot in self._later:
                    self._settle(slot)
            index = np.asarray(slots, dtype=np.int64)
            good = self._sealed[index] & (self._values[index] == got).all(axis=1)
            bad = np.flatnonzero(~good).tolist()
            self.mismatches += len(bad)
            self.verified += len(slots) - len(bad)
            self.verified_bytes += sum(nbytes) - sum(nbytes[i] for i in bad)
            return {i: ChecksumMismatch(f"{tier} slot {slots[i]}: checksum mismatch (" +
                                        ("the bytes changed at rest" if self._sealed[slots[i]] else
                                         "no digest: never written whole") + ")") for i in bad}

    def counts(self) -> dict[str, int]:
        return {"verified": self.verified, "verified_bytes": self.verified_bytes, "mismatches": self.mismatches}
