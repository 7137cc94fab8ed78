"""Where a decode step's time goes, on the bench's 8B shape: DynamicCache, its offloaded variant and TieredCache
(all resident; 22 resident + 10 streamed), with PyTorch's default SDPA backends and without cuDNN attention.
Prints ms/step (and the host's time to enqueue a step) per cache, twice each (the second run finds the kernels'
per-shape set-up done), and cuDNN attention's host time per call. Run on a GPU machine: ``python
docs/experiments/profile_decode.py 32768`` (add ``pairs`` for DynamicCache against TieredCache all resident, five
times each, alternating)."""

import contextlib
import sys
import time
import warnings

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kvtier import Config, TierManager
from kvtier.integrations.transformers import TieredCache

warnings.simplefilter("ignore")
ctx = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=65536, rope_theta=500000.0)
torch.set_default_dtype(torch.bfloat16)
with torch.device("cuda"):
    model = LlamaForCausalLM(config).eval()
ids = torch.randint(0, config.vocab_size, (1, ctx), device="cuda")


def tiered(resident=None):
    budget = None if resident is None else TieredCache.pool_bytes(config, ctx + 64, resident)
    cfg = Config(device="cuda", host_size=8 << 30, host_chunk=256 << 20)
    mgr = TierManager(cfg.replace(pool_budget=budget) if budget else cfg)
    mgr.tiering.host.wait_ready()
    return TieredCache(config, max_tokens=ctx + 64, manager=mgr)


caches = [("DynamicCache", lambda: DynamicCache(config=config)),
          ("offloaded", lambda: DynamicCache(config=config, offloading=True)),
          ("Tiered resident", tiered), ("Tiered 22+10", lambda: tiered(22))]
if len(sys.argv) > 2 and sys.argv[2] == "pairs":  # DynamicCache and TieredCache all resident, alternating
    caches = caches[0:1] + caches[2:3]
rows = []
for backends in ("default", "no cudnn") if len(sys.argv) <= 2 else ("default",):
    allowed = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    for repeat in range(2 if len(sys.argv) <= 2 else 5):
        for name, make in caches:
            cache = make()
            with torch.no_grad(), (sdpa_kernel(allowed) if backends == "no cudnn" else contextlib.nullcontext()):
                tok = model(ids, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
                for _ in range(3):
                    tok = model(tok, past_key_values=cache).logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(10):
                    tok = model(tok, past_key_values=cache).logits[:, -1:].argmax(-1)
                enqueue = (time.perf_counter() - start) / 10 * 1e3
                torch.cuda.synchronize()
                step = (time.perf_counter() - start) / 10 * 1e3
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(2):
                        tok = model(tok, past_key_values=cache).logits[:, -1:].argmax(-1)
                    torch.cuda.synchronize()
                cudnn = [e for e in prof.key_averages() if e.key == "aten::_cudnn_attention_forward"]
                per_call = cudnn[0].cpu_time_total / cudnn[0].count if cudnn else 0.0
                rows.append((backends, repeat, name, step, enqueue, per_call))
                print(f"{backends:9} {repeat} {name:16} {step:6.1f} ms/step  enqueue {enqueue:6.1f}  "
                      f"cudnn attention {per_call:7.1f} us/call", flush=True)
            if isinstance(cache, TieredCache):
                cache.close()
                cache.manager.close()
            del cache
            torch.cuda.empty_cache()
