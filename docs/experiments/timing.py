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
