"""Faults at the storage edge (a file layer failing on cue, a slot file changed at rest, memory changed at rest):
each is a clear error or a reported loss of exactly the pages it hit, never wrong bytes, and the books balance."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time

import pytest
import torch

import kvtier
from tests.conftest import PAGE, assert_seq, write_seq
from tests.faults import FailingCopies, FaultyFiles

BPP = 16  # blocks per page with the test shapes


def _space(mgr, make_manager, blocks=512):
    return mgr.create_space("m", max_tokens=blocks * make_manager.shape["block_size"], **make_manager.shape)


def _slots(space, seq):
    """The lower-tier slots of ``seq``'s pages, in page order."""
    return [s for p in space.block_books.pages_of_seqs([seq]) for s in space.pages.slots.get(p, [])]


def _two_on_nvme(mgr, make_manager):
    space = _space(mgr, make_manager)
    for seq in ("a", "b"):
        space.allocate(seq, 2 * BPP * space.block_size)
        write_seq(space, seq, salt=len(seq))
        space.offload(seq, tier="nvme").result()
    return space


def test_a_slot_file_overwritten_at_rest_is_a_lost_page_never_a_hit(make_manager):
    mgr = make_manager()
    space = _two_on_nvme(mgr, make_manager)
    # someone overwrites one of a's slots in the file (the attack): same length, other bytes
    slot = _slots(space, "a")[1]
    with open(mgr.tiering.tier("nvme").path, "r+b") as f:
        f.seek(slot * mgr.tiering.tier("nvme").unit + 100)  # a slot is named by its first unit
        f.write(os.urandom(4096))
    # bringing a back reports it lost; b comes back whole; nothing stale is served
    with pytest.raises(kvtier.TransferError) as failure:
        space.ensure_resident(["a", "b"])
    assert failure.value.lost == ["a"]
    assert_seq(space, "b", salt=1)
    assert space.residency("a")["lost"] > 0
    assert mgr.stats()["tiers"]["nvme"]["checksums"]["mismatches"] == 1
    space.free("a")
    mgr.check()


def test_corrupt_and_short_reads_lose_only_the_pages_they_hit(make_manager):
    if make_manager.name != "cpu":
        pytest.skip("the file layer is the POSIX path's")
    files = FaultyFiles(PAGE["cpu"])
    mgr = make_manager(files=files)
    space = _two_on_nvme(mgr, make_manager)
    # a read of one of b's slots hands back a flipped byte
    files.corrupt("read", slot=_slots(space, "b")[0], times=1)
    with pytest.raises(kvtier.TransferError) as failure:
        space.ensure_resident(["a", "b"])
    assert failure.value.lost == ["b"]
    assert_seq(space, "a", salt=1)
    space.free("b")
    mgr.check()
    # a short read while staging: the page stays on NVMe (the bytes there are good), and comes up later
    space.offload("a", tier="nvme").result()
    files.shorten("read", times=1)
    with pytest.raises(kvtier.TransferError):
        space.stage(["a"]).result()
    assert space.residency("a")["nvme"] > 0 and space.residency("a")["lost"] == 0
    space.ensure_resident(["a"])
    assert_seq(space, "a", salt=1)
    mgr.check()


def test_a_corrupt_read_into_an_engine_buffer_is_a_loss_not_data(make_manager):
    if make_manager.name != "cpu":
        pytest.skip("the file layer is the POSIX path's")
    files = FaultyFiles(PAGE["cpu"])
    mgr = make_manager(files=files)
    space = _two_on_nvme(mgr, make_manager)
    dst = [tuple(torch.zeros_like(t) for t in space.kv(layer)) for layer in range(space.num_layers)]
    files.corrupt("read", times=1)
    handle = space.read("a", dst)
    with pytest.raises(kvtier.TransferError) as failure:
        handle.wait()
    assert failure.value.lost == ["a"]
    assert space.residency("a")["lost"] > 0 and space.residency("b")["nvme"] > 0
    mgr.check()


