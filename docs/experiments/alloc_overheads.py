"""GPU-side costs of an alloc + free: recording and querying a fence, and alloc + free of 1 / 16 / 64 blocks with the
background map-ahead on and off (driver map and unmap calls counted). Run on a GPU machine:
python docs/experiments/alloc_overheads.py"""
import time

from timing import pair_rounds

from kvtier.bench.vmm import LLAMA8B
from kvtier.config import Config, MiB
from kvtier.manager import TierManager

TOK = 8192
CELL = LLAMA8B["num_kv_heads"] * LLAMA8B["head_dim"] * 2
for ahead in (True, False):
    cfg = Config(device="cuda", host_size=TOK * 2 * CELL * 32 + 256 * MiB, host_chunk=256 * MiB, nvme_size=64 * MiB,
                 map_ahead=ahead)
    with TierManager(cfg) as mgr:
        mgr.tiering.wait_ready()
        sp = mgr.create_space("peers", max_tokens=4 * TOK, **LLAMA8B)
        if ahead:
            t = time.perf_counter()
            for _ in range(5000):
                mgr.backend.record_fence(None)
            print(f"record_fence: {(time.perf_counter() - t) / 5000 * 1e6:.2f} us")
            ev = mgr.backend.record_fence(None)
            t = time.perf_counter()
            for _ in range(5000):
                ev.query()
            print(f"fence.query: {(time.perf_counter() - t) / 5000 * 1e6:.2f} us")
        for k in (1, 16, 64):
            s0 = sp.stats()
            rounds = pair_rounds(sp, k, 9, 300)
            s1 = sp.stats()
            print(f"map_ahead={ahead} k={k}: min {min(rounds):.1f} median {sorted(rounds)[4]:.1f} "
                  f"max {max(rounds):.1f} us; maps {s1['map_calls'] - s0['map_calls']} "
                  f"unmaps {s1['unmap_calls'] - s0['unmap_calls']}")
