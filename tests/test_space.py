"""Scripted scenarios of the KV space on a real backend (CPU virtual memory; CUDA under -m gpu)."""

from __future__ import annotations

import os

import pytest
import torch

import kvtier
from tests.conftest import PAGE as PAGE_BYTES
from tests.conftest import assert_seq, pattern, write_seq

BPP = 16  # blocks per page with the fixtures' shapes


def test_data_written_through_tensors_survives_other_traffic(make_manager):
    mgr = make_manager()
    space = mgr.create_space("m", max_tokens=256 * make_manager.shape["block_size"], **make_manager.shape)
    # two sequences of 40 and 70 blocks' worth of tokens, written through every layer's K and V
    space.allocate("a", 40 * space.block_size)
    space.allocate("b", 70 * space.block_size)
    write_seq(space, "a")
    write_seq(space, "b")
    # other sequences come and go, and "a" grows across a page boundary
    space.allocate("c", 33 * space.block_size)
    write_seq(space, "c", salt=1)
    space.free("c")
    space.allocate("a", 60 * space.block_size)
    # every byte written is read back
    assert_seq(space, "b")
    for layer in range(space.num_layers):
        k, _ = space.kv(layer)
        assert k.shape == (space.num_blocks, space.block_size, space.num_kv_heads, space.head_dim)
    mgr.check()


def test_grown_sequence_keeps_its_earlier_blocks_and_data(make_manager):
    mgr = make_manager()
    space = mgr.create_space("m", max_tokens=4096, **make_manager.shape)
    first = space.allocate("a", 5 * space.block_size)
    write_seq(space, "a")
    grown = space.allocate("a", 50 * space.block_size)
    # the first blocks are unchanged and hold the same bytes
    assert grown[:5] == first and len(grown) == 50
    for layer in range(space.num_layers):
        for kv, t in enumerate(space.kv(layer)):
            for i in range(5):
                assert torch.equal(t[grown[i]].cpu(), pattern(space, "a", 0, i, layer, kv))


def test_decode_steps_take_the_next_blocks_of_the_page_being_written(make_manager):
    mgr = make_manager()
    space = mgr.create_space("m", max_tokens=6 * BPP * make_manager.shape["block_size"], **make_manager.shape)
    bs = space.block_size
    # one sequence grows a token at a time, as an engine's decode steps do: consecutive blocks, page after page
    for t in range(1, 2 * BPP * bs + 1):
        space.allocate("a", t)
    assert space.blocks("a") == list(range(space.blocks("a")[0], space.blocks("a")[0] + 2 * BPP))
    # two more grow interleaved: short ones share a page, then each gets pages of its own; nothing is lost
    write_seq(space, "a")
    for t in range(1, BPP * bs + 2 * bs):
        space.allocate("b", t)
        space.allocate("c", t)
    assert not set(space.blocks("a")) & (set(space.blocks("b")) | set(space.blocks("c")))
    assert not set(space.blocks("b")) & set(space.blocks("c"))
    assert_seq(space, "a")
    mgr.check()
    # "a" goes down while its last page is not full, and comes back: growth resumes on the page it returns to
    for seq in ("a", "b", "c"):
        space.free(seq)
    space.allocate("a", BPP * bs + 2 * bs)
    write_seq(space, "a")
    space.offload("a", tier="host").result()
    with pytest.raises(kvtier.InvalidArgumentError, match="offloaded"):
        space.allocate("a", BPP * bs + 3 * bs)  # never a block on a page that is not on the GPU
    space.ensure_resident(["a"])
    grown = space.allocate("a", BPP * bs + 4 * bs)
    assert grown[-2:] == [grown[-3] + 1, grown[-3] + 2]
    for layer in range(space.num_layers):  # the blocks written before the round trip hold their bytes
        for kv, tensor in enumerate(space.kv(layer)):
            for i, b in enumerate(grown[:BPP + 2]):
                assert torch.equal(tensor[b].cpu(), pattern(space, "a", 0, i, layer, kv))
    mgr.check()


