"""A space's reserve of mapped empty pages follows its demand: scripted with a hand-turned clock (the edge we fake),
on a real backend (CPU virtual memory; CUDA under -m gpu)."""

from __future__ import annotations

import pytest

from kvtier.reserve import ReserveDemand
from tests.conftest import assert_seq, write_seq

BPP = 16  # blocks per page with the fixtures' shapes


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _held(space) -> tuple[int, int]:
    """Pages the space maps, and how many of them are empty."""
    return space.stats()["stripes_mapped"], space.stats()["stripes_empty"]


def _look_after_the_window(mgr, clock, space) -> None:
    """The window (1 s) passes with nothing asked for and the device done with what was written; the demoter's
    next look (called by hand)."""
    clock.now = 1.5
    mgr.backend.synchronize()
    space.map_ahead()


def test_the_reserve_is_the_largest_recent_take_at_least_one_at_most_the_cap():
    clock = Clock()
    demand = ReserveDemand(cap=4, window=1.0, clock=clock)
    # nothing taken yet: one page, so that a first request finds one mapped
    assert demand.target() == 1
    # takes of 3, then 1, then 2 pages: the largest of the last second counts
    demand.took(3)
    clock.now = 0.4
    demand.took(1)
    clock.now = 0.8
    demand.took(2)
    assert demand.target() == 3
    # the 3 passes out of the window, the 2 is then the largest
    clock.now = 1.1
    assert demand.target() == 2
    # then the 2 passes too, and one is left (the 1 went when the 2 came: a later, larger take outlasts it)
    clock.now = 1.9
    assert demand.target() == 1
    # a take over the cap is held to the cap; nothing taken (0 pages) changes nothing
    demand.took(9)
    demand.took(0)
    assert demand.target() == 4


def test_a_window_of_zero_or_a_cap_of_zero_fixes_the_reserve():
    clock = Clock()
    fixed, none = ReserveDemand(cap=2, window=0.0, clock=clock), ReserveDemand(cap=0, window=1.0, clock=clock)
    for demand in (fixed, none):
        demand.took(5)
    clock.now = 10.0
    assert (fixed.target(), none.target()) == (2, 0)


def test_a_space_keeps_mapped_what_its_recent_allocations_took(make_manager):
    clock = Clock()
    mgr = make_manager(pages=64, clock=clock, space_reserve_pages=2, space_reserve_window_s=1.0)
    space = mgr.create_space("s", max_tokens=32 * BPP * 16, **make_manager.shape)
    per_page = BPP * space.block_size
    # the demoter's look (called by hand here): nothing asked for yet, one page is mapped ahead
    space.map_ahead()
    assert space.stats()["stripes_empty"] == 1
    # a sequence of two pages takes that one and maps one more; the next look maps two empties behind it
    space.allocate("a", 2 * per_page)
    write_seq(space, "a")
    space.map_ahead()
    assert _held(space) == (4, 2)
    # freed at once: its two pages join the empties, and the two oldest over the reserve of two are unmapped
    space.free("a")
    assert _held(space) == (2, 2)
    mgr.check()
    # a second later, nothing larger asked for since: the next look keeps one (once the device is done with
    # what was written: an empty page is unmapped only then)
    _look_after_the_window(mgr, clock, space)
    assert _held(space) == (1, 1)
    # a one-block request books its block there: no driver call, its data round-trips
    calls = space.stats()["map_calls"]
    space.allocate("b", space.block_size)
    write_seq(space, "b")
    assert space.stats()["map_calls"] == calls and space.stats()["stripes_empty"] == 0
    assert_seq(space, "b")
    mgr.check()


