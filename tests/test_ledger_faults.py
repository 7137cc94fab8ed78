"""The ledger's shared state as input: books deleted, truncated, overwritten or unwritable, a peer stopped while
holding the lock, a live process's ``.alive`` file deleted, a killed writer's leftovers, books no live process
owns, a forked child. Each time: no exception but kvtier's escapes a public call, a manager's books match what
is mapped (``mgr.check()``), and the bytes written come back. Real processes where processes are the point."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from click.testing import CliRunner

import kvtier
from kvtier.cli import main
from kvtier.errors import ConfigError, OutOfPagesError
from kvtier.vmm import ledger as ledger_module
from kvtier.vmm import ledger_books
from kvtier.vmm.ledger import Ledger, ledgers, snapshot
from tests.conftest import PAGE as PAGE_OF
from tests.test_ledger import HAMMER

PAGE = PAGE_OF["cpu"]
SHAPE = dict(num_layers=1, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, block_size=16)
TOKENS_PER_PAGE = PAGE // (2 * 64 * 2)


def _manager(directory, name: str = "m", pool_pages: int = 8, ledger_pages: int = 8) -> kvtier.TierManager:
    config = kvtier.Config(device="cpu", page_size=PAGE, pool_budget=pool_pages * PAGE, pool_ready=0,
                           host_size=4 * PAGE, host_chunk=4 * PAGE, nvme_size=8 * PAGE, ledger_dir=str(directory),
                           ledger_budget=ledger_pages * PAGE, ledger_name=name, space_reserve_pages=0,
                           debug_checks=True)
    return kvtier.TierManager(config)


def _fill(space, seq: str, tokens: int, value: float) -> torch.Tensor:
    space.allocate(seq, tokens)
    k, _ = space.kv(0)
    ids = torch.tensor(space.blocks(seq))
    k[ids] = value
    return k[ids].clone()


def _books_file(directory) -> str:
    return os.path.join(ledgers(str(directory))[0], "ledger.json")


def _pages_on_books(directory) -> dict[str, int]:
    return {p["name"]: p["pages"] for p in snapshot(ledgers(str(directory))[0])["procs"].values()}


@pytest.mark.parametrize("damage", ["deleted", "truncated", "garbage", "wrong shape", "lost this process"])
def test_damaged_books_are_rebuilt_and_nothing_is_handed_out_unmapped(tmp_path, damage):
    with _manager(tmp_path) as mgr:
        space = mgr.create_space("s", **SHAPE)
        # two sequences on 2 pages (4 handles: K and V); the books say so
        a = _fill(space, "a", 2 * TOKENS_PER_PAGE, 1.0)
        _fill(space, "b", TOKENS_PER_PAGE, 2.0)
        assert _pages_on_books(tmp_path) == {"m": 6}
        # the books are damaged behind the process's back
        path = _books_file(tmp_path)
        if damage == "deleted":
            os.unlink(path)
        elif damage == "truncated":
            open(path, "r+").truncate(7)
        elif damage == "garbage":
            open(path, "w").write("\x00\x01 not json")
        elif damage == "wrong shape":
            open(path, "w").write(json.dumps({"procs": [1, 2], "budget_pages": "many"}))
        else:
            open(path, "w").write(json.dumps({"procs": {}, "budget_pages": 8, "page_size": PAGE}))
        # the process gives pages back: no exception, its books match what is mapped
        space.free("b")
        mgr.check()
        # and takes them again: every block handed out is mapped and takes its bytes
        b = _fill(space, "b", TOKENS_PER_PAGE, 3.0)
        space.check_resident(space.blocks("a") + space.blocks("b"))
        k, _ = space.kv(0)
        assert torch.equal(k[torch.tensor(space.blocks("a"))], a) and torch.equal(k[torch.tensor(space.blocks("b"))], b)
        mgr.check()
        # the books were rebuilt with this process's real count
        assert _pages_on_books(tmp_path) == {"m": 6}
    assert snapshot(ledgers(str(tmp_path))[0])["procs"] == {}


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_books_that_cannot_be_written_fail_clearly_and_change_nothing(tmp_path, monkeypatch, code):
    with _manager(tmp_path) as mgr:
        space = mgr.create_space("s", **SHAPE)
        a = _fill(space, "a", TOKENS_PER_PAGE, 1.0)
        _fill(space, "b", TOKENS_PER_PAGE, 2.0)

        # the directory fills up (a container's 64 MiB /dev/shm) or turns read-only
        def full(file: str, data: bytes) -> None:
            raise OSError(code, os.strerror(code))
        monkeypatch.setattr(ledger_books, "_store", full)
        # giving back always works (the books overcount this process until they can be written)
        space.free("b")
        mgr.check()
        # taking more is refused with a kvtier error naming the ledger, and changes nothing
        with pytest.raises(OutOfPagesError, match="cannot write its books"):
            space.allocate("c", TOKENS_PER_PAGE)
        mgr.check()
        assert space.sequences() == ["a"]
        # room again: the books catch up, and allocation goes on
        monkeypatch.undo()
        c = _fill(space, "c", TOKENS_PER_PAGE, 3.0)
        k, _ = space.kv(0)
        assert torch.equal(k[torch.tensor(space.blocks("a"))], a) and torch.equal(k[torch.tensor(space.blocks("c"))], c)
        assert _pages_on_books(tmp_path) == {"m": 4}
        mgr.check()


LOCK_HOLDER = textwrap.dedent("""
    import os, signal, sys
    from kvtier.vmm.ledger import locked_books, ledger_path
    with locked_books(ledger_path(sys.argv[1], "host"), holder=f"{os.getpid()} stuck debugger") as books:
        print("holding", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
""")


def test_a_peer_stopped_while_holding_the_lock_is_named_and_waited_for_a_bounded_time(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger_books, "LOCK_TIMEOUT_S", 0.3)
    with _manager(tmp_path) as mgr:
        space = mgr.create_space("s", **SHAPE)
        a = _fill(space, "a", TOKENS_PER_PAGE, 1.0)
        # another process takes the ledger's lock and is stopped while holding it (SIGSTOP, a debugger)
        holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path)], stdout=subprocess.PIPE,
                                  text=True)
        try:
            assert holder.stdout.readline().strip() == "holding"
            # this process's allocation waits at most the deadline, then fails naming the holder
            start = time.monotonic()
            with pytest.raises(OutOfPagesError, match=f"pid {holder.pid} \\(stuck debugger, stopped\\)"):
                space.allocate("b", TOKENS_PER_PAGE)
            assert time.monotonic() - start < 10
            # giving back never waits for it for ever, and the books stay whole
            space.free("a")
            mgr.check()
            # the operator's tools answer with the same message instead of hanging
            runner = CliRunner()
            out = runner.invoke(main, ["ls", "--ledger-dir", str(tmp_path)])
            assert out.exit_code == 0 and f"pid {holder.pid}" in out.output and "stopped" in out.output
            out = runner.invoke(main, ["limit", str(os.getpid()), "1GiB", "--ledger-dir", str(tmp_path)])
            assert out.exit_code != 0 and f"pid {holder.pid}" in out.output
        finally:
            holder.kill()
            holder.wait()
        # the holder is gone: after the back-off, allocation goes on and the books are right
        time.sleep(ledger_module.BUSY_BACKOFF_S)
        a = _fill(space, "a", TOKENS_PER_PAGE, 4.0)
        assert torch.equal(space.kv(0)[0][torch.tensor(space.blocks("a"))], a)
        assert _pages_on_books(tmp_path) == {"m": 2}
        mgr.check()


HOLDER = textwrap.dedent("""
    import sys
    from kvtier.vmm.ledger import Ledger
    ledger = Ledger(sys.argv[1], "host", budget_pages=10, page_size=65536, name="holder")
    print(ledger.reserve(int(sys.argv[2])), ledger.id, flush=True)
    for line in sys.stdin:  # each line: reserve that many more, print what the process holds
        print(ledger.reserve(int(line)), ledger.reserved(), flush=True)
""")


def _holder(tmp_path, pages: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), str(pages)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    granted, proc_id = proc.stdout.readline().split()
    assert int(granted) == pages
    return proc, proc_id


def test_a_live_process_whose_alive_file_is_deleted_keeps_its_pages(tmp_path):
    holder, holder_id = _holder(tmp_path, 7)
    try:
        path = ledgers(str(tmp_path))[0]
        # someone deletes the live holder's .alive file (a cleanup script, a careless rm)
        os.unlink(os.path.join(path, holder_id + ".alive"))
        # another process is not handed the holder's pages: the kernel still shows its lock
        me = Ledger(str(tmp_path), "host", budget_pages=10, page_size=PAGE, name="me")
        assert me.reserve(4) == 0 and me.reserve(3) == 3
        assert {p["name"]: p["pages"] for p in snapshot(path)["procs"].values()} == {"holder": 7, "me": 3}
        # the holder's next change makes its file again
        holder.stdin.write("0\n")
        holder.stdin.flush()
        assert holder.stdout.readline().split() == ["0", "7"]
        assert os.path.exists(os.path.join(path, holder_id + ".alive"))
        # once it is killed, its pages come back
        holder.kill()
        holder.wait()
        assert me.reserve(7) == 7
        me.release(10)
        me.close()
    finally:
        holder.kill()
        holder.wait()


def test_books_rebuilt_while_processes_run_count_every_live_process(tmp_path):
    holder, _ = _holder(tmp_path, 6)
    try:
        me = Ledger(str(tmp_path), "host", budget_pages=10, page_size=PAGE, name="me")
        # the books are overwritten with nonsense while both run
        open(_books_file(tmp_path), "w").write("{")
        # the rebuild finds the holder from its .alive record: only 4 are left
        assert me.reserve(5) == 0 and me.reserve(4) == 4
        assert {p["name"]: p["pages"] for p in snapshot(ledgers(str(tmp_path))[0])["procs"].values()} == \
            {"holder": 6, "me": 4}
        me.release(4)
        me.close()
    finally:
        holder.kill()
        holder.wait()


def test_books_no_live_process_owns_start_afresh_and_leftovers_are_swept(tmp_path):
    # a process with another page size and budget ran and was killed (SIGKILL: no goodbye, a write's temp file)
    holder, _ = _holder(tmp_path, 3)
    path = ledgers(str(tmp_path))[0]
    holder.kill()
    holder.wait()
    open(os.path.join(path, ".ledger.json.999999"), "w").write("{half")
    # a new process with another page size and budget: accepted, and its settings are the device's now
    me = Ledger(str(tmp_path), "host", budget_pages=20, page_size=2 * 65536, name="me")
    books = snapshot(path)
    assert (books["page_size"], books["budget_pages"]) == (2 * 65536, 20)
    assert [p["name"] for p in books["procs"].values()] == ["me"]
    assert sorted(os.listdir(path)) == sorted(["ledger.json", "ledger.lock", me.id + ".alive"])
    # while it lives, a process with another page size is refused, naming it
    with pytest.raises(ConfigError, match=f"pid {os.getpid()} \\(me\\)"):
        Ledger(str(tmp_path), "host", budget_pages=20, page_size=65536, name="other")
    me.close()


FORKER = textwrap.dedent("""
    import os, sys, time
    from kvtier.vmm.ledger import Ledger
    ledger = Ledger(sys.argv[1], "host", budget_pages=10, page_size=65536, name="parent")
    ledger.reserve(5)
    child = os.fork()
    if child == 0:  # the fork handlers have run by now
        print("child", os.getpid(), flush=True)
        time.sleep(120)
        os._exit(0)
    time.sleep(120)
""")


def test_a_forked_child_does_not_keep_a_killed_parents_pages(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", FORKER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    said, child = parent.stdout.readline().split()
    child = int(child)
    try:
        # the parent dies; its child (which inherited its descriptors) lives on
        parent.kill()
        parent.wait()
        # the parent's pages come back: the child did not keep the parent's lock
        me = Ledger(str(tmp_path), "host", budget_pages=10, page_size=PAGE, name="me")
        assert me.reserve(10) == 10
        me.release(10)
        me.close()
    finally:
        os.kill(child, signal.SIGKILL)


def test_the_cli_answers_clearly_on_any_books(tmp_path):
    runner = CliRunner()
    with _manager(tmp_path, name="model-a"):
        open(_books_file(tmp_path), "w").write("[]")
        out = runner.invoke(main, ["ls", "--ledger-dir", str(tmp_path)])
        assert out.exit_code == 0 and "model-a" in out.output, out.output
        out = runner.invoke(main, ["limit", str(os.getpid()), "not a size", "--ledger-dir", str(tmp_path)])
        assert out.exit_code != 0 and "is not a size" in out.output and "Traceback" not in out.output


def test_processes_hammering_books_that_keep_being_destroyed_never_exceed_the_budget(tmp_path):
    # four processes reserve and release at random against 32 pages while the books are deleted, truncated and
    # overwritten under them again and again: every rebuild counts every live process, so no snapshot ever shows
    # more than the budget, and at the end the books are empty
    first = Ledger(str(tmp_path), "host", budget_pages=32, page_size=65536, name="first")  # makes the directory
    books = _books_file(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-c", HAMMER, str(tmp_path), str(seed)], stdout=subprocess.PIPE,
                              text=True) for seed in range(4)]
    rng, damages = random.Random(0), 0
    while any(p.poll() is None for p in procs):
        damages += 1
        damage = rng.choice(["delete", "truncate", "garbage"])
        with contextlib.suppress(OSError):
            if damage == "delete":
                os.unlink(books)
            elif damage == "truncate":
                open(books, "r+").truncate(rng.randint(0, 40))
            else:
                open(books, "w").write("{]")
        time.sleep(rng.uniform(0, 0.02))
    worst = [int(p.communicate(timeout=300)[0].strip()) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert 16 < max(worst) <= 32 and damages > 10  # they competed for the budget, under a rain of damage
    first.close()
    assert snapshot(ledgers(str(tmp_path))[0])["procs"] == {}
