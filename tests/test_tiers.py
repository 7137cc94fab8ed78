"""Scripted tiering scenarios: every byte survives each path down and back up (CPU; CUDA under -m gpu)."""

from __future__ import annotations

import os
import threading
import time

import pytest

import kvtier
from kvtier.vmm import mapped_range
from tests.conftest import PAGE, assert_seq, write_seq

BPP = 16


def _space(mgr, make_manager, name="m", blocks=256):
    return mgr.create_space(name, max_tokens=blocks * make_manager.shape["block_size"], **make_manager.shape)


@pytest.mark.parametrize("tier", ["host", "nvme"])
def test_offload_and_prefetch_round_trip(make_manager, tier):
    mgr = make_manager()
    space = _space(mgr, make_manager)
    # a sequence of 2.5 pages, written in every layer, and an active one beside it
    space.allocate("idle", 40 * space.block_size)
    space.allocate("busy", 20 * space.block_size)
    write_seq(space, "idle")
    write_seq(space, "busy", salt=3)
    # offload: all of its pages leave the GPU and are unmapped
    space.offload("idle", tier=tier).result()
    assert space.residency("idle")[tier] == 40 * space.block_bytes * space.num_regions
    assert space.residency("idle")["gpu"] == 0
    mgr.check()
    # the engine keeps working meanwhile
    space.allocate("busy", 30 * space.block_size)
    write_seq(space, "busy", salt=3)
    # prefetch: the same block ids hold the same bytes again
    handle = space.prefetch(["idle"])
    handle.wait()
    handle.result()
    assert space.residency("idle")["gpu"] == 40 * space.block_bytes * space.num_regions
    assert_seq(space, "idle")
    assert_seq(space, "busy", salt=3)
    space.check_resident(space.blocks("idle"))
    mgr.check()


def test_host_pages_go_on_down_to_nvme_and_back(make_manager):
    mgr = make_manager()
    space = _space(mgr, make_manager)
    space.allocate("a", 2 * BPP * space.block_size)
    write_seq(space, "a")
    space.offload("a", tier="host").result()
    # host -> NVMe
    space.offload("a", tier="nvme").result()
    assert space.residency("a")["nvme"] > 0 and space.residency("a")["host"] == 0
    assert mgr.stats()["tiers"]["paths"]["host->nvme"]["stripes"] >= 1
    space.ensure_resident(["a"])
    assert_seq(space, "a")
    mgr.check()


def test_stage_brings_nvme_pages_to_host_then_prefetch(make_manager):
    mgr = make_manager()
    space = _space(mgr, make_manager)
    space.allocate("a", 2 * BPP * space.block_size)
    write_seq(space, "a")
    space.offload("a", tier="nvme").result()
    # stage: NVMe -> host, ahead of the step
    space.stage(["a"]).result()
    assert space.residency("a")["host"] > 0 and space.residency("a")["nvme"] == 0
    space.ensure_resident(["a"])
    assert_seq(space, "a")
    assert mgr.stats()["tiers"]["paths"]["nvme->host"]["stripes"] == 2
    mgr.check()


def test_full_host_tier_spills_to_nvme(make_manager):
    mgr = make_manager(host_size=4 * (64 << 10 if make_manager.name == "cpu" else 2 << 20))
    space = _space(mgr, make_manager)
    # four pages of 4 regions each need 16 host slots; the host tier has 4: one page fits, three spill
    space.allocate("a", 4 * BPP * space.block_size)
    write_seq(space, "a")
    space.offload("a", tier="host").result()
    assert space.stats()["stripes_host"] == 1 and space.stats()["stripes_nvme"] == 3
    space.ensure_resident(["a"])
    assert_seq(space, "a")
    mgr.check()


def test_allocate_demotes_idle_pages_instead_of_failing(make_manager):
    mgr = make_manager(pages=4 * 4)  # four pages of the 4-region space
    space = _space(mgr, make_manager)
    space.allocate("old", 3 * BPP * space.block_size)
    write_seq(space, "old")
    space.offload("old")  # idle; the policy decides where and when
    # a new request needs the whole pool: the idle pages go down synchronously
    space.allocate("new", 4 * BPP * space.block_size)
    assert space.residency("old")["gpu"] == 0
    write_seq(space, "new", salt=1)
    space.free("new")
    space.ensure_resident(["old"])
    assert_seq(space, "old")
    mgr.check()