def test_a_page_whose_copies_fail_after_its_first_regions_left_is_lost_not_wrong(make_manager):
    if make_manager.name != "cpu":
        pytest.skip("the failing device layer is a CPU backend")
    backend = FailingCopies()
    mgr = make_manager(pages=512, backend=backend, host_size=512 * PAGE["cpu"])
    shape = dict(make_manager.shape, num_layers=32)  # 64 regions: a page goes down in 8 batches of 8 copies
    space = mgr.create_space("m", max_tokens=4 * BPP * shape["block_size"], **shape)
    space.allocate("a", 2 * BPP * space.block_size)
    space.allocate("b", BPP * space.block_size)
    write_seq(space, "a")
    write_seq(space, "b", salt=1)
    # the device fails the 105th copy down: "a"'s first page has landed in host memory; its second page's first
    # regions have landed and left the GPU (unmapped as they landed), its last ones were never copied
    backend.fail_after(104)
    with pytest.raises(kvtier.TransferError) as failure:
        space.offload("a", tier="host").result()
    backend.left = None
    # neither side holds that page whole: it is reported lost, never handed back as data; the books balance
    assert failure.value.lost == ["a"]
    assert space.stripe_residency("a") == {"gpu": 0, "host": 1, "nvme": 0, "lost": 1}
    mgr.check()
    with pytest.raises(kvtier.TransferError, match="lost"):
        space.ensure_resident(["a"])
    # the rest is intact: "b" goes down and back byte for byte; freeing both gives back every handle and slot
    space.offload("b", tier="host").result()
    space.ensure_resident(["b"])
    assert_seq(space, "b", salt=1)
    space.free("a")
    space.free("b")
    mgr.check()
    assert mgr.tiering.tier("host").books.used == 0


@pytest.mark.parametrize("fault", ["eio", "enospc", "short", "corrupt"])
def test_a_failed_write_leaves_the_page_where_it_was(make_manager, fault):
    if make_manager.name != "cpu":
        pytest.skip("the file layer is the POSIX path's")
    files = FaultyFiles(PAGE["cpu"])
    mgr = make_manager(files=files)
    space = _space(mgr, make_manager)
    space.allocate("a", 2 * BPP * space.block_size)
    write_seq(space, "a")
    # the disk fails one write: that page stays on the GPU (the offload says so); the other goes down
    if fault == "short":
        files.shorten("write", times=1)
    elif fault == "corrupt":
        files.corrupt("write", times=1)  # lands, but bad: found when read back, and reported lost
    else:
        files.fail("write", errno.EIO if fault == "eio" else errno.ENOSPC, times=1)
    handle = space.offload("a", tier="nvme")
    if fault == "corrupt":
        handle.result()
        with pytest.raises(kvtier.TransferError) as failure:
            space.ensure_resident(["a"])
        assert failure.value.lost == ["a"]
        space.free("a")
    else:
        with pytest.raises(kvtier.TransferError):
            handle.result()
        assert space.stripe_residency("a") == {"gpu": 1, "host": 0, "nvme": 1, "lost": 0}
        mgr.check()
        space.ensure_resident(["a"])
        assert_seq(space, "a")
        assert mgr.stats()["tiers"]["nvme"]["health"]["failed_writes"] == 1
        space.offload("a", tier="nvme").result()  # the disk is well again
        assert not mgr.stats()["tiers"]["nvme"]["health"]["degraded"]
        space.ensure_resident(["a"])
        assert_seq(space, "a")
    mgr.check()


