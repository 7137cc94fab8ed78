"""The peer tier: pages demoted into another device's memory, faulted back, cascaded further down, and given back
when that device's own processes need its pages (its ledger). On CPU, ``cpu:1`` stands in for a second GPU: a
second mapping of memory of its own and a ledger of its own, so bytes really move and the books are real. Under
``-m gpu`` the same scenarios run on ``cuda:1`` where the machine has two GPUs with peer access."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import kvtier
from kvtier.cli import main
from kvtier.errors import CudaError, TransferError
from tests.conftest import PAGE, SHAPE, assert_seq, write_seq
from tests.faults import FailingCopies

REGIONS = 2 * SHAPE["cpu"]["num_layers"]  # slots per page (K and V of each layer)


@pytest.fixture
def peer(backend_name: str) -> str:
    """The device the peer tier uses: cpu:1 on CPU; on CUDA a second GPU this one has peer access to."""
    if backend_name == "cpu":
        return "cpu:1"
    from kvtier.vmm.cuda import peer_access
    if torch.cuda.device_count() < 2 or not peer_access(0, 1):
        pytest.skip("needs two GPUs with peer access (nvidia-h200-x2)")
    return "cuda:1"


def _make(make_manager: Any, peer: str, slots: int = 4 * REGIONS, **overrides: Any) -> kvtier.TierManager:
    page = PAGE[make_manager.name]
    settings = {"device": peer, "size": slots * page, **overrides.pop("peer_settings", {})}
    return make_manager(tiers=["peer", "host", "nvme"], tier_settings={"peer": settings}, **overrides)


def _space(mgr: kvtier.TierManager, make_manager: Any) -> kvtier.KVSpace:
    return mgr.create_space("m", max_tokens=8192, **make_manager.shape)


def _places(space: kvtier.KVSpace, seq: str) -> list[str]:
    """Where ``seq``'s bytes are."""
    return sorted(tier for tier, nbytes in space.residency(seq).items() if nbytes)


def _page_tokens(space: kvtier.KVSpace) -> int:
    return space.block_books.page_size // space.block_bytes * space.block_size


