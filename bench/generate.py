"""``kvtier bench generate``: one model and prompt, several caches -- transformers' DynamicCache (all on the GPU),
its offloaded variant (``DynamicCache(offloading=True)``), and TieredCache (whole KV resident, in the offloaded
cache's memory, and every layer streamed through host memory). Prefill time, decode tokens/s and peak GPU memory. A
Llama-3-8B-shaped model with random bf16 weights on a GPU; a tiny one on the CPU (just to run the path).

Peak GPU memory counts torch's allocator *and* kvtier's physical pages (which torch does not see), sampled
together: hooks around every module close a window, and the peak of a run is the largest window's torch peak plus
the pool's peak in that window (pages created, used or not). Decode speed is timed without the hooks.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch

from kvtier.bench.common import Table, random_model
from kvtier.config import Config
from kvtier.manager import TierManager

HOOKED_STEPS = 2  # the first decode steps, measured for memory too (with hooks)
REPEATS = 3  # runs of each cache, interleaved; the table keeps the best speed and the highest peak


def _llama(cuda: bool, quick: bool) -> Any:
    from transformers import LlamaConfig
    if cuda and not quick:
        return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256, max_position_embeddings=65536,
                           rope_theta=500000.0)
    return LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=2, vocab_size=1024, max_position_embeddings=65536)


class _PeakMemory:
    """Peak of torch's allocated bytes plus the kvtier pool's created bytes, sampled at every module boundary;
    also torch's own peak (``torch_peak``) since ``decode()`` was called."""

    def __init__(self, model: Any, device: torch.device, pool: Any) -> None:
        self.device, self.pool, self.peak, self.torch_peak, self._decoding = device, pool, 0, 0, False
        self.hooks = [h for m in model.modules()
                      for h in (m.register_forward_pre_hook(self._sample), m.register_forward_hook(self._sample))]
        torch.cuda.reset_peak_memory_stats(device)
        if pool is not None:
            pool.reset_peak()

    def decode(self) -> None:
        self._sample()
        self._decoding = True

    def _sample(self, *args: Any) -> None:
        window = torch.cuda.max_memory_allocated(self.device)
        if self._decoding:
            self.torch_peak = max(self.torch_peak, window)
        if self.pool is not None:
            window += self.pool.peak_created * self.pool.page_size
            self.pool.reset_peak()
        self.peak = max(self.peak, window)
        torch.cuda.reset_peak_memory_stats(self.device)

    def close(self) -> None:
        self._sample()
        for h in self.hooks:
            h.remove()


