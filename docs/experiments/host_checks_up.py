"""Why did host -> gpu with checksums fall from 0.97 to 0.84 of the pinned copy in `bench tiers` at 2e74846 (H200),
while the fault-back of `bench prefetch` in the same run rose (0.87 -> 0.97 at 32k tokens)? Round trips with the
digest sums written to host memory by a kernel (2e74846) and copied by the copy engine (before), `digests_of` alone
both ways, and a profile of one bring-back. Run on a GPU machine: python docs/experiments/host_checks_up.py"""

import cProfile, pstats, statistics, time, io
import torch
from kvtier import Config, TierManager
from kvtier.tiering.tiers import digest as dm
from kvtier.bench.tiers import LLAMA8B, _round_trip, pcie_ceilings
MiB = 1 << 20
shape, per_token = dict(LLAMA8B), 2 * 32 * 8 * 128 * 2
largest = 16384 * per_token
config = Config(device="cuda", pool_budget=largest + 512 * MiB, pool_ready=largest + 256 * MiB,
                host_size=largest + 256 * MiB, host_chunk=256 * MiB, nvme_size=64 * MiB,
                background_demotion=False, space_reserve_pages=0)
with TierManager(config) as mgr:
    mgr.tiering.wait_ready()
    space = mgr.create_space("sweep", max_tokens=16384 + 8192, **shape)
    _round_trip(space, 1024, mgr.backend.synchronize)
    dev = mgr.device
    for mode in ("mapped", "copy", "mapped"):
        dm._mapped_ok[torch.device("cuda", 0)] = mode == "mapped"
        for tokens in (1024, 16384):
            r = [_round_trip(space, tokens, mgr.backend.synchronize) for _ in range(5)]
            pc = pcie_ceilings(dev, tokens * per_token, 3)
            print(f"{mode:7s} {tokens:6d} down {statistics.median(x[0] for x in r)*1e3:7.2f} ms "
                  f"up {statistics.median(x[1] for x in r)*1e3:7.2f} ms  pinned down {pc['down']*1e3:.2f} up {pc['up']*1e3:.2f}",
                  flush=True)
    # digests_of alone
    bufs = [torch.empty(64 << 20, dtype=torch.uint8, device=dev)[i * (8 << 20):(i + 1) * (8 << 20)] for i in range(8)]
    for mode in ("mapped", "copy"):
        dm._mapped_ok[torch.device("cuda", 0)] = mode == "mapped"
        ts = []
        for _ in range(50):
            t = time.perf_counter(); p = dm.digests_of(bufs, lane="down"); p.values(); ts.append(time.perf_counter() - t)
        ts2 = []
        for _ in range(50):
            t = time.perf_counter(); p = dm.digests_of(bufs, lane="down"); ts2.append(time.perf_counter() - t); p.values()
        print(f"digests_of 8x8MiB {mode}: with values {statistics.median(ts)*1e6:.0f} us, launch {statistics.median(ts2)*1e6:.0f} us")
    dm._mapped_ok[torch.device("cuda", 0)] = True
    for tokens in (1024, 16384):
        space.allocate("s", tokens); mgr.backend.synchronize()
        space.offload("s", tier="host").result()
        pr = cProfile.Profile(); pr.enable(); t = time.perf_counter()
        space.ensure_resident(["s"])
        el = time.perf_counter() - t
        pr.disable(); space.free("s")
        s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18)
        print(f"--- profile up {tokens}: {el*1e3:.2f} ms"); print(s.getvalue()[-3500:])
