"""Replay a workload trace through the real manager (real pages, real copies, real files) to compare configs.

Trace: JSON Lines. The first line describes the spaces, ``{"spaces": {"chat": {"num_layers": 4, ...,
"priority": 5}}}``; every other line is one event, in time order::

    {"t": 0.0, "op": "arrive", "space": "chat", "seq": "c1", "tokens": 1800}   # prompt of 1800 tokens
    {"t": 0.4, "op": "decode", "seq": "c1", "tokens": 200}                     # 200 tokens generated
    {"t": 0.4, "op": "idle",   "seq": "c1"}                                    # waits for the user
    {"t": 31.0, "op": "return", "seq": "c1", "tokens": 120}                    # back with 120 more tokens
    {"t": 40.0, "op": "finish", "seq": "c1"}

Time is the trace's, not the wall clock's: events run back to back, and the policy reads the trace clock, so a
replay of an hour takes seconds and is repeatable. Each ``return`` faults the sequence back before its step;
its stall is the wall time that took.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from kvtier.config import Config
from kvtier.errors import ConfigError, KVTierError
from kvtier.manager import TierManager

OPS = ("arrive", "decode", "idle", "return", "finish")


@dataclass
class Trace:
    spaces: dict[str, dict[str, Any]]
    events: list[dict[str, Any]]


def load_trace(path: str) -> Trace:
    """Read a trace file, checking every line; a bad one raises ConfigError naming the file and the line."""
    try:
        with open(path) as f:
            numbered = [(i, line) for i, line in enumerate(f, start=1) if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the trace ({exc})") from None
    lines = []
    for i, line in numbered:
        try:
            lines.append((i, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{i}: not a JSON object ({exc.msg}); is the line cut short?") from None
    head = lines[0][1] if lines else None
    if not isinstance(head, dict) or not isinstance(head.get("spaces"), dict) or \
            not all(isinstance(shape, dict) for shape in head["spaces"].values()):
        raise ConfigError(f"{path}:1: the first line must describe the spaces: "
                          "{\"spaces\": {\"NAME\": {\"num_layers\": ..., ...}}}")
    spaces = head["spaces"]
    for i, e in lines[1:]:
        problem = _event_problem(e, spaces)
        if problem:
            raise ConfigError(f"{path}:{i}: {problem}")
    return Trace(spaces, [e for _, e in lines[1:]])


def _event_problem(e: Any, spaces: dict[str, Any]) -> str | None:
    if not isinstance(e, dict) or e.get("op") not in OPS or "seq" not in e or "t" not in e:
        return f"an event needs t, seq and op (one of {', '.join(OPS)}), got {e}"
    if isinstance(e["t"], bool) or not isinstance(e["t"], (int, float)):
        return f"t must be a number of seconds, got {e['t']!r}"
    tokens = e.get("tokens", 0)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        return f"tokens must be an int >= 0, got {tokens!r}"
    if e["op"] == "arrive" and e.get("space") not in spaces:
        return (f"arrive names space {e.get('space')!r}, which the first line does not declare (declared: "
                f"{', '.join(spaces) or 'none'})")
    return None


def save_trace(trace: Trace, path: str) -> None:
    with open(path, "w") as f:
        f.write(json.dumps({"spaces": trace.spaces}) + "\n")
        for e in trace.events:
            f.write(json.dumps(e) + "\n")


@dataclass
class SpaceReport:
    places: tuple[str, ...] = ("gpu", "host", "nvme")    # the GPU, then the manager's tiers, nearest first
    returns: Counter = field(default_factory=Counter)   # where a returning sequence's farthest pages were
    stalls: list[float] = field(default_factory=list)   # seconds each return waited for its fault-back
    failed: int = 0                                      # requests refused (out of pages): preempted
    pages_up: Counter = field(default_factory=Counter)   # pages it faulted back, per source tier

    def row(self) -> dict[str, Any]:
        n = sum(self.returns.values())
        pct = (lambda q: float(np.percentile(self.stalls, q)) * 1e3 if self.stalls else 0.0)
        return {"returns": n, **{f"hit {t}": (self.returns[t] / n if n else 0.0) for t in self.places},
                "stall p50 ms": pct(50), "stall p99 ms": pct(99), "refused": self.failed}


def replay(trace: Trace, config: Config) -> dict[str, Any]:
    """Run ``trace`` under ``config``; return per-space reports, bytes per path and tier occupancy over time."""
    config = config.replace(background_demotion=False)  # demotion on demand only: repeatable
    places = ("gpu", *config.tiers)
    reports: dict[str, SpaceReport] = defaultdict(lambda: SpaceReport(places))
    timeline: list[tuple[float, ...]] = []
    now = [0.0]
    with TierManager(config, clock=lambda: now[0]) as mgr:  # the policy ages on the trace's clock
        mgr.tiering.wait_ready()
        spaces = {}
        for name, shape in trace.spaces.items():
            try:
                spaces[name] = mgr.create_space(name, **shape)
            except TypeError as exc:  # a key create_space does not take
                raise ConfigError(f"the trace's space {name!r}: {exc} (keys: num_layers, num_kv_heads, head_dim, "
                                  "dtype, block_size, max_tokens, priority, quota_bytes)") from None
        where: dict[str, str] = {}
        tokens: dict[str, int] = {}
        for e in trace.events:
            now[0] = float(e["t"])
            seq, op = e["seq"], e["op"]
            if op == "arrive":
                where[seq], tokens[seq] = e["space"], 0
            if seq not in where:
                continue  # refused earlier
            space, report = spaces[where[seq]], reports[where[seq]]
            try:
                if op == "return":
                    res = space.stripe_residency(seq)  # the slowest tier it must come back from
                    report.returns[next(t for t in reversed(places) if res[t] or t == "gpu")] += 1
                    report.pages_up.update({t: res[t] for t in places[1:]})
                    start = time.perf_counter()
                    space.ensure_resident([seq])
                    report.stalls.append(time.perf_counter() - start)
                if op in ("arrive", "decode", "return"):
                    tokens[seq] += int(e.get("tokens", 0))
                    space.allocate(seq, min(tokens[seq], space.max_tokens))
                elif op == "idle":
                    space.offload(seq)
                elif op == "finish":
                    space.free(seq)
                    del where[seq]
            except KVTierError:
                report.failed += 1  # the engine would preempt it: drop the request
                if seq in space.sequences():
                    space.free(seq)
                where.pop(seq, None)
            stats = mgr.stats()["spaces"].values()
            timeline.append((now[0], sum(s["stripes_mapped"] for s in stats),
                             *(sum(s[f"stripes_{t}"] for s in stats) for t in places[1:])))
        paths = {k: v["bytes"] for k, v in mgr.stats()["tiers"]["paths"].items()}
        path_pages = {k: v["stripes"] for k, v in mgr.stats()["tiers"]["paths"].items()}
    occupancy = np.array(timeline) if timeline else np.zeros((0, 1 + len(places)))
    return {"spaces": {name: reports[name].row() for name in trace.spaces}, "bytes": paths, "path_pages": path_pages,
            "pages_up": {tier: sum(r.pages_up[tier] for r in reports.values()) for tier in places[1:]},
            "peak pages": {t: int(occupancy[:, 1 + i].max(initial=0)) for i, t in enumerate(places)},
            "places": list(places), "timeline": occupancy.tolist(),
            "stalls": {n: reports[n].stalls for n in trace.spaces}}


def plot(results: dict[str, dict[str, Any]], path: str, priorities: dict[str, int] | None = None) -> None:
    """Tier occupancy over trace time, and the headline: the stall distribution of each space under each config
    (one line style per config, one colour per space), with the p99 of the highest-priority space in the title."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib: pip install matplotlib") from exc
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(13, 4.8))
    styles = ["-", "--", ":", "-."]
    spaces = sorted({name for res in results.values() for name in res["stalls"]},
                    key=lambda n: -(priorities or {}).get(n, 0))
    colours = {name: f"C{i}" for i, name in enumerate(spaces)}
    for (label, res), style in zip(results.items(), styles * len(results)):
        tl = np.array(res["timeline"])
        if len(tl):
            for col, tier in enumerate(res.get("places", ["gpu", "host", "nvme"]), start=1):
                ax_t.plot(tl[:, 0], tl[:, col], style, color=f"C{col - 1}", label=f"{label}: {tier}")
        for name in spaces:
            stalls = sorted(s * 1e3 for s in res["stalls"].get(name, []))
            if stalls:
                ax_s.plot(stalls, np.linspace(0, 1, len(stalls)), style, color=colours[name], label=f"{label}: {name}")
    top = spaces[0] if spaces and priorities else None
    headline = [f"{label}: {np.percentile(res['stalls'][top], 99) * 1e3:.2f} ms"
                for label, res in results.items() if top and res["stalls"].get(top)]
    if headline:
        ax_s.text(0.02, 0.97, f"p99 stall of {top} (highest priority)\n" + "\n".join(headline),
                  transform=ax_s.transAxes, va="top", fontsize=8, bbox={"facecolor": "white", "alpha": 0.8})
    every = [s for res in results.values() for v in res["stalls"].values() for s in v if s > 0]
    wide = bool(every) and max(every) / min(every) > 20  # a log axis only where the stalls span decades
    ax_t.set(xlabel="trace time (s)", ylabel="stripes", title="tier occupancy")
    ax_s.set(xlabel="fault-back stall (ms)", ylabel="fraction of returns", title="stalls per space (CDF)",
             xscale="log" if wide else "linear")
    ax_t.legend(fontsize=7)
    ax_s.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _shown(metric: str, row: dict[str, Any]) -> Any:
    """A hit rate as a percentage (n/a where the space had no returns); other metrics as they are."""
    if not metric.startswith("hit "):
        return row[metric]
    return f"{100 * row[metric]:.1f}%" if row["returns"] else None


def side_by_side(results: dict[str, dict[str, Any]]) -> Iterable[list[Any]]:
    """Rows (space, metric, value per config) for a table."""
    labels = list(results)
    first = results[labels[0]]
    for space in first["spaces"]:
        for metric in first["spaces"][space]:
            yield [space, metric, *[_shown(metric, results[lab]["spaces"][space]) for lab in labels]]
    for path in sorted({p for r in results.values() for p in r["bytes"]}):
        yield ["(all)", f"GB {path}", *[results[lab]["bytes"].get(path, 0) / 1e9 for lab in labels]]
    for tier in first["peak pages"]:
        yield ["(all)", f"peak pages {tier}", *[results[lab]["peak pages"].get(tier, 0) for lab in labels]]
