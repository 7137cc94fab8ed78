"""Where does a turn's TTFT go in `kvtier bench prefix`? At 865f504 (H200) the engine on kvtier computed 0.31x the
prompt tokens the engine as shipped recomputes, yet TTFT p50 was equal (1.14 s against 1.19 s) -- far above what a
prefill of a few thousand tokens of a 1B model takes. This times the engine's scheduler thread in both runs: its
steps (prepare / forward / update), the tokens each step ran, and kvtier's hooks on that thread (keeping forgotten
blocks, finding prompts below). Also: the five slowest first tokens of each run, with each one's lookups below
and preemptions, and each run's first tokens split into the wait for a first batch and the steps after it. Run on
a GPU machine: python docs/experiments/prefix_steps.py [--quick] [--documents] [--profile] [--no-graphs] (--profile:
where the scheduler's batch making spends its time, cProfile'd on its thread; --no-graphs: decode steps without CUDA
graphs, as the bench ran them before 3e677f6)"""

import cProfile
import pstats
import statistics
import sys
import time
from collections import defaultdict

import rich.console

from transformers.generation.continuous_batching.continuous_api import ContinuousBatchProcessor
from transformers.generation.continuous_batching.scheduler import Scheduler

from kvtier.bench import prefix
from kvtier.integrations.cb_preemption import TieredOffloading
from kvtier.integrations.cb_prefix import TieredPrefixes
from timing import spent, timed

q_tokens: list[tuple[int, int]] = []


def timed_step(owner):
    original = owner._generation_step

    def wrapper(self, model):
        io = self.inputs_and_outputs
        q_tokens.append((int(getattr(io, "num_q_tokens", -1)), int(getattr(io, "max_kv_read", -1))))
        import torch
        t = time.perf_counter()
        original(self, model)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        spent["forward (synchronized)"].append(time.perf_counter() - t)
    owner._generation_step = wrapper


profiles: list[cProfile.Profile] = [cProfile.Profile()]  # --profile: the scheduler's batch making, per run


def profiled(owner, name):
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        profiles[-1].enable()
        try:
            return original(*args, **kwargs)
        finally:
            profiles[-1].disable()
    setattr(owner, name, wrapper)


if "--profile" in sys.argv:
    profiled(ContinuousBatchProcessor, "prepare_next_batch")
timed(ContinuousBatchProcessor, "prepare_next_batch", "prepare_next_batch")
timed(ContinuousBatchProcessor, "update_batch", "update_batch")
timed_step(ContinuousBatchProcessor)
timed(TieredPrefixes, "keep", "kvtier keep (forgotten blocks down)")
timed(TieredPrefixes, "extend", "kvtier extend (prompt found below)")
timed(TieredPrefixes, "settle", "kvtier settle")

# the story of the slowest first tokens: each request's lookups below and preemptions, seconds from the run's start
events: dict[str, list[tuple[float, str]]] = defaultdict(list)
served: list[dict] = []


def note(request_id: str, what: str) -> None:  # times made relative to the run's start when it ended
    events[request_id].append((time.perf_counter(), what))


def traced_extend(original):
    def wrapper(self, request_id, prompt_ids, matched):
        held = original(self, request_id, prompt_ids, matched)
        note(request_id, f"lookup {matched} -> {held} tokens" + (" (short of room)" if request_id in self.short
                                                                  else ""))
        return held
    return wrapper


def traced_victims(original):
    def wrapper(self, victims, tables):
        done = original(self, victims, tables)
        for state in victims:
            note(state.request_id, "swapped out" if state.request_id in done else "requeued or reset")
        return done
    return wrapper


def captured_serve(original):
    def wrapper(*args, **kwargs):
        events.clear()
        admitted.clear()
        out = original(*args, **kwargs)
        t0 = out["start"]
        served.append({"ttft": out["ttft_by_request"], "admitted": {r: t - t0 for r, t in admitted.items()},
                       "events": {r: [(t - t0, what) for t, what in e] for r, e in events.items()}})
        return out
    return wrapper


admitted: dict[str, float] = {}  # request -> when it was first in a scheduled batch (s from the run's start)


def traced_admission(original):
    def wrapper(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        for future in out[0]:
            if future.state.request_id not in admitted:
                admitted[future.state.request_id] = time.perf_counter()
        return out
    return wrapper


Scheduler._process_candidates = traced_admission(Scheduler._process_candidates)
TieredPrefixes.extend = traced_extend(TieredPrefixes.extend)
TieredOffloading._offload_to_cpu = traced_victims(TieredOffloading._offload_to_cpu)
prefix._serve = captured_serve(prefix._serve)

rows = []
original_measure_step = None


def report(label: str) -> None:
    rows.append((label, {k: (len(v), sum(v), statistics.median(v) if v else 0.0, max(v) if v else 0.0)
                         for k, v in spent.items()}, list(q_tokens)))
    spent.clear()
    q_tokens.clear()
    profiles.append(cProfile.Profile())


names = iter(["engine as shipped", "engine on kvtier"])
table = prefix.run("auto", quick="--quick" in sys.argv, step=lambda: report(next(names)),
                   workload="documents" if "--documents" in sys.argv else "chats", graphs="--no-graphs" not in sys.argv)
rich.console.Console(width=200).print(table.render())
for label, parts, qs in rows:
    print(f"\n{label}: {len(qs)} steps")
    for k, (n, total, med, top) in sorted(parts.items(), key=lambda kv: -kv[1][1]):
        print(f"  {k:40s} calls {n:6d}  total {total:8.2f} s  median {med * 1e3:8.2f} ms  max {top * 1e3:8.1f} ms")
    if qs:
        q, kv = [a for a, _ in qs], [b for _, b in qs]
        print(f"  query tokens per step: median {statistics.median(q):.0f}, max {max(q)}, steps over 512: "
              f"{sum(x > 512 for x in q)}; kv read per step: median {statistics.median(kv):.0f}, max {max(kv)}")
if "--profile" in sys.argv:
    for (label, *_), profile in zip(rows, profiles):
        print(f"\n{label}: prepare_next_batch, by time inside (with what it called)")
        pstats.Stats(profile).sort_stats("cumulative").print_stats(28)
        pstats.Stats(profile).sort_stats("tottime").print_stats(12)  # the leaves: driver calls, waits
for (label, *_), run in zip(rows, served):
    # a first token's time in two: waiting to be in a batch at all (KV room, the safety margin, the token budget),
    # then from the first batch it was in to its first token (its prefill's steps, beside others' work)
    waits = {rid: run["admitted"][rid] - came for rid, (_, came) in run["ttft"].items() if rid in run["admitted"]}
    after = [run["ttft"][rid][0] - w for rid, w in waits.items()]
    if waits:
        print(f"\n{label}: TTFT p50 {statistics.median(t for t, _ in run['ttft'].values()):.2f} s = waiting for a "
              f"first batch p50 {statistics.median(waits.values()):.2f} s (max {max(waits.values()):.2f}) + first "
              f"batch to first token p50 {statistics.median(after):.2f} s (max {max(after):.2f})")
    print(f"\n{label}: the five slowest first tokens (s from the run's start)")
    for rid, (ttft, came) in sorted(run["ttft"].items(), key=lambda kv: -kv[1][0])[:5]:
        print(f"  {rid}: came at {came:.2f}, first in a batch at {run['admitted'].get(rid, float('nan')):.2f}, "
              f"first token after {ttft:.2f}")
        for at, what in run["events"].get(rid, [])[:10]:
            print(f"      {at:8.2f}  {what}")