def test_without_demote_on_allocate_the_pool_error_stands(make_manager):
    mgr = make_manager(pages=4 * 4, demote_on_allocate=False)
    space = _space(mgr, make_manager)
    space.allocate("old", 3 * BPP * space.block_size)
    space.offload("old")
    with pytest.raises(kvtier.OutOfPagesError):
        space.allocate("new", 4 * BPP * space.block_size)
    assert space.residency("old")["gpu"] > 0
    mgr.check()


def test_background_demoter_keeps_the_watermark(make_manager):
    mgr = make_manager(pages=8 * 4, background_demotion=True, gpu_low_watermark=0.3, gpu_high_watermark=0.5)
    space = _space(mgr, make_manager)
    space.allocate("a", 4 * BPP * space.block_size)
    space.allocate("b", 3 * BPP * space.block_size)
    write_seq(space, "a")
    # only "a" goes idle: the demoter moves its pages down until half the pool is free
    space.offload("a")
    deadline = time.monotonic() + 10
    while mgr.pool.available() < 0.5 * mgr.pool.budget_pages:
        assert time.monotonic() < deadline, "the background demoter did not reach the high watermark"
        time.sleep(0.01)
    assert space.residency("b")["gpu"] == 3 * BPP * space.block_bytes * space.num_regions
    space.ensure_resident(["a"])
    assert_seq(space, "a")
    mgr.check()


def test_free_releases_pages_in_every_tier(make_manager):
    mgr = make_manager()
    space = _space(mgr, make_manager)
    space.allocate("a", 3 * BPP * space.block_size)
    space.offload("a", tier="host").result()
    space.offload("a", tier="nvme").result()
    space.free("a")
    stats = mgr.stats()["tiers"]
    assert stats["host"]["slots_used"] == 0 and stats["nvme"]["slots_used"] == 0
    mgr.check()


def test_failed_nvme_read_reports_the_sequence_lost_never_stale_data(make_manager):
    mgr = make_manager()
    space = _space(mgr, make_manager)
    space.allocate("a", 2 * BPP * space.block_size)
    space.allocate("b", 2 * BPP * space.block_size)
    write_seq(space, "a")
    space.offload("a", tier="nvme").result()
    # the slot file loses its contents underneath (a real short read, not a mock)
    os.truncate(mgr.tiering.tier("nvme").path, 0)
    with pytest.raises(kvtier.TransferError) as failure:
        space.ensure_resident(["a"])
    assert failure.value.lost == ["a"]
    # the page is not marked resident: the debug check refuses it; other sequences are untouched
    with pytest.raises(kvtier.NotResidentError):
        space.check_resident(space.blocks("a"))
    assert space.residency("a")["lost"] > 0
    with pytest.raises(kvtier.TransferError):
        space.prefetch(["a"])
    space.free("a")  # the engine recomputes it
    mgr.check()


def test_offload_bad_tier_is_refused(make_manager):
    mgr = make_manager()
    space = _space(mgr, make_manager)
    space.allocate("a", 10)
    with pytest.raises(kvtier.InvalidArgumentError, match="tier"):
        space.offload("a", tier="tape")
    with pytest.raises(kvtier.UnknownSequenceError):
        space.offload("zz", tier="host")
    space.offload("a", tier="host").result()
    with pytest.raises(kvtier.InvalidArgumentError, match="prefetch it"):
        space.allocate("a", 100)


def test_concurrent_demotion_prefetch_and_allocation(make_manager):
    mgr = make_manager(pages=12 * 4, background_demotion=True, gpu_low_watermark=0.4, gpu_high_watermark=0.6)
    space = _space(mgr, make_manager, blocks=1024)
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            for round_ in range(8):
                seq = f"c{k}"
                space.allocate(seq, (BPP + 4) * space.block_size)
                write_seq(space, seq, salt=round_)
                space.offload(seq, tier="host" if round_ % 2 else None)
                space.ensure_resident([seq])
                assert_seq(space, seq, salt=round_)
                space.free(seq)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "deadlock: a client did not finish"
    assert not errors, errors[0]
    mgr.tiering.drain()
    mgr.check()


