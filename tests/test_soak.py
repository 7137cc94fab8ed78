"""The soak: a seeded random walk, several threads, tight tiers, every policy, background demotion on and off
(tests/soak.py). A bounded run in the default suite; ``pytest -m soak`` runs a long one (at least a million page
round trips) and prints its counts."""

from __future__ import annotations

import os
import time

import pytest

from tests.conftest import PAGE
from tests.faults import FaultyFiles
from tests.soak import soak

POLICIES = ["lru", "lfu", "priority"]


@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
@pytest.mark.parametrize("policy", POLICIES)
def test_a_bounded_soak_keeps_every_byte(make_manager, policy, background):
    # host checksums ride along with background demotion: both settings' paths are walked
    counts = soak(make_manager, make_manager.shape, PAGE[make_manager.name], policy, background, threads=3,
                  steps=300, seed=len(policy), host_checksums=background)
    assert not counts.errors, counts.errors[:5]
    assert counts.mismatches == 0 and counts.caught == 0 and counts.lost == 0
    assert counts.pages_up > 0 and counts.bytes_verified > 0


@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
def test_a_soak_under_disk_faults_loses_pages_but_never_hands_back_a_wrong_byte(backend_name, make_manager,
                                                                               background):
    # 3% of the NVMe tier's reads and writes fail at random (EIO, short, a flipped byte): sequences get lost and
    # are freed; every byte handed back is still right, and the books balance
    if backend_name != "cpu":
        pytest.skip("the file layer is the POSIX path's")
    files = FaultyFiles(PAGE["cpu"])
    files.chaos(0.03, seed=7)
    counts = soak(make_manager, make_manager.shape, PAGE["cpu"], "lru", background, threads=3, steps=400, seed=3,
                  files=files, host_checksums=background)
    assert not counts.errors, counts.errors[:5]
    assert counts.mismatches == 0, "a wrong byte was handed back"
    assert sum(files.fired.values()) > 0 and counts.lost > 0 and counts.caught > 0
    assert counts.pages_up > 0 and counts.bytes_verified > 0


@pytest.mark.soak
@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
@pytest.mark.parametrize("policy", POLICIES)
def test_a_long_soak(make_manager, policy, background, capsys):
    target = int(os.environ.get("KVTIER_SOAK_ROUND_TRIPS", 1_000_000)) // (2 * len(POLICIES))
    # a wall-clock bound for a machine lent by the minute: the counts are printed for what ran
    deadline = time.monotonic() + float(os.environ.get("KVTIER_SOAK_SECONDS", "inf"))
    total = None
    seed = int(os.environ.get("KVTIER_SOAK_FIRST_SEED", 0))
    while total is None or (total.pages_up < target and time.monotonic() < deadline):
        counts = soak(make_manager, make_manager.shape, PAGE[make_manager.name], policy, background, threads=4,
                      steps=2000, seed=seed, host_checksums=background)
        assert not counts.errors, counts.errors[:5]
        assert counts.mismatches == 0 and counts.caught == 0
        if total is None:
            total = counts
        else:
            total.add(counts)
        seed += 1
    with capsys.disabled():
        print(f"\nsoak {make_manager.name} {policy} {'background' if background else 'inline'}: {total.steps} steps, "
              f"{total.pages_up} page round trips ({total.pages_down} pages down), {total.bytes_verified} bytes "
              f"verified, {total.mismatches} mismatches, {total.refused} calls refused (no room)")
