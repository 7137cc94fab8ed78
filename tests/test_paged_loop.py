"""The example engine loop: sequences going idle and coming back through the tiers decode exactly what they
decode with everything resident."""

from __future__ import annotations

import kvtier
from kvtier.integrations.paged_loop import run

PAGE = 64 << 10
PROMPTS = {f"s{i}": [(7 * i + j) % 251 for j in range(150 + 37 * i)] for i in range(6)}


def test_loop_with_offloads_matches_everything_resident():
    roomy = kvtier.Config(device="cpu", page_size=PAGE, pool_budget=4096 * PAGE, host_size=64 * PAGE,
                          nvme_size=64 * PAGE, background_demotion=False)
    # the pool holds about half the sequences: idle ones are demoted (to host, and on to NVMe) and come back
    tight = roomy.replace(pool_budget=48 * PAGE, host_size=16 * PAGE, nvme_size=512 * PAGE, debug_checks=True)
    expected, calm = run(roomy, PROMPTS, steps=18)
    with_tiers, busy = run(tight, PROMPTS, steps=18)
    assert with_tiers == expected
    assert all(len(tokens) > 0 for tokens in expected.values())
    # the tight run really went through the tiers; the roomy one did not
    paths = busy["tiers"]["paths"]
    assert paths["gpu->host"]["stripes"] > 0 and paths["host->gpu"]["stripes"] > 0
    assert not calm["tiers"]["paths"]


def test_loop_on_a_failing_disk_recomputes_what_was_lost_and_decodes_the_same():
    # the engine's own loop, on a disk that fails 10% of reads and writes at random: sequences whose pages were
    # lost are freed and recomputed; every token is the one decoded with everything resident
    from tests.faults import FaultyFiles
    roomy = kvtier.Config(device="cpu", page_size=PAGE, pool_budget=4096 * PAGE, host_size=64 * PAGE,
                          nvme_size=64 * PAGE, background_demotion=False)
    expected, _ = run(roomy, PROMPTS, steps=18)
    # a host tier of 4 whole-page slots: most idle sequences go on to NVMe, where the faults are
    tight = roomy.replace(pool_budget=48 * PAGE, host_size=4 * PAGE, host_pieces=1, nvme_size=512 * PAGE,
                          debug_checks=True)
    files = FaultyFiles(PAGE)
    files.chaos(0.1, seed=11)
    got, stats = run(tight, PROMPTS, steps=18, files=files)
    assert got == expected
    assert stats["tiers"]["paths"]["nvme->gpu"]["stripes"] > 0 and sum(files.fired.values()) > 0
    if any(fault.startswith("read") for fault in files.fired):  # a failed read back always loses its sequence
        assert stats["recomputed"] > 0
