"""``kvtier bench long-context``: a context whose KV does not fit beside the weights on the GPU.

A Llama-2-7B-shaped model (MHA: 512 KiB of KV per token) with random bf16 weights, and a prompt of ``tokens``
tokens fed in chunks: by default sized to the machine, a context whose KV is 1.15x the GPU's memory (on a 141 GB
H200 ~310k tokens, 150 GiB of KV), so that no cache can hold it on the GPU; ``--tokens`` sets it. TieredCache runs
first: as many layers resident as the pool holds beside the weights, the rest streamed through pinned host memory
and read every step; the host tier is sized for the streamed layers only (a run that needs more host memory than
the process may take says so before it starts). Then DynamicCache and its
offloaded variant are tried (they run out of memory, or crawl: each is given ``deadline`` seconds). Reported: prefill
time, decode tokens/s, peak GPU memory, bytes below, and the decode step against its physical limit -- the bytes
read from below each step over the host-to-device bandwidth of a pinned copy measured in the same run.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch

from kvtier.bench.common import Table, random_model
from kvtier.bench.tiers import pcie_ceilings
from kvtier.config import Config, GiB, MiB
from kvtier.errors import ConfigError
from kvtier.tiering.tiers.host import memory_limit
from kvtier.integrations.transformers import cache_kwarg
from kvtier.manager import TierManager

log = logging.getLogger(__name__)

CHUNK = 4096  # prefill chunk: its activations (and its mask over the whole context) stay small


def _llama2_7b(cuda: bool, quick: bool) -> Any:
    from transformers import LlamaConfig
    if cuda and not quick:
        return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32000, max_position_embeddings=262144)
    return LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=1024, max_position_embeddings=262144)


def _streamed_bytes(config: Any, max_tokens: int, pool: int, page: int, itemsize: int) -> int:
    """Host memory the layers TieredCache streams take at ``max_tokens``, with a pool of ``pool`` bytes: as many
    layers resident as the pool holds (``TieredCache.pool_bytes``), the rest whole in the host tier."""
    from kvtier.integrations.cache_layers import _layer_bytes
    from kvtier.integrations.transformers import TieredCache
    n = config.num_hidden_layers
    resident = max((r for r in range(n + 1) if TieredCache.pool_bytes(config, max_tokens, r, page_size=page,
                                                                       itemsize=itemsize) <= pool), default=0)
    token_bytes = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * itemsize
    layer, _ = _layer_bytes(token_bytes, -(-max_tokens // 16) * 16, 1, page)
    return (n - resident) * layer


def _run(model: Any, ids: torch.Tensor, cache: Any, new_tokens: int, chunk: int, deadline: float,
         sync: Callable[[], None]) -> dict[str, Any]:
    """Chunked prefill, then greedy decode; stops early (``done`` tokens) past ``deadline`` seconds."""
    out: dict[str, Any] = {"done": 0}
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, ids.shape[1], chunk):
            logits = model(ids[:, first:first + chunk], **{cache_kwarg(): cache}, use_cache=True,
                           logits_to_keep=1).logits[:, -1]
            sync()
            out["done"] = min(ids.shape[1], first + chunk)
            log.info("long-context: %d tokens in %.1f s", out["done"], time.perf_counter() - start)
            if time.perf_counter() - start > deadline:
                out["prefill s"] = time.perf_counter() - start
                return out
        out["prefill s"] = time.perf_counter() - start
        token = logits.argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = model(token, **{cache_kwarg(): cache}, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        sync()
        out["step s"] = (time.perf_counter() - start) / new_tokens
    return out


def run(device: str = "auto", quick: bool = False, tokens: int | None = None, new_tokens: int | None = None,
        deadline: float = 30.0, step: Any = None) -> Table:
    from transformers import DynamicCache

    from kvtier.integrations.transformers import TieredCache
    from kvtier.vmm import resolve_device

    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    new_tokens = new_tokens or (8 if cuda else 4)
    chunk = CHUNK if cuda and not quick else 256
    config = _llama2_7b(cuda, quick)
    itemsize = 2 if cuda else 4
    token_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * \
        (config.hidden_size // config.num_attention_heads) * itemsize
    if not tokens:  # sized to the machine: more KV than the GPU has memory
        total = torch.cuda.get_device_properties(dev).total_memory if cuda and not quick else 0
        tokens = -(-int(1.15 * total) // token_bytes // CHUNK) * CHUNK if total else 2048
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    model = random_model(config, dev)
    ids = torch.randint(0, config.vocab_size, (1, tokens), device=dev)
    table = Table(f"long context: Llama-2-7B shape ({token_bytes // 1024} KiB of KV a token), {tokens} tokens "
                  f"({tokens * token_bytes / GiB:.1f} GiB of KV), prefill in chunks of {chunk}, {new_tokens} new",
                  ["cache", "outcome", "prefill s", "decode tok/s", "peak GPU GiB", "GiB below", "step limit s",
                   "limit / step"])

    def peak() -> float:
        return torch.cuda.max_memory_allocated(dev) / GiB if cuda else 0.0

    # TieredCache: the pool gets what the GPU has left beside the weights and the activations of a chunk
    kv_bytes = tokens * token_bytes
    base = Config(device=str(dev)) if cuda else Config(device="cpu", page_size=64 << 10)
    if cuda:
        # what torch needs beside the pool at 160k: a chunk's activations and its mask over the whole context
        budget = max(torch.cuda.mem_get_info(dev)[0] - (12 * GiB if not quick else 256 * MiB), 64 * MiB)
    else:  # one layer resident, so that the CPU run streams the others too
        budget = TieredCache.pool_bytes(config, tokens + new_tokens, 1, page_size=base.page_size, itemsize=itemsize)
    page = base.page_size or (8 << 20)
    host = _streamed_bytes(config, tokens + new_tokens, budget, page, itemsize) + (1 * GiB if cuda else 4 * MiB)
    limit, where = memory_limit()
    if host > limit:
        raise ConfigError(f"long-context: {tokens} tokens stream {host / GiB:.1f} GiB of KV through host memory, and "
                          f"this process may take {limit / GiB:.1f} GiB ({where}); pass a smaller --tokens")
    cfg = base.replace(pool_budget=budget, pool_ready=0, host_size=host, host_chunk=1 * GiB if cuda else 4 * MiB,
                       host_high_watermark=1.0, host_low_watermark=1.0)  # the host tier holds it all: no cascade
    manager = TierManager(cfg)
    try:
        pin = time.perf_counter()
        manager.tiering.wait_ready()
        pin = time.perf_counter() - pin
        up = pcie_ceilings(dev, 1 * GiB if cuda else 64 * MiB)["up"] / (1 * GiB if cuda else 64 * MiB)
        cache = TieredCache(config, max_tokens=tokens + new_tokens, manager=manager)
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            got = _run(model, ids, cache, new_tokens, chunk, float("inf"), sync)
            below = cache.residency()["host"] + cache.residency()["nvme"]
            limit = below * up  # seconds a step needs to read what lies below, at the pinned-copy bandwidth
            pool_peak = manager.pool.peak_created * manager.page_size / GiB
            table.add(f"TieredCache ({len(cache.streamed_layers)} of {config.num_hidden_layers} layers streamed)",
                      "ok", got["prefill s"], 1 / got["step s"], peak() + pool_peak, below / GiB, limit,
                      limit / got["step s"])
            log.info("long-context: %s", table.rows[-1])
            table.notes.append(f"host tier pinned in {pin:.0f} s before the run; H2D pinned copy "
                               f"{1 / up / 1e9:.1f} GB/s in the same run; peak GPU = torch's peak + kvtier's pages")
        finally:
            cache.close()
    finally:
        manager.close()
    if step:
        step()
    for label, make in (("DynamicCache", lambda: DynamicCache(config=config)),
                        ("DynamicCache(offloading=True)", lambda: DynamicCache(config=config, offloading=True))):
        if not cuda and "offload" in label:
            continue  # transformers' offloading needs a CUDA stream
        cache = make()
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            got = _run(model, ids, cache, new_tokens, chunk, deadline, sync)
            outcome = "ok" if "step s" in got else f"crawls: {got['done']} tokens in {got['prefill s']:.0f} s"
            table.add(label, outcome, got["prefill s"], 1 / got["step s"] if "step s" in got else 0.0, peak(),
                      0.0, 0.0, 0.0)
        except torch.OutOfMemoryError:
            table.add(label, f"out of GPU memory at {cache.get_seq_length()} tokens", 0.0, 0.0, peak(), 0.0, 0.0, 0.0)
        finally:
            del cache
            if cuda:
                torch.cuda.empty_cache()
                # the offloaded cache's pinned copies stay cached by torch otherwise
                getattr(torch._C, "_host_emptyCache", lambda: None)()
        log.info("long-context: %s", table.rows[-1])
        if step:
            step()

    table.notes.append("limit / step: the decode step against the time to read the bytes below once over PCIe "
                       "(1.0 = the step is the copy)")
    return table
