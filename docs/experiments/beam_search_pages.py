"""Beam search over a long prompt: the memory its cache holds at the end and the time of the search, TieredCache
(a beam reorder maps rows' whole pages: kvtier/space_pages.py ``alias``) against DynamicCache (rows copied by
``index_select`` each step); the sequences must be equal.

    python docs/experiments/beam_search_pages.py [--device cuda] [--prompt 4096] [--beams 4] [--new 16]
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

import kvtier
from kvtier.integrations.transformers import TieredCache, cache_kwarg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--new", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    gpu = args.device == "cuda"
    config = transformers.LlamaConfig(hidden_size=1024 if gpu else 256, intermediate_size=2048 if gpu else 512,
                                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8 if gpu else 4,
                                      vocab_size=256, max_position_embeddings=args.prompt + args.new + 64)
    model = transformers.LlamaForCausalLM(config).to(args.device).eval()  # fp32: sequences compared exactly
    prompt = torch.randint(1, 256, (1, args.prompt), generator=torch.Generator().manual_seed(1)).to(args.device)

    def run(cache):  # -> (seconds, bytes held at the end, sequences)
        if gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, **{cache_kwarg(): cache}, max_new_tokens=args.new, num_beams=args.beams,
                                 do_sample=False, pad_token_id=0)
        if gpu:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if isinstance(cache, TieredCache):
            held = cache.manager.pool.in_use_pages * cache.manager.page_size
        else:
            held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        return seconds, held, out

    d_s, d_bytes, expected = run(transformers.DynamicCache(config=config))
    page = 2 << 20 if gpu else 64 << 10
    kcfg = kvtier.Config(device=args.device, page_size=page, pool_budget=16 << 30 if gpu else 4 << 30,
                         pool_ready=0, host_size=1 << 30, nvme_size=1 << 30)
    cache = TieredCache(config, max_tokens=args.prompt + args.new + 64, config=kcfg)  # rows rounded up to pages
    t_s, t_bytes, got = run(cache)
    cache.close()
    print(f"device {args.device}, prompt {args.prompt} tokens, {args.beams} beams, {args.new} new, 8 layers, fp32")
    print("| cache | search s | held at the end, MiB | sequences equal to DynamicCache's |")
    print("| --- | --- | --- | --- |")
    print(f"| DynamicCache | {d_s:.2f} | {d_bytes / 2**20:.1f} | (reference) |")
    print(f"| TieredCache | {t_s:.2f} | {t_bytes / 2**20:.1f} | {torch.equal(got, expected)} |")


if __name__ == "__main__":
    main()
