"""Slot files and their owners: a killed process's file (its KV, readable) is removed by the next manager that
starts on the directory; a live process's file is never touched (liveness by the lock its owner holds)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import kvtier

OWNER = textwrap.dedent("""
    import sys, time, kvtier
    mgr = kvtier.TierManager(device="cpu", page_size=64 << 10, pool_budget=8 << 20, host_size=1 << 20,
                             nvme_size=4 << 20, nvme_dir=sys.argv[1])
    print(mgr.tiering.tier("nvme").path, flush=True)
    if sys.argv[2] == "busy":  # writing to its slot file when it is killed
        space = mgr.create_space("m", num_layers=2, num_kv_heads=2, head_dim=64, max_tokens=4096)
        space.allocate("a", 2048)
        while True:
            space.offload("a", tier="nvme").result()
            space.ensure_resident(["a"])
    time.sleep(120)
""")


def _owner(directory: str, busy: bool = False) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", OWNER, directory, "busy" if busy else "idle"],
                            stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def _start(directory: str) -> kvtier.TierManager:
    return kvtier.TierManager(device="cpu", page_size=64 << 10, pool_budget=8 << 20, host_size=1 << 20,
                              nvme_size=1 << 20, nvme_dir=directory)


def test_a_dead_owners_slot_file_is_removed_and_a_live_ones_kept(tmp_path):
    directory = str(tmp_path)
    dead, dead_file = _owner(directory, busy=True)
    live, live_file = _owner(directory)
    try:
        # one owner is killed in the middle of its writes (no close, no cleanup): its slot file stays behind
        time.sleep(1.0)
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        assert os.path.exists(dead_file) and os.path.exists(live_file)
        # a manager starting on the directory removes the dead one's file, keeps the live one's
        with _start(directory) as mgr:
            assert not os.path.exists(dead_file)
            assert os.path.exists(live_file) and os.path.exists(mgr.tiering.tier("nvme").path)
            # and a second manager in this process does not take the first one's file for dead
            with _start(directory) as other:
                assert os.path.exists(mgr.tiering.tier("nvme").path) and os.path.exists(other.tiering.tier("nvme").path)
    finally:
        live.kill()
        live.wait()
    # closed managers leave only the directory's lock file; the killed live one's file goes at the next start
    _start(directory).close()
    assert os.listdir(directory) == [".kvtier.lock"]


def test_the_slot_file_is_reserved_on_disk_and_a_disk_short_of_room_is_refused_at_start(tmp_path):
    size = 8 << 20
    with kvtier.TierManager(device="cpu", page_size=64 << 10, pool_budget=8 << 20, host_size=1 << 20,
                            nvme_size=size, nvme_dir=str(tmp_path), nvme_preallocate=True) as mgr:
        assert os.stat(mgr.tiering.tier("nvme").path).st_blocks * 512 >= size  # blocks allocated, not a sparse file
    with pytest.raises(kvtier.ConfigError, match="nvme_dir: cannot make the slot file"):
        kvtier.TierManager(device="cpu", page_size=64 << 10, pool_budget=8 << 20, host_size=1 << 20,
                           nvme_size=1 << 60, nvme_dir=str(tmp_path), nvme_preallocate=True)
    assert sorted(os.listdir(tmp_path)) == [".kvtier.lock"]


TEMP_OWNER = textwrap.dedent("""
    import signal, time, kvtier
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in a terminal, whatever it inherited
    mgr = kvtier.TierManager(device="cpu", page_size=64 << 10, pool_budget=8 << 20, host_size=1 << 20,
                             nvme_size=4 << 20)
    space = mgr.create_space("m", num_layers=2, num_kv_heads=2, head_dim=64, max_tokens=4096)
    space.allocate("a", 2048)
    space.offload("a", tier="nvme").result()
    print(mgr.tiering.tier("nvme").describe()["path"], flush=True)
    time.sleep(120)
""")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_the_default_nvme_file_leaves_nothing_behind_however_the_process_ends(tmp_path, sig):
    # nvme_dir unset: the slot file is a temporary one, its name gone once open; the process is ended by a signal
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", TEMP_OWNER], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert "deleted once open" in proc.stdout.readline()
        # while it runs, nothing of it is on the disk by name
        assert not [n for n in os.listdir(tmp_path) if n.startswith("kvtier-")]
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert not [n for n in os.listdir(tmp_path) if n.startswith("kvtier-")]


def test_abandoned_temporary_slot_directories_are_swept_at_start(tmp_path, monkeypatch):
    # an earlier run (an older version, or a process killed while starting) left a temporary directory with a
    # slot file nobody holds; another holds a file whose owner lives
    dead = tmp_path / "kvtier-nvme-dead"
    dead.mkdir()
    (dead / "kvtier-1-1.slots").write_bytes(b"old KV" * 100)
    live_dir = tmp_path / "kvtier-nvme-live"
    proc, live_file = _owner(str(live_dir))
    try:
        past = time.time() - 3600
        for d in (dead, live_dir):
            os.utime(d, (past, past))
        monkeypatch.setenv("TMPDIR", str(tmp_path))
        import tempfile
        monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
        with kvtier.TierManager(device="cpu", page_size=64 << 10, pool_budget=8 << 20, host_size=1 << 20,
                                nvme_size=1 << 20):
            assert not dead.exists() and os.path.exists(live_file)
    finally:
        proc.kill()
        proc.wait()


DIR_HOLDER = textwrap.dedent("""
    import fcntl, os, signal, sys
    fd = os.open(os.path.join(sys.argv[1], ".kvtier.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("holding", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
""")


def test_a_process_stopped_holding_the_directorys_lock_holds_no_manager_up(tmp_path, monkeypatch):
    # a process is stopped (SIGSTOP, a debugger) while it holds the NVMe directory's lock: a manager starting on
    # that directory fails within the deadline, saying so; one starting on its own temporary file is not held up
    # by it in a directory left behind either
    from kvtier.tiering.tiers import nvme
    monkeypatch.setattr(nvme, "DIR_LOCK_TIMEOUT_S", 0.3)
    directory = tmp_path / "kvtier-nvme-stuck"
    directory.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", DIR_HOLDER, str(directory)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        start = time.monotonic()
        with pytest.raises(kvtier.ConfigError, match="held by another process"):
            _start(str(directory))
        assert time.monotonic() - start < 10
        past = time.time() - 3600
        os.utime(directory, (past, past))
        monkeypatch.setenv("TMPDIR", str(tmp_path))
        import tempfile
        monkeypatch.setattr(tempfile, "tempdir", None)
        with kvtier.TierManager(device="cpu", page_size=64 << 10, pool_budget=8 << 20, host_size=1 << 20,
                                nvme_size=1 << 20):
            assert directory.exists()  # busy: left alone
    finally:
        holder.kill()
        holder.wait()
