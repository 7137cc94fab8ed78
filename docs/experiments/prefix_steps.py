"""Where does a turn's TTFT go in `kvtier bench prefix`? At 865f504 (H200) the engine on kvtier computed 0.31x the
prompt tokens the engine as shipped recomputes, yet TTFT p50 was equal (1.14 s against 1.19 s) -- far above what a
prefill of a few thousand tokens of a 1B model takes. This times the engine's scheduler thread in both runs: its
steps (prepare / forward / update), the tokens each step ran, and kvtier's hooks on that thread (keeping forgotten
blocks, finding prompts below). Run on a GPU machine: python docs/experiments/prefix_steps.py [--quick] [--documents]"""

import statistics
import sys
import time
from collections import defaultdict

import rich.console

from transformers.generation.continuous_batching.continuous_api import ContinuousBatchProcessor

from kvtier.bench import prefix
from kvtier.integrations.cb_prefix import TieredPrefixes

spent: dict[str, list[float]] = defaultdict(list)
q_tokens: list[tuple[int, int]] = []


def timed(owner, name, label):
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[label].append(time.perf_counter() - t)
    setattr(owner, name, wrapper)


def timed_step(owner):
    original = owner._generation_step

    def wrapper(self, model):
        io = self.inputs_and_outputs
        q_tokens.append((int(getattr(io, "num_q_tokens", -1)), int(getattr(io, "max_kv_read", -1))))
        import torch
        t = time.perf_counter()
        original(self, model)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        spent["forward (synchronized)"].append(time.perf_counter() - t)
    owner._generation_step = wrapper


timed(ContinuousBatchProcessor, "prepare_next_batch", "prepare_next_batch")
timed(ContinuousBatchProcessor, "update_batch", "update_batch")
timed_step(ContinuousBatchProcessor)
timed(TieredPrefixes, "keep", "kvtier keep (forgotten blocks down)")
timed(TieredPrefixes, "extend", "kvtier extend (prompt found below)")
timed(TieredPrefixes, "settle", "kvtier settle")

rows = []
original_measure_step = None


def report(label: str) -> None:
    rows.append((label, {k: (len(v), sum(v), statistics.median(v) if v else 0.0, max(v) if v else 0.0)
                         for k, v in spent.items()}, list(q_tokens)))
    spent.clear()
    q_tokens.clear()


names = iter(["engine as shipped", "engine on kvtier"])
table = prefix.run("auto", quick="--quick" in sys.argv, step=lambda: report(next(names)),
                   workload="documents" if "--documents" in sys.argv else "chats")
rich.console.Console(width=200).print(table.render())
for label, parts, qs in rows:
    print(f"\n{label}: {len(qs)} steps")
    for k, (n, total, med, top) in sorted(parts.items(), key=lambda kv: -kv[1][1]):
        print(f"  {k:40s} calls {n:6d}  total {total:8.2f} s  median {med * 1e3:8.2f} ms  max {top * 1e3:8.1f} ms")
    if qs:
        q, kv = [a for a, _ in qs], [b for _, b in qs]
        print(f"  query tokens per step: median {statistics.median(q):.0f}, max {max(q)}, steps over 512: "
              f"{sum(x > 512 for x in q)}; kv read per step: median {statistics.median(kv):.0f}, max {max(kv)}")
