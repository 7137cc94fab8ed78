"""Methods timed on every call, for the experiments here (run as scripts, they import this from their folder)."""

import time
from collections import defaultdict

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
