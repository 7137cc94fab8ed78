"""``kvtier bench processes``: two engine processes on one GPU, one model each, under bursts that take turns.

The workload of ``kvtier bench colocated`` (model A's burst, then model B's), but each model served by its own
process, as serving engines run. Served twice in the same run: a static equal split (each process's engine as
shipped with half the KV budget) and kvtier's per-device ledger (each process's engine on kvtier, both drawing
pages from one device budget: the busy process maps what the idle one gave back). Reported per model: output
tokens/s, time to first token (p50, p99), preemptions, peak KV; pages each process held over time, read from
the ledger (a plot with ``--plot``).

Each process is ``python -m kvtier.bench.processes SPEC``: it builds its model, says ``ready``, waits for ``go``
on stdin (so that both bursts start on one clock), serves, and prints its results as one JSON line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

from kvtier.bench.colocated import SAMPLE_S, setup
from kvtier.bench.common import Table, percentile
from kvtier.config import MiB

NAMES = "AB"


def run(device: str = "auto", quick: bool = False, step: Callable[[], None] | None = None) -> Table:
    from kvtier.vmm import resolve_device
    from kvtier.vmm.ledger import ledgers, snapshot

    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    s = setup(cuda, quick)
    table = Table(f"Two engine processes, one KV budget of {s.budget_blocks} blocks ({s.budget / MiB:.1f} MiB), "
                  f"bursts {s.gap:g} s apart ({s.n} requests each)",
                  ["memory", "model", "output tok/s", "TTFT p50 s", "TTFT p99 s", "preempted: kept",
                   "preempted: recomputed", "peak KV MiB"])
    half = s.static_bytes() / MiB  # half the blocks and the engine's two pad sectors

    with tempfile.TemporaryDirectory(prefix="kvtier-bench-ledger-") as ledger_dir:
        for mode in ("static", "ledger"):
            spec = dict(device=str(dev), quick=quick, mode=mode, ledger_dir=ledger_dir)
            samples: dict[str, list[tuple[float, float]]] = {f"ledger {n}": [] for n in NAMES}
            t0 = [0.0]

            def sample(stop: threading.Event) -> None:
                while not stop.wait(SAMPLE_S):
                    for path in ledgers(ledger_dir):
                        books = snapshot(path)
                        now = time.perf_counter() - t0[0]
                        for proc in books["procs"].values():
                            key = f"ledger {proc['name'][-1]}"
                            if key in samples:
                                samples[key].append((now, proc["pages"] * books["page_size"] / MiB))

            outs = _serve_in_processes(spec, t0, sample if mode == "ledger" else None)
            for name, out in zip(NAMES, outs):
                if mode == "static":
                    table.add("static equal split", name, out["tok_s"], out["ttft_p50"], out["ttft_p99"], 0, None,
                              half)
                    table.series[f"static {name}"] = [(0.0, half), (out["end"], half)]
                else:
                    table.add("kvtier ledger", name, out["tok_s"], out["ttft_p50"], out["ttft_p99"], out["kept"],
                              out["recomputed"], out["peak_bytes"] / MiB)
            if mode == "ledger":
                table.series.update(samples)
            if step:
                step()
    table.notes.append("one process per model; static: each engine as shipped with half the blocks (preemptions "
                       "it recomputed are not counted here: n/a); ledger: both engines on kvtier, one device budget "
                       "of the static split's whole KV, staging room included; peak KV = the cache's mapped pages at "
                       "their most; the plot's ledger lines are the pages each process held (staging included)")
    if not cuda:
        table.notes.append("CPU backend: tiny models, not GPU figures")
    return table


def _serve_in_processes(spec: dict[str, Any], t0: list[float],
                        sample: Callable[[threading.Event], None] | None) -> list[dict[str, Any]]:
    """Start one process per model, release both bursts at once, return each one's results."""
    procs = [subprocess.Popen([sys.executable, "-m", "kvtier.bench.processes", json.dumps({**spec, "index": i})],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for i in range(len(NAMES))]
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(stop,), name="bench-ledger", daemon=True) if sample else None
    try:
        for p in procs:
            line = p.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"bench processes: a model process failed to start (said {line!r}; see stderr)")
        t0[0] = time.perf_counter()
        if sampler:
            sampler.start()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = []
        for p in procs:
            out, _ = p.communicate(timeout=600)
            if p.returncode != 0:
                raise RuntimeError(f"bench processes: a model process failed (exit {p.returncode}; see stderr)")
            outs.append(json.loads(out.strip().splitlines()[-1]))
        return outs
    finally:
        stop.set()
        if sampler and sampler.is_alive():
            sampler.join()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """One model's process: build, wait for the go, serve its burst; return its figures."""
    from kvtier.bench.common import random_model
    from kvtier.bench.serve import _cb_config, _serve
    from kvtier.integrations.continuous_batching import kvtier_engine
    from kvtier.manager import TierManager
    from kvtier.vmm import resolve_device

    dev = resolve_device(spec["device"])
    cuda = dev.type == "cuda"
    s = setup(cuda, spec["quick"])
    i, name = spec["index"], NAMES[spec["index"]]
    work = s.works[i]
    model = random_model(s.config, dev)
    model.config._attn_implementation = "sdpa"
    timeout = 300.0 if cuda else 120.0

    def wait_for_go() -> None:
        print("ready", flush=True)
        sys.stdin.readline()

    if spec["mode"] == "static":
        wait_for_go()
        out = _serve(model, work, _cb_config(work, s.budget_blocks // 2, 0.0, cuda), timeout)
        stats = {"preempted_to_tiers": 0, "soft_resets": None, "peak_bytes_mapped": 0}
    else:
        pool = s.pool_bytes(cuda)
        config = s.kvtier_config(dev, ledger_dir=spec["ledger_dir"], ledger_budget=pool, ledger_name=f"model {name}")
        with TierManager(config) as mgr, kvtier_engine(model, mgr, name=name, capacity_bytes=s.capacity(cuda),
                                                       staging_bytes=s.staging(cuda)) as engine:
            wait_for_go()
            out = _serve(model, work, _cb_config(work, None, 0.0, cuda), timeout)
            stats = engine.stats()
    return {"tok_s": out["tok_s"], "ttft_p50": percentile(out["ttft"], 50), "ttft_p99": percentile(out["ttft"], 99),
            "end": out["end"], "kept": stats["preempted_to_tiers"], "recomputed": stats["soft_resets"],
            "peak_bytes": stats["peak_bytes_mapped"], "errors": out["errors"]}


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))), flush=True)
