"""What the poke and the fence cost an alloc + free of a few blocks: the poke that wakes the demoter when a take
leaves the space's reserve short ("no poke": without it), and the fence a free records when it empties a page
("torch event": a new ``torch.cuda.Event`` each time, as before ``kvtier.vmm.fences``; as is: a pooled driver
event). The space of ``bench peers``; variants interleaved over three trials, the least of each. First measured
at 7755088 (H100, with torch events as is and driver events as the variant): 42.4 / 45.4 / 47.6 us with torch
events, 36.0 / 39.2 / 41.4 with driver events; the poke within noise. Run on a GPU machine:
python docs/experiments/alloc_variants.py"""

import time

import torch
from timing import pair_rounds

from kvtier.bench.vmm import LLAMA8B
from kvtier.config import Config, MiB
from kvtier.manager import TierManager

TOKENS = 8192
CELL = LLAMA8B["num_kv_heads"] * LLAMA8B["head_dim"] * 2


def torch_events(index: int):
    def record(stream=None):
        event = torch.cuda.Event()
        event.record(stream if stream is not None else torch.cuda.current_stream(index))
        return event
    return record


config = Config(device="cuda", host_size=TOKENS * 2 * CELL * 32 + 256 * MiB, host_chunk=256 * MiB, nvme_size=64 * MiB)
with TierManager(config) as mgr:
    mgr.tiering.wait_ready()
    space = mgr.create_space("peers", max_tokens=4 * TOKENS, **LLAMA8B)
    pooled, poke = mgr.backend.record_fence, mgr.tiering.poke
    torch_record = torch_events(mgr.backend.index)
    for name, record in (("torch event", torch_record), ("pooled driver event", pooled)):
        for _ in range(2):  # the second pass: the pool's events exist
            start = time.perf_counter()
            fences = [record(None) for _ in range(5000)]
            took = (time.perf_counter() - start) / 5000 * 1e6
            start = time.perf_counter()
            for f in fences:
                f.query()
            queried = (time.perf_counter() - start) / 5000 * 1e6
            del fences
        print(f"{name}: record {took:.2f} us, query {queried:.2f} us")
    variants = {"as is": (pooled, poke), "torch event": (torch_record, poke), "no poke": (pooled, lambda: None)}
    best: dict[tuple[str, int], float] = {}
    for trial in range(3):
        for name, (record, poking) in variants.items():
            mgr.backend.record_fence, mgr.tiering.poke = record, poking
            time.sleep(0.1)
            for k in (1, 16, 64):
                pair_rounds(space, k, 1, 200)
                least = min(pair_rounds(space, k, 5, 400))
                best[name, k] = min(best.get((name, k), least), least)
    mgr.backend.record_fence, mgr.tiering.poke = pooled, poke
    for name in variants:
        print(f"{name:>12}: " + " / ".join(f"{best[name, k]:.1f}" for k in (1, 16, 64)) + " us (1 / 16 / 64 blocks)")
    mgr.check()