def test_a_full_disk_under_the_cascade_is_backed_off_said_once_and_shown(make_manager, caplog):
    if make_manager.name != "cpu":
        pytest.skip("the file layer is the POSIX path's")
    files = FaultyFiles(PAGE["cpu"])
    mgr = make_manager(files=files, host_size=32 * PAGE["cpu"], background_demotion=True, host_high_watermark=0.5,
                       host_low_watermark=0.25)
    space = _space(mgr, make_manager)
    # the host tier fills past its high watermark while every NVMe write fails with ENOSPC
    files.fail("write", errno.ENOSPC)
    caplog.set_level(logging.WARNING, logger="kvtier")
    space.allocate("a", 5 * BPP * space.block_size)  # 20 of the host's 32 slots (4 regions a page)
    write_seq(space, "a")
    space.offload("a", tier="host").result()
    time.sleep(1.5)
    # the demoter tried a few rounds, not one every tick (75 at 20 ms), and said so once
    rounds = 1 + sum(1 for (_, t0), (_, t1) in zip(files.times, files.times[1:]) if t1 - t0 > 0.01)
    assert 1 <= rounds <= 12, rounds
    said = [r for r in caplog.records if "writes are failing" in r.getMessage()]
    assert len(said) == 1 and "No space left" in said[0].getMessage()
    health = mgr.stats()["tiers"]["nvme"]["health"]
    assert health["degraded"] and health["failed_writes"] >= 2
    assert space.residency("a")["host"] == 5 * BPP * space.block_bytes * space.num_regions
    # the disk has room again: a later try succeeds, the cascade goes on, the log says it once more
    files.clear()
    deadline = time.monotonic() + 60
    while mgr.stats()["tiers"]["nvme"]["health"]["degraded"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not mgr.stats()["tiers"]["nvme"]["health"]["degraded"]
    assert any("writes succeed again" in r.getMessage() for r in caplog.records)
    mgr.drain()
    assert space.residency("a")["nvme"] > 0
    space.ensure_resident(["a"])
    assert_seq(space, "a")
    mgr.check()


def test_host_checksums_catch_host_memory_changed_at_rest(make_manager):
    mgr = make_manager(host_checksums=True)
    space = _space(mgr, make_manager)
    for seq in ("a", "b", "c"):
        space.allocate(seq, BPP * space.block_size)
        write_seq(space, seq, salt=len(seq) + 7)
        space.offload(seq, tier="host").result()
    # a stray write into a's host slot; b's is left alone
    mgr.tiering.tier("host").view(_slots(space, "a")[0])[5] ^= 1
    with pytest.raises(kvtier.TransferError) as failure:
        space.ensure_resident(["a", "b"])
    assert failure.value.lost == ["a"]
    assert_seq(space, "b", salt=8)
    # nor is a bad host page laundered into a good digest on its way to NVMe
    mgr.tiering.tier("host").view(_slots(space, "c")[1])[7] ^= 1
    with pytest.raises(kvtier.TransferError) as failure:
        space.offload("c", tier="nvme").result()
    assert space.residency("c")["lost"] > 0
    assert mgr.stats()["tiers"]["host"]["checksums"]["mismatches"] == 2
    for seq in ("a", "c"):
        space.free(seq)
    mgr.check()


def test_a_host_fault_back_is_checked_by_its_waiter_while_the_worker_is_busy(make_manager):
    if make_manager.name != "cpu":
        pytest.skip("the file layer is the POSIX path's")
    files = FaultyFiles(PAGE["cpu"])
    mgr = make_manager(files=files)  # host checksums: on by default
    space = _space(mgr, make_manager)
    for seq in ("a", "b"):
        space.allocate(seq, BPP * space.block_size)
        write_seq(space, seq, salt=3)
    space.offload("a", tier="host").result()
    # the transfer worker is stuck in b's NVMe write (a slow disk)
    gate = threading.Event()
    files.hold("write", gate)
    going = space.offload("b", tier="nvme")
    try:
        # a's fault-back from host memory: its bytes are checked where they landed by the caller waiting for
        # them, not behind b's write in the worker's line
        waited = threading.Thread(target=lambda: space.prefetch(["a"]).wait())
        waited.start()
        waited.join(20)
        assert not waited.is_alive(), "the fault-back waited for the worker"
        assert mgr.stats()["tiers"]["host"]["checksums"]["verified"] == space.num_regions
        assert_seq(space, "a", salt=3)
    finally:
        gate.set()
    going.result()
    space.ensure_resident(["b"])
    assert_seq(space, "b", salt=3)
    mgr.check()


def test_write_health_backs_off_per_try_and_says_a_streak_once(caplog):
    from kvtier.tiering.engine.health import WriteHealth
    now = [100.0]
    health = WriteHealth("nvme", clock=lambda: now[0])  # a fake clock: the back-off is arithmetic
    caplog.set_level(logging.WARNING, logger="kvtier")
    full = OSError(errno.ENOSPC, "No space left on device")
    # one try of 8 pages fails: one back-off step (20 ms), not eight
    first = object()
    for _ in range(8):
        health.failed(full, attempt=first)
    assert health.degraded and health.backing_off() and health.retry_at == pytest.approx(100.02)
    assert not health.backing_off(on_demand=True)  # a request waiting for room still tries it...
    # each later try doubles it, up to 30 s
    waits = []
    for _ in range(14):
        now[0] = health.retry_at
        assert not health.backing_off()
        health.failed(full, attempt=object())
        waits.append(round(health.retry_at - now[0], 3))
    assert health.backing_off(on_demand=True)  # ...until three tries have failed
    assert not health.retry_soon()  # and a 30 s back-off is not worth a request's wait
    assert waits[:4] == [0.04, 0.08, 0.16, 0.32] and waits[-1] == 30.0
    assert health.describe()["failed_writes"] == 22
    health.succeeded()
    assert not health.degraded and not health.backing_off()
    # a tier that recovers and fails again within the minute flaps: said once, not each time
    caplog.clear()
    flappy = WriteHealth("host", clock=lambda: now[0])
    for _ in range(3):
        flappy.failed(full)
        now[0] += 5
        flappy.succeeded()
    said = [r.getMessage() for r in caplog.records]
    assert len([m for m in said if "writes are failing" in m]) == 1
    assert len([m for m in said if "succeed again" in m]) == 1


def test_an_allocate_that_needs_a_dead_disk_fails_cleanly_and_keeps_every_byte(make_manager):
    if make_manager.name != "cpu":
        pytest.skip("the file layer is the POSIX path's")
    files = FaultyFiles(PAGE["cpu"])
    mgr = make_manager(pages=16, files=files, host_size=0)  # no host tier: room must come from NVMe
    space = _space(mgr, make_manager)
    # the pool is full of an idle sequence; the disk refuses every write
    space.allocate("a", 4 * BPP * space.block_size)
    write_seq(space, "a")
    space.offload("a")  # idle: the policy may move it when room is needed
    files.fail("write", errno.ENOSPC)
    # an allocate that needs a's pages to go down tries, backs off, and says OutOfPagesError
    with pytest.raises(kvtier.OutOfPagesError):
        space.allocate("b", 2 * BPP * space.block_size)
    assert "b" not in space.sequences()
    assert mgr.stats()["tiers"]["nvme"]["health"]["degraded"]
    # a stayed where it was, every byte of it
    assert space.residency("a")["gpu"] == 4 * BPP * space.block_bytes * space.num_regions
    space.ensure_resident(["a"])
    assert_seq(space, "a")
    mgr.check()
    # the disk has room again: the same allocate succeeds
    files.clear()
    space.offload("a")
    deadline = time.monotonic() + 60
    while True:
        try:
            space.allocate("b", 2 * BPP * space.block_size)
            break
        except kvtier.OutOfPagesError:
            assert time.monotonic() < deadline, "the tier was never tried again"
            time.sleep(0.05)
    assert space.residency("a")["nvme"] > 0
    mgr.check()


def test_the_demoter_outlives_an_exception_and_keeps_demoting(make_manager, caplog):
    # the policy (user code) raises in its first three answers to the background demoter
    mgr = make_manager(pages=16, background_demotion=True, gpu_low_watermark=0.5, gpu_high_watermark=0.9,
                       policy="tests.faults:FlakyPolicy", policy_params={"fail": 3})
    space = mgr.create_space("s", **make_manager.shape)
    per_page = space.page_size // space.block_bytes * space.block_size  # tokens on one page of the space
    # two sequences fill the pool; one goes idle: the demoter must send it down under the watermark
    for seq in ("a", "b"):
        space.allocate(seq, 2 * per_page)
        write_seq(space, seq)
    with caplog.at_level(logging.ERROR, logger="kvtier.tiering.engine.background"):
        space.offload("a")
        deadline = time.monotonic() + 30
        while space.residency("a")["gpu"] and time.monotonic() < deadline:
            time.sleep(0.02)
    # it failed three times (logged, not fatal), then did its job; the bytes come back
    assert mgr.tiering.demoter.errors == 3 and space.residency("a")["gpu"] == 0
    assert sum("a check failed" in r.message for r in caplog.records) == 3
    space.prefetch(["a"]).result()
    assert_seq(space, "a")
    assert_seq(space, "b")
    mgr.check()


def test_a_cascade_round_cut_short_still_drains_the_tier_to_its_low_mark(make_manager):
    if make_manager.name != "cpu":
        pytest.skip("the file layer is the POSIX path's")
    files = FaultyFiles(PAGE["cpu"])
    mgr = make_manager(files=files, host_size=32 * PAGE["cpu"], background_demotion=True, host_high_watermark=0.5,
                       host_low_watermark=0.25)
    space = _space(mgr, make_manager)
    # 5 pages (20 of the host's 32 slots) land on the host: past its high mark (16); the demoter's first round
    # sends 3 pages towards its low mark (8), and one NVMe write of that round fails: the round ends with the
    # host at 12 slots, under its high mark but above its low one
    files.fail("write", errno.EIO, times=1)
    space.allocate("a", 5 * BPP * space.block_size)
    write_seq(space, "a")
    space.offload("a", tier="host").result()
    # the tier keeps draining once the disk answers again, to its low mark, not to just under its high one
    deadline = time.monotonic() + 30
    whole = mgr.stats()["tiers"]["host"]["pieces"]  # the books count units: a whole page's slot is this many
    while mgr.stats()["tiers"]["host"]["slots_used"] > 8 * whole:
        assert time.monotonic() < deadline, mgr.stats()["tiers"]["host"]["slots_used"]
        time.sleep(0.02)
    mgr.drain()
    assert files.fired["write errno"] == 1
    assert space.residency("a")["nvme"] == 3 * BPP * space.block_bytes * space.num_regions
    space.ensure_resident(["a"])
    assert_seq(space, "a")
    mgr.check()