def test_short_requests_coming_and_going_keep_their_page_mapped_within_the_cap(make_manager):
    clock = Clock()
    mgr = make_manager(pages=64, clock=clock, space_reserve_pages=2, space_reserve_window_s=1.0)
    space = mgr.create_space("s", max_tokens=32 * BPP * 16, **make_manager.shape)
    # the demoter's look maps one page ahead; a one-block request takes it, and the next look maps one behind it
    space.map_ahead()
    space.allocate("q0", space.block_size)
    space.map_ahead()
    assert _held(space) == (2, 1)
    maps, unmaps = space.stats()["map_calls"], space.stats()["unmap_calls"]
    # requests come and go between the looks: each freed page is over the target of one but within the cap of
    # two, so it stays -- no free unmaps and no look maps anything, where each cycle had unmapped one and
    # mapped another
    for i in range(1, 6):
        space.free(f"q{i - 1}")
        space.map_ahead()
        space.allocate(f"q{i}", space.block_size)
        write_seq(space, f"q{i}")
        space.map_ahead()
        assert_seq(space, f"q{i}")
    assert (space.stats()["map_calls"], space.stats()["unmap_calls"]) == (maps, unmaps)
    space.free("q5")
    assert _held(space) == (2, 2)
    mgr.check()
    # the window passes with nothing asked for: the next look keeps the one page of the target
    _look_after_the_window(mgr, clock, space)
    assert _held(space) == (1, 1)
    mgr.check()


def test_the_demoter_trims_a_reserve_no_one_asked_for_again(make_manager):
    import time
    clock = Clock()
    mgr = make_manager(pages=64, clock=clock, background_demotion=True, map_ahead=True, space_reserve_pages=2,
                       space_reserve_window_s=1.0)
    space = mgr.create_space("s", max_tokens=32 * BPP * 16, **make_manager.shape)
    per_page = BPP * space.block_size
    # a two-page sequence, freed: the demoter keeps two empty pages mapped behind it while the window lasts
    space.allocate("a", 2 * per_page)
    space.free("a")
    mgr.tiering.poke()
    time.sleep(0.1)  # a few of the demoter's looks (one each 20 ms)
    assert space.stats()["stripes_empty"] == 2
    # the window passes with nothing asked for: the demoter's own looks unmap one (no call of ours)
    clock.now = 1.5
    mgr.backend.synchronize()
    deadline = time.monotonic() + 5
    while space.stats()["stripes_empty"] != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _held(space) == (1, 1)
    mgr.check()


# --- the reserve mapped without the manager's lock: booked, mapped, landed --------------------------------------
def _in_thread(call):
    """Run ``call`` in a thread; return the thread and a list that receives its result or its exception."""
    import threading
    out: list = []

    def run():
        try:
            out.append(call())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_pages_mapped_ahead_without_the_lock_are_booked_meanwhile_and_waited_for(make_manager):
    mgr = make_manager(pages=64, space_reserve_pages=2)
    space = mgr.create_space("s", max_tokens=32 * BPP * 16, **make_manager.shape)
    per_page = BPP * space.block_size
    free_before = mgr.pool.available()
    # the demoter's first step, under the lock: two vacant pages booked as arriving, their handles taken
    with mgr.lock:
        arrival = space.start_map_ahead()
    assert arrival is not None and len(arrival.pages) == 2
    assert mgr.pool.available() == free_before - 2 * space.num_regions
    assert not space.pages.vacant()[arrival.pages].any() and space.stats()["stripes_empty"] == 0
    mgr.check()  # the handles count as the space's: the books agree while the pages are being mapped
    # one arrival at a time: a second look books nothing more
    with mgr.lock:
        assert space.start_map_ahead() is None
    # an allocation that needs fresh pages waits for them rather than mapping others beside them
    thread, out = _in_thread(lambda: space.allocate("a", per_page))
    thread.join(0.3)
    assert thread.is_alive() and not out
    # the driver calls, without the lock (the waiting allocation does not hold it either), then the landing
    arrival.arrive()
    with mgr.lock:
        assert space.land_map_ahead(arrival) == 2
    thread.join(10)
    assert out and not isinstance(out[0], BaseException), out
    # it booked its blocks on an arrived page: the arrival's were the only driver calls; one empty stays ahead
    assert space.stats()["map_calls"] == 2 * space.num_regions and space.stats()["stripes_empty"] == 1
    assert set(space.block_books.pages_of_seqs(["a"])) <= set(arrival.pages)
    write_seq(space, "a")
    assert_seq(space, "a")
    mgr.check()