def test_a_new_requests_blocks_are_the_ones_the_full_plan_picks(make_manager):
    # a new request shorter than a page takes the first free blocks on mapped pages, found without the full plan:
    # differentially, over requests arriving, growing, going idle below and ending in a seeded order, the blocks
    # found that way are the plan's every time they are found
    import numpy as np

    from kvtier.placement import first_on_mapped, plan_blocks
    mgr = make_manager()
    space = mgr.create_space("m", max_tokens=8 * BPP * make_manager.shape["block_size"], **make_manager.shape)
    bs, rng, live, found = space.block_size, np.random.default_rng(7), [], 0
    for step in range(300):
        need = int(rng.integers(1, BPP + 2))
        books, masks = space.block_books, space._masks()
        fast = first_on_mapped(books, need, masks.allocatable & ~masks.idle)
        if fast is not None:
            blocks, new_pages = plan_blocks(books, [], need, masks, lambda n: True)
            assert fast.tolist() == blocks.tolist() and new_pages == []
            found += 1
        action = rng.integers(0, 4)
        if action < 2 or not live:  # a request arrives
            try:
                space.allocate(("r", step), need * bs)
                live.append(("r", step))
            except (kvtier.OutOfPagesError, kvtier.SpaceFullError):
                pass
        elif action == 2:  # one grows by a block, or goes idle below
            seq = live[int(rng.integers(0, len(live)))]
            if rng.integers(0, 2) and seq not in space._offloaded:
                try:
                    space.allocate(seq, (len(space.blocks(seq)) + 1) * bs)
                except (kvtier.OutOfPagesError, kvtier.SpaceFullError):
                    pass
            elif seq not in space._offloaded:
                space.offload(seq, tier="host").result()
        else:  # one ends
            space.free(live.pop(int(rng.integers(0, len(live)))))
    assert found > 100  # the case the fast path takes is the common one
    mgr.check()


def test_pages_are_unmapped_on_free_and_remapped_on_reuse(make_manager):
    mgr = make_manager(space_reserve_pages=0)
    space = mgr.create_space("m", max_tokens=4096, **make_manager.shape)
    pointers = [t.data_ptr() for layer in range(space.num_layers) for t in space.kv(layer)]
    space.allocate("a", 3 * BPP * space.block_size)
    assert space.stats()["stripes_mapped"] == 3 and mgr.pool.in_use_pages == 3 * space.num_regions
    # free: every page is unmapped and its handles go back to the pool
    space.free("a")
    assert space.stats()["stripes_mapped"] == 0 and mgr.pool.in_use_pages == 0
    # reuse: new pages mapped at the same addresses; data written now reads back
    space.allocate("b", 2 * BPP * space.block_size)
    write_seq(space, "b")
    assert_seq(space, "b")
    assert pointers == [t.data_ptr() for layer in range(space.num_layers) for t in space.kv(layer)]
    assert space.stats()["unmap_calls"] == 3 * space.num_regions
    mgr.check()


def test_reserve_pages_stay_mapped_and_are_reused(make_manager):
    mgr = make_manager(space_reserve_pages=2)
    space = mgr.create_space("m", max_tokens=4096, **make_manager.shape)
    space.allocate("a", 3 * BPP * space.block_size)
    maps = space.stats()["map_calls"]
    # free: two empty pages stay mapped as reserve, one is unmapped
    space.free("a")
    assert space.stats()["stripes_mapped"] == 2 and space.stats()["stripes_empty"] == 2
    # a new sequence uses the reserve without new mappings
    space.allocate("b", 2 * BPP * space.block_size)
    assert space.stats()["map_calls"] == maps and space.stats()["stripes_empty"] == 0
    mgr.check()


