"""``kvtier bench peers``: the same allocation work through kvtier and through kvcached, in one run.

kvcached (ovg-project/kvcached) maps KV pages on demand under engines' block tables too; it is a benchmark peer
only: none of its code is in kvtier, and it is imported only here, in a child process (so a crash in its native
code is reported as such instead of ending the benchmark). Skipped where kvcached is not installed.

The work, in a Llama-3-8B-shaped cache (32 layers, 8 KV heads, head_dim 128, bf16, 16-token blocks):
1. alloc + free of k blocks, warm, per pair;
2. one sequence grown to 8k tokens 16 tokens at a time (an engine's decode growth), per call and in all, with
   the device memory then held (``cudaMemGetInfo``) and the driver map calls where the library counts them;
3. what kvcached cannot do: send the grown sequence to host memory and bring it back (kvtier only).
"""

from __future__ import annotations

import ctypes.util
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable

import torch

from kvtier.bench.common import Table, percentile
from kvtier.bench.vmm import LLAMA8B

BLOCK = 16
CELL = LLAMA8B["num_kv_heads"] * LLAMA8B["head_dim"] * 2  # bytes of one token's K (or V) in one layer
KS = (1, 16, 64, 512)
MARK = "kvtier-peers: "  # the child's result line (kvcached prints to stdout too)


def _pairs(alloc: Callable[[int], Any], free: Callable[[Any], None], k: int, iters: int) -> float:
    """Microseconds per alloc+free of ``k`` blocks (after a warm-up)."""
    for _ in range(10):
        free(alloc(k))
    start = time.perf_counter()
    for _ in range(iters):
        free(alloc(k))
    return (time.perf_counter() - start) / iters * 1e6


def _used(device: torch.device) -> int:
    if device.type != "cuda":  # the CPU backend's pages are host memory: not counted here
        return 0
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


SETTLE_S = 0.5  # the libraries' background threads top their reserves up meanwhile (kvtier's map-ahead, kvcached's
#                pre-allocation): held memory is read in that steady state -- read at once, kvtier's was 1352 or
#                2376 MiB in runs of the same code (H100, c26f179), as the map-ahead had run or not


def _grow(step: Callable[[int], None], device: torch.device, tokens: int, before: int) -> dict[str, float | None]:
    """Grow one sequence to ``tokens`` in 16-token steps: per-call p50/p99 us, total ms, and the device MiB
    held over ``before`` (the bytes used before the library set up its cache) once its reserves have settled."""
    _sync(device)
    times = []
    for t in range(BLOCK, tokens + 1, BLOCK):
        start = time.perf_counter()
        step(t)
        times.append(time.perf_counter() - start)
    _sync(device)
    time.sleep(SETTLE_S if device.type == "cuda" else 0)
    return {"p50": percentile(times, 50) * 1e6, "p99": percentile(times, 99) * 1e6, "total": sum(times) * 1e3,
            "held": (_used(device) - before) / 2**20 if device.type == "cuda" else None}


def kvtier_side(device: torch.device, tokens: int, iters: int) -> dict[str, Any]:
    from kvtier.config import Config, MiB
    from kvtier.manager import TierManager
    out: dict[str, Any] = {}
    before = _used(device)
    config = Config(device=str(device), host_size=tokens * 2 * CELL * 32 + 256 * MiB, host_chunk=256 * MiB,
                    nvme_size=64 * MiB)
    with TierManager(config) as mgr:
        mgr.tiering.wait_ready()
        space = mgr.create_space("peers", max_tokens=4 * tokens, **LLAMA8B)
        def alloc(n: int) -> str:
            space.allocate("k", n * BLOCK)
            return "k"

        for k in KS:
            out[f"alloc{k}"] = _pairs(alloc, space.free, k, iters)
        time.sleep(0.5)  # the demoter maps the reserve back (map_ahead), as between an engine's requests
        calls = space.stats()["map_calls"]
        out["grow"] = _grow(lambda t: space.allocate("g", t), device, tokens, before)
        out["grow"]["map_calls"] = space.stats()["map_calls"] - calls
        # what of the held memory kvtier keeps ahead of need, read right after it (the same steady state)
        out["grow"]["reserve"] = space.stats()["stripes_empty"] * space.page_bytes / 2**20
        out["grow"]["ready"] = mgr.pool.free_pages * mgr.page_size / 2**20
        start = time.perf_counter()
        space.offload("g", tier="host").result()
        out["down_ms"] = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        space.ensure_resident(["g"])
        out["up_ms"] = (time.perf_counter() - start) * 1e3
        space.free("g")
        mgr.check()
    return out


