"""Kept copies: a page brought back up keeps its host/NVMe copy, so offloading it again copies nothing -- until a
token is allocated in it (CPU; CUDA under -m gpu). Every scenario reads the bytes back through the tier."""

from __future__ import annotations

import pytest

import kvtier

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
    # first trip down and back: three pages copied each way; the two full ones keep their slots as copies (the
    # third holds the last block, which the engine may still fill without telling: it keeps none)
    space.offload("a", tier=tier).result()
    space.ensure_resident(["a"])
    copied = _bytes_down(mgr, tier)
    assert mgr.stats()["tiers"]["copies"]["kept_stripes"] == 2
    # second trip down: only the third page is copied (its live half: 8 blocks), the copies become the others'
    # homes (debug_checks poisons the GPU pages)
    space.offload("a", tier=tier).result()
    assert _bytes_down(mgr, tier) == copied + space.num_regions * (int(2.5 * BPP) - 2 * BPP) * space.block_bytes
    assert mgr.stats()["tiers"]["copies"]["reused_stripes"] == 2 and space.residency("a")[tier] > 0
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
    assert _bytes_down(mgr) == copied + space.num_regions * 9 * space.block_bytes  # that page only: its 9 blocks
    space.ensure_resident(["a"])
    assert_seq(space, "a")  # the new block came back too
    mgr.check()


def test_a_page_still_being_filled_keeps_no_copy(make_manager):
    mgr = make_manager()
    space = _space(mgr, make_manager)
    block = space.block_size
    space.allocate("a", BPP * block - block + 1)  # the last block of the page holds one token
    write_seq(space, "a")
    space.offload("a", tier="host").result()
    space.ensure_resident(["a"])
    assert mgr.stats()["tiers"]["copies"]["kept_stripes"] == 0
    # an engine fills that block token by token, telling no one (as paged engines do), then the sequence goes
    # down and up again: the new tokens come back (a kept copy would have brought back the old bytes)
    k, _ = space.kv(0)
    last = space.blocks("a")[-1]
    k[last, 1:] = 7.0
    space.offload("a", tier="host").result()
    space.ensure_resident(["a"])
    assert bool((space.kv(0)[0][last, 1:] == 7.0).all())
    mgr.check()


def test_rewritten_tokens_said_so_are_copied_again(make_manager):
    mgr = make_manager()
    space = _space(mgr, make_manager)
    space.allocate("a", int(2.5 * BPP) * space.block_size)
    write_seq(space, "a")
    space.offload("a", tier="host").result()
    space.ensure_resident(["a"])
    assert mgr.stats()["tiers"]["copies"]["kept_stripes"] == 2
    # the engine rewrites the first block (e.g. reordering beams) and says so: that page loses its copy
    k, _ = space.kv(0)
    k[space.blocks("a")[0]] = 3.0
    space.mark_written("a", 0, space.block_size)
    assert mgr.stats()["tiers"]["copies"]["kept_stripes"] == 1
    space.offload("a", tier="host").result()
    space.ensure_resident(["a"])
    assert bool((space.kv(0)[0][space.blocks("a")[0]] == 3.0).all())
    with pytest.raises(kvtier.InvalidArgumentError):
        space.mark_written("a", 5, 2)
    mgr.check()


def test_copies_give_way_when_the_host_tier_is_full(make_manager):
    mgr = make_manager()  # host tier: 16 slots, four pages of this 4-region space
    space = _space(mgr, make_manager)
    space.allocate("a", (2 * BPP + 1) * space.block_size)  # two full pages, and one with its last block
    space.allocate("b", 3 * BPP * space.block_size)
    write_seq(space, "a")
    write_seq(space, "b", salt=1)
    # a goes down and back: the copies of its two full pages take half the host tier
    space.offload("a", tier="host").result()
    space.ensure_resident(["a"])
    assert mgr.stats()["tiers"]["copies"]["kept_stripes"] == 2
    # b needs three pages of host, two are free: one of a's copies is dropped rather than spilling b to NVMe
    space.offload("b", tier="host").result()
    assert space.stripe_residency("b")["host"] == 3
    assert mgr.stats()["tiers"]["copies"]["kept_stripes"] == 1
    # a goes down for real now: the page with a copy left stays in host, the two others spill
    space.offload("a", tier="host").result()
    assert space.stripe_residency("a") == {"gpu": 0, "host": 1, "nvme": 2, "lost": 0}
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
    assert mgr.stats()["tiers"]["copies"]["kept_stripes"] == 0
    # so going down again copies it, new block included
    space.offload("a", tier="host").result()
    space.ensure_resident(["a"])
    assert_seq(space, "a")
    mgr.check()
