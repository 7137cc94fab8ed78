"""``kvtier bench generate``: one model and prompt, three caches -- transformers' DynamicCache (all on the GPU),
its offloaded variant (``DynamicCache(offloading=True)``), and TieredCache (whole KV resident, and streamed with
one resident layer). Prefill time, decode tokens/s and peak GPU memory (torch's allocator plus kvtier's mapped
pages, which torch does not see). A Llama-3-8B-shaped model with random bf16 weights on a GPU; a tiny one on
the CPU (``--quick`` there, just to run the path)."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from kvtier.bench.common import Table
from kvtier.config import Config
from kvtier.manager import TierManager


def _llama(cuda: bool, quick: bool) -> Any:
    from transformers import LlamaConfig
    if cuda and not quick:
        return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256, max_position_embeddings=65536,
                           rope_theta=500000.0)
    return LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=2, vocab_size=1024, max_position_embeddings=65536)


def _measure(model: Any, ids: torch.Tensor, cache: Any, new_tokens: int, device: torch.device) -> dict[str, float]:
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        sync()
        start = time.perf_counter()
        # logits for the last position only: a 32k x 128k-vocab logits tensor would dwarf the KV in the peak
        logits = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        sync()
        prefill = time.perf_counter() - start
        token = logits.argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        sync()
        decode = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    manager = getattr(cache, "manager", None)
    if manager is not None:
        peak += manager.stats()["pool"]["peak_bytes_in_use"]
    return {"prefill s": prefill, "tok/s": new_tokens / decode, "peak GPU GiB": peak / 2**30}


def run(device: str = "auto", quick: bool = False, contexts: list[int] | None = None, new_tokens: int = 32,
        step: Any = None) -> Table:
    from transformers import DynamicCache, LlamaForCausalLM

    from kvtier.integrations.transformers import TieredCache
    from kvtier.vmm import resolve_device

    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    contexts = contexts or ([4096] if quick else [16384, 32768]) if cuda else [512]
    config = _llama(cuda, quick)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if cuda else torch.float32)  # no fp32 copy of 8B weights on the way
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    kv_base = Config(device=str(dev)) if cuda else Config(device="cpu", page_size=64 << 10, host_size=64 << 20,
                                                          nvme_size=64 << 20)
    kv_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
    head_dim = config.hidden_size // config.num_attention_heads
    itemsize = 2 if cuda else 4

    def tiered(ctx: int, resident: int | None) -> Any:
        """A TieredCache on a manager of its own: all resident with the default budget, or streamed within a
        pool of four layers (about what the offloaded DynamicCache keeps on the GPU), host memory for the rest."""
        per_layer = 2 * (ctx + new_tokens + 16) * kv_heads * head_dim * itemsize
        total = per_layer * config.num_hidden_layers
        cfg = kv_base.replace(host_size=max(kv_base.host_size, int(1.25 * total)),
                              host_chunk=max(kv_base.host_chunk, 256 << 20) if cuda else kv_base.host_chunk)
        if resident is not None:
            page_bytes = 2 * (cfg.page_size or (8 << 20))
            cfg = cfg.replace(pool_budget=4 * max(per_layer, page_bytes) + 4 * page_bytes,
                              pool_ready=2 * max(per_layer, page_bytes))
        manager = TierManager(cfg)
        manager.tiering.host.wait_ready()
        return TieredCache(config, max_tokens=ctx + new_tokens + 16, manager=manager, resident_layers=resident)
    table = Table(f"generate: {config.num_hidden_layers}-layer Llama shape, random weights, {new_tokens} new tokens",
                  ["context", "cache", "prefill s", "decode tok/s", "peak GPU GiB", "tok/s vs DynamicCache"])
    for ctx in contexts:
        ids = torch.randint(0, config.vocab_size, (1, ctx), device=dev)
        caches: list[tuple[str, Callable[[], Any]]] = [
            ("DynamicCache", lambda: DynamicCache(config=config)),
            ("DynamicCache(offloading=True)", lambda: DynamicCache(config=config, offloading=True)),
            ("TieredCache, all resident", lambda: tiered(ctx, None)),
            ("TieredCache, 1 layer resident", lambda: tiered(ctx, 1)),
        ]
        base = None
        for label, make in caches:
            if not cuda and "offloading" in label:
                continue  # transformers' offloading needs a CUDA stream
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
            base = base or got["tok/s"]
            table.add(ctx, label, got["prefill s"], got["tok/s"], got["peak GPU GiB"], got["tok/s"] / base)
            if step:
                step()
    table.notes.append("targets (H100, 32k): TieredCache all resident within 5% of DynamicCache; at no more GPU "
                       "memory than the offloaded cache, >= 2x its tok/s")
    return table