@pytest.mark.parametrize("tier", ["host", "nvme"])
def test_a_short_sequence_moves_only_its_live_bytes(make_manager, tier):
    # a sequence of 5 blocks on a page of 16 (a quarter-full page, as a 1024-token sequence on 8 MiB pages): its
    # page goes down and comes back carrying those 5 blocks' bytes in each region, not the page; host checksums
    # and NVMe digests cover exactly what was moved
    mgr = make_manager(host_checksums=True)
    space = _space(mgr, make_manager)
    space.allocate("a", 5 * space.block_size)
    write_seq(space, "a")
    live = 5 * space.block_bytes * space.num_regions
    space.offload("a", tier=tier).result()
    paths = mgr.stats()["tiers"]["paths"]
    assert paths[f"gpu->{tier}"]["bytes"] == live
    space.ensure_resident(["a"])
    assert mgr.stats()["tiers"]["paths"][f"{tier}->gpu"]["bytes"] == live
    assert_seq(space, "a")
    # through every path: host, on down to NVMe (the length goes with it), staged back to host, up
    space.offload("a", tier="host").result()
    space.offload("a", tier="nvme").result()
    space.stage(["a"]).result()
    assert space.residency("a")["host"] > 0
    space.ensure_resident(["a"])
    assert_seq(space, "a")
    paths = mgr.stats()["tiers"]["paths"]
    assert paths["host->nvme"]["bytes"] == paths["nvme->host"]["bytes"] == live
    # the sequence grows past the old end of its page: the next move carries the longer prefix
    space.allocate("a", 9 * space.block_size)
    write_seq(space, "a")
    space.offload("a", tier=tier).result()
    space.ensure_resident(["a"])
    assert_seq(space, "a")
    mgr.check()


@pytest.mark.parametrize("tier", ["host", "nvme"])
def test_blocks_handed_out_again_on_a_shared_page_move_with_their_new_bytes(make_manager, tier):
    # a page holds a's last 4 blocks and b's 5 (9 of 16 live): it goes down and up carrying those 9
    mgr = make_manager()
    space = _space(mgr, make_manager)
    space.allocate("a", (BPP + 4) * space.block_size)
    write_seq(space, "a")
    space.allocate("b", 5 * space.block_size)
    write_seq(space, "b", salt=2)
    space.offload("a", tier=tier).result()
    space.offload("b", tier=tier).result()
    space.ensure_resident(["a", "b"])
    # b goes; c is handed b's blocks and more (past the length the page last moved with), with other bytes
    space.free("b")
    space.allocate("c", 7 * space.block_size)
    assert set(space.blocks("c")) > set(range(BPP + 4, BPP + 9))  # b's blocks, handed out again
    write_seq(space, "c", salt=5)
    space.offload("a", tier=tier).result()
    space.offload("c", tier=tier).result()
    space.ensure_resident(["a", "c"])
    assert_seq(space, "a")
    assert_seq(space, "c", salt=5)
    # a grows on that page past c (blocks 27-29): the longer prefix goes down and comes back
    space.allocate("a", (BPP + 7) * space.block_size)
    write_seq(space, "a")
    space.offload("a", tier=tier).result()
    space.ensure_resident(["a"])
    assert_seq(space, "a")
    assert_seq(space, "c", salt=5)
    mgr.check()


