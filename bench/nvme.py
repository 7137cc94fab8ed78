"""``kvtier bench nvme``: disk throughput vs threads and I/O size, raw ``O_DIRECT`` and (on GPU machines) kvikio
reading and writing device memory, in GDS or compat mode as the machine allows."""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from kvtier.bench.common import Table, with_scratch_dir
from kvtier.tiering.tiers.nvme import io_mode
from kvtier.bench.tiers import disk_ceilings
from kvtier.config import MiB


def _kvikio(directory: str, nbytes: int, threads: int, task: int) -> tuple[float, float] | None:
    """Seconds for kvikio to write then read ``nbytes`` of device memory, or None where it cannot run."""
    if not torch.cuda.is_available():
        return None
    try:
        import kvikio
        import kvikio.defaults
    except ImportError:
        return None
    path = os.path.join(directory, f"kvtier-kvikio-{os.getpid()}.bin")
    buf = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    with kvikio.defaults.set({"num_threads": threads, "task_size": task, "auto_direct_io_read": True,
                              "auto_direct_io_write": True}):
        f = kvikio.CuFile(path, "w+")
        try:
            start = time.perf_counter()
            f.pwrite(buf).get()
            mid = time.perf_counter()
            f.pread(buf).get()
            end = time.perf_counter()
        finally:
            f.close()
            os.unlink(path)
    return mid - start, end - mid


@with_scratch_dir
def run(nbytes: int, threads: list[int], sizes: list[int], nvme_dir: str | None = None, step: Any = None) -> Table:
    directory = nvme_dir  # given, or a temporary one (with_scratch_dir)
    mode = io_mode(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    table = Table(f"NVMe throughput vs threads and I/O size ({nbytes // MiB} MiB; {mode})",
                  ["threads", "I/O MiB", "raw write GB/s", "raw read GB/s", "kvikio write GB/s",
                   "kvikio read GB/s", "kvikio/raw read"])
    gb = nbytes / 1e9
    for t in threads:
        for size in sizes:
            raw = disk_ceilings(directory, nbytes, t, size)
            kv = _kvikio(directory, nbytes, t, size)
            table.add(t, size // MiB, gb / raw["write"], gb / raw["read"], gb / kv[0] if kv else None,
                      gb / kv[1] if kv else None, raw["read"] / kv[1] if kv else None)
            if step:
                step()
    table.notes.append(f"files in {directory}; kvikio columns are n/a where no CUDA driver is present")
    return table
