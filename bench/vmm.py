"""``kvtier bench vmm``: what mapping costs, what an allocation costs, and what the decode path pays.

1. Map/unmap cost per page for several page sizes: kvtier's allocate/free against the raw calls timed in the same
   run (CUDA: ``cuMemMap`` + ``cuMemSetAccess`` per handle straight through cuda-python; CPU: ``mmap``).
2. ``allocate`` of an 8k-token sequence in a Llama-3-8B-shaped space (32 layers, 8 KV heads, head_dim 128, bf16:
   1 GiB of KV) with a warm pool, p50/p99 per page size.
3. Decode attention (gather of each sequence's blocks + ``scaled_dot_product_attention``) over a space's tensors
   against the same kernel over a plain torch allocation of the same shape: a ratio, 1.0 = no overhead.
"""

from __future__ import annotations

import time


import torch
import torch.nn.functional as F

from kvtier.bench.common import Table, percentile, time_device
from kvtier.config import Config, MiB
from kvtier.manager import TierManager

LLAMA8B = dict(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, block_size=16)


def _raw_map_unmap(mgr: TierManager, page_size: int, n: int) -> tuple[float, float]:
    """Seconds per page for map+set-access and for unmap, one page per call, raw calls on one range."""
    backend = mgr.backend
    base = backend.reserve(n * page_size, page_size)
    handles = [backend.create(page_size) for _ in range(n)]
    try:
        if backend.name == "cuda":
            from cuda.bindings import driver as drv
            access = backend.access
            start = time.perf_counter()
            for i, h in enumerate(handles):
                drv.cuMemMap(base + i * page_size, page_size, 0, h, 0)
                drv.cuMemSetAccess(base + i * page_size, page_size, access, 1)
            mapped = time.perf_counter()
            for i in range(n):
                drv.cuMemUnmap(base + i * page_size, page_size)
            end = time.perf_counter()
        else:
            start = time.perf_counter()
            for i, h in enumerate(handles):
                backend.map(base + i * page_size, page_size, [h])
            mapped = time.perf_counter()
            for i in range(n):
                backend.unmap(base + i * page_size, page_size)
            end = time.perf_counter()
    finally:
        for h in handles:
            backend.release(h)
        backend.free_reservation(base, n * page_size)
    return (mapped - start) / n, (end - mapped) / n


