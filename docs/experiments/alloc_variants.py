"""What an alloc + free of a few blocks would gain without (a) the poke that wakes the demoter when a take leaves
the space's reserve short, (b) a torch event per free that empties a page (a driver event from a pool instead,
recorded on the raw current stream). The space of ``bench peers``; variants interleaved over three trials, the
least of each. Run on a GPU machine: python docs/experiments/alloc_variants.py"""

import time

import torch
from cuda.bindings import driver as drv
from timing import pair_rounds

from kvtier.bench.vmm import LLAMA8B
from kvtier.config import Config, MiB
from kvtier.manager import TierManager

TOKENS = 8192
CELL = LLAMA8B["num_kv_heads"] * LLAMA8B["head_dim"] * 2


class DriverFence:
    """A pooled driver event; back to the pool when the last page holding it lets go."""
    __slots__ = ("event", "pool")

    def __init__(self, event, pool):
        self.event, self.pool = event, pool

    def query(self) -> bool:
        return drv.cuEventQuery(self.event)[0] == drv.CUresult.CUDA_SUCCESS

    def synchronize(self) -> None:
        drv.cuEventSynchronize(self.event)

    def __del__(self):
        self.pool.append(self.event)


def driver_fences(backend):
    pool: list = []
    index = backend.index

    def record(stream=None):
        backend._bind()
        event = pool.pop() if pool else drv.cuEventCreate(drv.CUevent_flags.CU_EVENT_DISABLE_TIMING)[1]
        raw = stream.cuda_stream if stream is not None else torch._C._cuda_getCurrentRawStream(index)
        drv.cuEventRecord(event, raw)
        return DriverFence(event, pool)
    return record


config = Config(device="cuda", host_size=TOKENS * 2 * CELL * 32 + 256 * MiB, host_chunk=256 * MiB, nvme_size=64 * MiB)
with TierManager(config) as mgr:
    mgr.tiering.wait_ready()
    space = mgr.create_space("peers", max_tokens=4 * TOKENS, **LLAMA8B)
    torch_record, poke = mgr.backend.record_fence, mgr.tiering.poke
    driver_record = driver_fences(mgr.backend)
    for name, record in (("torch event", torch_record), ("driver event", driver_record)):
        record(None)
        start = time.perf_counter()
        fences = [record(None) for _ in range(5000)]
        took = (time.perf_counter() - start) / 5000 * 1e6
        start = time.perf_counter()
        for f in fences:
            f.query()
        print(f"{name}: record {took:.2f} us, query {(time.perf_counter() - start) / 5000 * 1e6:.2f} us")
        del fences
    variants = {"as is": (torch_record, poke), "no poke": (torch_record, lambda: None),
                "driver fence": (driver_record, poke), "both": (driver_record, lambda: None)}
    best: dict[tuple[str, int], float] = {}
    for trial in range(3):
        for name, (record, poking) in variants.items():
            mgr.backend.record_fence, mgr.tiering.poke = record, poking
            time.sleep(0.1)
            for k in (1, 16, 64):
                pair_rounds(space, k, 1, 200)
                least = min(pair_rounds(space, k, 5, 400))
                best[name, k] = min(best.get((name, k), least), least)
    mgr.backend.record_fence, mgr.tiering.poke = torch_record, poke
    for name in variants:
        print(f"{name:>13}: " + " / ".join(f"{best[name, k]:.1f}" for k in (1, 16, 64)) + " us (1 / 16 / 64 blocks)")
    mgr.check()
