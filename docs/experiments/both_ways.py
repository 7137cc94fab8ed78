"""Why do both directions at once with host checksums run at 1.05x one way (H200, 0a499ec) against 1.73x without?
Times a 4 GiB Llama-3-8B sequence down, another up, and both at once, checksums on and off (three rounds each,
medians), then profiles one both-at-once round with checksums and prints, per CUDA stream, what ran and when
(copies each way, the digests' kernels), and where the host's time went (torch's CPU ops, by total time).
Also times ``digests_of`` of a batch of eight 8 MiB regions, its launch alone and with its values.
Run on a GPU machine: python docs/experiments/both_ways.py [--tokens N] [--trace FILE] [--gate-regions 0,8,16]
[--no-profile]"""

import argparse
import collections
import gzip
import json
import os
import statistics
import tempfile
import time

import torch

from kvtier import Config, TierManager
from kvtier.bench.tiers import LLAMA8B, pcie_ceilings
from kvtier.tiering.tiers import digest as dm

MiB = 1 << 20
parser = argparse.ArgumentParser()
parser.add_argument("--tokens", type=int, default=32768)
parser.add_argument("--trace", default="")
parser.add_argument("--gate-regions", default="0", help="comma-separated values of vmm.mapped_range.GATE_REGIONS "
                    "to time both ways with (0: the gate held for a whole mapping call)")
parser.add_argument("--no-profile", action="store_true", help="only the timings")
args = parser.parse_args()
tokens = args.tokens
nbytes = tokens * 2 * 32 * 8 * 128 * 2
dev = torch.device("cuda", 0)


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def setup(checks: bool):
    config = Config(device="cuda", pool_budget=2 * nbytes + 512 * MiB, pool_ready=nbytes + 256 * MiB,
                    host_size=2 * nbytes + 256 * MiB, host_chunk=256 * MiB, nvme_size=64 * MiB,
                    background_demotion=False, space_reserve_pages=0, host_checksums=checks)
    mgr = TierManager(config)
    mgr.tiering.wait_ready()
    space = mgr.create_space("s", max_tokens=2 * tokens + 8192, **LLAMA8B)
    space.allocate("a", tokens)
    space.allocate("b", tokens)
    for h in (space.offload("a", tier="host"), space.offload("b", tier="host")):
        h.result()
    space.ensure_resident(["a", "b"])
    return mgr, space


def rounds(space, n: int = 3) -> dict[str, float]:
    out = collections.defaultdict(list)
    for _ in range(n):
        for seq in ("a", "b"):
            space.mark_written(seq, 0, tokens)  # no kept copy: every byte goes down again
        out["down"].append(timed(lambda: space.offload("a", tier="host").result()))
        out["up"].append(timed(lambda: space.ensure_resident(["a"])))
        space.mark_written("a", 0, tokens)
        space.offload("a", tier="host").result()
        out["both"].append(timed(lambda: [h.result() for h in (space.offload("b", tier="host"),
                                                                 space.prefetch(["a"]))]))
        space.ensure_resident(["a", "b"])
    return {k: statistics.median(v) for k, v in out.items()}


pcie = pcie_ceilings(dev, nbytes)
print(f"{tokens} tokens, {nbytes / 2**30:.2f} GiB; pinned copy down {pcie['down'] * 1e3:.1f} ms, up "
      f"{pcie['up'] * 1e3:.1f} ms, both {pcie['both'] * 1e3:.1f} ms", flush=True)
from kvtier.vmm import mapped_range  # noqa: E402

for gate_regions, checks in [(int(g), c) for g in args.gate_regions.split(",") for c in (True, False)]:
    mapped_range.GATE_REGIONS = gate_regions
    mgr, space = setup(checks)
    try:
        r = rounds(space)
        print(f"gate regions {gate_regions:2d}, checksums {'on ' if checks else 'off'}: down {r['down'] * 1e3:6.1f} ms ({pcie['down'] / r['down']:.3f})"
              f"  up {r['up'] * 1e3:6.1f} ms ({pcie['up'] / r['up']:.3f})  both {r['both'] * 1e3:6.1f} ms "
              f"({2 * r['down'] / r['both']:.2f}x one way, {pcie['both'] / r['both']:.3f} of two pinned copies)",
              flush=True)
    finally:
        mgr.close()