def test_a_map_ahead_that_fails_gives_its_handles_back_and_the_pages_stay_vacant(make_manager):
    import kvtier
    mgr = make_manager(pages=64, space_reserve_pages=2)
    space = mgr.create_space("s", max_tokens=32 * BPP * 16, **make_manager.shape)
    free_before = mgr.pool.available()
    backend, real_map, calls = mgr.backend, mgr.backend.map, []

    def failing_map(address, page_size, handles):  # the driver refuses the third map call (a later region)
        calls.append(address)
        if len(calls) == 3:
            raise kvtier.errors.CudaError("cuMemMap", "CUDA_ERROR_OUT_OF_MEMORY", "injected")
        real_map(address, page_size, handles)

    with mgr.lock:
        arrival = space.start_map_ahead()
    backend.map = failing_map
    try:
        arrival.arrive()  # the failure is kept for the landing, never raised here
    finally:
        backend.map = real_map
    assert isinstance(arrival.error, kvtier.errors.CudaError)
    # the landing undoes the booking: handles back in the pool, the pages vacant, nothing mapped
    with mgr.lock:
        assert space.land_map_ahead(arrival) == 0
    assert arrival.done() and mgr.pool.available() == free_before
    assert space.pages.vacant()[arrival.pages].all() and space.stats()["stripes_mapped"] == 0
    mgr.check()
    # called whole (under the lock, as tests and owners may), the same failure is raised to the caller
    backend.map, calls[:] = failing_map, []
    try:
        with pytest.raises(kvtier.errors.CudaError, match="injected"):
            space.map_ahead()
    finally:
        backend.map = real_map
    assert mgr.pool.available() == free_before
    mgr.check()
    # the fault cleared: the next look maps the reserve
    assert space.map_ahead() == 2
    mgr.check()


def test_dropping_a_space_or_asking_its_room_waits_for_pages_being_mapped_ahead(make_manager):
    mgr = make_manager(pages=16, space_reserve_pages=2)
    space = mgr.create_space("s", max_tokens=32 * BPP * 16, **make_manager.shape)
    other = mgr.create_space("t", max_tokens=32 * BPP * 16, **make_manager.shape)
    per_page = BPP * space.block_size
    # s books two pages ahead: of the pool's 16 handles (4 pages of 4 regions), 8 are arriving in s
    with mgr.lock:
        arrival = space.start_map_ahead()
    assert mgr.pool.available() == 8
    # t asks for three pages: the pool has two; the arriving ones will be empties it may take, so it waits
    grow, grown = _in_thread(lambda: other.allocate("b", 3 * per_page))
    # dropping s waits for its arrival too
    drop, dropped = _in_thread(lambda: mgr.drop_space("s"))
    grow.join(0.3)
    assert grow.is_alive() and drop.is_alive()
    arrival.arrive()
    with mgr.lock:
        space.land_map_ahead(arrival)
    grow.join(10)
    drop.join(10)
    assert grown and not isinstance(grown[0], BaseException), grown
    assert dropped and not isinstance(dropped[0], BaseException), dropped
    assert "s" not in mgr.spaces and len(other.blocks("b")) == 3 * BPP
    write_seq(other, "b")
    assert_seq(other, "b")
    mgr.check()


