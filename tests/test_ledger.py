"""The per-device ledger shared by kvtier processes: one budget, reservations that cannot race, a killed
process's pages taken back, limits changed at run time, and ``kvtier ls`` / ``limit`` / ``top`` over it. Real
processes (subprocesses) where processes are the point."""

from __future__ import annotations

import os
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
from kvtier.errors import OutOfPagesError
from kvtier.vmm.ledger import Ledger, ledgers, snapshot
from tests.conftest import PAGE as PAGE_OF

PAGE = 64 << 10


def _books(directory: str) -> dict:
    return snapshot(ledgers(directory)[0])


def test_reservations_share_one_budget_within_limits(tmp_path):
    a = Ledger(str(tmp_path), "host", budget_pages=10, page_size=PAGE, name="a")
    b = Ledger(str(tmp_path), "host", budget_pages=10, page_size=PAGE, name="b", limit_pages=4)
    try:
        # a takes 6 of the 10; b may hold 4 at most: all or nothing, unless partial
        assert a.reserve(6) == 6
        assert b.reserve(5) == 0 and b.reserve(5, partial=True) == 4
        assert a.room() == 0 and b.room() == 0
        assert sum(p["pages"] for p in _books(str(tmp_path))["procs"].values()) == 10
        # a gives back: b is still at its limit, a may take them again
        a.release(6)
        assert b.room() == 0 and a.reserve(6) == 6
        a.release(6)
        b.release(4)
    finally:
        a.close()
        b.close()
    assert _books(str(tmp_path))["procs"] == {}
    assert not [n for n in os.listdir(ledgers(str(tmp_path))[0]) if n.endswith(".alive")]


HAMMER = textwrap.dedent("""
    import random, sys
    from kvtier.vmm.ledger import Ledger, ledgers, snapshot
    directory, seed = sys.argv[1], int(sys.argv[2])
    ledger = Ledger(directory, "host", budget_pages=32, page_size=65536, name=f"hammer {seed}")
    rng, held, worst = random.Random(seed), 0, 0
    for _ in range(300):
        if held and rng.random() < 0.45:
            n = rng.randint(1, held)
            ledger.release(n)
            held -= n
        else:
            held += ledger.reserve(rng.randint(1, 8), partial=rng.random() < 0.5)
        worst = max(worst, sum(p["pages"] for p in snapshot(ledgers(directory)[0])["procs"].values()))
    ledger.release(held)
    ledger.close()
    print(worst)
""")


def test_processes_hammering_one_ledger_never_exceed_its_budget(tmp_path):
    # four processes reserve and release at random against a budget of 32 pages: after every step the books,
    # read under the lock, hold no more than 32, and at the end nothing is left on them
    procs = [subprocess.Popen([sys.executable, "-c", HAMMER, str(tmp_path), str(seed)], stdout=subprocess.PIPE,
                              text=True) for seed in range(4)]
    worst = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0
        worst.append(int(out.strip()))
    assert max(worst) <= 32 and max(worst) > 16  # they did compete for it
    assert _books(str(tmp_path))["procs"] == {}


HOLDER = textwrap.dedent("""
    import sys, time
    from kvtier.vmm.ledger import Ledger
    ledger = Ledger(sys.argv[1], "host", budget_pages=10, page_size=65536, name="doomed")
    ledger.reserve(7)
    print("held", flush=True)
    time.sleep(600)
""")


