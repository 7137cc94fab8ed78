"""``kvtier bench colocated``: two models served from one process on one KV budget, under bursty traffic.

Model A's requests come in a burst, then model B's (each model idle while the other is busy). Served twice in
the same run: a static equal split (the engine as shipped, each with half the budget) and kvtier's shared pool
(each engine on one manager whose pool is the whole budget: the busy model maps the pages the idle one gave
back). Reported per model: time to first token (p50, p99), output tokens/s, preemptions, and the KV memory each
held over time (a plot with ``--plot``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from kvtier.bench.common import Table, percentile, random_model
from kvtier.bench.serve import Workload, _cb_config, _serve
from kvtier.config import Config, MiB
from kvtier.manager import TierManager

SAMPLE_S = 0.05


@dataclass
class Setup:
    """What the two-model benches share: the model shape, each model's workload, the KV budget for both."""
    config: Any
    works: list[Workload]
    budget_blocks: int
    block_bytes: int
    gap: float
    n: int

    @property
    def budget(self) -> int:
        return self.budget_blocks * self.block_bytes

    def staging(self, cuda: bool) -> int:
        return self.block_bytes

    def static_bytes(self) -> int:
        """What one engine of the static split maps: half the budget's blocks and its two pad sectors (a sector is
        a block here), which the engine as shipped allocates beside its blocks."""
        return (self.budget_blocks // 2 + 2) * self.block_bytes

    def pool_bytes(self, cuda: bool) -> int:
        """The pages both engines draw on: exactly what the static split maps (both halves and both engines' pad
        sectors; on the CPU backend a little more: its 64 KiB pages hold eight of these tiny blocks). Each engine's
        staging room comes out of it. (At f4f2c27 the pool had 64 MiB of staging per engine more and each cache
        could grow to the whole budget: twice the split's memory while both were busy; at 952e6ad it had the pad
        sectors less, which on the H100 left an engine alone on the pool no more blocks than the static half.)"""
        return 2 * self.static_bytes() + (0 if cuda else 2 * MiB)

    def capacity(self, cuda: bool) -> int:
        """An engine's cache at most: the budget less both engines' staging rooms."""
        return self.budget - 2 * self.staging(cuda)

    def kvtier_config(self, dev: Any, **more: Any) -> Config:
        cuda = dev.type == "cuda"
        return Config(device=str(dev), pool_budget=self.pool_bytes(cuda), pool_ready=0,
                      host_size=max(self.budget, 256 * MiB) if cuda else 64 * MiB,
                      host_chunk=64 * MiB if cuda else 4 * MiB, nvme_size=256 * MiB,
                      # 2 MiB pages on a GPU: each engine's staging room (pages it keeps for preemption, a page
                      # more for a chunk that straddles) is a small part of a budget this size; with 8 MiB pages the
                      # two engines' rooms took 8 of the quick run's 7 pages (2a2efd3)
                      page_size=2 * MiB if cuda else 64 << 10, **more)


def setup(cuda: bool, quick: bool) -> Setup:
    from transformers import LlamaConfig
    if cuda:  # two Llama-3.2-1B shapes (32 KiB of KV a token)
        config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                             num_key_value_heads=8, vocab_size=32000, max_position_embeddings=8192)
        # bursts that take turns, as in the case the shared pool is for: each burst takes ~60 s on a static half
        # (24 requests a model and bursts 10 s apart overlapped throughout and outran 270 s, 952e6ad)
        n, prompt, output, rate, page, gap = (6 if quick else 12), (64, 256), (128, 256), 64.0, 256, \
            (20.0 if quick else 40.0)
    else:
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=128, max_position_embeddings=1024)
        n, prompt, output, rate, page, gap = (6 if quick else 12), (8, 48), (8, 32), 1e6, 16, 0.5
    # A's burst at 0, B's after ``gap`` seconds; the budget: half of one burst's peak, for both models
    # (a third of the peak left each engine of the static split two requests at a time on the H100, 628b7d8)
    works = [Workload.make(n, prompt, output, rate, config.vocab_size, page, 1 / 2, seed=i, start=i * gap)
             for i in range(2)]
    # ... but never so small that half of it cannot hold one request whole (the static split would refuse it)
    largest = max(-(-(len(p) + m) // page) for w in works for p, m in zip(w.prompts, w.new_tokens))
    budget_blocks = max(works[0].budget_blocks, 2 * largest + 2)
    itemsize = 2 if cuda else 4  # random_model: bf16 on a GPU, fp32 on the CPU
    block_bytes = (config.num_hidden_layers * 2 * config.num_key_value_heads *
                   (config.hidden_size // config.num_attention_heads) * itemsize * page)
    return Setup(config, works, budget_blocks, block_bytes, gap, n)


def run(device: str = "auto", quick: bool = False, step: Callable[[], None] | None = None) -> Table:
    from kvtier.integrations.continuous_batching import kvtier_engine
    from kvtier.vmm import resolve_device

    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    s = setup(cuda, quick)
    config, works, budget_blocks, block_bytes, budget, n, gap = (s.config, s.works, s.budget_blocks, s.block_bytes,
                                                                s.budget, s.n, s.gap)
    models = [random_model(config, dev) for _ in range(2)]
    for m in models:
        m.config._attn_implementation = "sdpa"
    timeout = 300.0 if cuda else 120.0
    table = Table(f"Two models, one KV budget of {budget_blocks} blocks ({budget / MiB:.1f} MiB), bursts {gap:g} s "
                  f"apart ({n} requests each)",
                  ["memory", "model", "output tok/s", "TTFT p50 s", "TTFT p99 s", "preempted: kept",
                   "preempted: recomputed", "peak KV MiB"])

    def serve_both(serve_one: Callable[[int], dict[str, Any]]) -> list[dict[str, Any]]:
        outs: list[Any] = [None, None]

        def run_one(i: int) -> None:
            try:
                outs[i] = serve_one(i)
            except BaseException as exc:  # raised below, in the caller's thread
                outs[i] = exc

        threads = [threading.Thread(target=run_one, args=(i,), name=f"bench-model-{i}") for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for out in outs:
            if isinstance(out, BaseException):
                raise out
        return outs

    # static equal split: each engine as shipped with half the budget, its cache allocated whole
    half = budget_blocks // 2
    static = serve_both(lambda i: _serve(models[i], works[i], _cb_config(works[i], half, 0.0, cuda), timeout))
    for i, out in enumerate(static):
        table.add("static equal split", "AB"[i], out["tok_s"], percentile(out["ttft"], 50),
                  percentile(out["ttft"], 99), 0, None, s.static_bytes() / MiB)
        table.series[f"static {'AB'[i]}"] = [(0.0, s.static_bytes() / MiB), (out["end"], s.static_bytes() / MiB)]
    if step:
        step()

    # kvtier's shared pool: both engines on one manager whose pool is the budget (staging room included)
    staging = s.staging(cuda)
    with TierManager(s.kvtier_config(dev)) as mgr, \
            kvtier_engine(models[0], mgr, name="A", capacity_bytes=s.capacity(cuda), staging_bytes=staging) as a, \
            kvtier_engine(models[1], mgr, name="B", capacity_bytes=s.capacity(cuda), staging_bytes=staging) as b:
        samples: dict[str, list[tuple[float, float]]] = {"kvtier A": [], "kvtier B": []}
        done = threading.Event()
        t0 = time.perf_counter()

        def sample() -> None:
            while not done.wait(SAMPLE_S):
                now = time.perf_counter() - t0
                for name, engine in (("kvtier A", a), ("kvtier B", b)):
                    samples[name].append((now, engine.stats()["bytes_mapped"] / MiB))

        sampler = threading.Thread(target=sample, name="bench-memory", daemon=True)
        sampler.start()
        try:
            shared = serve_both(lambda i: _serve(models[i], works[i], _cb_config(works[i], None, 0.0, cuda),
                                                 timeout))
        finally:
            done.set()
            sampler.join()
        stats = [a.stats(), b.stats()]
    for i, out in enumerate(shared):
        table.add("kvtier shared pool", "AB"[i], out["tok_s"], percentile(out["ttft"], 50),
                  percentile(out["ttft"], 99), stats[i]["preempted_to_tiers"], stats[i]["soft_resets"],
                  stats[i]["peak_bytes_mapped"] / MiB)
    table.series.update(samples)
    if step:
        step()
    table.notes.append("static: each engine as shipped with half the blocks (preemptions it recomputed are not "
                       "counted here: n/a); shared: both engines on one kvtier pool of what the split maps (pad sectors in), staging room "
                       "included; peak KV = the cache's mapped pages at their most")
    if not cuda:
        table.notes.append("CPU backend: tiny models, not GPU figures")
    return table
