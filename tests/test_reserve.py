"""A space's reserve of mapped empty pages follows its demand: scripted with a hand-turned clock (the edge we fake),
on a real backend (CPU virtual memory; CUDA under -m gpu)."""

from __future__ import annotations

from kvtier.reserve import ReserveDemand
from tests.conftest import assert_seq, write_seq

BPP = 16  # blocks per page with the fixtures' shapes


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


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
    assert (space.stats()["stripes_mapped"], space.stats()["stripes_empty"]) == (4, 2)
    # freed at once: its two pages join the empties, and the two oldest over the reserve of two are unmapped
    space.free("a")
    assert (space.stats()["stripes_mapped"], space.stats()["stripes_empty"]) == (2, 2)
    mgr.check()
    # a second later, nothing larger asked for since: the next look keeps one (once the device is done with
    # what was written: an empty page is unmapped only then)
    clock.now = 1.5
    mgr.backend.synchronize()
    space.map_ahead()
    assert (space.stats()["stripes_mapped"], space.stats()["stripes_empty"]) == (1, 1)
    # a one-block request books its block there: no driver call, its data round-trips
    calls = space.stats()["map_calls"]
    space.allocate("b", space.block_size)
    write_seq(space, "b")
    assert space.stats()["map_calls"] == calls and space.stats()["stripes_empty"] == 0
    assert_seq(space, "b")
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
    assert (space.stats()["stripes_mapped"], space.stats()["stripes_empty"]) == (1, 1)
    mgr.check()
