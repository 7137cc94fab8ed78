"""Elastic buffers (an engine's flat cache tensor) sharing one pool: borrowing freely while the others idle,
meeting at fair shares while they are short, priorities, and every page accounted for after."""

from __future__ import annotations

import pytest

from kvtier.errors import OutOfPagesError


def test_buffers_borrow_freely_and_meet_at_fair_shares_under_contention(make_manager):
    with make_manager(pages=12) as mgr:
        page = mgr.page_size
        a = mgr.create_buffer("a", 12 * page)
        b = mgr.create_buffer("b", 12 * page)
        low = mgr.create_buffer("low", 12 * page, priority=-1)
        # a burst on a while the others idle: it may take the whole pool
        assert a.available() == 12
        a.acquire([(0, 9 * page)])
        low.acquire([(0, page)])
        assert a.available() == 2 and not a.yielding()
        # b is short and says so: a (9 pages) is past its share -- low keeps its 1, a and b split the other 11, rounded up --
        # so a may not grow, and waiting is no failure for it
        b.want()
        assert a.fair_share() == 6 and a.available() == 0 and a.yielding()
        with pytest.raises(OutOfPagesError):
            a.acquire([(9 * page, 10 * page)])
        # low has a lower priority than b: it is held at its share too (the even split of 12 over three, 4)
        assert low.available() == min(2, 4 - 1)
        # a's requests finish: pages go back and b grows into them, up to its share while a wants too
        a.release([(5 * page, 9 * page)])
        assert b.available() == 6
        b.acquire([(0, 6 * page)])
        a.want()
        assert a.fair_share() == 6 and b.fair_share() == 6 and a.available() == 0 and b.available() == 0
        # b idles (its want lapses): a may borrow again
        b._wanted_at = float("-inf")
        assert a.available() == 0 or not a._contended()
        b.release([(0, 6 * page)])
        assert not a._contended() and a.available() == 12 - 5 - 1
        for buffer in (a, b, low):
            buffer.close()
        assert mgr.pool.in_use_pages == 0
        mgr.check()


def test_a_higher_priority_buffer_does_not_yield_to_a_lower_one(make_manager):
    with make_manager(pages=8) as mgr:
        page = mgr.page_size
        high = mgr.create_buffer("high", 8 * page, priority=1)
        low = mgr.create_buffer("low", 8 * page)
        high.acquire([(0, 6 * page)])
        low.want()
        assert not high.yielding() and high.available() == 2
        high.acquire([(6 * page, 8 * page)])
        high.close()
        low.close()
        mgr.check()


def test_a_buffer_takes_the_room_spaces_keep_mapped_empty(make_manager):
    from tests.conftest import assert_seq, write_seq
    with make_manager(pages=16, space_reserve_pages=2) as mgr:
        page = mgr.page_size
        space = mgr.create_space("s", max_tokens=64 * 16 * 16, **make_manager.shape)
        # a space maps its reserve ahead (two pages of its regions each) and holds a live sequence of one page
        space.map_ahead()
        per_page = space.page_size // space.block_bytes * space.block_size
        space.allocate("a", per_page)
        write_seq(space, "a")
        space.map_ahead()
        empties = space.stats()["stripes_empty"]
        held = space.range.handle_count()
        assert empties == 2 and mgr.pool.available() == 16 - held
        # a buffer counts the empty pages as room (they are a reserve, not a claim) and maps into them
        buffer = mgr.create_buffer("b", 16 * page)
        assert buffer.available() == 16 - space.num_regions  # all but the live sequence's page
        buffer.acquire([(0, buffer.available() * page)])
        assert space.stats()["stripes_empty"] == 0 and mgr.pool.available() == 0
        # the space's live sequence is untouched
        assert_seq(space, "a")
        mgr.check()


def test_pages_a_space_is_mapping_ahead_are_room_a_buffer_waits_for(make_manager):
    import threading
    import time
    with make_manager(pages=16, space_reserve_pages=2) as mgr:
        space = mgr.create_space("s", max_tokens=64 * 16 * 16, **make_manager.shape)
        buffer = mgr.create_buffer("b", 16 * mgr.page_size)
        # the demoter's first step: the space books its reserve as arriving (handles taken, not yet mapped)
        with mgr.lock:
            arrival = space.start_map_ahead()
        assert arrival is not None and len(arrival.pages) == 2
        booked = 2 * space.num_regions
        assert buffer.available() == 16 - booked  # neither free in the pool nor empty in the space
        # the driver calls and the landing, on another thread (as the demoter does); the buffer waits for them
        def land() -> None:
            time.sleep(0.2)  # the driver's calls take a while (a page of 64 regions: 2-3 ms on an H100)
            arrival.arrive()
            with mgr.lock:
                space.land_map_ahead(arrival)
        threading.Thread(target=land).start()
        assert buffer.settle_arrivals()
        # landed as empties: room again
        assert space.stats()["stripes_empty"] == 2 and buffer.available() == 16
        assert not buffer.settle_arrivals()
        mgr.check()


def test_pages_the_pool_is_creating_are_room_a_buffer_waits_for(make_manager):
    import threading

    import pytest

    from tests.faults import WatchedCreates
    if make_manager.name != "cpu":
        pytest.skip("the watched device layer is a CPU backend")
    backend = WatchedCreates()
    with make_manager(pages=16, pool_ready=0, backend=backend) as mgr:
        buffer = mgr.create_buffer("b", 16 * mgr.page_size)
        # another thread takes 4 pages the pool must create, and its first creation stalls (the driver's call)
        gate, started = threading.Event(), threading.Event()
        backend.watch = lambda: (started.set(), gate.wait(5))
        taken: list = []
        taker = threading.Thread(target=lambda: taken.extend(mgr.pool.take(4)))
        taker.start()
        assert started.wait(5)
        # those pages are neither free nor room while they are made, so a buffer sees 4 fewer
        assert buffer.available() == 12
        # ... and a buffer judging its room waits for them: the creation lands, the taker gives them back
        threading.Timer(0.2, gate.set).start()
        assert buffer.settle_arrivals()
        taker.join(5)
        mgr.pool.give(taken)
        assert buffer.available() == 16 and not buffer.settle_arrivals()
        mgr.check()
