"""``kvtier bench decode-pairs``: TieredCache (all resident) against DynamicCache, decode step by decode step.

Whole ``generate`` runs drift apart on a host-bound VM (the pairs of one round of ``bench generate`` spanned
0.47-1.37 on an H100), so here both caches are prefilled once and then decode in alternating blocks of a few
steps -- A B, B A, A B, ... -- and each round's two blocks form a pair. The median of the pairs and their spread
(inter-quartile range) tell whether the two are within 5% of each other.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from kvtier.bench.common import Table, random_model, percentile
from kvtier.bench.generate import _llama
from kvtier.config import Config, GiB
from kvtier.manager import TierManager


def run(device: str = "auto", quick: bool = False, context: int | None = None, rounds: int | None = None,
        steps: int = 4, step: Any = None) -> Table:
    from transformers import DynamicCache

    from kvtier.integrations.transformers import TieredCache, cache_kwarg
    from kvtier.vmm import resolve_device

    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    context = context or (32768 if cuda and not quick else 512)
    rounds = rounds or (30 if cuda and not quick else 4)
    config = _llama(cuda, quick)
    model = random_model(config, dev)
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    tokens = context + 2 * rounds * steps + 1
    kv = Config(device=str(dev), pool_ready=0) if cuda else Config(device="cpu", page_size=64 << 10)
    manager = TierManager(kv.replace(host_size=max(kv.host_size, 1 * GiB)))
    caches = {"DynamicCache": DynamicCache(config=config),
              "TieredCache, all resident": TieredCache(config, max_tokens=tokens, manager=manager)}
    ids = torch.randint(0, config.vocab_size, (1, context), device=dev)
    times: dict[str, list[float]] = {name: [] for name in caches}
    cpu: dict[str, list[float]] = {name: [] for name in caches}  # the main thread's CPU time: the host's own work
    try:
        with torch.no_grad():
            last = {}
            for name, cache in caches.items():  # prefill each, and a few steps to warm up
                token = model(ids, **{cache_kwarg(): cache}, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
                for _ in range(steps):
                    token = model(token, **{cache_kwarg(): cache}).logits[:, -1].argmax(-1, keepdim=True)
                last[name] = token
            names = list(caches)
            for r in range(rounds):
                for name in (names if r % 2 == 0 else names[::-1]):  # A B, B A: drift hits both alike
                    sync()
                    start, start_cpu = time.perf_counter(), time.thread_time()
                    token = last[name]
                    for _ in range(steps):
                        token = model(token, **{cache_kwarg(): caches[name]}).logits[:, -1].argmax(-1, keepdim=True)
                    cpu[name].append((time.thread_time() - start_cpu) / steps)  # before the sync: launch work only
                    sync()
                    times[name].append((time.perf_counter() - start) / steps)
                    last[name] = token
                if step:
                    step()
    finally:
        caches["TieredCache, all resident"].close()
        manager.close()
    table = Table(f"decode pairs: {config.num_hidden_layers}-layer Llama shape at {context} tokens, {rounds} rounds "
                  f"of {steps} steps each, alternating", ["cache", "measure", "median ms/step", "vs DynamicCache (median)",
                                                          "95% CI of the median", "p25-p75", "min-max", "within 5%"])
    for measure, samples in (("wall", times), ("host CPU", cpu)):
        for name, got in samples.items():
            pairs = [b / t for b, t in zip(samples["DynamicCache"], got)]  # > 1: faster than DynamicCache
            lo, hi = median_interval(pairs)
            table.add(name, measure, percentile(got, 50) * 1e3, percentile(pairs, 50), f"{lo:.3f}-{hi:.3f}",
                      f"{percentile(pairs, 25):.3f}-{percentile(pairs, 75):.3f}", f"{min(pairs):.3f}-{max(pairs):.3f}",
                      "yes" if lo >= 0.95 else "no" if hi < 0.95 else "unsettled")
    table.notes.append("each round runs both caches back to back (the order alternates); a pair is DynamicCache's "
                       "ms/step over the other's in the same round. 'within 5%': the 95% confidence interval of the "
                       "pairs' median lies above 0.95 (yes), below it (no), or straddles it (unsettled: more rounds "
                       "narrow it). host CPU: the main thread's CPU time to launch a step (the decode is host-bound): "
                       "when it tracks the wall time, the spread is the host's own speed, not stalls")
    return table


def median_interval(values: list[float], z: float = 1.96) -> tuple[float, float]:
    """A distribution-free confidence interval of the median: the order statistics ``n/2 -+ z*sqrt(n)/2`` (the
    normal approximation of the binomial; about 95% with z = 1.96), clamped to the sample."""
    ordered, n = sorted(values), len(values)
    half = z * math.sqrt(n) / 2
    return ordered[max(0, math.floor(n / 2 - half))], ordered[min(n - 1, math.ceil(n / 2 + half) - 1)]
