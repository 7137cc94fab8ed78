"""Methods timed on every call, for the experiments here (run as scripts, they import this from their folder)."""

import time
from collections import defaultdict
from contextlib import contextmanager

spent: dict[str, list[float]] = defaultdict(list)  # label -> the seconds of each call


def timed(owner, name, label):
    """Replace ``owner.name`` by a wrapper that adds each call's seconds to ``spent[label]``."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[label].append(time.perf_counter() - t)
    setattr(owner, name, wrapper)


def pair_rounds(space, k: int, rounds: int, pairs: int) -> list[float]:
    """Microseconds per allocate + free of ``k`` blocks (16 tokens each) of one sequence, for each of ``rounds``
    rounds of ``pairs`` pairs."""
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(pairs):
            space.allocate("k", k * 16)
            space.free("k")
        out.append((time.perf_counter() - t) / pairs * 1e6)
    return out


@contextmanager
def peers_space():
    """The space of ``bench peers`` (Llama-3-8B shape, 4 x 8192 tokens) in a manager of its own, on the GPU if there
    is one, else the CPU backend."""
    import torch

    from kvtier.bench.vmm import LLAMA8B
    from kvtier.config import Config, MiB
    from kvtier.manager import TierManager
    tokens = 8192
    cell = LLAMA8B["num_kv_heads"] * LLAMA8B["head_dim"] * 2  # bytes of one token's K (or V) in one layer
    config = Config(device="cuda" if torch.cuda.is_available() else "cpu",
                    host_size=tokens * 2 * cell * 32 + 256 * MiB, host_chunk=256 * MiB, nvme_size=64 * MiB)
    with TierManager(config) as mgr:
        mgr.tiering.wait_ready()
        yield mgr.create_space("peers", max_tokens=4 * tokens, **LLAMA8B)