def kvcached_side(device: torch.device, tokens: int, iters: int) -> dict[str, Any]:
    """Runs in the child process: kvcached set up as its vLLM integration does for one worker."""
    from kvcached.integration.vllm.interfaces import alloc_kv_cache, init_kvcached, shutdown_kvcached
    from kvcached.kv_cache_manager import KVCacheManager
    from kvcached.vmm_ops import kv_tensors_created
    num_blocks = 4 * tokens // BLOCK
    torch.cuda.set_device(device)
    before = _used(device)
    init_kvcached(tp_rank=0, world_size=1, is_worker=True, async_sched=False)
    out: dict[str, Any] = {}
    try:
        alloc_kv_cache(kvcache_shape=(2, num_blocks, BLOCK, LLAMA8B["num_kv_heads"], LLAMA8B["head_dim"]),
                       block_size=BLOCK, dtype=LLAMA8B["dtype"], device=str(device), num_layers=LLAMA8B["num_layers"])
        deadline = time.monotonic() + 30
        while not kv_tensors_created():
            if time.monotonic() > deadline:
                raise RuntimeError("kvcached: KV tensors not created within 30 s")
            time.sleep(0.05)
        manager = KVCacheManager(num_blocks=num_blocks, block_size=BLOCK, cell_size=CELL,
                                 num_layers=LLAMA8B["num_layers"], world_size=1)
        for k in KS:
            out[f"alloc{k}"] = _pairs(manager.alloc, manager.free, k, iters)
        time.sleep(0.5)  # its pre-allocation thread refills the reserved pages meanwhile
        held: list[int] = []

        def grow(tokens_now: int) -> None:
            block = manager.alloc(1)
            if block is None:  # kvcached says no room by returning None
                raise RuntimeError(f"kvcached: no block for token {tokens_now} of {tokens}")
            held.extend(block)

        out["grow"] = _grow(grow, device, tokens, before)
        out["grow"]["map_calls"] = None  # not counted by kvcached
        manager.free(held)
    finally:
        shutdown_kvcached()
    return out


def _kvcached_in_child(device: torch.device, tokens: int, iters: int) -> tuple[dict[str, Any] | None, str]:
    """kvcached's figures from a child process, or None and why not."""
    try:
        import kvcached  # noqa: F401
    except ImportError:
        return None, "kvcached is not installed: skipped (pip install it to compare)"
    command = [sys.executable, "-m", "kvtier.bench.peers", str(device), str(tokens), str(iters)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    said = f"kvcached {getattr(kvcached, '__version__', '?')}"
    stdcxx = ctypes.util.find_library("stdc++")
    if proc.returncode == -signal.SIGSEGV and stdcxx:
        # Seen on the H100 image (kvcached e8e6406, g++ 13): its vmm_ops extension carries libstdc++ code of its
        # own and crashes at the PageAllocator constructor's first `std::cout << <integer>`; with the system's
        # libstdc++ preloaded, whose symbols then win, it runs. Say so rather than compare nothing.
        env = {**os.environ, "LD_PRELOAD": " ".join(filter(None, [os.environ.get("LD_PRELOAD"), stdcxx]))}
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        said += f" (run with LD_PRELOAD={stdcxx}: without it, it segfaults in PageAllocator's constructor)"
    if proc.returncode != 0:
        what = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
                else f"exit {proc.returncode}")
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return None, f"kvcached {what} in its child process: {tail[-300:]}"
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)), None)
    if line is None:
        return None, f"{said}: its child process printed no result"
    return json.loads(line[len(MARK):]), said


def run(device: str = "auto", quick: bool = False, step: Any = None) -> list[Table]:
    from kvtier.vmm import resolve_device
    dev = resolve_device(device)
    table = Table("Side by side: kvtier and kvcached, Llama-3-8B shape (bf16, 16-token blocks)",
                  ["work", "kvtier", "kvcached", "unit", "kvcached / kvtier"])
    tokens, iters = (2048, 200) if quick else (8192, 1000)
    ours = kvtier_side(dev, tokens, iters)
    if step:
        step()
    if dev.type == "cuda":
        theirs, said = _kvcached_in_child(dev, tokens, iters)
    else:  # kvtier's side alone: the host-side cost of the same calls, on the CPU backend
        theirs, said = None, "kvcached runs on CUDA only: its column is empty on the CPU backend"
    if step:
        step()
    other = theirs or {}

    def row(work: str, ours_value: float | None, theirs_value: float | None, unit: str) -> None:
        ratio = theirs_value / ours_value if ours_value and theirs_value is not None else None
        table.add(work, ours_value, theirs_value, unit, ratio)

    for k in KS:
        row(f"alloc + free of {k} block(s)", ours[f"alloc{k}"], other.get(f"alloc{k}"), "us per pair")
    g, h = ours["grow"], other.get("grow", {})
    row(f"grow to {tokens} tokens, 16 at a time: p50", g["p50"], h.get("p50"), "us per call")
    row(f"grow to {tokens} tokens, 16 at a time: p99", g["p99"], h.get("p99"), "us per call")
    row(f"grow to {tokens} tokens, 16 at a time: all", g["total"], h.get("total"), "ms")
    row(f"device memory held with the {tokens}-token sequence", g["held"], h.get("held"), "MiB")
    row("  of it: empty pages mapped ahead (the space's reserve)", g["reserve"], None, "MiB")
    row("  of it: pages created, not mapped (the pool's ready pages)", g["ready"], None, "MiB")
    row("driver map calls during the growth", g["map_calls"], h.get("map_calls"), "calls")
    row(f"send the {tokens}-token sequence to host memory", ours["down_ms"], None, "ms")
    row("bring it back (prefetch, mapping included)", ours["up_ms"], None, "ms")
    table.notes.append(f"{said}; n/a = not available in that library (kvcached keeps KV on the GPU only and does not "
                       "count its driver calls); both with their defaults: kvtier maps ahead (map_ahead), kvcached "
                       "pre-allocates reserved pages; held = cudaMemGetInfo's used bytes over those before the "
                       f"library set up (its mapped pages, reserves included), {SETTLE_S} s after the growth, once "
                       "each library's background thread has topped its reserve up")
    return [table]


if __name__ == "__main__":  # the child process: kvcached's side, one JSON line on stdout
    dev_arg, tokens_arg, iters_arg = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    result = kvcached_side(torch.device(dev_arg), tokens_arg, iters_arg)
    sys.stdout.flush()
    print(MARK + json.dumps(result))