@pytest.mark.parametrize("gate_regions", [0, 1], ids=["gate-per-call", "gate-per-region"])
@pytest.mark.parametrize("failing_call", [3, 6], ids=["first-page", "second-page"])
@pytest.mark.parametrize("tier", ["host", "nvme"])
def test_a_map_that_fails_mid_page_during_prefetch_leaves_everything_as_it_was(make_manager, tier, failing_call,
                                                                             gate_regions, monkeypatch):
    # prefetch maps a page region after region and enqueues each region's copy up at once; a driver map failing
    # part-way (after earlier regions' copies were queued) unmaps what it mapped once those copies have landed,
    # gives the handles back and leaves the sequence below, intact: a later prefetch brings the same bytes (a
    # failure in the second page also takes the whole first page, copied up already, back off the GPU); the same
    # with the mapping gate let go between regions (copies down may start between them)
    monkeypatch.setattr(mapped_range, "GATE_REGIONS", gate_regions)
    mgr = make_manager()
    space = _space(mgr, make_manager)
    space.allocate("a", 2 * BPP * space.block_size)
    write_seq(space, "a")
    space.offload("a", tier=tier).result()
    in_use = mgr.pool.in_use_pages
    backend, real_map, calls = mgr.backend, mgr.backend.map, []

    def failing_map(address, page_size, handles):  # the driver refuses one map call of the prefetch
        calls.append(address)
        if len(calls) == failing_call:
            raise kvtier.errors.CudaError("cuMemMap", "CUDA_ERROR_OUT_OF_MEMORY", "injected")
        real_map(address, page_size, handles)

    backend.map = failing_map
    try:
        with pytest.raises(kvtier.errors.CudaError, match="injected"):
            space.prefetch(["a"]).result()
    finally:
        backend.map = real_map
    assert space.residency("a")["gpu"] == 0 and space.residency("a")[tier] > 0
    assert mgr.pool.in_use_pages == in_use
    mgr.check()
    # the fault cleared: the same bytes come back
    space.prefetch(["a"]).result()
    assert_seq(space, "a")
    mgr.check()
    mgr.close()


def test_a_page_promoted_in_groups_of_regions_counts_once_in_the_path_stats(make_manager):
    mgr = make_manager()
    space = _space(mgr, make_manager)
    space.allocate("a", 2 * BPP * space.block_size)  # two pages, each of num_regions regions
    write_seq(space, "a")
    space.offload("a", tier="host").result()
    space.prefetch(["a"]).result()
    assert mgr.stats()["tiers"]["paths"]["host->gpu"]["stripes"] == 2
    assert_seq(space, "a")
    mgr.check()
    mgr.close()


def test_pages_that_go_down_in_many_batches_come_back_byte_for_byte(make_manager):
    # 64 regions (a 32-layer model): a page goes down in 8 batches, its regions unmapped as their copies land
    mgr = make_manager(pages=1024, host_size=1024 * PAGE[make_manager.name])
    shape = dict(make_manager.shape, num_layers=32)
    space = mgr.create_space("m", max_tokens=8 * BPP * shape["block_size"], **shape)
    space.allocate("a", (2 * BPP + 3) * space.block_size)  # two whole pages and 3 blocks of a third
    space.allocate("b", BPP * space.block_size)
    write_seq(space, "a")
    write_seq(space, "b", salt=1)
    # a goes down to host memory: its pages are no longer resident; b, still active, reads back intact
    space.offload("a", tier="host").result()
    assert space.stripe_residency("a")["host"] >= 2
    with pytest.raises(kvtier.NotResidentError):
        space.check_resident(space.blocks("a"))
    assert_seq(space, "b", salt=1)
    mgr.check()
    # back up, byte for byte
    space.ensure_resident(["a"])
    assert_seq(space, "a")
    # rewritten (no kept copy), both go down together and come back together; then a to NVMe (via a copy down
    # that stays whole until its writes land) and back
    write_seq(space, "a", salt=2)
    space.mark_written("a", 0, space.num_tokens("a"))
    for handle in (space.offload("a", tier="host"), space.offload("b", tier="host")):
        handle.result()
    space.ensure_resident(["a", "b"])
    assert_seq(space, "a", salt=2)
    assert_seq(space, "b", salt=1)
    space.offload("a", tier="nvme").result()
    space.ensure_resident(["a"])
    assert_seq(space, "a", salt=2)
    mgr.check()
    # the space dropped while a's pages are on their way down (regions leaving as they land): nothing leaks, and
    # another space on the pool moves byte for byte
    other = mgr.create_space("o", max_tokens=BPP * shape["block_size"], **shape)
    other.allocate("x", BPP * other.block_size)
    write_seq(other, "x", salt=3)
    space.offload("a", tier="host")
    mgr.drop_space("m")
    mgr.check()
    assert mgr.tiering.tier("host").books.used == 0
    other.offload("x", tier="host").result()
    other.ensure_resident(["x"])
    assert_seq(other, "x", salt=3)
    mgr.check()
