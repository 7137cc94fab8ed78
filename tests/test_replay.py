"""A replay of a small bursty trace in CI: its figures must match the manager's own counters."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

import kvtier
from kvtier.replay import load_trace, replay, save_trace
from kvtier.traces import bursty_trace, chat_trace

MiB = 1 << 20


def _config(policy: str) -> kvtier.Config:
    # a pool of 12 pages against a working set several times larger: host and NVMe both get used
    return kvtier.Config(device="cpu", page_size=2 * MiB, pool_budget=12 * 16 * 2 * MiB, pool_ready=16 * MiB,
                         host_size=4 * 16 * 2 * MiB, host_chunk=16 * MiB, nvme_size=2048 * MiB, policy=policy,
                         debug_checks=True)


def test_replay_figures_match_the_managers_counters(tmp_path):
    trace = bursty_trace(requests=30, seed=3)
    path = tmp_path / "bursty.jsonl"
    save_trace(trace, str(path))
    trace = load_trace(str(path))  # the round trip through the file format
    result = replay(trace, _config("lru"))
    returns = sum(1 for e in trace.events if e["op"] == "return")
    rows = result["spaces"]
    assert sum(r["returns"] for r in rows.values()) + sum(r["refused"] for r in rows.values()) >= returns > 0
    for name, row in rows.items():
        if row["returns"]:
            assert abs(row["hit gpu"] + row["hit host"] + row["hit nvme"] - 1) < 1e-9
            assert len(result["stalls"][name]) == row["returns"]
    # every page the replay saw coming back from a tier is one the manager moved on that path
    assert result["pages_up"]["host"] == result["path_pages"].get("host->gpu", 0)
    assert result["pages_up"]["nvme"] == result["path_pages"].get("nvme->gpu", 0)
    assert result["pages_up"]["host"] + result["pages_up"]["nvme"] > 0, "the trace should have used the tiers"
    assert result["peak pages"]["gpu"] <= 12


def test_priority_policy_cuts_the_interactive_stalls():
    # a pool that holds the interactive model's working set but not everyone's
    trace = bursty_trace(seed=0)
    roomy = dict(pool_budget=1024 * MiB, host_size=1024 * MiB, debug_checks=False)
    lru, prio = (replay(trace, _config(p).replace(**roomy)) for p in ("lru", "priority"))
    interactive = lambda r: r["spaces"]["interactive"]
    assert interactive(lru)["hit gpu"] < 1.0  # under LRU its sequences were demoted...
    assert interactive(prio)["hit gpu"] == 1.0  # ...under priority never
    assert interactive(prio)["stall p99 ms"] < interactive(lru)["stall p99 ms"]


def test_trace_and_replay_commands(tmp_path):
    out = tmp_path / "chat.jsonl"
    run = lambda *a: subprocess.run([sys.executable, "-m", "kvtier.cli", *a], capture_output=True, text=True,
                                    timeout=300)
    made = run("trace", "chat", str(out), "--size", "6")
    assert made.returncode == 0 and out.exists()
    assert len(load_trace(str(out)).events) == len(chat_trace(6).events)
    png = tmp_path / "replay.png"
    done = run("replay", str(out), "--device", "cpu", "--plot", str(png))
    assert done.returncode == 0, done.stderr
    assert "stall p99 ms" in done.stdout and png.stat().st_size > 10_000
    assert f"plot written to {png}" in " ".join(done.stdout.split())
    assert "%" in done.stdout  # hit rates as percentages


def test_a_bad_trace_is_refused_naming_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = chat_trace(2)
    save_trace(good, str(path))
    lines = path.read_text().splitlines()
    run = lambda: subprocess.run([sys.executable, "-m", "kvtier.cli", "replay", str(path), "--device", "cpu"],
                                 capture_output=True, text=True, timeout=300)
    space = next(iter(good.spaces))
    for broken, said in (
            (lines[:3] + [lines[3][:len(lines[3]) // 2]], f"{path}:4: not a JSON object"),  # cut short
            (lines[:1] + [lines[1].replace(f'"{space}"', '"nobody"')], f"{path}:2: arrive names space 'nobody'"),
            (["[1, 2]"] + lines[1:], f"{path}:1: the first line must describe the spaces"),
            (lines[:1] + ['{"t": "soon", "seq": "x", "op": "finish"}'], f"{path}:2: t must be a number")):
        path.write_text("\n".join(broken) + "\n")
        with pytest.raises(kvtier.ConfigError, match=re.escape(said)):
            load_trace(str(path))
        done = run()
        assert done.returncode == 2 and said in " ".join(done.stdout.split()), done.stdout + done.stderr
        assert "Traceback" not in done.stderr
