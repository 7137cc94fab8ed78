"""A file layer that fails on cue: the storage edge of the NVMe tier's POSIX path, for tests on CPU; and a CPU
backend whose copies fail on cue (``FailingCopies``): the device edge, as a device error in mid-transfer.

Each rule matches an operation (``"read"`` or ``"write"``) and optionally one slot, and does one thing: raise an
``OSError`` with an errno, shorten the transfer to half, or corrupt one byte (a write puts the corrupt bytes on
disk; a read hands them back). ``times``: how many matching calls it fires for (None: for ever). Every call is
counted and timed, fired or not.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass

from typing import Callable, Iterable

from kvtier.errors import CudaError
from kvtier.policies import PageRef
from kvtier.policies.lru import LRUPolicy
from kvtier.vmm import HostBackend


@dataclass
class Rule:
    op: str
    action: str            # "errno", "short" or "corrupt"
    errno: int = 0
    slot: int | None = None
    times: int | None = None
    gate: threading.Event | None = None


class FaultyFiles:
    def __init__(self, page_size: int, pieces: int = 4) -> None:
        """Rules name slots as the NVMe tier does: by their first unit, ``page_size // pieces`` bytes each
        (``[nvme] pieces``, 4 by default)."""
        self.slot_size = page_size // pieces
        self.rules: list[Rule] = []
        self.calls: Counter[str] = Counter()
        self.fired: Counter[str] = Counter()
        self.times: list[tuple[str, float]] = []
        self._lock = threading.Lock()
        self._chaos: tuple[float, random.Random] | None = None

    # --- cues ------------------------------------------------------------------------------------------------------
    def fail(self, op: str, errno: int, slot: int | None = None, times: int | None = None) -> None:
        self.rules.append(Rule(op, "errno", errno, slot, times))

    def shorten(self, op: str, slot: int | None = None, times: int | None = None) -> None:
        self.rules.append(Rule(op, "short", 0, slot, times))

    def corrupt(self, op: str, slot: int | None = None, times: int | None = None) -> None:
        self.rules.append(Rule(op, "corrupt", 0, slot, times))

    def hold(self, op: str, gate: threading.Event, times: int | None = None) -> None:
        """Calls wait until ``gate`` is set, then go on as usual (an I/O thread stuck on a slow disk)."""
        self.rules.append(Rule(op, "hold", 0, None, times, gate))

    def chaos(self, rate: float, seed: int = 0) -> None:
        """From now on, each call fails at random with probability ``rate``: EIO, a short transfer or a corrupt
        byte, one third each (seeded)."""
        self._chaos = (rate, random.Random(seed))

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self._chaos = None

    def _rule(self, op: str, offset: int) -> Rule | None:
        with self._lock:
            self.calls[op] += 1
            self.times.append((op, time.monotonic()))
            if self._chaos is not None and self._chaos[1].random() < self._chaos[0]:
                action = self._chaos[1].choice(["errno", "short", "corrupt"])
                self.fired[f"{op} {action}"] += 1
                return Rule(op, action, errno.EIO)
            for rule in self.rules:
                if rule.op == op and rule.slot in (None, offset // self.slot_size) and rule.times != 0:
                    if rule.times is not None:
                        rule.times -= 1
                    self.fired[f"{op} {rule.action}"] += 1
                    return rule
        return None

    # --- the file layer ----------------------------------------------------------------------------------------------
    def pwrite(self, fd: int, view: memoryview, offset: int) -> int:
        rule = self._rule("write", offset)
        if rule is not None and rule.gate is not None:
            rule.gate.wait()
            rule = None
        if rule is None:
            return os.pwrite(fd, view, offset)
        if rule.action == "errno":
            raise OSError(rule.errno, os.strerror(rule.errno))
        if rule.action == "short":
            return os.pwrite(fd, view[:len(view) // 2], offset)
        with mmap.mmap(-1, len(view)) as bad:  # page-aligned, as O_DIRECT wants
            bad[:] = view
            bad[len(view) // 3] ^= 0x40
            return os.pwrite(fd, bad, offset)

    def pread(self, fd: int, view: memoryview, offset: int) -> int:
        rule = self._rule("read", offset)
        if rule is not None and rule.action == "errno":
            raise OSError(rule.errno, os.strerror(rule.errno))
        if rule is not None and rule.action == "short":
            return os.preadv(fd, [view[:len(view) // 2]], offset)
        done = os.preadv(fd, [view], offset)
        if rule is not None:
            view[len(view) // 3] ^= 0x40
        return done


class FailingCopies(HostBackend):
    """The CPU backend, whose copies between device pages and host memory fail from the ``n``-th after
    ``fail_after(n)`` on (as a CUDA error would in the middle of a transfer)."""

    def __init__(self) -> None:
        super().__init__()
        self.left: int | None = None  # copies that still succeed; None: all of them

    def fail_after(self, n: int) -> None:
        self.left = n

    def copy_async(self, dst: int, src: int, nbytes: int, stream: object = None) -> None:
        if self.left is not None:
            if self.left <= 0:
                raise CudaError("cuMemcpyAsync", "CUDA_ERROR_ILLEGAL_ADDRESS", "failed on cue (tests/faults.py)")
            self.left -= 1
        super().copy_async(dst, src, nbytes, stream)


class WatchedCreates(HostBackend):
    """The CPU backend, noting ``watch()`` as it creates each page (e.g. the pool's stock at that moment)."""

    def __init__(self) -> None:
        super().__init__()
        self.watch: Callable[[], object] = lambda: None
        self.seen: list[object] = []

    def create(self, size: int) -> int:
        self.seen.append(self.watch())
        return super().create(size)


class FailingPins(HostBackend):
    """The CPU backend, whose ``pin`` fails from the ``n``-th call on (as ``cuMemHostRegister`` does when the
    process may lock no more memory); it notes the spans it refused, (address, bytes)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.left, self.refused = n, []  # type: list[tuple[int, int]]

    def pin(self, address: int, size: int) -> None:
        if self.left <= 0:
            self.refused.append((address, size))
            raise CudaError("cuMemHostRegister", "CUDA_ERROR_OUT_OF_MEMORY", "failed on cue (tests/faults.py)")
        self.left -= 1


class FlakyPolicy(LRUPolicy):
    """A policy plug-in (``tests.faults:FlakyPolicy``) whose first ``fail`` calls of ``victims`` raise: a bug in
    user code, met first by the background demoter."""

    name = "flaky"

    def __init__(self, fail: int = 3, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        self.fail = fail

    def victims(self, candidates: Iterable[PageRef], n: int) -> list[PageRef]:
        if self.fail > 0:
            self.fail -= 1
            raise RuntimeError("a bug in the policy")
        return super().victims(candidates, n)
