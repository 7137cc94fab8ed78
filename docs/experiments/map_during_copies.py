"""Does cuMemMap wait for copies or kernels in flight? (H100, driver 580: it waits for device-to-host copies
only; see README, "Tier paths".) Run on a GPU machine: python docs/experiments/map_during_copies.py"""

import time, torch, kvtier
n = 2 << 30
with kvtier.TierManager(kvtier.Config(pool_budget=4 << 30, pool_ready=2 << 30, background_demotion=False)) as m:
    be, P = m.backend, m.page_size
    N = 128
    handles = m.pool.take(N)
    base = be.reserve(N * P, P)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda"); dev2 = torch.empty(n, dtype=torch.uint8, device="cuda")
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    s1 = torch.cuda.Stream()
    work = {
        "idle": lambda: None,
        "D2H copy": lambda: host.copy_(dev, non_blocking=True),
        "H2D copy": lambda: dev.copy_(host, non_blocking=True),
        "D2D copy": lambda: dev2.copy_(dev, non_blocking=True),
        "kernel (_sleep)": lambda: torch.cuda._sleep(100_000_000),
    }
    for name, fn in work.items():
        torch.cuda.synchronize()
        with torch.cuda.stream(s1):
            fn()
        t = time.perf_counter()
        for i, h in enumerate(handles):
            be.map(base + i * P, P, [h])
        tm = time.perf_counter() - t
        s1.synchronize()
        with torch.cuda.stream(s1):
            fn()
        t = time.perf_counter()
        be.unmap(base, N * P)
        tu = time.perf_counter() - t
        t = time.perf_counter(); s1.synchronize(); left = time.perf_counter() - t
        print(f"{name:16s} map {N} handles {tm*1e3:6.1f} ms | unmap {tu*1e3:6.1f} ms (work left after unmap {left*1e3:5.1f} ms)")
    be.free_reservation(base, N * P); m.pool.give(handles)
