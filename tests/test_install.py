"""The README's main command on a fresh install: a new virtual environment, the core package with no extras
(no transformers, no test tools), then ``kvtier bench`` -- what a new user runs first."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main_command() -> str:
    """The README's first command (the main job), as written there."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    return re.search(r"^python3 -m pip install (.*) && kvtier bench$", readme, re.M).group(1)


def test_the_main_command_works_on_a_fresh_install_with_no_extras(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python, kvtier_cmd = str(venv / "bin" / "python"), str(venv / "bin" / "kvtier")
    install = _main_command().split()
    assert install == ["torch==2.13.0", "-e", "."]  # the pin that takes the CPU build here
    done = subprocess.run([python, "-m", "pip", "install", "-q", *install], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert subprocess.run([python, "-c", "import transformers"], capture_output=True).returncode != 0
    # the main job, quick: every benchmark that needs no extra runs; the others say how to get them
    done = subprocess.run([kvtier_cmd, "bench", "--quick"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    assert "skipping generate" in done.stdout and "pip install 'kvtier[transformers]'" in done.stdout
    for title in ("Map/unmap cost", "Tier paths", "Fault-back latency", "NVMe throughput"):
        assert title in done.stdout, title