def test_a_killed_processes_pages_are_taken_back(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        me = Ledger(str(tmp_path), "host", budget_pages=10, page_size=PAGE, name="me")
        # alive: its 7 pages are its own, and its books entry stays
        assert me.reserve(4) == 0 and me.room() == 3
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        # dead (its lock went with it): the next look takes its pages off the books
        assert me.reserve(10) == 10
        assert [p["name"] for p in _books(str(tmp_path))["procs"].values()] == ["me"]
        me.release(10)
        me.close()
    finally:
        holder.kill()
        holder.wait()


LEFT_OPEN = textwrap.dedent("""
    import signal, sys, time, kvtier
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in a terminal, whatever it inherited
    mgr = kvtier.TierManager(device="cpu", page_size=65536, pool_budget=8 << 20, host_size=1 << 20,
                             nvme_size=1 << 20, ledger_dir=sys.argv[1], ledger_name="left open")
    space = mgr.create_space("m", num_layers=2, num_kv_heads=2, head_dim=64, max_tokens=4096)
    space.allocate("a", 2048)
    space.offload("a", tier="nvme").result()
    print("held", flush=True)
    if sys.argv[2] == "raises":
        raise RuntimeError("the engine failed")
    if sys.argv[2] == "sleeps":
        time.sleep(120)
""")


@pytest.mark.parametrize("end", ["returns", "raises", "sleeps"])
def test_a_manager_left_open_gives_its_pages_back_when_the_process_exits(tmp_path, end):
    # a script that never closes its manager: it ends, dies of an exception, or is stopped by Ctrl-C
    proc = subprocess.Popen([sys.executable, "-c", LEFT_OPEN, str(tmp_path), end], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        if end == "sleeps":
            proc.send_signal(signal.SIGINT)
        # it exits (closing a manager during the interpreter's teardown could hang: threads cannot run then)
        assert proc.wait(timeout=60) != 0 if end != "returns" else proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()
    # its pages went back at exit: the books hold no process of it, before anyone sweeps the dead
    assert _books(str(tmp_path))["procs"] == {}


LOCK_HOLDER = textwrap.dedent("""
    import os, signal, sys
    from kvtier.vmm.ledger import locked_books, ledger_path
    with locked_books(ledger_path(sys.argv[1], "host"), holder=f"{os.getpid()} stuck debugger"):
        print("holding", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
""")


def test_a_manager_left_open_exits_while_a_stopped_process_holds_the_ledger(tmp_path):
    # the script ends with its manager open while another process holds the books' lock, stopped (a debugger)
    proc = subprocess.Popen([sys.executable, "-c", LEFT_OPEN, str(tmp_path), "sleeps"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    holder = None
    try:
        assert proc.stdout.readline().strip() == "held"
        holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path)], stdout=subprocess.PIPE,
                                  text=True)
        assert holder.stdout.readline().strip() == "holding"
        proc.send_signal(signal.SIGINT)
        # the close at exit waits for the lock a bounded time, says so, and the process ends
        assert proc.wait(timeout=60) != 0
        assert "ledger" in proc.stderr.read()
    finally:
        for p in (proc, holder):
            if p is not None:
                p.kill()
                p.wait()
    # its record stayed on the books; its lock died with it, so the next look sweeps it
    assert _books(str(tmp_path))["procs"] == {}


def test_a_process_past_its_fair_share_stops_growing_while_another_wants(tmp_path):
    a = Ledger(str(tmp_path), "host", budget_pages=12, page_size=PAGE, name="a")
    b = Ledger(str(tmp_path), "host", budget_pages=12, page_size=PAGE, name="b")
    c = Ledger(str(tmp_path), "host", budget_pages=12, page_size=PAGE, name="c", priority=-1)
    try:
        # a holds 9 of 12, c (lower priority) 1; no one wants more: no share, a may take what is left
        assert a.reserve(9) == 9 and c.reserve(1) == 1
        assert a.fair_share() is None and a.reserved_cached() == 9
        # b wants: c keeps its 1 (under an even split), a and b split the other 11 -> a may hold 6 (rounded up)
        b.want(2)
        a._share = (None, 0, -1.0)  # read afresh (the share is read at most every SHARE_TTL_S)
        assert a.fair_share() == 6 and a.reserved_cached() == 9
        # c is of a lower priority than b: it is held at its share too, the even split of the 11 others leave
        assert c.fair_share() == 4
        # b itself hears no one else wanting
        assert b.fair_share() is None
    finally:
        a.release(9)
        c.release(1)
        for ledger in (a, b, c):
            ledger.close()


def _manager(tmp_path, name: str, pool_pages: int, backend: str = "cpu", **overrides) -> kvtier.TierManager:
    page = PAGE_OF[backend]
    config = kvtier.Config(device=backend, page_size=page, pool_budget=pool_pages * page, pool_ready=0,
                           host_size=4 * page, host_chunk=4 * page, nvme_size=8 * page, ledger_dir=str(tmp_path),
                           ledger_budget=8 * page, ledger_name=name, space_reserve_pages=0, **overrides)
    return kvtier.TierManager(config)


def test_two_managers_share_the_devices_budget_and_pages_flow_back(tmp_path, backend_name):
    shape = dict(num_layers=1, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, block_size=16)
    with _manager(tmp_path, "a", 8, backend_name) as a, _manager(tmp_path, "b", 8, backend_name) as b:
        sa, sb = a.create_space("s", **shape), b.create_space("s", **shape)
        blocks_per_page = PAGE_OF[backend_name] // (16 * 2 * 64 * 2)
        # a maps 3 pages (6 handles: K and V); b, with its own budget of 8, finds only 2 left on the device
        sa.allocate("x", 3 * blocks_per_page * 16)
        with pytest.raises(OutOfPagesError):
            sb.allocate("y", 2 * blocks_per_page * 16)
        sb.allocate("y", 1 * blocks_per_page * 16)
        # a frees: its pages go back to the device (pool_ready=0), and b can grow into them
        sa.free("x")
        sa.check()
        sb.allocate("z", 3 * blocks_per_page * 16)
        books = _books(str(tmp_path))
        assert {p["name"]: p["pages"] for p in books["procs"].values()} == {"a": 0, "b": 8}
        a.check()
        b.check()
    assert _books(str(tmp_path))["procs"] == {}


def test_top_shows_each_processes_prefix_cache_hits(tmp_path):
    # a process publishes a prompt's blocks and a second request finds them: its demoter says so in the ledger
    # (counters ride along with its idle count), and kvtier ls / top show the hits and the tokens saved
    with _manager(tmp_path, "cached model", 8) as a:
        space = a.create_space("s", num_layers=1, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, block_size=16)
        prompt = list(range(64))
        keys = space.block_keys(prompt)
        space.allocate("r1", len(prompt))
        space.publish("r1", keys)
        assert space.share_prefix("r2", keys) == 64
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            cache = next(iter(_books(str(tmp_path))["procs"].values())).get("cache")
            if cache and cache["hit_blocks"] == 4:
                break
            time.sleep(0.05)
        assert cache == {"hit_blocks": 4, "tokens_saved": 64, "lookups_short": 0, "from_gpu": 4}
        out = CliRunner().invoke(main, ["ls", "--ledger-dir", str(tmp_path)])
        assert out.exit_code == 0, out.output
        row = next(line for line in out.output.splitlines() if "cached model" in line)
        assert "gpu 4" in row and " 64 " in row, out.output


def test_ls_and_limit_show_and_change_a_share(tmp_path):
    runner = CliRunner()
    with _manager(tmp_path, "model-a", 8, ledger_priority=3) as a:
        space = a.create_space("s", num_layers=1, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, block_size=16)
        space.allocate("x", 16)
        out = runner.invoke(main, ["ls", "--ledger-dir", str(tmp_path)])
        assert out.exit_code == 0, out.output
        assert "model-a" in out.output and str(os.getpid()) in out.output
        # a lower limit: refused beyond it from now on
        out = runner.invoke(main, ["limit", str(os.getpid()), f"{3 * PAGE}", "--ledger-dir", str(tmp_path)])
        assert out.exit_code == 0, out.output
        assert a.pool.ledger.room() <= 1
        with pytest.raises(OutOfPagesError):
            space.allocate("y", 4 * 16 * 16)
        out = runner.invoke(main, ["limit", "999999999", "1GiB", "--ledger-dir", str(tmp_path)])
        assert out.exit_code != 0 and "no live kvtier process" in out.output
        out = runner.invoke(main, ["top", "--ledger-dir", str(tmp_path), "--interval", "0.05", "--count", "2"])
        assert out.exit_code == 0 and "model-a" in out.output


IDLE_HOLDER = textwrap.dedent("""
    import sys, time, torch, kvtier
    directory, budget, priority, pages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    device, PAGE = sys.argv[5], int(sys.argv[6])
    config = kvtier.Config(device=device, page_size=PAGE, pool_budget=budget * PAGE, pool_ready=0,
                           host_size=16 * PAGE, host_chunk=16 * PAGE, nvme_size=8 * PAGE, ledger_dir=directory,
                           ledger_budget=budget * PAGE, ledger_name=f"idle model {priority}", ledger_priority=priority,
                           space_reserve_pages=0, gpu_low_watermark=0.0, gpu_high_watermark=0.0)
    with kvtier.TierManager(config) as mgr:
        space = mgr.create_space("s", num_layers=1, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, block_size=16)
        space.allocate("old", pages * PAGE // (2 * 64 * 2))  # pages of the space: twice as many handles (K, V)
        k, v = space.kv(0)
        ids = torch.tensor(space.blocks("old"), device=device)
        k[ids] = torch.arange(k[ids].numel(), dtype=torch.float32).reshape(k[ids].shape).to(k.device, k.dtype)
        expected = k[ids].clone()
        space.offload("old")  # idle: it stays on the GPU until someone needs the room
        time.sleep(0.5)  # its demoter says so in the ledger within 50 ms (until then no one waits for it)
        print("ready", flush=True)
        sys.stdin.readline()
        where = space.residency("old")
        space.ensure_resident(["old"])
        print("ok" if torch.equal(space.kv(0)[0][ids], expected) else "WRONG", where["host"] > 0, flush=True)
""")


def _holder(tmp_path, budget: int, priority: int, pages: int, backend: str) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", IDLE_HOLDER, str(tmp_path), str(budget), str(priority),
                               str(pages), backend, str(PAGE_OF[backend])], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "ready"
    return holder


