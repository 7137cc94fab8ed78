"""The type checker finds no error in kvtier, vmm, tiering and policies: the Protocols say what the code does."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = {"vmm": "vmm", "tiering": "tiering", "policies": "policies", "bench": "bench"}  # folder -> subpackage


def test_mypy_finds_no_errors(tmp_path):
    pytest.importorskip("mypy")
    # the folders are subpackages of kvtier only once installed (package-dir): lay them out as the package is
    package = tmp_path / "kvtier"
    package.mkdir()
    for name in os.listdir(os.path.join(ROOT, "kvtier")):
        if name != "__pycache__":
            os.symlink(os.path.join(ROOT, "kvtier", name), package / name)
    for folder, sub in LAYERS.items():
        os.symlink(os.path.join(ROOT, folder), package / sub)
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", os.path.join(ROOT, "pyproject.toml"),
                             "--cache-dir", str(tmp_path / "cache"), "-p", "kvtier"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
