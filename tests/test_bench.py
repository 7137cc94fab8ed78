"""``kvtier bench --quick`` as CI runs it: every table there, every path measured, every figure positive. No
assertion on timing: on a busy machine any ratio can land anywhere (figures belong to the benchmarks)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_quick_bench_reports_every_path_within_its_ceilings(tmp_path):
    out, plots = tmp_path / "bench.json", tmp_path / "plots"
    before = set(_scratch_dirs())
    done = subprocess.run([sys.executable, "-m", "kvtier.cli", "bench", "--quick", "--device", "cpu", "--json",
                           str(out), "--plot", str(plots)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert set(_scratch_dirs()) <= before  # it removed the temporary directories it made
    result = json.loads(out.read_text())
    # the system header: what the figures were measured on
    assert {"device", "torch", "nvme_io", "host_memory_gib", "filesystem"} <= set(result["system"])
    tables = {t["title"].split(",")[0].split(" (")[0]: t["rows"] for t in result["tables"]}
    paths = {row["path"]: row for row in tables["Tier paths"]}
    assert set(paths) == {"gpu -> host", "host -> gpu (prefetch)", "both at once", "gpu -> nvme", "nvme -> gpu",
                          "host -> nvme", "nvme -> host (stage)", "gpu -> host, checksums off",
                          "host -> gpu, checksums off", "both at once, checksums off",
                          "gpu -> host while the pool refills"}
    for row in paths.values():
        assert row["kvtier GB/s"] > 0 and row["ceiling GB/s"] > 0 and row["ratio"] > 0, row
        assert row["met"] in (True, False, None), row  # every row says whether its target is met
    assert paths["gpu -> host, checksums off"]["met"] is None  # an option's cost: no target
    # a reader's output: nothing cut short, nothing shown as 0 that does not exist here (n/a)
    assert "…" not in done.stdout and " n/a " in done.stdout
    for row in tables["GPU <-> host vs transfer size"]:
        assert row["down ratio"] > 0 and row["up ratio"] > 0 and row["met"] is None, row  # GPU targets: n/a here
    for row in tables["Fault-back latency vs sequence length"]:
        assert row["host ratio"] > 0 and row["nvme ratio"] > 0 and row["nothing to copy us"] > 0, row
        assert row["met"] is None, row
    for row in tables["allocate() of a 8192-token sequence"]:
        assert row["met"] is None, row
    for row in tables["NVMe throughput vs threads and I/O size"]:
        assert row["raw write GB/s"] > 0 and row["raw read GB/s"] > 0
        assert row["kvikio read GB/s"] is None  # no CUDA driver here: not measured, not 0
    assert {p.name for p in plots.iterdir()} == {"tiers.png", "prefetch.png", "nvme.png"}
    generate = next(rows for title, rows in tables.items() if title.startswith("generate"))
    assert {r["cache"] for r in generate} >= {"DynamicCache", "TieredCache, all resident"}
    assert all(r["decode tok/s"] > 0 for r in generate)


def test_long_context_bench_runs_the_path_on_the_cpu(tmp_path):
    # the GPU figures come from the H100 (README); here the path runs with a tiny model, most layers streamed
    out = tmp_path / "long.json"
    done = subprocess.run([sys.executable, "-m", "kvtier.cli", "bench", "long-context", "--quick", "--device", "cpu",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["cache"].split(" (")[0]: r for r in json.loads(out.read_text())["tables"][0]["rows"]}
    assert rows["DynamicCache"]["outcome"] == "ok" and rows["TieredCache"]["outcome"] == "ok"
    assert rows["TieredCache"]["decode tok/s"] > 0 and rows["TieredCache"]["GiB below"] > 0


def test_long_context_asks_host_memory_for_the_layers_it_streams_only():
    # the H200 case: ~310k tokens of the Llama-2-7B shape (152 GiB of KV) with a 100 GiB pool: the layers the pool
    # holds stay on the GPU, and the host tier is sized for the others -- not for all of the KV
    pytest.importorskip("transformers")
    from kvtier.bench.long_context import _llama2_7b, _streamed_bytes
    config = _llama2_7b(cuda=True, quick=False)
    tokens, GiB = 311296, 1 << 30
    kv, layer = tokens * (512 << 10), tokens * (512 << 10) // config.num_hidden_layers
    host = _streamed_bytes(config, tokens + 8, 100 * GiB, 8 << 20, 2)
    assert kv - 100 * GiB <= host <= kv - 100 * GiB + 4 * layer  # the pool's resident layers, less its ring


def test_serve_bench_serves_the_workload_both_ways_on_the_cpu(tmp_path):
    # the engine as shipped and the engine on kvtier serve the same requests under the same KV budget: both
    # preempt, kvtier keeps what it preempted, and every output equals the other run's
    out = tmp_path / "serve.json"
    done = subprocess.run([sys.executable, "-m", "kvtier.cli", "bench", "serve", "--quick", "--device", "cpu",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["engine"]: r for r in json.loads(out.read_text())["tables"][0]["rows"]}
    shipped, ours = rows["engine as shipped: soft reset"], rows["engine on kvtier"]
    assert shipped["preempted: recomputed"] > 0 and shipped["preempted: kept"] == 0
    assert ours["preempted: kept"] > 0 and ours["preempted: recomputed"] == 0
    assert shipped["same tokens"] and ours["same tokens"]
    assert ours["output tok/s"] > 0 and ours["TTFT p99 s"] >= ours["TTFT p50 s"] > 0


@pytest.mark.parametrize("args, says", [
    (["serve", "--workload", "documents"], "--workload documents is a workload of bench prefix"),
    (["prefix", "--workload", "8b"], "--workload 8b is a workload of bench serve"),
    (["serve", "--workload", "8b", "--device", "cpu"], "--workload 8b needs a GPU"),
])
def test_a_workload_of_another_bench_or_device_is_refused_before_anything_runs(args, says):
    from click.testing import CliRunner

    from kvtier.cli import main
    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code == 2 and says in result.output, result.output


@pytest.mark.parametrize("workload", ["chats", "documents"])
def test_prefix_bench_serves_the_chats_both_ways_on_the_cpu(tmp_path, workload):
    # the engine as shipped and the engine on kvtier serve the same chats under the same KV budget: kvtier finds
    # history in host memory, computes fewer prompt tokens, and every output equals the other run's (documents:
    # each conversation's first turn a document, asked about again)
    out, plots = tmp_path / "prefix.json", tmp_path / "plots"
    done = subprocess.run([sys.executable, "-m", "kvtier.cli", "bench", "prefix", "--quick", "--device", "cpu",
                           "--workload", workload, "--json", str(out), "--plot", str(plots)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = json.loads(out.read_text())["tables"][0]
    rows = {r["engine"]: r for r in table["rows"]}
    shipped, ours = rows["engine as shipped"], rows["engine on kvtier"]
    assert shipped["hits host"] == 0 and ours["hits host"] > 0 and ours["MiB up"] > 0
    assert ours["computed"] < shipped["computed"] <= shipped["prompt tokens"] + shipped["computed"]
    assert shipped["outputs differing"] == ours["outputs differing"] == 0
    assert ours["output tok/s"] > 0 and ours["TTFT p99 s"] >= ours["TTFT p50 s"] > 0
    assert "engine on kvtier: host" in table["series"] and (plots / "prefix.png").exists()
    assert table["title"].startswith("Documents asked about" if workload == "documents" else "Chats")


def test_prefix_bench_repeats_take_turns_and_report_each_engines_medians(tmp_path):
    # two runs of each engine, taking turns: a row a run, then each engine's medians over its runs
    out = tmp_path / "prefix.json"
    done = subprocess.run([sys.executable, "-m", "kvtier.cli", "bench", "prefix", "--quick", "--device", "cpu",
                           "--repeats", "2", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["engine"]: r for r in json.loads(out.read_text())["tables"][0]["rows"]}
    for engine in ("engine as shipped", "engine on kvtier"):
        runs = [rows[f"{engine} (run {i})"] for i in (1, 2)]
        median = rows[f"{engine} (median of 2)"]
        assert median["computed"] == (runs[0]["computed"] + runs[1]["computed"]) / 2
        assert median["TTFT p50 s"] == (runs[0]["TTFT p50 s"] + runs[1]["TTFT p50 s"]) / 2
        assert all(r["outputs differing"] == 0 for r in runs)


@pytest.mark.parametrize("bench, shared, series", [
    ("colocated", "kvtier shared pool", "kvtier"),  # two models in one process: the KV each mapped over time
    ("processes", "kvtier ledger", "ledger"),       # a process per model: the pages each held, read from the ledger
])
def test_two_model_benches_serve_both_ways_on_the_cpu(tmp_path, bench, shared, series):
    out = tmp_path / f"{bench}.json"
    before = set(_scratch_dirs())
    done = subprocess.run([sys.executable, "-m", "kvtier.cli", "bench", bench, "--quick", "--device", "cpu",
                           "--json", str(out), "--plot", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = json.loads(out.read_text())["tables"][0]
    rows = {(r["memory"], r["model"]): r for r in table["rows"]}
    assert set(rows) == {(m, x) for m in ("static equal split", shared) for x in "AB"}
    assert all(r["output tok/s"] > 0 for r in rows.values())
    assert all(rows[(shared, x)]["preempted: recomputed"] == 0 for x in "AB")
    # memory over time, each model's both ways (each held some while it ran), and the plot of it
    assert set(table["series"]) == {"static A", "static B", f"{series} A", f"{series} B"}
    assert all(max(mib for _, mib in table["series"][f"{series} {x}"]) > 0 for x in "AB")
    assert (tmp_path / f"{bench}.png").exists()
    assert set(_scratch_dirs()) <= before  # it removed the temporary directories it made (the ledger's too)


def _scratch_dirs() -> list[str]:
    import glob
    import tempfile
    return glob.glob(f"{tempfile.gettempdir()}/kvtier-bench-*")


def test_decode_pairs_settles_within_5_percent_by_the_medians_interval():
    from kvtier.bench.pairs import median_interval
    # the interval holds the median, and more rounds of the same spread narrow it (the IQR would not)
    few = [0.90, 0.94, 0.96, 0.97, 0.99, 1.01, 1.05, 1.10]
    many = few * 25
    lo, hi = median_interval(few)
    assert lo <= sorted(few)[4] <= hi
    lo_many, hi_many = median_interval(many)
    assert lo <= lo_many and hi_many <= hi and (lo_many, hi_many) != (lo, hi)
    assert median_interval([1.0]) == (1.0, 1.0)


def test_peers_bench_times_kvtier_alone_on_the_cpu_and_says_why(tmp_path):
    # kvcached runs on CUDA only: on the CPU backend the table has kvtier's side (the host-side cost of the same
    # calls) and an empty kvcached column, and says why
    out = tmp_path / "peers.json"
    done = subprocess.run([sys.executable, "-m", "kvtier.cli", "bench", "peers", "--quick", "--device", "cpu",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table = json.loads(out.read_text())["tables"][0]
    rows = {r["work"]: r for r in table["rows"]}
    for k in (1, 16, 64, 512):
        assert rows[f"alloc + free of {k} block(s)"]["kvtier"] > 0
        assert rows[f"alloc + free of {k} block(s)"]["kvcached"] is None
    assert rows["grow to 2048 tokens, 16 at a time: all"]["kvtier"] > 0
    assert rows["device memory held with the 2048-token sequence"]["kvtier"] is None
    # what kvtier keeps ahead of need is counted apart: whole 512 MiB pages (64 regions of 8 MiB), at most the
    # reserve's two, and up to twice the pool's 256 MiB of ready pages
    assert rows["  of it: empty pages mapped ahead (the space's reserve)"]["kvtier"] in (0, 512, 1024)
    assert 0 <= rows["  of it: pages created, not mapped (the pool's ready pages)"]["kvtier"] <= 512
    assert "CUDA only" in table["notes"][0]


def test_remote_bench_moves_a_prompt_through_both_stores_on_the_cpu(tmp_path):
    # kvtier's remote cache and each store's own client move the same bytes through a Valkey server and a Mooncake
    # store started for the run; what comes back is what went (the bench checks it), a hit is set against
    # recomputing the prompt, and a second server process finds what a first one computed (the bench checks that
    # it hit, and that a prompt nobody computed did not)
    out = tmp_path / "remote.json"
    done = subprocess.run([sys.executable, "-m", "kvtier.cli", "bench", "remote", "--quick", "--device", "cpu",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = json.loads(out.read_text())["tables"][0]
    rows = {r["store"]: r for r in table["rows"]}
    skipped = [n for n in table["notes"] if "skipped" in n]
    assert set(rows) | {n.split()[0] for n in skipped} == {"valkey", "mooncake"}, table["notes"]
    for row in rows.values():
        assert row["kvtier put GB/s"] > 0 and row["kvtier get GB/s"] > 0 and row["put ratio"] > 0
        assert row["hit ms"] > 0 and row["recompute ms"] > 0
        assert row["2nd server TTFT hit ms"] > 0 and row["TTFT miss ms"] > 0
