"""Each policy's ordering, scripted step by step, with a hand-turned clock (time is the edge we fake)."""

from __future__ import annotations

import pytest

import kvtier
from kvtier.policies import Candidate, PageRef, known_policies, make_policy


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _policy(name: str, **params):
    clock = Clock()
    return make_policy(name, clock=clock, **params), clock


A, B, C, D = (PageRef("m", i) for i in range(4))


def test_lru_demotes_least_recently_used_first():
    policy, clock = _policy("lru")
    for ref in (A, B, C):        # created at t = 0, 1, 2
        policy.on_create(ref, 0)
        clock.now += 1
    policy.on_use(A)             # A is now the most recent
    assert policy.victims([A, B, C], 2) == [B, C]
    policy.on_remove(B)
    assert policy.victims([A, C], 5) == [C, A]
    assert policy.victims([], 3) == []  # nothing to give is always safe


def test_lfu_resists_a_one_off_scan():
    policy, clock = _policy("lfu", half_life=1000.0)
    policy.on_create(A, 0)
    for _ in range(5):           # A is used again and again
        clock.now += 1
        policy.on_use(A)
    clock.now += 1
    policy.on_create(B, 0)       # B: a scan, touched once, more recently than A
    assert policy.victims([A, B], 1) == [B]
    lru, lru_clock = _policy("lru")
    lru.on_create(A, 0)
    lru_clock.now += 1
    lru.on_create(B, 0)
    assert lru.victims([A, B], 1) == [A]  # LRU would have dropped the hot page


def test_lfu_counts_fade_with_half_life():
    policy, clock = _policy("lfu", half_life=10.0)
    policy.on_create(A, 0)
    for _ in range(3):
        policy.on_use(A)         # 4 uses, long ago
    clock.now += 100.0           # ten half-lives: ~0.004 left
    policy.on_create(B, 0)       # 1 fresh use
    assert policy.victims([A, B], 1) == [A]


def test_priority_demotes_low_first_lru_within_a_class():
    policy, clock = _policy("priority", aging_seconds=100.0)
    policy.on_create(A, 5)
    clock.now += 1
    policy.on_create(B, 0)
    clock.now += 1
    policy.on_create(C, 0)
    clock.now += 1
    policy.on_use(B)
    # low class first (C older than B), the high-priority A last
    assert policy.victims([A, B, C], 3) == [C, B, A]
    policy.on_priority(C, 9)     # set_priority raised C above everyone
    assert policy.victims([A, B, C], 3) == [B, A, C]


def test_priority_aging_guard_lets_idle_high_priority_data_go():
    policy, clock = _policy("priority", aging_seconds=10.0)
    policy.on_create(A, 3)       # high priority, then idle
    clock.now += 45.0            # 4 aging steps idle: effective priority 3 - 4 = -1
    policy.on_create(B, 0)       # busy low-priority traffic
    assert policy.victims([A, B], 1) == [A]
    clock.now += 1
    policy.on_use(A)             # used again: full priority back
    assert policy.victims([A, B], 1) == [B]


def test_nvme_admission_filter_keeps_one_off_pages_off_the_ssd():
    policy, _ = _policy("lru", nvme_min_uses=2)
    policy.on_create(A, 0)
    policy.on_create(B, 0)
    policy.on_use(B)
    # with room in host memory both go there; without, only B (used twice) may go to NVMe
    roomy, full = [Candidate("host", 4, True), Candidate("nvme", 9, True)], [Candidate("host", 0, False),
                                                                            Candidate("nvme", 9, True)]
    assert policy.place(A, "gpu", roomy) == "host"
    assert policy.place(A, "gpu", full) is None
    assert policy.place(B, "gpu", full) == "nvme"
    assert policy.place(A, "host", full[1:]) is None
    assert policy.place(B, "gpu", [Candidate("host", 0, False), Candidate("nvme", 0, False)]) is None


def test_registry_errors_list_known_policies_and_load_paths():
    assert {"lru", "lfu", "priority"} <= set(known_policies())
    with pytest.raises(kvtier.ConfigError, match="known: .*lfu.*lru.*priority"):
        make_policy("mru")
    assert make_policy("kvtier.policies.lru:LRUPolicy").name == "lru"
    with pytest.raises(kvtier.ConfigError, match="cannot be loaded"):
        make_policy("no_such_module:Policy")
    with pytest.raises(kvtier.ConfigError, match=r"not a parameter of the .priority. policy \(its parameters: aging"):
        make_policy("priority", aging=3)


def test_priority_policy_keeps_the_important_space_resident(make_manager):
    # end to end: two idle sequences, one of a high-priority space; pressure demotes the other one first
    mgr = make_manager(pages=5 * 4, policy="priority")
    shape = make_manager.shape
    hi = mgr.create_space("hi", max_tokens=4096, priority=5, **shape)
    lo = mgr.create_space("lo", max_tokens=4096, **shape)
    hi.allocate("h", 2 * 16 * hi.block_size)
    lo.allocate("l", 2 * 16 * lo.block_size)
    hi.offload("h")
    lo.offload("l")
    lo.allocate("new", 3 * 16 * lo.block_size)  # needs 2 more pages than are free: one space must go down
    assert lo.residency("l")["gpu"] == 0 and hi.residency("h")["gpu"] > 0
    mgr.check()
