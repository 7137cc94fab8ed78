"""Why did the first offload of an 8192-token Llama-3-8B sequence (1 GiB) take 77-217 ms with host checksums on and
23 ms with them off (`kvtier bench peers`, H100, c26f179, five runs)? That bench's offload is its manager's first.
This times three round trips of the same sequence in one manager, each way, checksums on and off, and the first
pinned allocations of the small tensors the digests' sums land in (torch's pinned cache is empty at first).
Run on a GPU machine: python docs/experiments/first_offload.py"""

import time

import torch

from kvtier import Config, TierManager
from kvtier.bench.vmm import LLAMA8B

MiB = 1 << 20
tokens = 8192
kv = tokens * 2 * 32 * 8 * 128 * 2
for checks in (True, False, True):
    config = Config(device="cuda", host_size=kv + 256 * MiB, host_chunk=256 * MiB, nvme_size=64 * MiB,
                    host_checksums=checks)
    with TierManager(config) as mgr:
        mgr.tiering.wait_ready()
        space = mgr.create_space("s", max_tokens=4 * tokens, **LLAMA8B)
        space.allocate("g", tokens)
        torch.cuda.synchronize()
        rows = []
        for _ in range(3):
            start = time.perf_counter()
            space.offload("g", tier="host").result()
            down = time.perf_counter() - start
            start = time.perf_counter()
            space.ensure_resident(["g"])
            rows.append((down * 1e3, (time.perf_counter() - start) * 1e3))
        print(f"checksums {'on ' if checks else 'off'}: down/up ms per round trip "
              + "  ".join(f"{d:.1f}/{u:.1f}" for d, u in rows))
sizes = [(n, 2) for n in (8, 16, 24, 32, 64, 128)]
for label in ("first", "again"):
    start = time.perf_counter()
    held = [torch.empty(s, dtype=torch.int64, pin_memory=True) for s in sizes]
    print(f"pinned allocations of {len(sizes)} small tensors, {label}: {(time.perf_counter() - start) * 1e3:.2f} ms")
    del held
