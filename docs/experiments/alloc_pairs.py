"""Alloc + free of 1 / 16 / 64 blocks in the space of ``bench peers`` (Llama-3-8B shape, 4 x 8192 tokens): the
least of 27 rounds of 400 pairs (three passes of nine, each after a warm-up), on the CPU backend unless a GPU is
there. Compare commits by running it on each in turns. Run: python docs/experiments/alloc_pairs.py"""

import torch
from timing import pair_rounds

from kvtier.bench.vmm import LLAMA8B
from kvtier.config import Config, MiB
from kvtier.manager import TierManager

TOKENS = 8192
CELL = LLAMA8B["num_kv_heads"] * LLAMA8B["head_dim"] * 2  # bytes of one token's K (or V) in one layer

config = Config(device="cuda" if torch.cuda.is_available() else "cpu", host_size=TOKENS * 2 * CELL * 32 + 256 * MiB,
                host_chunk=256 * MiB, nvme_size=64 * MiB)
with TierManager(config) as mgr:
    mgr.tiering.wait_ready()
    space = mgr.create_space("peers", max_tokens=4 * TOKENS, **LLAMA8B)
    least: dict[int, float] = {}
    for _ in range(3):
        for k in (1, 16, 64):
            pair_rounds(space, k, 1, 200)  # warm
            least[k] = min([least.get(k, float("inf"))] + pair_rounds(space, k, 9, 400))
    print(" ".join(f"{k} block(s): {us:.1f} us" for k, us in least.items()))
