"""``kvtier bench remote``'s two-server workload: the time to first token of a second server whose prompt another
server computed, found through the store, against a prompt nobody computed.

Each server is a process of its own running transformers' continuous batching on kvtier with the remote cache
on (``kvtier_engine``; a model of ``bench.remote``'s KV shape, random weights). The first serves a prompt; the
blocks its engine forgets at the end of its session go to the store. The second serves the same prompt (a hit:
``find`` reads the blocks from the store, and the engine computes only the last partial block) and then, in a
third process, a prompt of the same length nobody computed (a miss: the whole prefill). Each server first serves
a short prompt of its own, so that neither measured request pays the engine's start-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import torch

from kvtier.bench.common import random_model
from kvtier.config import Config, MiB

CHILD = ("import json, sys\nfrom kvtier.bench.remote_servers import serve\n"
         "print('RESULT ' + json.dumps(serve(**json.loads(sys.argv[1]))), flush=True)")


def model_config(tokens: int) -> Any:
    """A Llama of ``bench.remote.SHAPE``'s KV shape (8 layers, 8 KV heads of 128)."""
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=max(tokens + 64, 4096))


def _prompt(tokens: int, seed: int) -> list[int]:
    return torch.randint(1, 1024, (tokens,), generator=torch.Generator().manual_seed(seed)).tolist()


def serve(device: str, tokens: int, seed: int, store: dict[str, Any], object_bytes: int) -> dict[str, Any]:
    """One server's life: a short warm-up prompt, then the prompt of ``seed``; its TTFT and the remote counts."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from kvtier.integrations.continuous_batching import kvtier_engine
    from kvtier.manager import TierManager

    dev = torch.device(device)
    config = model_config(tokens)
    model = random_model(config, dev)
    model.config._attn_implementation = "sdpa"
    block_tokens = 16
    kv = (tokens + 256) * 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * \
        model.dtype.itemsize
    cfg = Config(device=device, pool_budget=3 * kv + 512 * MiB, pool_ready=0, host_size=kv + 64 * MiB, nvme_size=0,
                 tiers=["host"], page_size=None if dev.type == "cuda" else 64 << 10, remote_object_bytes=object_bytes,
                 remote_buffer=kv + 64 * MiB, remote_timeout_s=60.0, remote_put_timeout_s=120.0,
                 remote_negative_ttl_s=0.0, **store)
    gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=2)
    cb = ContinuousBatchingConfig(page_size=block_tokens, num_blocks=None, max_batch_tokens=tokens + 256,
                                  allow_block_sharing=True, auto_switch_to_flash=False, use_cuda_graph=False)
    with TierManager(cfg) as mgr:
        if mgr.remote is None or not mgr.remote.wait_connected(60):
            raise RuntimeError("bench remote: the server's remote cache did not connect")
        with kvtier_engine(model, mgr, name="bench", capacity_bytes=kv + 64 * MiB, staging_bytes=kv + 64 * MiB):
            with model.continuous_batching_context_manager(generation_config=gen,
                                                           continuous_batching_config=cb) as engine:
                ttft = {}
                for rid, prompt in (("warm-up", _prompt(64, 10_000 + seed)), ("measured", _prompt(tokens, seed))):
                    start = time.perf_counter()
                    engine.add_request(prompt, request_id=rid, max_new_tokens=2, record_timestamps=True)
                    while True:
                        result = engine.get_result(timeout=600)
                        if result is None:
                            raise RuntimeError(f"bench remote: the engine stopped: "
                                               f"{engine.background_thread_status.fatal_error!r}")
                        if result.request_id == rid and result.is_finished():
                            break
                    ttft[rid] = result.timestamps[0] - start
        flushed = mgr.remote.flush(300)  # what the engine forgot reaches the store before the process ends
        remote = mgr.stats()["remote"]
    return {"ttft": ttft["measured"], "hit_blocks": remote.get("hit_blocks", 0), "puts": remote.get("puts", 0),
            "flushed": flushed}


def _serve_in_a_process(device: str, tokens: int, seed: int, store: dict[str, Any], object_bytes: int,
                        timeout: float = 900.0) -> dict[str, Any]:
    spec = json.dumps({"device": device, "tokens": tokens, "seed": seed, "store": store,
                       "object_bytes": object_bytes})
    done = subprocess.run([sys.executable, "-c", CHILD, spec], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "GLOG_minloglevel": "2"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"bench remote: a server process failed: {done.stderr[-2000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def two_servers(device: str, tokens: int, store: dict[str, Any], object_bytes: int) -> dict[str, float]:
    """The first server computes a prompt; a second finds it in the store (hit); a third serves a prompt nobody
    computed (miss). Their TTFTs in seconds, and the blocks the hit read from the store."""
    first = _serve_in_a_process(device, tokens, 1, store, object_bytes)
    if not first["flushed"] or not first["puts"]:
        raise RuntimeError(f"bench remote: the first server stored nothing ({first})")
    hit = _serve_in_a_process(device, tokens, 1, store, object_bytes)
    miss = _serve_in_a_process(device, tokens, 2, store, object_bytes)
    if not hit["hit_blocks"] or miss["hit_blocks"]:
        raise RuntimeError(f"bench remote: the second server did not hit, or the third did ({hit}, {miss})")
    return {"first": first["ttft"], "hit": hit["ttft"], "miss": miss["ttft"], "hit_blocks": hit["hit_blocks"]}
