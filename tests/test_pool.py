"""The page pool: pages created ahead of need by its worker, hysteresis, budget, books."""

from __future__ import annotations

import time

import pytest

import kvtier
from kvtier.vmm import HostBackend, PagePool
from kvtier.vmm.mapped_range import MappedRange
from tests.faults import WatchedCreates

PAGE = 64 << 10


def _wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the pool's worker did not get there in time"
        time.sleep(0.005)


def test_pool_refills_ahead_of_need_and_shrinks_with_hysteresis():
    pool = PagePool(HostBackend(), PAGE, budget_pages=100, ready_pages=8)
    try:
        # warm at start: ready pages exist before anyone asks
        assert pool.free_pages == 8 and pool.creations == 8
        # taking down to 4 (= ready/2) does not wake the worker; below it, it refills to 8
        held = pool.take(4)
        time.sleep(0.05)
        assert pool.free_pages == 4
        held += pool.take(1)
        _wait_for(lambda: pool.free_pages == 8)
        # giving back up to 16 (= 2 * ready) keeps them all
        pool.give(held)
        time.sleep(0.05)
        assert pool.free_pages == 13 and pool.releases == 0
        # holding 13 leaves none: refilled to 8; giving the 13 back makes 21 > 16: released down to 8
        held = pool.take(13)
        _wait_for(lambda: pool.free_pages == 8)
        pool.give(held)
        _wait_for(lambda: pool.free_pages == 8)
        assert pool.releases == 13 and pool.in_use_pages == 0
        pool.check()
    finally:
        pool.close()


def test_take_beyond_budget_raises_and_changes_nothing():
    pool = PagePool(HostBackend(), PAGE, budget_pages=6, ready_pages=2)
    try:
        held = pool.take(5)
        used_before = pool.in_use_pages
        assert not pool.can_take(2)
        with pytest.raises(kvtier.OutOfPagesError, match="budget of 6 pages"):
            pool.take(2)
        # nothing was taken (the free count may still grow meanwhile: the background refill makes the 6th page)
        assert pool.in_use_pages == used_before == 5 and pool.created_pages <= 6
        pool.give(held)
        pool.check()
    finally:
        pool.close()


def test_handles_map_real_memory():
    # a page given back and taken again is still a working page of memory
    backend = HostBackend()
    pool = PagePool(backend, PAGE, budget_pages=4, ready_pages=0)
    base = backend.reserve(2 * PAGE, PAGE)
    try:
        handles = pool.take(2)
        backend.map(base, PAGE, handles)
        view = backend.tensor(base, 2 * PAGE)
        view.fill_(7)
        assert int(view.sum()) == 7 * 2 * PAGE
        backend.unmap(base, 2 * PAGE)
        pool.give(handles)
    finally:
        backend.free_reservation(base, 2 * PAGE)
        pool.close()


def test_a_page_gives_regions_back_ahead_of_the_rest():
    # a page going down unmaps its regions as their copies land; the page is whole again only once unmapped
    backend = HostBackend()
    pool = PagePool(backend, PAGE, budget_pages=16, ready_pages=0)
    rng = MappedRange(backend, num_regions=4, num_pages=3, page_size=PAGE)
    try:
        # pages 0 and 1 mapped in every region, each region's bytes marked with its number
        rng.map([0, 1], pool.take(8))
        for r in range(4):
            for p in (0, 1):
                rng.region_view(r, p).fill_(r)
        assert rng.handle_count() == 8 and not rng.partial
        # regions 0 and 1 of page 0 go ahead: two handles back, the page no longer whole, its other regions intact
        pool.give(rng.unmap_regions(0, [0, 1]))
        assert rng.handle_count() == 6 and rng.partial == {0}
        assert rng.mapped_regions(0) == [2, 3] and pool.in_use_pages == 6
        assert [int(rng.region_view(r, 0).max()) for r in (2, 3)] == [2, 3]
        # unmapping both pages (one run) takes the six handles left, each once
        pool.give(rng.unmap([0, 1]))
        assert rng.handle_count() == 0 and not rng.partial and pool.in_use_pages == 0
        pool.check()
    finally:
        rng.close()
        pool.close()