def _check(holder: subprocess.Popen) -> bool:
    """The holder brings its sequence back and compares it; returns whether it had been sent below."""
    holder.stdin.write("check\n")
    holder.stdin.flush()
    ok, went_below = holder.stdout.readline().split()
    assert ok == "ok" and holder.wait(timeout=60) == 0
    return went_below == "True"


def _take(tmp_path, handles: int, backend: str) -> None:
    with _manager(tmp_path, "busy model", 12, backend, ledger_priority=5, gpu_low_watermark=0.0,
                  gpu_high_watermark=0.0) as a:
        space = a.create_space("s", num_layers=1, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, block_size=16)
        space.allocate("new", handles // 2 * PAGE_OF[backend] // (2 * 64 * 2))
        assert {p["name"]: p["pages"] for p in _books(str(tmp_path))["procs"].values()}["busy model"] == handles
        space.free("new")
        a.check()


def test_a_process_short_of_pages_gets_another_processes_idle_ones(tmp_path, backend_name):
    # B holds 8 of the device's 10 pages for a sequence it set idle; A needs 6: it says so in the ledger and waits,
    # B's demoter sends B's idle pages to its host tier and releases them; A's allocate goes through. Afterwards B
    # brings its sequence back, every byte as it was
    holders = []
    try:
        holders.append(_holder(tmp_path, budget=10, priority=0, pages=4, backend=backend_name))
        _take(tmp_path, 6, backend_name)
        assert _check(holders[0])
    finally:
        for h in holders:
            h.kill()
            h.wait()


def test_the_lowest_priority_processes_idle_pages_go_first(tmp_path, backend_name):
    # two processes hold idle pages, 4 each of 12; A needs 6 (4 are free): only the lower priority one gives
    holders = []
    try:
        holders.append(_holder(tmp_path, budget=12, priority=2, pages=2, backend=backend_name))
        holders.append(_holder(tmp_path, budget=12, priority=0, pages=2, backend=backend_name))
        _take(tmp_path, 6, backend_name)
        assert [_check(h) for h in holders] == [False, True]
    finally:
        for h in holders:
            h.kill()
            h.wait()


def test_a_serving_engine_short_of_pages_gets_another_processes_idle_ones(tmp_path):
    # transformers' continuous batching on kvtier here, an idle model in another process holding 12 of the
    # device's 16 pages: the engine, short of room (to start, or to schedule), says what it wants in the ledger
    # and waits; the other
    # process demotes its idle sequence and gives pages back; the engine serves the tokens of the engine as
    # shipped, and the other process's bytes come back intact
    transformers = pytest.importorskip("transformers")
    cb = pytest.importorskip("kvtier.integrations.continuous_batching")
    if ".".join(transformers.__version__.split(".")[:2]) not in cb.SUPPORTED_VERSIONS:
        pytest.skip(f"transformers {transformers.__version__} is not a version the integration supports")
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512)).eval()
    model.config._attn_implementation = "sdpa"
    gen = transformers.GenerationConfig(max_new_tokens=20, eos_token_id=-1, pad_token_id=0, do_sample=False)
    prompts = [[(7 * i + j) % 127 + 1 for j in range(10 + 5 * i)] for i in range(4)]

    def generate(num_blocks: int | None) -> dict:
        config = ContinuousBatchingConfig(page_size=16, num_blocks=num_blocks, max_batch_tokens=64,
                                          allow_block_sharing=False, auto_switch_to_flash=False, use_cuda_graph=False)
        out = model.generate_batch(inputs=prompts, generation_config=gen, continuous_batching_config=config)
        return {rid: list(r.generated_tokens) for rid, r in out.items()}

    expected = generate(64)
    holder = _holder(tmp_path, budget=16, priority=0, pages=6, backend="cpu")  # 6 space pages: 12 handles
    try:
        page = PAGE_OF["cpu"]
        config = kvtier.Config(device="cpu", page_size=page, pool_budget=16 * page, pool_ready=0,
                               host_size=16 * page, host_chunk=16 * page, nvme_size=16 * page,
                               ledger_dir=str(tmp_path), ledger_budget=16 * page, ledger_name="serving model",
                               ledger_priority=5)
        with kvtier.TierManager(config) as mgr, cb.kvtier_engine(model, mgr, name="m", staging_bytes=16 << 10):
            got = generate(None)
        assert got == expected
        assert _check(holder)  # its idle sequence went below to make the room, and came back intact
    finally:
        holder.kill()
        holder.wait()
