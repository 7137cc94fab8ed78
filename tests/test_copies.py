"""Kept copies: a page brought back up keeps its host/NVMe copy, so offloading it again copies nothing -- until a
token is allocated in it (CPU; CUDA under -m gpu). Every scenario reads the bytes back through the tier."""

from __future__ import annotations

import pytest

from tests.conftest import assert_seq, write_seq

BPP = 16  # blocks per page in the test shape


def _space(mgr, make_manager):
    return mgr.create_space("m", max_tokens=256 * make_manager.shape["block_size"], **make_manager.shape)


def _bytes_down(mgr, tier="host"):
    return mgr.stats()["tiers"]["paths"].get(f"gpu->{tier}", {}).get("bytes", 0)


@pytest.mark.parametrize("tier", ["host", "nvme"])
def test_offloading_an_unwritten_page_again_copies_nothing(make_manager, tier):
    mgr = make_manager()
    space = _space(mgr, make_manager)
    space.allocate("a", int(2.5 * BPP) * space.block_size)
    write_seq(space, "a")
    # first trip down and back: three pages copied each way, their slots kept as copies
    space.offload("a", tier=tier).result()
    space.ensure_resident(["a"])
    copied = _bytes_down(mgr, tier)
    assert mgr.stats()["tiers"]["copies"]["kept_pages"] == 3
    # second trip down: nothing copied, the copies become the pages' homes (debug_checks poisons the GPU pages)
    space.offload("a", tier=tier).result()
    assert _bytes_down(mgr, tier) == copied
    assert mgr.stats()["tiers"]["copies"]["reused_pages"] == 3 and space.residency("a")[tier] > 0
    mgr.check()
    # and back up: the same bytes
    space.ensure_resident(["a"])
    assert_seq(space, "a")
    mgr.check()


def test_a_page_written_since_is_copied_again(make_manager):
    mgr = make_manager()
    space = _space(mgr, make_manager)
    space.allocate("a", int(2.5 * BPP) * space.block_size)
    write_seq(space, "a")
    space.offload("a", tier="host").result()
    space.ensure_resident(["a"])
    copied = _bytes_down(mgr)
    # one more block: it falls in the third page, whose copy no longer holds its bytes
    space.allocate("a", (int(2.5 * BPP) + 1) * space.block_size)
    write_seq(space, "a")
    space.offload("a", tier="host").result()
    assert _bytes_down(mgr) == copied + space.num_regions * space.page_size  # that page only
    space.ensure_resident(["a"])
    assert_seq(space, "a")  # the new block came back too
    mgr.check()


def test_one_token_more_in_a_page_drops_its_copy(make_manager):
    mgr = make_manager()
    space = _space(mgr, make_manager)
    block = space.block_size
    space.allocate("a", BPP * block - block + 1)  # the last block of the page holds one token
    write_seq(space, "a")
    space.offload("a", tier="host").result()
    space.ensure_resident(["a"])
    assert mgr.stats()["tiers"]["copies"]["kept_pages"] == 1
    # the next token lands in the same block: no block is added, but the page's bytes change
    space.allocate("a", BPP * block - block + 2)
    assert mgr.stats()["tiers"]["copies"]["kept_pages"] == 0
    mgr.check()


def test_copies_give_way_when_the_host_tier_is_full(make_manager):
    mgr = make_manager()  # host tier: 16 slots, four pages of this 4-region space
    space = _space(mgr, make_manager)
    space.allocate("a", 2 * BPP * space.block_size)
    space.allocate("b", 3 * BPP * space.block_size)
    write_seq(space, "a")
    write_seq(space, "b", salt=1)
    # a goes down and back: its two copies take half the host tier
    space.offload("a", tier="host").result()
    space.ensure_resident(["a"])
    # b needs three pages of host, two are free: one of a's copies is dropped rather than spilling b to NVMe
    space.offload("b", tier="host").result()
    assert space.page_residency("b")["host"] == 3
    assert mgr.stats()["tiers"]["copies"]["kept_pages"] == 1
    # a goes down for real now: one page fits in host, one spills
    space.offload("a", tier="host").result()
    assert space.page_residency("a") == {"gpu": 0, "host": 1, "nvme": 1, "lost": 0}
    space.ensure_resident(["a", "b"])
    assert_seq(space, "a")
    assert_seq(space, "b", salt=1)
    mgr.check()


def test_without_keep_copies_every_trip_copies(make_manager):
    mgr = make_manager(keep_copies=False)
    space = _space(mgr, make_manager)
    space.allocate("a", 2 * BPP * space.block_size)
    write_seq(space, "a")
    space.offload("a", tier="host").result()
    space.ensure_resident(["a"])
    copied = _bytes_down(mgr)
    space.offload("a", tier="host").result()
    assert _bytes_down(mgr) == 2 * copied
    space.ensure_resident(["a"])
    assert_seq(space, "a")
    mgr.check()


def test_a_page_written_while_coming_up_keeps_no_copy(make_manager):
    mgr = make_manager()
    space = _space(mgr, make_manager)
    space.allocate("a", (BPP - 1) * space.block_size)
    write_seq(space, "a")
    space.offload("a", tier="host").result()
    # holding the manager's lock keeps the worker from committing: the page is still on its way up when the
    # engine allocates and writes one more block in it (allowed once its wait(stream) is ordered first)
    with mgr.lock:
        handle = space.prefetch(["a"])
        handle.wait()
        space.allocate("a", BPP * space.block_size)
        write_seq(space, "a")
    handle.result()
    assert mgr.stats()["tiers"]["copies"]["kept_pages"] == 0
    # so going down again copies it, new block included
    space.offload("a", tier="host").result()
    space.ensure_resident(["a"])
    assert_seq(space, "a")
    mgr.check()