def test_pages_go_to_the_peer_and_come_back_byte_for_byte(make_manager, peer):
    mgr = _make(make_manager, peer)
    space = _space(mgr, make_manager)
    tier = mgr.tiering.tier("peer")
    assert tier.describe()["available"] and tier.books.capacity == 4 * REGIONS
    # two sequences of one page and a half each; their bytes written
    for seq in ("a", "b"):
        space.allocate(seq, _page_tokens(space) * 3 // 2)
        write_seq(space, seq, salt=7)
    pages = space.block_books.pages_of_seqs(["a"])
    before = [space.region_view(r, p).clone().cpu() for p in pages for r in range(space.num_regions)]
    # a goes to the peer: its pages leave the GPU, and its bytes are in the peer's memory
    space.offload("a", tier="peer").result()
    assert _places(space, "a") == ["peer"]
    slots = [s for p in pages for s in space.pages.slots[p]]
    landed = [tier.peer_view(s)[:tier.held(s)].cpu() for s in slots]
    assert all(torch.equal(x[:y.numel()], y[:x.numel()]) for x, y in zip(before, landed))
    assert mgr.stats()["tiers"]["paths"]["gpu->peer"]["stripes"] == 2
    mgr.check()
    # back on the GPU, every byte as written; b was never touched
    space.prefetch(["a"]).result()
    assert _places(space, "a") == ["gpu"]
    assert_seq(space, "a", salt=7)
    assert_seq(space, "b", salt=7)
    mgr.check()


def test_a_full_peer_spills_to_host_and_its_high_mark_cascades_there(make_manager, peer):
    # the peer holds 2 pages; the demoter keeps it between 50% and 75% full
    mgr = _make(make_manager, peer, slots=2 * REGIONS, background_demotion=True, gpu_low_watermark=0.0,
                gpu_high_watermark=0.0, peer_settings={"low_watermark": 0.5, "high_watermark": 0.75})
    space = _space(mgr, make_manager)
    seqs = ["a", "b", "c"]
    for seq in seqs:
        space.allocate(seq, _page_tokens(space))
        write_seq(space, seq)
    # three pages asked to go to the peer: two fit, the third goes on to host
    for seq in seqs:
        space.offload(seq, tier="peer").result()
    # the peer passed its high mark: the demoter moves its coldest page on to host, down to its low mark
    deadline = time.monotonic() + 10
    while mgr.tiering.tier("peer").books.used > REGIONS and time.monotonic() < deadline:
        time.sleep(0.02)
    where = {seq: _places(space, seq)[0] for seq in seqs}
    assert sorted(where.values()) == ["host", "host", "peer"], where
    assert "peer->host" in mgr.stats()["tiers"]["paths"]
    # all three come back whole, from both tiers
    space.prefetch(seqs).result()
    for seq in seqs:
        assert_seq(space, seq)
    mgr.check()


def test_the_peer_gives_its_pages_back_when_that_devices_own_engine_needs_them(make_manager, peer, tmp_path):
    if make_manager.name != "cpu":
        pytest.skip("the second GPU's engine: the same scenario, CPU stand-ins for both devices")
    page = PAGE["cpu"]
    ledger = dict(ledger_dir=str(tmp_path), ledger_budget=16 * page)
    # A (on cpu) keeps up to 12 pages of cpu:1 as its peer tier, and fills 8 of them with two idle sequences
    a = _make(make_manager, peer, slots=12, background_demotion=True, gpu_low_watermark=0.0, gpu_high_watermark=0.0,
              peer_settings={"regrow_after_s": 0.5}, **ledger)
    space = _space(a, make_manager)
    for seq in ("x", "y"):
        space.allocate(seq, _page_tokens(space))
        write_seq(space, seq, salt=3)
        space.offload(seq, tier="peer").result()
    tier = a.tiering.tier("peer")
    assert tier.books.capacity == 12 and tier.books.used == 2 * REGIONS
    # B, an engine on cpu:1 itself, needs 12 of that device's 16 pages: 4 are free on its ledger, so it says it
    # wants more and waits; A's peer tier gives its free slots back at once, then sends one page on to host
    b = make_manager(device=peer, ledger_name="engine on cpu:1", tiers=["host"], **ledger)
    engine = b.create_space("e", max_tokens=8192, **make_manager.shape)
    engine.allocate("s", 3 * _page_tokens(engine))
    assert b.pool.ledger.reserved() >= 3 * REGIONS
    assert tier.books.capacity <= 16 - b.pool.ledger.reserved()
    assert tier.describe()["given_back"] >= 12 - tier.books.capacity > 0
    where = [_places(space, seq)[0] for seq in ("x", "y")]
    assert "host" in where
    # A's sequences come back whole, wherever they went
    space.prefetch(["x", "y"]).result()
    for seq in ("x", "y"):
        assert_seq(space, seq, salt=3)
    a.check()
    b.check()
    # B ends: nobody on cpu:1 asks any more, and the peer tier grows back to its size
    b.close()
    deadline = time.monotonic() + 10
    while tier.books.capacity < 12 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tier.books.capacity == 12 and tier.describe()["grown"] > 12
    a.check()


@pytest.mark.parametrize("seed", [30, 31, 32])
def test_a_random_walk_while_the_peers_engine_takes_and_gives_back_pages_never_changes_a_byte(make_manager, peer,
                                                                                              tmp_path, seed):
    if make_manager.name != "cpu":
        pytest.skip("CPU stand-ins for both devices")
    import random
    rng = random.Random(seed)
    page = PAGE["cpu"]
    # the engine on cpu:1 first: it sets that device's budget (16 pages); A's own device gets 64
    b = make_manager(device=peer, ledger_name="engine on cpu:1", tiers=["host"], ledger_dir=str(tmp_path),
                     ledger_budget=16 * page)
    a = _make(make_manager, peer, slots=12, background_demotion=True, peer_settings={"regrow_after_s": 0.2},
              ledger_dir=str(tmp_path), ledger_budget=64 * page)
    space = _space(a, make_manager)
    engine = b.create_space("e", max_tokens=8192, **make_manager.shape)
    seqs = [f"s{i}" for i in range(6)]
    for i, seq in enumerate(seqs):
        space.allocate(seq, _page_tokens(space))
        write_seq(space, seq, salt=i)
    taken = refused = 0
    for step in range(80):
        op = rng.random()
        if op < 0.4:  # a sequence goes idle, down to a tier or left to the demoter
            space.offload(rng.choice(seqs), tier=rng.choice(["peer", "peer", "host", "nvme", None])).result()
        elif op < 0.7:  # some come back for a step
            space.prefetch(rng.sample(seqs, rng.randint(1, 3))).result()
        elif taken:  # the engine on cpu:1 lets its pages go
            engine.free("x")
            taken = 0
        else:  # the engine on cpu:1 needs pages: the peer tier gives them back
            try:
                engine.allocate("x", rng.randint(1, 3) * _page_tokens(engine))
                taken = 1
            except kvtier.OutOfPagesError:
                refused += 1  # nobody could give them in time: a clear error, nothing changed
        a.check()
        b.check()
    # every sequence comes back as written, wherever the walk left it
    space.ensure_resident(seqs)
    for i, seq in enumerate(seqs):
        assert_seq(space, seq, salt=i)
    assert a.tiering.tier("peer").describe()["given_back"] > 0 and refused < 3
    a.check()


def test_a_peer_tier_that_owes_with_no_tier_below_says_so_once(make_manager, peer, tmp_path, caplog):
    if make_manager.name != "cpu":
        pytest.skip("CPU stand-ins for both devices")
    page = PAGE["cpu"]
    # the peer is the only tier: what the engine on cpu:1 asks for can be paid from free slots only
    b = make_manager(device=peer, ledger_name="engine on cpu:1", tiers=["host"], ledger_dir=str(tmp_path),
                     ledger_budget=12 * page)
    a = make_manager(tiers=["peer"], tier_settings={"peer": {"device": peer, "size": 8 * page}},
                     background_demotion=True, gpu_low_watermark=0.0, gpu_high_watermark=0.0,
                     ledger_dir=str(tmp_path), ledger_budget=64 * page)
    space = _space(a, make_manager)
    space.allocate("x", _page_tokens(space))
    write_seq(space, "x")
    space.offload("x", tier="peer").result()
    # the engine on cpu:1 says it wants 8 pages: the 4 free slots go back at once, the 4 in use cannot go anywhere
    tier = a.tiering.tier("peer")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any("is the last tier" in r.message for r in caplog.records):
        b.pool.ledger.want(8)
        time.sleep(0.05)
    assert sum("is the last tier" in r.message for r in caplog.records) == 1
    assert tier.books.capacity == tier.books.used == REGIONS and tier.describe()["owed"] > 0
    space.prefetch(["x"]).result()
    assert_seq(space, "x")
    a.check()
    b.check()


def test_a_copy_that_fails_either_way_leaves_the_page_where_it_was(backend_name, peer):
    if backend_name != "cpu":
        pytest.skip("copies that fail on cue: the CPU backend's")
    failing = FailingCopies()
    page = PAGE["cpu"]
    config = kvtier.Config(device="cpu", page_size=page, pool_budget=64 * page, pool_ready=0, debug_checks=True,
                           host_size=16 * page, host_chunk=4 * page, nvme_size=16 * page, background_demotion=False,
                           tiers=["peer", "host"], tier_settings={"peer": {"device": peer, "size": 8 * page}})
    with kvtier.TierManager(config, backend=failing) as mgr:
        space = mgr.create_space("m", max_tokens=8192, **SHAPE["cpu"])
        space.allocate("a", _page_tokens(space))
        write_seq(space, "a")
        # the copy down fails half way: the page stays on the GPU, its slots go back
        failing.fail_after(1)
        with pytest.raises(TransferError):
            space.offload("a", tier="peer").result()
        assert _places(space, "a") == ["gpu"] and mgr.tiering.tier("peer").books.used == 0
        mgr.check()
        # down for real, then the copy up fails: the page stays on the peer, and comes back at the next try
        failing.fail_after(None)
        space.offload("a", tier="peer").result()
        failing.fail_after(1)
        with pytest.raises((TransferError, CudaError)):  # as the driver raises it when the copy is enqueued
            space.prefetch(["a"]).result()
        assert _places(space, "a") == ["peer"]
        mgr.check()
        failing.fail_after(None)
        space.prefetch(["a"]).result()
        assert_seq(space, "a")
        mgr.check()


@pytest.mark.parametrize("device, why", [("auto", "no second GPU"), ("cpu:0", "own device"),
                                         ("cuda:1", "not a cpu device"), ("nonsense", "not a device")])
def test_without_a_peer_the_tier_is_unavailable_says_why_and_kvtier_runs_without_it(make_manager, tmp_path,
                                                                                    device, why):
    if make_manager.name != "cpu":
        pytest.skip("the CPU backend's reasons")
    page = PAGE["cpu"]
    mgr = make_manager(tiers=["peer", "host"], tier_settings={"peer": {"device": device, "size": 8 * page}})
    stats = mgr.stats()["tiers"]["peer"]
    assert not stats["available"] and why in stats["why"] and stats["slots"] == 0
    # asked for explicitly, the pages go to the next tier that has room
    space = _space(mgr, make_manager)
    space.allocate("a", _page_tokens(space))
    write_seq(space, "a")
    space.offload("a", tier="peer").result()
    assert _places(space, "a") == ["host"]
    space.prefetch(["a"]).result()
    assert_seq(space, "a")
    mgr.check()
    # kvtier info and config check say so
    path = tmp_path / "peer.toml"
    path.write_text(f'[gpu]\ndevice = "cpu"\n[tiers]\norder = ["peer", "host"]\n[tiers.peer]\ndevice = "{device}"\n')
    out = CliRunner().invoke(main, ["info", "--device", "cpu", "--config", str(path)])
    assert out.exit_code == 0 and "unavailable" in out.output and why in out.output
    out = CliRunner().invoke(main, ["config", "check", str(path)])
    assert out.exit_code == 1 and "[tiers.peer]" in out.output and why in out.output


def test_a_peer_ledger_that_counts_pages_of_another_size_makes_the_tier_unavailable(make_manager, tmp_path):
    if make_manager.name != "cpu":
        pytest.skip("CPU stand-ins")
    page = PAGE["cpu"]
    # an engine on cpu:1 counts pages of twice the size on that device's ledger
    make_manager(device="cpu:1", page_size=2 * page, pool_budget=8 * 2 * page, ledger_dir=str(tmp_path))
    mgr = make_manager(tiers=["peer", "host"], tier_settings={"peer": {"device": "cpu:1", "size": 8 * page}},
                       ledger_dir=str(tmp_path))
    stats = mgr.stats()["tiers"]["peer"]
    assert not stats["available"] and "page_size" in stats["why"]
    mgr.check()


def test_the_readmes_peer_section_is_a_config_that_checks(tmp_path):
    import os
    import re
    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")).read()
    block = next(b for b in re.findall(r"```toml\n(.*?)```", readme, flags=re.S) if "[tiers.peer]" in b)
    path = tmp_path / "peer.toml"
    path.write_text(block)
    config = kvtier.Config.from_file(str(path))
    assert config.tiers == ["peer", "host", "nvme"] and config.tier_settings["peer"]["size"] == "16GiB"
    out = CliRunner().invoke(main, ["config", "check", "--schema-only", str(path)])
    assert out.exit_code == 0, out.output


PEER_LOCK_HOLDER = """
import os, signal, sys
from kvtier.vmm.ledger import locked_books, ledger_path
with locked_books(ledger_path(sys.argv[1], "host-1"), holder=f"{os.getpid()} stuck debugger") as books:
    print("holding", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
"""


def test_a_peer_ledger_held_by_a_stopped_process_neither_hangs_nor_breaks_the_tier(tmp_path, monkeypatch):
    import subprocess
    import sys

    from kvtier.vmm import ledger as ledger_module
    from kvtier.vmm import ledger_books
    monkeypatch.setattr(ledger_books, "LOCK_TIMEOUT_S", 0.3)
    page = PAGE["cpu"]
    config = dict(device="cpu", page_size=page, pool_budget=64 * page, pool_ready=0, debug_checks=True,
                  host_size=16 * page, host_chunk=4 * page, nvme_size=16 * page, ledger_dir=str(tmp_path),
                  tiers=["peer", "host"], tier_settings={"peer": {"device": "cpu:1", "size": 8 * page}})

    def stopped_holder() -> subprocess.Popen:
        holder = subprocess.Popen([sys.executable, "-c", PEER_LOCK_HOLDER, str(tmp_path)], stdout=subprocess.PIPE,
                                  text=True)
        assert holder.stdout.readline().strip() == "holding"
        return holder

    # 1. the peer's ledger is held when the tier opens: unavailable, naming the holder; kvtier runs without it
    holder = stopped_holder()
    try:
        with kvtier.TierManager(kvtier.Config(**config, background_demotion=False)) as mgr:
            why = mgr.stats()["tiers"]["peer"]["why"]
            assert f"pid {holder.pid}" in why and "stopped" in why
            space = mgr.create_space("m", max_tokens=8192, **SHAPE["cpu"])
            space.allocate("a", _page_tokens(space))
            write_seq(space, "a")
            space.offload("a", tier="peer").result()
            assert _places(space, "a") == ["host"]
            mgr.check()
    finally:
        holder.kill()
        holder.wait()
    time.sleep(ledger_module.BUSY_BACKOFF_S)
    # 2. held while the tier runs: its looks at the ledger fail fast (the demoter goes on), pages still go to the
    #    peer and come back whole; once the holder is gone the books are right
    with kvtier.TierManager(kvtier.Config(**config, background_demotion=True)) as mgr:
        tier = mgr.tiering.tier("peer")
        assert tier.describe()["available"] and tier.books.capacity == 8
        space = mgr.create_space("m", max_tokens=8192, **SHAPE["cpu"])
        space.allocate("a", _page_tokens(space))
        write_seq(space, "a", salt=5)
        holder = stopped_holder()
        try:
            space.offload("a", tier="peer").result()
            time.sleep(0.5)  # the demoter looks at the held ledger several times meanwhile
            assert _places(space, "a") == ["peer"] and mgr.tiering.demoter.errors == 0
            space.prefetch(["a"]).result()
            assert_seq(space, "a", salt=5)
            mgr.check()
        finally:
            holder.kill()
            holder.wait()
        time.sleep(ledger_module.BUSY_BACKOFF_S + 0.2)
        peer_books = next(path for path in ledger_module.ledgers(str(tmp_path)) if path.endswith("host-1"))
        held = {p["name"]: p["pages"] for p in ledger_module.snapshot(peer_books)["procs"].values()}
        assert list(held.values()) == [8] and next(iter(held)).startswith("peer tier of")
        mgr.check()