def test_sequences_get_pages_of_their_own_while_memory_allows(make_manager):
    mgr = make_manager()
    space = mgr.create_space("m", max_tokens=4096, **make_manager.shape)
    # two prompts of more than a page each, then decode growth in turns, one block at a time
    space.allocate("a", 20 * space.block_size)
    space.allocate("b", 20 * space.block_size)
    for n in range(21, 2 * BPP + 5):
        space.allocate("a", n * space.block_size)
        space.allocate("b", n * space.block_size)
    pages_a = {b // BPP for b in space.blocks("a")}
    pages_b = {b // BPP for b in space.blocks("b")}
    # no page is shared, and each uses the fewest pages its blocks need
    assert not pages_a & pages_b
    assert len(pages_a) == len(pages_b) == 3
    mgr.check()


def test_short_sequences_share_a_page(make_manager):
    mgr = make_manager()
    space = mgr.create_space("m", max_tokens=4096, **make_manager.shape)
    # four requests of 3 blocks each fit one page together
    for s in range(4):
        space.allocate(s, 3 * space.block_size)
    assert space.stats()["stripes_mapped"] == 1
    mgr.check()


def test_sequences_share_pages_under_pressure_rather_than_fail(make_manager):
    mgr = make_manager(pages=2 * 2 * 2)  # two pages of a two-layer space
    space = mgr.create_space("m", max_tokens=4096, **make_manager.shape)
    # four sequences of 8 blocks fit two pages only if they share them
    for s in range(4):
        space.allocate(s, 8 * space.block_size)
    assert space.stats()["stripes_mapped"] == 2
    for s in range(4):
        write_seq(space, s)
    for s in range(4):
        assert_seq(space, s)
    mgr.check()


def test_pages_freed_by_one_space_are_reused_by_another(make_manager):
    mgr = make_manager(pages=4 * 4, space_reserve_pages=0, pool_ready=4 * 4 * PAGE_BYTES[make_manager.name])
    shape = make_manager.shape
    a = mgr.create_space("a", max_tokens=4096, **shape)
    b = mgr.create_space("b", max_tokens=4096, **shape)
    a.allocate("x", 4 * BPP * a.block_size)  # the whole pool
    with pytest.raises(kvtier.OutOfPagesError):
        b.allocate("y", 1)
    created = mgr.pool.creations
    a.free("x")
    b.allocate("y", 4 * BPP * b.block_size)
    write_seq(b, "y")
    assert_seq(b, "y")
    # the same physical pages served both: none was created for b
    assert mgr.pool.creations == created
    mgr.check()


def test_another_space_reclaims_reserve_pages(make_manager):
    mgr = make_manager(pages=4 * 4, space_reserve_pages=4)
    shape = make_manager.shape
    a = mgr.create_space("a", max_tokens=4096, **shape)
    b = mgr.create_space("b", max_tokens=4096, **shape)
    a.allocate("x", 4 * BPP * a.block_size)
    a.free("x")  # four empty pages stay mapped in a as its reserve
    assert a.stats()["stripes_mapped"] == 4
    b.allocate("y", 3 * BPP * b.block_size)
    assert a.stats()["stripes_mapped"] == 1 and b.stats()["stripes_mapped"] == 3
    mgr.check()


def _snapshot(mgr, space):
    return (space.stats()["stripes_mapped"], space.stats()["blocks_used"], mgr.pool.in_use_pages,
            {s: space.blocks(s) for s in space.sequences()})


def test_quota_exceeded_changes_nothing(make_manager):
    mgr = make_manager()
    shape = make_manager.shape
    probe = mgr.create_space("probe", max_tokens=64, **shape)
    page_bytes = probe.page_bytes
    space = mgr.create_space("q", max_tokens=4096, quota_bytes=2 * page_bytes, **shape)
    space.allocate("a", BPP * space.block_size)
    write_seq(space, "a")
    before = _snapshot(mgr, space)
    # a request that would map a third page fails, and leaves everything as it was
    with pytest.raises(kvtier.QuotaExceededError, match="quota"):
        space.allocate("b", 2 * BPP * space.block_size)
    assert _snapshot(mgr, space) == before
    assert_seq(space, "a")
    space.allocate("b", BPP * space.block_size)  # within quota
    mgr.check()


def test_pool_exhaustion_changes_nothing(make_manager):
    mgr = make_manager(pages=3 * 4)
    space = mgr.create_space("m", max_tokens=4096, **make_manager.shape)
    space.allocate("a", 2 * BPP * space.block_size)
    before = _snapshot(mgr, space)
    with pytest.raises(kvtier.OutOfPagesError, match="pool_budget"):
        space.allocate("b", 2 * BPP * space.block_size)
    assert _snapshot(mgr, space) == before
    with pytest.raises(kvtier.UnknownSequenceError):
        space.blocks("b")
    mgr.check()


def test_space_full(make_manager):
    mgr = make_manager()
    space = mgr.create_space("m", max_tokens=BPP * 16 * 2, **dict(make_manager.shape, block_size=16))
    space.allocate("a", space.max_tokens)
    with pytest.raises(kvtier.SpaceFullError):
        space.allocate("b", 16)
    mgr.check()


def test_bad_input_raises_specific_errors_and_keeps_state(make_manager):
    mgr = make_manager()
    shape = make_manager.shape
    space = mgr.create_space("m", max_tokens=1024, **shape)
    space.allocate("a", 100)
    before = _snapshot(mgr, space)
    with pytest.raises(kvtier.UnknownSequenceError, match="no sequence 'zz'"):
        space.free("zz")
    with pytest.raises(kvtier.InvalidArgumentError, match=">= 0"):
        space.allocate("a", -1)
    with pytest.raises(kvtier.InvalidArgumentError, match="max_tokens"):
        space.allocate("a", 10**9)
    with pytest.raises(kvtier.InvalidArgumentError, match="out of range"):
        space.kv(shape["num_layers"])
    with pytest.raises(kvtier.InvalidArgumentError, match="not supported"):
        mgr.create_space("bad", max_tokens=64, **dict(shape, dtype=torch.complex64))
    with pytest.raises(kvtier.InvalidArgumentError, match="exists already"):
        mgr.create_space("m", max_tokens=64, **shape)
    with pytest.raises(kvtier.InvalidArgumentError, match="positive int"):
        mgr.create_space("z", max_tokens=0, **shape)
    assert _snapshot(mgr, space) == before
    mgr.close()
    with pytest.raises(kvtier.ClosedError):
        space.allocate("a", 200)
    with pytest.raises(kvtier.ClosedError):
        mgr.create_space("n", max_tokens=64, **shape)


def test_bad_device_and_config():
    with pytest.raises(kvtier.DeviceError):  # a device this machine lacks
        kvtier.TierManager(device="cuda:97")
    with pytest.raises(kvtier.ConfigError, match="'tpu' is not a device"):  # no device at all: refused up front
        kvtier.TierManager(device="tpu")
    with pytest.raises(kvtier.ConfigError, match="page_size"):
        kvtier.Config(page_size=-4)
    with pytest.raises(kvtier.ConfigError, match="pool_budget"):
        kvtier.Config(pool_budget=1.5)
    with pytest.raises(kvtier.ConfigError, match="granularity"):
        kvtier.TierManager(device="cpu", page_size=5000)


def test_check_resident_debug_check(make_manager):
    mgr = make_manager(space_reserve_pages=0)
    space = mgr.create_space("m", max_tokens=4096, **make_manager.shape)
    blocks = space.allocate("a", 3 * space.block_size)
    space.check_resident(blocks)
    space.free("a")
    # freed blocks (and their unmapped pages) are refused before a step could touch them
    with pytest.raises(kvtier.NotResidentError):
        space.check_resident(blocks)
    with pytest.raises(kvtier.NotResidentError):
        space.check_resident([space.num_blocks])


def test_stats_count_pages_bytes_and_calls(make_manager):
    mgr = make_manager(space_reserve_pages=0)
    space = mgr.create_space("m", max_tokens=4096, **make_manager.shape)
    space.allocate("a", 2 * BPP * space.block_size)
    stats = mgr.stats()
    assert stats["spaces"]["m"]["stripes_mapped"] == 2
    assert stats["spaces"]["m"]["bytes_mapped"] == 2 * space.page_bytes
    assert stats["total"]["map_calls"] == 2 * space.num_regions
    assert stats["pool"]["pages_in_use"] == 2 * space.num_regions


def test_more_bad_input_gets_specific_errors(make_manager):
    mgr = make_manager()
    space = mgr.create_space("m", max_tokens=4096, **make_manager.shape)
    # an id that cannot be a dict key, a string where a list of ids belongs, a reservation too large to book
    with pytest.raises(kvtier.InvalidArgumentError, match="not hashable"):
        space.allocate(["x"], 16)
    with pytest.raises(kvtier.InvalidArgumentError, match="list of sequence ids"):
        space.prefetch("seq")
    with pytest.raises(kvtier.InvalidArgumentError, match="lower max_tokens"):
        mgr.create_space("big", max_tokens=2**50, **make_manager.shape)
    space.allocate("a", 16)
    mgr.check()
    # after close, every call says so
    mgr.close()
    for call in (lambda: space.blocks("a"), space.sequences, lambda: space.residency("a"),
                 lambda: space.allocate("a", 32), lambda: space.check_resident([0])):
        with pytest.raises(kvtier.ClosedError):
            call()


def test_a_manager_that_fails_to_start_leaves_nothing_behind(tmp_path):
    # a file where the NVMe directory should be, a host tier larger than this machine's memory, a page the
    # backend cannot map: each a ConfigError naming the setting; threads and file descriptors stay as they were
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    bad = [dict(nvme_dir=str(blocker)), dict(host_size=1 << 60), dict(page_size=5000)]
    # a host tier of 64 MiB, mapped and filled before the NVMe tier fails: leaked, 20 starts would show ~1.3 GB
    base = dict(device="cpu", page_size=64 << 10, pool_budget=64 << 20, host_size=64 << 20, host_chunk=16 << 20,
                nvme_size=1 << 20)
    import threading
    threads, fds, mapped = threading.active_count(), len(os.listdir("/proc/self/fd")), _mapped()
    for _ in range(7):
        for change in bad:
            with pytest.raises(kvtier.ConfigError, match="nvme_dir|host_size|page_size"):
                kvtier.TierManager(kvtier.Config(**{**base, **change}))
    assert threading.active_count() == threads and len(os.listdir("/proc/self/fd")) == fds
    grew = _mapped() - mapped  # mapped, not resident: the CPU backend's host tier is never touched here
    assert grew < 256 << 20, f"mapped memory grew by {grew >> 20} MiB over 21 failed starts"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-dir"]


def _mapped() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _wait_for(predicate, seconds: float = 5.0) -> bool:
    import time
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_map_ahead_maps_the_reserve_before_it_is_needed(make_manager):
    mgr = make_manager(pages=32, background_demotion=True, map_ahead=True, space_reserve_pages=2)
    space = mgr.create_space("s", max_tokens=64 * BPP * 16, **make_manager.shape)
    per_page = BPP * space.block_size
    # the demoter maps two empty pages into the new space, off any allocate path
    assert _wait_for(lambda: space.stats()["stripes_empty"] == 2)
    calls = space.stats()["map_calls"]
    # a sequence of two pages lands on them: the allocate maps nothing, and its data round-trips
    space.allocate("a", 2 * per_page)
    assert space.stats()["map_calls"] == calls
    write_seq(space, "a")
    assert_seq(space, "a")
    # and the reserve is topped up again behind it
    assert _wait_for(lambda: space.stats()["stripes_empty"] == 2)
    mgr.check()
    # another space short of pages takes the empties back (they are room, not a claim)
    other = mgr.create_space("t", max_tokens=64 * BPP * 16, **make_manager.shape)
    # (a space page is a handle per region: 4 here) 5 pages are 20 handles; 32 - 8 (a) - 8 (the reserve) leaves 16
    other.allocate("b", 5 * per_page)
    assert_seq(space, "a")
    mgr.check()


def test_a_space_may_opt_out_of_map_ahead(make_manager):
    # an owner that maps ahead of need itself (a layer-streaming cache, a staging space) turns it off per space
    mgr = make_manager(pages=32, background_demotion=True, map_ahead=True, space_reserve_pages=2)
    own = mgr.create_space("own", max_tokens=64 * BPP * 16, map_ahead=False, **make_manager.shape)
    other = mgr.create_space("other", max_tokens=64 * BPP * 16, **make_manager.shape)
    # the demoter tops up the other space's reserve, never this one's
    assert _wait_for(lambda: other.stats()["stripes_empty"] == 2)
    mgr.tiering.poke()
    assert not _wait_for(lambda: own.stats()["stripes_empty"] > 0, seconds=0.3)
    assert own.stats()["map_calls"] == 0
    # not a bool: refused, saying what it takes
    with pytest.raises(kvtier.errors.InvalidArgumentError, match="map_ahead must be a bool"):
        mgr.create_space("bad", max_tokens=64, map_ahead="yes", **make_manager.shape)
    mgr.check()


BAD_CALLS = [  # (what, call): each must raise a KVTierError naming the argument, changing nothing
    ("stage a string", lambda s, m: s.stage("abc")),
    ("stage a number", lambda s, m: s.stage(7)),
    ("prefetch None", lambda s, m: s.prefetch(None)),
    ("ensure_resident a number", lambda s, m: s.ensure_resident(3)),
    ("prefetch unhashable ids", lambda s, m: s.prefetch([["a"]])),
    ("check_resident a huge id", lambda s, m: s.check_resident([2**70])),
    ("check_resident strings", lambda s, m: s.check_resident(["a"])),
    ("check_resident floats", lambda s, m: s.check_resident([1.5])),
    ("check_resident a number", lambda s, m: s.check_resident(5)),
    ("mark_written an unknown sequence", lambda s, m: s.mark_written("zz", 0, 1)),
    ("mark_written past the end", lambda s, m: s.mark_written("a", 0, 10**6)),
    ("mark_written a reversed range", lambda s, m: s.mark_written("a", 9, 3)),
    ("mark_written floats", lambda s, m: s.mark_written("a", 0.5, 3)),
    ("allocate with a bad first_block", lambda s, m: s.allocate("a", 16, first_block="x")),
    ("allocate past the space", lambda s, m: s.allocate("c", 16, first_block=2**70)),
    ("set_priority beyond int64", lambda s, m: s.set_priority("a", 2**70)),
    ("read into a number", lambda s, m: s.read("a", 5)),
    ("read into pairs of the wrong shape", lambda s, m: s.read("a", [(1, 2, 3)])),
    ("region_view of a region out of range", lambda s, m: s.region_view(-1, 0)),
    ("live_bytes of a page out of range", lambda s, m: s.live_bytes(2**70)),
    ("drop_space a list", lambda s, m: m.drop_space(["s"])),
    ("create_buffer of more than an address space", lambda s, m: m.create_buffer("b", 2**70)),
    ("create_buffer with a string reserve", lambda s, m: m.create_buffer("b", 1 << 20, reserve_pages="2")),
    ("create_space with a huge priority", lambda s, m: m.create_space("t", 1, 1, 64, priority=2**64)),
    ("offload to a tier that is not one", lambda s, m: s.offload("a", tier="tape")),
    ("offload_prefix a string", lambda s, m: s.offload_prefix("a", "10")),
    ("block_rows past the last block", lambda s, m: s.block_rows(s.num_blocks - 1, 2)),
    ("block_rows from a negative block", lambda s, m: s.block_rows(-1, 1)),
]


@pytest.mark.parametrize("what, call", BAD_CALLS, ids=[w for w, _ in BAD_CALLS])
def test_every_bad_argument_is_a_kvtier_error_and_changes_nothing(make_manager, what, call):
    mgr = make_manager()
    space = mgr.create_space("s", max_tokens=4096, **make_manager.shape)
    space.allocate("a", 100)
    space.allocate("b", 40)
    space.offload("b", tier="host").result()
    before = _snapshot(mgr, space)
    with pytest.raises(kvtier.KVTierError):
        call(space, mgr)
    assert _snapshot(mgr, space) == before
    mgr.check()


def test_block_rows_are_a_run_of_blocks_in_every_region(make_manager):
    mgr = make_manager()
    space = mgr.create_space("m", max_tokens=256 * make_manager.shape["block_size"], **make_manager.shape)
    blocks = space.allocate("a", 20 * space.block_size)
    write_seq(space, "a")
    # a run of blocks across a page boundary: row r is region r's bytes of those blocks, in order
    assert blocks == list(range(blocks[0], blocks[0] + 20))  # a fresh space hands out a run
    first, count = blocks[10], 9
    rows = space.block_rows(first, count)
    assert rows.shape == (space.num_regions, count * space.block_bytes) and rows.dtype == torch.uint8
    for r in range(space.num_regions):
        region = space.kv(r // 2)[r % 2][first:first + count]
        assert torch.equal(rows[r].cpu(), region.contiguous().view(torch.uint8).view(-1).cpu())
    # one copy into the rows writes those blocks of every region, and nothing else
    mine = slice(blocks[0], blocks[-1] + 1)  # only the sequence's blocks are mapped (their pages)
    before = [t[mine].clone() for layer in range(space.num_layers) for t in space.kv(layer)]
    rows.copy_(torch.full_like(rows, 7))
    after = [t[mine] for layer in range(space.num_layers) for t in space.kv(layer)]
    for old, new in zip(before, after):
        assert (new[10:19].view(torch.uint8) == 7).all()
        assert torch.equal(old[:10], new[:10]) and torch.equal(old[19:], new[19:])
    mgr.check()


def test_an_elastic_buffer_released_more_than_acquired_is_refused_unchanged(make_manager):
    mgr = make_manager()
    buf = mgr.create_buffer("b", 4 * mgr.page_size)
    buf.acquire([(0, 10), (0, 10)])
    # three releases of a span acquired twice: refused whole, the books as they were
    with pytest.raises(kvtier.InvalidArgumentError, match="released more often than acquired"):
        buf.release([(0, 10), (0, 10), (0, 10)])
    with pytest.raises(kvtier.InvalidArgumentError, match="a span is a"):
        buf.acquire(["ab"])
    assert buf.mapped_pages == 1
    buf.release([(0, 10), (0, 10)])
    mgr.check()


@pytest.mark.parametrize("pages_per_block", [1.5, 3, 8])
def test_a_block_larger_than_a_page_is_mapped_whole_and_moves_whole(make_manager, pages_per_block):
    # blocks that span more than two pages (an engine block of a large model as one kvtier token, as the
    # continuous-batching integration keeps them): every page under a block is mapped before it is handed out,
    # check_resident sees every page, and the bytes survive a trip down and back
    page = PAGE_BYTES[make_manager.name]
    mgr = make_manager(pages=256)
    head_dim = int(page * pages_per_block) // 2  # float16: one token of one head is the whole block
    space = mgr.create_space("wide", num_layers=1, num_kv_heads=1, head_dim=head_dim, dtype=torch.float16,
                             block_size=1, max_tokens=40, map_ahead=False)
    assert space.block_bytes == int(page * pages_per_block)
    for seq, n in (("a", 3), ("b", 5), ("c", 2)):
        space.allocate(seq, n)
        space.check_resident(space.blocks(seq))
        write_seq(space, seq)
    space.free("b")
    space.allocate("a", 7)  # grows into what b left, and past it
    space.check_resident(space.blocks("a"))
    write_seq(space, "a", salt=1)
    space.offload("a", tier="host").result()
    with pytest.raises(kvtier.NotResidentError):
        space.check_resident(space.blocks("a"))
    space.prefetch(["a"]).result()
    space.check_resident(space.blocks("a"))
    assert_seq(space, "a", salt=1)
    assert_seq(space, "c")
    mgr.check()