mapped_range.GATE_REGIONS = int(args.gate_regions.split(",")[0])  # the profile below: the first value
if args.no_profile:
    raise SystemExit(0)

# digests_of alone: a batch as the copies down take it
region = torch.randint(0, 1 << 62, (8 * MiB,), dtype=torch.int64, device=dev).view(torch.uint8)
bufs = [region[i * 8 * MiB:(i + 1) * 8 * MiB] for i in range(8)]
scattered = [torch.empty(8 * MiB, dtype=torch.uint8, device=dev) for _ in range(8)]
for name, b in (("one run", bufs), ("scattered", scattered)):
    launch, whole = [], []
    for _ in range(30):
        torch.cuda.synchronize()
        t = time.perf_counter()
        p = dm.digests_of(b, lane="down")
        launch.append(time.perf_counter() - t)
        p.values()
        whole.append(time.perf_counter() - t)
    print(f"digests_of 8 x 8 MiB, {name}: launch {statistics.median(launch) * 1e6:.0f} us, with values "
          f"{statistics.median(whole) * 1e6:.0f} us ({64 * MiB / statistics.median(whole) / 1e9:.0f} GB/s)", flush=True)

from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402


def profiled(checks: bool) -> None:
    """One both-at-once round under the profiler: when the prefetch call returned (its mapping done: copies down
    start no new batch meanwhile), when each direction's copies ran, what the streams did."""
    mgr, space = setup(checks)
    try:
        for seq in ("a", "b"):
            space.mark_written(seq, 0, tokens)
        space.offload("a", tier="host").result()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            def both() -> None:
                with record_function("offload call"):
                    down = space.offload("b", tier="host")
                with record_function("prefetch call"):
                    up = space.prefetch(["a"])
                down.result()
                up.result()
            seconds = timed(both)
        print(f"\n=== profiled both at once, checksums {'on' if checks else 'off'}: {seconds * 1e3:.1f} ms")
        if checks:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))
        path = os.path.join(tempfile.mkdtemp(), "trace.json")
        prof.export_chrome_trace(path)
    finally:
        mgr.close()
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    calls = {e["name"]: e for e in events if e.get("name") in ("offload call", "prefetch call") and "dur" in e}
    t0 = min([e["ts"] for e in gpu] + [e["ts"] for e in calls.values()])
    for name, e in calls.items():
        print(f"{name}: from {(e['ts'] - t0) / 1e3:.2f} to {(e['ts'] + e['dur'] - t0) / 1e3:.2f} ms")
    streams = collections.defaultdict(list)
    for e in gpu:
        streams[(e["args"].get("stream"), e["cat"], e["name"][:40])].append((e["ts"] - t0, e["dur"]))
    print("stream  kind        name                                      count  busy ms  first ms  last end ms")
    for (stream, cat, name), spans in sorted(streams.items(), key=lambda kv: (str(kv[0][0]), kv[1][0][0])):
        busy = sum(d for _, d in spans) / 1e3
        print(f"{str(stream):6s}  {cat:10s}  {name:40s}  {len(spans):5d}  {busy:7.2f}  {spans[0][0] / 1e3:8.2f}  "
              f"{max(s + d for s, d in spans) / 1e3:11.2f}")
    # each direction's copies: when they ran and how long their copy engine stood still between the first and last
    for kind in ("DtoH", "HtoD"):
        spans = sorted((e["ts"] - t0, e["dur"]) for e in gpu if e["cat"] == "gpu_memcpy" and kind in e["name"])
        if spans:
            end, idle, worst = spans[0][0], 0.0, 0.0
            for s, d in spans:
                if s > end:
                    idle, worst = idle + s - end, max(worst, s - end)
                end = max(end, s + d)
            print(f"{kind}: {len(spans)} copies from {spans[0][0] / 1e3:.2f} to {end / 1e3:.2f} ms, idle between "
                  f"them {idle / 1e3:.2f} ms (longest {worst / 1e3:.2f} ms)")
    if args.trace:
        keep = [e for e in events if e.get("ph") == "X" and "dur" in e]
        with gzip.open(args.trace.replace(".json", f"-{'on' if checks else 'off'}.json"), "wt") as f:
            json.dump({"traceEvents": keep}, f)


profiled(True)
profiled(False)
