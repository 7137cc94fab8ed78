"""The ``kvtier`` command, run as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import kvtier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _kvtier(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "kvtier.cli", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_version_and_info():
    assert kvtier.__version__ in _kvtier("--version")
    out = _kvtier("info", "--device", "cpu")
    assert "host" in out and "granularity" in out
    # the tiers a manager would have here, from the defaults or a config file
    for key in ("page size", "pool budget", "host tier", "nvme tier", "policy"):
        assert key in out, (key, out)
    out = _kvtier("info", "--device", "cpu", "--config", os.path.join(ROOT, "configs", "cpu-dev.toml"))
    assert "MiB" in out and "nvme tier" in out


def test_bench_vmm_quick_writes_json(tmp_path):
    path = tmp_path / "vmm.json"
    out = _kvtier("bench", "vmm", "--quick", "--device", "cpu", "--json", str(path))
    assert "System" in out
    result = json.loads(path.read_text())
    assert result["system"]["device"] == "cpu"
    tables = {t["title"].split(",")[0]: t["rows"] for t in result["tables"]}
    cost = tables["Map/unmap cost per page (one page = one handle)"]
    assert cost and all(row["kvtier map us"] > 0 and row["raw map+access us"] > 0 for row in cost)
    decode = next(rows for title, rows in tables.items() if title.startswith("Decode attention"))
    assert 0.5 < decode[1]["ratio to plain"] < 2.0


def test_bench_runs_several_by_name_and_says_it_is_alive_off_a_terminal(tmp_path):
    # two benchmarks in one call; the output is a pipe: a line per step instead of a progress bar
    out = _kvtier("bench", "vmm", "nvme", "--quick", "--device", "cpu")
    assert "bench vmm: started" in out and "bench nvme: step 1 of" in out
    assert out.index("Map/unmap cost") < out.index("NVMe throughput")
    # the GPU's targets are not judged on the CPU backend
    assert "not judged here (met: n/a)" in out
    done = subprocess.run([sys.executable, "-m", "kvtier.cli", "bench", "nope"], capture_output=True, text=True)
    assert done.returncode != 0 and "'nope' is not one of" in done.stderr


def test_plots_of_a_saved_run_are_drawn_from_its_json(tmp_path):
    # the committed plots come from the committed JSON of the same run: what they show is what its tables say
    out = _kvtier("bench", "--from-json", os.path.join(ROOT, "docs", "bench", "h100-2026-11-26.json"), "--plot",
                  str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["nvme.png", "prefetch.png", "tiers.png"] and "plot:" in out


def test_the_operators_commands_answer_without_importing_torch(tmp_path):
    # kvtier ls / top / limit / config check --schema-only read the ledger and the config only: no torch, no CUDA
    config = tmp_path / "c.toml"
    config.write_text('[gpu]\ndevice = "cpu"\n')
    for args in (["ls"], ["top", "--count", "1", "--interval", "0.05"], ["limit", "1", "1GiB"],
                 ["config", "check", "--schema-only", str(config)]):
        code = ("import sys\nfrom kvtier.cli import main\n"
                f"try:\n    main({args + ['--ledger-dir', str(tmp_path)] if args[0] != 'config' else args!r}, "
                "standalone_mode=False)\nexcept Exception:\n    pass\n"
                "print('\\nTORCH', 'torch' in sys.modules)")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.stdout.rsplit("TORCH", 1)[-1].strip() == "False", (args, done.stdout, done.stderr)