def test_refills_wait_while_copies_go_down_unless_the_pool_runs_low():
    pool = PagePool(HostBackend(), PAGE, budget_pages=100, ready_pages=16)
    copies_down = [True]  # the edge: what the mover would say
    pool.yield_to = lambda: copies_down[0]
    try:
        # below half the ready pages while copies go down: the worker waits (7 >= a quarter of 16)
        held = pool.take(9)
        _wait_for(lambda: pool.refill_waits > 0)
        assert pool.free_pages == 7 and pool.creations == 16
        # below a quarter: it refills anyway (an allocation may need the pages now)
        held += pool.take(4)
        _wait_for(lambda: pool.free_pages == 16)
        # the copies land: a pool short again refills at once
        held += pool.take(9)
        _wait_for(lambda: pool.refill_waits > 1)
        copies_down[0] = False
        _wait_for(lambda: pool.free_pages == 16)
        pool.give(held)
        pool.check()
    finally:
        pool.close()


def test_the_mover_reports_copies_down_only_while_they_run(make_manager):
    mgr = make_manager()
    space = mgr.create_space("m", max_tokens=4096, **make_manager.shape)
    space.allocate("a", 40 * space.block_size)
    # the pool's refills look at this count; it is back to zero once the transfer has landed
    space.offload("a", tier="host").result()
    assert mgr.tiering.mover.down_in_flight == 0
    space.ensure_resident(["a"])
    space.offload("a", tier="nvme").result()
    assert mgr.tiering.mover.down_in_flight == 0
    mgr.check()


def test_pages_stocked_elsewhere_count_as_ready():
    pool = PagePool(HostBackend(), PAGE, budget_pages=100, ready_pages=8)
    stocked = [0]
    pool.stocked = lambda: stocked[0]  # the edge: what the manager's spaces would say of their reserves
    try:
        # spaces keep 6 pages mapped ahead: the worker keeps only the other 2 created (low mark 1)
        stocked[0] = 6
        assert pool.ready_target() == 2
        held = pool.take(7)
        time.sleep(0.05)
        assert pool.free_pages == 1 and pool.creations == 8
        # below the low mark: refilled to 2, not 8
        held += pool.take(1)
        _wait_for(lambda: pool.free_pages == 2)
        time.sleep(0.05)
        assert pool.free_pages == 2 and pool.creations == 10
        # the reserves were used: the next take finds the pool short of 8 and it refills to 8
        stocked[0] = 0
        held += pool.take(1)
        _wait_for(lambda: pool.free_pages == 8)
        # a stock of more than ready: above twice ready, the pool releases down to none
        stocked[0] = 12
        pool.give(held)
        _wait_for(lambda: pool.free_pages == 0)
        assert pool.in_use_pages == 0
        pool.check()
    finally:
        pool.close()


def test_a_spaces_reserve_is_the_pools_ready_stock(make_manager):
    mgr = make_manager(pages=64)
    mgr = make_manager(pages=64, pool_ready=8 * mgr.page_size)  # a reserve of two pages (the fixture's)
    _wait_for(lambda: mgr.pool.free_pages == 8)
    space = mgr.create_space("r", max_tokens=4096, **make_manager.shape)
    # the space maps its reserve of two pages ahead (what the demoter does): the pool's 8 ready handles go to it
    # and the pool creates no more -- one stock, not two
    assert space.map_ahead() == 2
    assert space.stocked_pages == 2 * space.num_regions == 8 and mgr.pool.ready_target() == 0
    time.sleep(0.05)
    assert mgr.pool.free_pages == 0
    # a request takes the reserve: the pool's target is whole again, and the next take refills it
    space.allocate("a", 32 * space.block_size)  # 16 blocks a page
    assert space.stocked_pages == 0 and mgr.pool.ready_target() == 8
    other = mgr.create_space("o", max_tokens=4096, map_ahead=False, **make_manager.shape)
    other.allocate("b", space.block_size)
    _wait_for(lambda: mgr.pool.free_pages == 8)
    # the space maps its reserve again from those: the pool is left with what the stock does not cover
    assert space.map_ahead() == 2 and mgr.pool.free_pages == 0 and mgr.pool.ready_target() == 0
    space.free("a")
    other.free("b")
    mgr.check()


def test_pages_mapped_ahead_are_stock_before_the_pool_makes_them(make_manager):
    if make_manager.name != "cpu":
        pytest.skip("the watched device layer is a CPU backend")
    backend = WatchedCreates()
    mgr = make_manager(pages=64, backend=backend)
    space = mgr.create_space("r", max_tokens=4096, **make_manager.shape)
    # the space books its reserve (two pages of four regions) before the pool creates their handles: a worker
    # woken by that take would otherwise see no stock and refill the ready pages for nothing
    backend.watch = mgr.pool.stocked
    assert space.map_ahead() == 2
    assert backend.seen == [8] * 8
    mgr.check()
