"""Copies of a prompt cache (transformers' recipe: ``copy.deepcopy(prompt_cache)`` for each question): memory and
time, TieredCache (whole pages shared, see kvtier/space_pages.py) against DynamicCache, same model, same prompt.
Every copy then answers a question; the tokens must equal DynamicCache's.

    python docs/experiments/prompt_cache_copies.py [--device cuda] [--prompt 4096] [--copies 4]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import transformers

import kvtier
from kvtier.integrations.transformers import TieredCache, cache_kwarg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--new", type=int, default=8, help="tokens each copy generates")
    args = parser.parse_args()
    torch.manual_seed(0)
    gpu = args.device == "cuda"
    config = transformers.LlamaConfig(hidden_size=1024 if gpu else 256, intermediate_size=2048 if gpu else 512,
                                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8 if gpu else 4,
                                      vocab_size=256, max_position_embeddings=2 * args.prompt + 256)
    dtype = torch.bfloat16 if gpu else torch.float32
    model = transformers.LlamaForCausalLM(config).to(args.device, dtype).eval()
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, 256, (1, args.prompt), generator=gen).to(args.device)
    questions = [torch.randint(1, 256, (1, 8 + q), generator=gen).to(args.device) for q in range(args.copies)]
    kw = cache_kwarg()

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize()

    def run(prompt_cache):  # -> (seconds a copy, bytes after the copies, answers)
        with torch.no_grad():
            model(prompt, **{kw: prompt_cache})
        sync()
        start = time.perf_counter()
        copies = [copy.deepcopy(prompt_cache) for _ in questions]
        sync()
        seconds = (time.perf_counter() - start) / len(copies)
        held = used_bytes(prompt_cache, copies)
        answers = []
        for cache, q in zip(copies, questions):
            with torch.no_grad():
                answers.append(model.generate(torch.cat([prompt, q], dim=1), **{kw: cache}, max_new_tokens=args.new,
                                              do_sample=False, pad_token_id=0))
            if isinstance(cache, TieredCache):
                cache.close()
        return seconds, held, answers

    def used_bytes(original, copies) -> int:
        if isinstance(original, TieredCache):
            return original.manager.pool.in_use_pages * original.manager.page_size
        return sum(t.numel() * t.element_size() for c in [original, *copies] for layer in c.layers
                   for t in (layer.keys, layer.values))

    d_seconds, d_bytes, expected = run(transformers.DynamicCache(config=config))
    page = 2 << 20 if gpu else 64 << 10
    kcfg = kvtier.Config(device=args.device, page_size=page, pool_budget=8 << 30 if gpu else 2 << 30, pool_ready=0,
                         host_size=1 << 30, nvme_size=1 << 30)
    original = TieredCache(config, max_tokens=args.prompt + 64, config=kcfg)
    t_seconds, t_bytes, got = run(original)
    same = sum(torch.equal(a, b) for a, b in zip(got, expected))
    print(f"device {args.device}, prompt {args.prompt} tokens, {args.copies} copies, 8 layers, {dtype}")
    print("| cache | a copy, ms | memory of the original and its copies, MiB | answers equal to DynamicCache's |")
    print("| --- | --- | --- | --- |")
    print(f"| DynamicCache | {d_seconds * 1e3:.2f} | {d_bytes / 2**20:.1f} | (reference) |")
    print(f"| TieredCache | {t_seconds * 1e3:.2f} | {t_bytes / 2**20:.1f} | {same} of {len(expected)} |")
    original.close()


if __name__ == "__main__":
    main()
