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

import threading

import numpy as np
import torch

ROW = 4096  # bytes per row: the digest covers whole rows (every slot is a multiple of it)
WORDS = ROW // 8

_streams: dict[torch.device, torch.cuda.Stream] = {}
_streams_lock = threading.Lock()


class ChecksumMismatch(OSError):
    """Bytes read back from a tier do not match the digest taken when they were written: the data is corrupt."""


def digest(buf: torch.Tensor) -> tuple[int, int]:
    """The digest of ``buf`` (contiguous bytes, a multiple of 4 KiB, 8-byte aligned) on its own device. On the
    GPU it runs on a side stream: the caller must know the bytes have landed (a synchronized event, a finished
    read), and it waits for its result."""
    nbytes = buf.numel() * buf.element_size()
    if nbytes % ROW or buf.data_ptr() % 8 or not buf.is_contiguous():
        raise ValueError(f"a digest needs contiguous, 8-byte aligned whole rows of {ROW} bytes; got {nbytes} bytes "
                         f"at {buf.data_ptr():#x}")
    words = buf.view(torch.uint8).view(torch.int64).view(-1, WORDS)
    if buf.is_cuda:
        with torch.cuda.stream(side_stream(buf.device)):
            sums = torch.cat((words.sum(1), words.sum(0))).cpu()  # the copy to the host waits for the sums
    else:
        sums = torch.cat((words.sum(1), words.sum(0)))
    return _fold(sums.numpy().view(np.uint64), words.shape[0])


def _fold(sums: np.ndarray, rows: int) -> tuple[int, int]:
    weights = np.arange(1, max(rows, WORDS) + 1, dtype=np.uint64)
    return int((sums[:rows] * weights[:rows]).sum()), int((sums[rows:] * weights[:WORDS]).sum())  # wraps: mod 2^64


def side_stream(device: torch.device) -> torch.cuda.Stream:
    with _streams_lock:  # several I/O threads may digest at once
        if device not in _streams:
            _streams[device] = torch.cuda.Stream(device)
        return _streams[device]


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
        got, want = digest(buf), self.value(slot)
        if got != want:
            self.mismatches += 1
            raise ChecksumMismatch(f"{tier} slot {slot}: checksum mismatch (" +
                                   ("no digest: never written whole" if want is None else "the bytes changed at rest")
                                   + ")")
        self.verified += 1
        self.verified_bytes += buf.numel() * buf.element_size()
        return got

    def counts(self) -> dict[str, int]:
        return {"verified": self.verified, "verified_bytes": self.verified_bytes, "mismatches": self.mismatches}
