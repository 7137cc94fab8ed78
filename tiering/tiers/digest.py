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
import threading
from typing import Any, Iterator

import numpy as np
import torch

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
        sums = torch.cat((words.sum(1), words.sum(0)))
    return _fold(sums.numpy().view(np.uint64), words.shape[0])


class PendingDigests:
    """The digests of several buffers, under way (see :func:`digests_of`)."""

    def __init__(self, folded: torch.Tensor, event: Any = None) -> None:
        self._folded, self._event = folded, event
        self._values: list[tuple[int, int]] | None = None

    def values(self) -> list[tuple[int, int]]:
        """One digest per buffer, in order (waits for them once)."""
        if self._values is None:
            if self._event is not None:
                self._event.synchronize()
            self._values = [(a, b) for a, b in self._folded.numpy().view(np.uint64).tolist()]
        return self._values


def _words(buf: torch.Tensor) -> torch.Tensor:
    nbytes = buf.numel() * buf.element_size()
    if nbytes % ROW or buf.data_ptr() % 8 or not buf.is_contiguous():
        raise ValueError(f"a digest needs contiguous, 8-byte aligned whole rows of {ROW} bytes; got {nbytes} bytes "
                         f"at {buf.data_ptr():#x}")
    return buf.view(torch.uint8).view(torch.int64).view(-1, WORDS)


def _runs(bufs: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, int]]:
    """``bufs`` as 3-d word tensors, (buffers, rows, words): a run of buffers of one length, one storage and one
    address step -- the regions of one page, side by side in a space's range -- is one strided tensor, so that
    its sums take two reductions, not two a buffer."""
    i = 0
    while i < len(bufs):
        first = _words(bufs[i])
        j, step = i + 1, 0
        while j < len(bufs) and bufs[j].numel() == bufs[i].numel() and bufs[j].dtype == bufs[i].dtype:
            gap = bufs[j].data_ptr() - bufs[j - 1].data_ptr()
            if gap <= 0 or gap % 8 or (step and gap != step) or \
                    bufs[j].untyped_storage().data_ptr() != bufs[i].untyped_storage().data_ptr():
                break
            _words(bufs[j])
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
    cuda = bufs[0].is_cuda
    parts = []
    with torch.cuda.stream(side_stream(bufs[0].device, lane)) if cuda else contextlib.nullcontext():
        if cuda and after is not None:
            torch.cuda.current_stream(bufs[0].device).wait_event(after)
        for words, _ in _runs(bufs):
            rows = words.shape[1]
            weights = _weights(words.device, max(rows, WORDS))  # int64 products and sums wrap: mod 2^64, as _fold
            parts.append(torch.stack(((words.sum(2) * weights[:rows]).sum(1),
                                      (words.sum(1) * weights[:WORDS]).sum(1)), dim=1))
        folded = torch.cat(parts) if len(parts) > 1 else parts[0]
        if not cuda:
            return PendingDigests(folded)
        host = torch.empty(folded.shape, dtype=folded.dtype, pin_memory=True)
        host.copy_(folded, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    return PendingDigests(host, event)


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
        self.verified = self.verified_bytes = self.mismatches = 0

    @staticmethod
    def compute(buf: torch.Tensor) -> tuple[int, int]:
        return digest(buf)

    def open(self, slot: int) -> None:
        """The slot's bytes are about to change: it has no digest until :meth:`seal`."""
        self._sealed[slot] = False

    def seal(self, slot: int, value: tuple[int, int]) -> None:
        self._values[slot] = value
        self._sealed[slot] = True

    def value(self, slot: int) -> tuple[int, int] | None:
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

    def counts(self) -> dict[str, int]:
        return {"verified": self.verified, "verified_bytes": self.verified_bytes, "mismatches": self.mismatches}