def map_cost(device: str, page_sizes: list[int], tokens: int, repeat: int) -> tuple[Table, Table]:
    cost = Table("Map/unmap cost per page (one page = one handle)",
                 ["page", "raw map+access us", "raw unmap us", "kvtier map us", "kvtier unmap us",
                  "kvtier/raw map", "map GB/s"])
    alloc = Table(f"allocate() of a {tokens}-token sequence, Llama-3-8B shape, warm pool",
                  ["page", "handles", "p50 ms", "p99 ms", "free p50 ms", "target p50 ms"])
    for page_size in page_sizes:
        handles_needed = 2 * LLAMA8B["num_layers"] * -(-tokens * 2048 // page_size)
        # the pool keeps twice the sequence ready, so no handle is created while the timed calls map; the host
        # tier is small and pinned before timing (pinning holds the driver and slows mapping meanwhile)
        config = Config(device=device, page_size=page_size, pool_ready=2 * handles_needed * page_size,
                        space_reserve_pages=0, host_size=64 * MiB, host_chunk=64 * MiB, nvme_size=64 * MiB,
                        background_demotion=False)
        with TierManager(config) as mgr:
            mgr.tiering.wait_ready()
            raw_map, raw_unmap = _raw_map_unmap(mgr, page_size, min(256, handles_needed))
            space = mgr.create_space("bench", max_tokens=tokens, **LLAMA8B)
            frees: list[float] = []

            def cycle() -> None:
                space.allocate("seq", tokens)
                start = time.perf_counter()
                space.free("seq")
                frees.append(time.perf_counter() - start)

            cycle()
            frees.clear()
            before = space.stats()
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                space.allocate("seq", tokens)
                times.append(time.perf_counter() - start)
                mgr.backend.synchronize()
                start = time.perf_counter()
                space.free("seq")
                frees.append(time.perf_counter() - start)
            after = space.stats()
            maps = after["map_calls"] - before["map_calls"]
            map_us = (after["map_seconds"] - before["map_seconds"]) / maps * 1e6
            unmap_us = (after["unmap_seconds"] - before["unmap_seconds"]) / maps * 1e6
            p50 = percentile(times, 50)
            cost.add(f"{page_size // MiB} MiB", raw_map * 1e6, raw_unmap * 1e6, map_us, unmap_us,
                     map_us / (raw_map * 1e6), page_size / (map_us * 1e-6) / 1e9)
            alloc.add(f"{page_size // MiB} MiB", maps // repeat, p50 * 1e3, percentile(times, 99) * 1e3,
                      percentile(frees, 50) * 1e3, 5.0)
    cost.notes.append("kvtier maps a run of consecutive pages with one set-access; raw = one call pair per page")
    alloc.notes.append("p50 of allocate with handles created ahead of need; free() unmaps after a device fence")
    return cost, alloc


def new_sequences(device: str, tokens: int, count: int, ahead: bool, page_size: int = 8 * MiB) -> list[float]:
    """Seconds of ``allocate`` for ``count`` new ``tokens``-token sequences that stay live (requests arriving),
    50 ms apart, with ``map_ahead`` on or off; the reserve is a sequence's worth of pages."""
    pages = -(-tokens * 2048 // page_size)  # pages of the space one sequence needs (2 KiB a token per region)
    config = Config(device=device, page_size=page_size, pool_budget=2 * LLAMA8B["num_layers"] * page_size *
                    pages * (count + 2), pool_ready=0, space_reserve_pages=pages, map_ahead=ahead,
                    host_size=64 * MiB, host_chunk=64 * MiB, nvme_size=64 * MiB)
    times = []
    with TierManager(config) as mgr:
        mgr.tiering.wait_ready()
        space = mgr.create_space("bench", max_tokens=tokens * count, **LLAMA8B)
        for i in range(count):
            deadline = time.monotonic() + 1.0
            time.sleep(0.05)  # the gap between arrivals; with map_ahead, the demoter maps the reserve meanwhile
            while ahead and space.stats()["stripes_empty"] < pages and time.monotonic() < deadline:
                time.sleep(0.005)
            start = time.perf_counter()
            space.allocate(f"s{i}", tokens)
            times.append(time.perf_counter() - start)
    return times


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      tables: torch.Tensor) -> torch.Tensor:
    """One decode step of one layer: gather each sequence's blocks, then SDPA (GQA)."""
    b = tables.shape[0]
    k = k_cache[tables].reshape(b, -1, k_cache.shape[2], k_cache.shape[3]).transpose(1, 2)
    v = v_cache[tables].reshape(b, -1, v_cache.shape[2], v_cache.shape[3]).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def decode_overhead(device: str, batch: int, tokens: int, repeat: int) -> Table:
    table = Table(f"Decode attention, {batch} sequences x {tokens} tokens (gather + SDPA, GQA 32/8, d=128)",
                  ["layout", "ms / layer", "ratio to plain"])
    with TierManager(Config(device=device, host_size=64 * MiB, nvme_size=64 * MiB)) as mgr:
        dev = mgr.device
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        shape = dict(LLAMA8B, num_layers=2, dtype=dtype)
        # headroom: each sequence's last page is partly empty (pages stay per sequence)
        space = mgr.create_space("decode", max_tokens=batch * (tokens + 8192), **shape)
        step = 256  # grow the sequences in turns, as decode does, so their blocks interleave across pages
        for t in range(step, tokens + 1, step):
            for s in range(batch):
                space.allocate(s, t)
        tables = torch.tensor([space.blocks(s) for s in range(batch)], device=dev)
        k_space, v_space = space.kv(1)
        gen = torch.Generator(device=dev).manual_seed(0)
        for t in (k_space, v_space):
            t[tables.flatten()] = torch.randn(t[tables.flatten()].shape, generator=gen, device=dev, dtype=dtype)
        # plain tensors of the same shape; copy only allocated blocks (the rest of the space is unmapped)
        k_plain, v_plain = torch.zeros_like(k_space), torch.zeros_like(v_space)
        k_plain[tables.flatten()] = k_space[tables.flatten()]
        v_plain[tables.flatten()] = v_space[tables.flatten()]
        q = torch.randn(batch, 32, 1, 128, generator=gen, device=dev, dtype=dtype)
        out_space = _decode_attention(q, k_space, v_space, tables)
        out_plain = _decode_attention(q, k_plain, v_plain, tables)
        assert torch.equal(out_space, out_plain), "same data, same kernel: outputs must be identical"
        plain, spaced = [], []
        for _ in range(repeat):  # alternate, so drift in clocks hits both alike
            plain += time_device(lambda: _decode_attention(q, k_plain, v_plain, tables), dev, 5, warmup=1)
            spaced += time_device(lambda: _decode_attention(q, k_space, v_space, tables), dev, 5, warmup=1)
        p, s = percentile(plain, 50), percentile(spaced, 50)
        table.add("plain torch allocation", p * 1e3, 1.0)
        table.add("kvtier space", s * 1e3, p / s)
        table.notes.append("ratio = plain time / space time (medians); target >= 0.98")
    return table


def run(device: str = "auto", quick: bool = False) -> list[Table]:
    is_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    sizes = [2 * MiB, 4 * MiB, 8 * MiB, 32 * MiB] if quick else [2 * MiB, 4 * MiB, 8 * MiB, 16 * MiB, 32 * MiB]
    cost, alloc = map_cost(device, sizes, tokens=8192, repeat=5 if quick else 20)
    if is_cuda:  # a machine's worth of host memory per row on the CPU backend: GPU only
        for ahead in (False, True):
            times = new_sequences(device, 8192, 4 if quick else 12, ahead)
            alloc.add(f"8 MiB, new live sequences, map_ahead {'on' if ahead else 'off'}", None,
                      percentile(times, 50) * 1e3, percentile(times, 99) * 1e3, None, 1.0)
        alloc.notes.append("new live sequences: each allocate() of a fresh 8k-token sequence, 50 ms apart, the earlier "
                           "ones kept; with map_ahead the demoter maps the reserve (a sequence's pages) in between")
    batch, tokens = (16, 4096) if is_cuda else (4, 1024)
    decode = decode_overhead(device, batch, tokens if not quick else tokens // 2, repeat=4 if quick else 20)
    alloc.columns.append("met")  # every row says whether its target is met
    for row in alloc.rows:
        row.append(row[2] <= row[5])
    return [cost, alloc, decode]