def test_allocations_beside_the_demoter_mapping_ahead_keep_every_byte(make_manager):
    # the real thread: two spaces allocate, write, check and free while the demoter maps their reserves without
    # the lock and trims them (a window of 10 ms); every sequence's bytes are its own, and the books agree after
    import random
    import time
    mgr = make_manager(pages=48, background_demotion=True, map_ahead=True, space_reserve_pages=2,
                       space_reserve_window_s=0.01)
    spaces = [mgr.create_space(n, max_tokens=32 * BPP * 16, **make_manager.shape) for n in ("s", "t")]
    rng = random.Random(7)
    live: dict = {}
    deadline = time.monotonic() + 1.5
    n = 0
    while time.monotonic() < deadline:
        space = rng.choice(spaces)
        if live.get(space.name) and rng.random() < 0.5:
            seq = live[space.name].pop()
            assert_seq(space, seq)
            space.free(seq)
        elif len(live.get(space.name, [])) < 3:
            seq = f"q{n}"
            n += 1
            space.allocate(seq, rng.choice([1, BPP // 2, BPP, 2 * BPP]) * space.block_size)
            write_seq(space, seq)
            live.setdefault(space.name, []).append(seq)
        mgr.tiering.poke()
        if rng.random() < 0.3:
            time.sleep(0.005)
    for space in spaces:
        for seq in live.get(space.name, []):
            assert_seq(space, seq)
    mgr.check()
    assert sum(s.stats()["map_calls"] for s in spaces) > 0


def test_sharing_pages_into_a_space_waits_for_its_pages_being_mapped_ahead(make_manager):
    mgr = make_manager(pages=64, space_reserve_pages=2)
    src = mgr.create_space("src", max_tokens=32 * BPP * 16, **make_manager.shape)
    dst = mgr.create_space("dst", max_tokens=32 * BPP * 16, **make_manager.shape)
    per_page = BPP * src.block_size
    # the original: one whole page of written blocks
    src.allocate("s", per_page, first_block=0)
    write_seq(src, "s")
    # dst's demoter books its first two pages as arriving; sharing page 0 into dst waits for them to land (a
    # vacant page or an empty one may be shared, never one half mapped)
    with mgr.lock:
        arrival = dst.start_map_ahead()
    assert arrival.pages == [0, 1]
    thread, out = _in_thread(lambda: dst.share_pages(src, [0]))
    thread.join(0.3)
    assert thread.is_alive() and not out
    arrival.arrive()
    with mgr.lock:
        dst.land_map_ahead(arrival)
    thread.join(10)
    assert out == [None], out
    # page 0 of dst now reads src's bytes: the empty page it landed as gave its own memory back first
    assert dst.pages.shared == {0} and dst.stats()["stripes_empty"] == 1
    dst.allocate("s", per_page, first_block=0)
    assert_seq(dst, "s")
    mgr.check()


def test_a_new_requests_take_of_the_reserve_pokes_the_demoter_at_its_first_growth(make_manager, monkeypatch):
    import time

    from kvtier.tiering.engine.background import Demoter
    monkeypatch.setattr(Demoter, "PERIOD", 60.0)  # the demoter looks only when poked (its clock at the edge)
    mgr = make_manager(pages=64, background_demotion=True, map_ahead=True, space_reserve_pages=1)
    space = mgr.create_space("s", max_tokens=32 * BPP * 16, **make_manager.shape)
    per_page = BPP * space.block_size
    space.map_ahead()
    assert _held(space) == (1, 1)
    # a new request takes the reserve page: no poke (its free may give it back at once), the next look tops it up
    space.allocate("a", space.block_size)
    time.sleep(0.1)
    assert _held(space) == (1, 0)
    # it grows a block, on the same page: a sequence grows with the reserve short -- the demoter maps one now
    space.allocate("a", 2 * space.block_size)
    deadline = time.monotonic() + 5
    while _held(space)[1] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _held(space) == (2, 1)
    # it grows onto that page (taking it): short again while it grows -- mapped again
    space.allocate("a", per_page + space.block_size)
    deadline = time.monotonic() + 5
    while _held(space)[1] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _held(space) == (3, 1)
    space.free("a")
    mgr.check()
