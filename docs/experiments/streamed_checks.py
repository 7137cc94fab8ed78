"""Why do host checksums take `bench long-context` from 0.90 of its physical limit to 0.65 (H100, 93bffd3, 188k
tokens, 16 of 32 layers streamed: 46 GiB read up a decode step)? A smaller case of the same: a Llama-2-7B shape at
``--tokens`` (default 65536) with a pool for ``--resident`` layers, so that the others stream; decode steps timed
with checksums off, on, off, on (each a manager of its own, in one process), and the main thread's profile of the
last two steps with them on (where it waits).
Run on a GPU machine: python docs/experiments/streamed_checks.py [--tokens N] [--resident R]"""

import argparse
import cProfile
import io
import pstats
import time

import torch

from kvtier import Config, TierManager
from kvtier.bench.common import random_model
from kvtier.bench.long_context import CHUNK, _llama2_7b, _streamed_bytes
from kvtier.bench.tiers import pcie_ceilings
from kvtier.config import GiB
from kvtier.integrations.transformers import TieredCache, cache_kwarg

parser = argparse.ArgumentParser()
parser.add_argument("--tokens", type=int, default=65536)
parser.add_argument("--resident", type=int, default=16)
parser.add_argument("--steps", type=int, default=8)
args = parser.parse_args()
dev = torch.device("cuda", 0)
config = _llama2_7b(True, False)
model = random_model(config, dev)
ids = torch.randint(0, config.vocab_size, (1, args.tokens), device=dev)
base = Config(device="cuda")
page = base.page_size or 8 << 20
budget = TieredCache.pool_bytes(config, args.tokens + args.steps + 1, args.resident, page_size=page,
                                itemsize=2)
host = _streamed_bytes(config, args.tokens + args.steps + 1, budget, page, 2) + 1 * GiB
up = pcie_ceilings(dev, 1 * GiB)["up"] / GiB

ORDER = (False, True, False, True)  # off first: the first manager of the process was slower (4aa1f8c, 8b92b9d)
for run, checks in enumerate(ORDER):
    cfg = base.replace(pool_budget=budget, pool_ready=0, host_size=host, host_chunk=1 * GiB, host_checksums=checks,
                       host_high_watermark=1.0, host_low_watermark=1.0)
    with TierManager(cfg) as manager, torch.no_grad():
        manager.tiering.wait_ready()
        cache = TieredCache(config, max_tokens=args.tokens + args.steps + 1, manager=manager)
        try:
            for first in range(0, args.tokens, CHUNK):
                logits = model(ids[:, first:first + CHUNK], **{cache_kwarg(): cache}, use_cache=True,
                               logits_to_keep=1).logits[:, -1]
            token = logits.argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            below = cache.residency()["host"]
            times, profile = [], cProfile.Profile()
            for step in range(args.steps):
                if step == args.steps - 2 and run == len(ORDER) - 1:  # the last run's last two steps, profiled
                    profile.enable()
                start = time.perf_counter()
                token = model(token, **{cache_kwarg(): cache}, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            profile.disable()
            timed_steps = times[1:args.steps - 2]  # not the first (it reads what the prefill left), nor profiled ones
            step_s = sorted(timed_steps)[len(timed_steps) // 2]
            print(f"checksums {'on ' if checks else 'off'}: {len(cache.streamed_layers)} layers streamed, "
                  f"{below / GiB:.1f} GiB below; step {step_s * 1e3:.0f} ms, limit {below * up * 1e3:.0f} ms "
                  f"({below * up / step_s:.3f}); steps " + " ".join(f"{t * 1e3:.0f}" for t in times), flush=True)
            if run == len(ORDER) - 1:
                out = io.StringIO()
                pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(22)
                print(out.getvalue()[-6000:])
                profile = cProfile.Profile()
        finally:
            cache.close()