def _measure(model: Any, ids: torch.Tensor, cache: Any, new_tokens: int, device: torch.device) -> dict[str, float]:
    from kvtier.integrations.transformers import cache_kwarg
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    manager = getattr(cache, "manager", None)
    memory = _PeakMemory(model, device, manager.pool if manager else None) if cuda else None

    def step(token: torch.Tensor) -> torch.Tensor:
        return model(token, **{cache_kwarg(): cache}, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    with torch.no_grad():
        sync()
        start = time.perf_counter()
        # logits for the last position only: a 32k x 128k-vocab logits tensor would dwarf the KV in the peak
        logits = model(ids, **{cache_kwarg(): cache}, use_cache=True, logits_to_keep=1).logits[:, -1]
        sync()
        prefill = time.perf_counter() - start
        token = logits.argmax(-1, keepdim=True)
        if memory:
            memory.decode()
        start = time.perf_counter()
        for i in range(new_tokens):  # the first steps carry any warm-up a cache has (pinning, bringing layers up)
            token = step(token)
            if memory and i + 1 == HOOKED_STEPS:
                memory.close()
            if i + 1 == new_tokens // 4:
                sync()
                first = time.perf_counter() - start
        sync()
        decode = time.perf_counter() - start
    steady = new_tokens - new_tokens // 4
    return {"prefill s": prefill, "tok/s": new_tokens / decode, "steady tok/s": steady / (decode - first),
            "peak GPU GiB": memory.peak / 2**30 if memory else 0.0,
            "decode torch bytes": memory.torch_peak if memory else 0}


def run(device: str = "auto", quick: bool = False, contexts: list[int] | None = None, new_tokens: int | None = None,
        step: Any = None, repeats: int | None = None) -> Table:
    from transformers import DynamicCache

    from kvtier.integrations.transformers import TieredCache
    from kvtier.vmm import resolve_device

    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    contexts = contexts or ([4096] if quick else [16384, 32768]) if cuda else [512]
    new_tokens = new_tokens or (16 if quick or not cuda else 64)
    config = _llama(cuda, quick)
    model = random_model(config, dev)
    kv_base = Config(device=str(dev)) if cuda else Config(device="cpu", page_size=64 << 10, host_size=64 << 20,
                                                          nvme_size=64 << 20)
    kv_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
    head_dim = config.hidden_size // config.num_attention_heads
    itemsize = 2 if cuda else 4
    page = kv_base.page_size or (8 << 20)

    def tiered(ctx: int, streamed: bool = False, pool_bytes: int | None = None) -> Any:
        """A TieredCache on a manager of its own: all resident, every layer streamed (in the pool that takes), or
        as many layers resident as a pool of ``pool_bytes`` holds."""
        tokens = ctx + new_tokens
        layer_handles = 2 * math.ceil(tokens * kv_heads * head_dim * itemsize / page)  # K and V regions
        total = layer_handles * page * config.num_hidden_layers
        # host room for all of it below the cascade's watermark (else the coldest pages would go on to NVMe)
        cfg = kv_base.replace(host_size=max(kv_base.host_size, int(total / kv_base.host_low_watermark) + 4 * page),
                              host_chunk=max(kv_base.host_chunk, 256 << 20) if cuda else kv_base.host_chunk,
                              pool_ready=0)  # no pages kept ready: the peak counts them, and decode rarely maps
        if streamed:
            pool_bytes = TieredCache.pool_bytes(config, tokens, 0, page_size=page, itemsize=itemsize)
        if pool_bytes is not None:
            cfg = cfg.replace(pool_budget=max(pool_bytes // page, 2 * layer_handles) * page)
        manager = TierManager(cfg)
        manager.tiering.wait_ready()
        return TieredCache(config, max_tokens=tokens, manager=manager, resident_layers=0 if streamed else None)
    repeats = repeats or (REPEATS if not quick else 1 if cuda else 2)  # CPU: interleaved too, run order misleads
    table = Table(f"generate: {config.num_hidden_layers}-layer Llama shape, random weights, {new_tokens} new tokens",
                  ["context", "cache", "prefill s", "decode tok/s", "steady tok/s", "peak GPU GiB",
                   "tok/s vs DynamicCache", "median of pairs", "pairs min-max"])
    # warm up kernels and the allocator on a short prompt (on the CPU too: otherwise the first run pays for it)
    _measure(model, torch.randint(0, config.vocab_size, (1, 512), device=dev), DynamicCache(config=config), 4, dev)
    for ctx in contexts:
        ids = torch.randint(0, config.vocab_size, (1, ctx), device=dev)
        caches: list[tuple[str, Callable[[], Any]]] = [
            ("DynamicCache", lambda: DynamicCache(config=config)),
            ("DynamicCache(offloading=True)", lambda: DynamicCache(config=config, offloading=True)),
            ("TieredCache, all resident", lambda: tiered(ctx)),
            # the offloaded cache's peak, less what torch itself peaks at while decoding with TieredCache: the
            # pool then holds as many layers as fit beside the ring and the streamed layers' last pages
            ("TieredCache, in the offloaded cache's memory", lambda: tiered(ctx, pool_bytes=int(
                seen["DynamicCache(offloading=True)"]["peak GPU GiB"] * 2**30
                - seen["TieredCache, all resident"]["decode torch bytes"]) - (64 << 20))),
            ("TieredCache, all streamed", lambda: tiered(ctx, streamed=True)),
        ]
        seen: dict[str, dict[str, float]] = {}
        runs: dict[str, list[float]] = {}  # tok/s of every run, in order: run r of each cache is a pair
        for _ in range(repeats):  # interleaved, so that drift hits every cache alike
            for label, make in caches:
                if not cuda and "offload" in label:
                    continue  # transformers' offloading needs a CUDA stream (and memory is measured on GPUs only)
                cache = make()
                try:
                    got = _measure(model, ids, cache, new_tokens, dev)
                finally:
                    if isinstance(cache, TieredCache):
                        cache.close()
                        cache.manager.close()  # the bench made this manager for it
                    del cache
                    if cuda:
                        torch.cuda.empty_cache()
                runs.setdefault(label, []).append(got["tok/s"])
                best = seen.setdefault(label, got)  # best speed, highest peak over the repeats
                best.update({"prefill s": min(best["prefill s"], got["prefill s"]),
                             "tok/s": max(best["tok/s"], got["tok/s"]),
                             "steady tok/s": max(best["steady tok/s"], got["steady tok/s"]),
                             "peak GPU GiB": max(best["peak GPU GiB"], got["peak GPU GiB"])})
                if step:
                    step()
        base = seen["DynamicCache"]["tok/s"]
        for label, got in seen.items():
            pairs = sorted(a / b for a, b in zip(runs[label], runs["DynamicCache"]))
            table.add(ctx, label, got["prefill s"], got["tok/s"], got["steady tok/s"],
                      got["peak GPU GiB"] if cuda else None,
                      got["tok/s"] / base, pairs[len(pairs) // 2], f"{pairs[0]:.2f}-{pairs[-1]:.2f}")
    if not cuda:
        table.notes.append("CPU run: these figures show that the path works, not GPU speed (see the README's "
                           "H100 figures)")
    table.notes.append(f"best of {repeats} interleaved runs (decode speed drifts between runs); decode "
                       f"tok/s: all {new_tokens} steps after the prefill; steady: the last three quarters; pairs: "
                       "each run's tok/s over DynamicCache's run of the same round (median, and the spread)")
    table.notes.append("peak GPU: torch's allocator plus kvtier's pages, sampled together at module boundaries")
    table.notes.append("targets (H100, 32k): TieredCache all resident within 5% of DynamicCache; at no more GPU "
                       "memory than the offloaded cache, >= 2x its tok/s")
    return table
