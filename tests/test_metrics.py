"""The Prometheus endpoint: scraped as Prometheus would, its figures are the manager's own books."""

from __future__ import annotations

import socket
import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import kvtier
from tests.conftest import write_seq


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "device"))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_endpoint_reports_what_the_books_say_and_goes_away_at_close(make_manager):
    threads = threading.active_count()
    mgr = make_manager(metrics_port=0)  # any free port
    space = mgr.create_space("chat", max_tokens=4096 * make_manager.shape["block_size"], **make_manager.shape)
    # one sequence down to host, another to NVMe and back: paths, pages per tier, stalls
    for seq, tier in (("a", "host"), ("b", "nvme")):
        space.allocate(seq, 40 * space.block_size)
        write_seq(space, seq)
        space.offload(seq, tier=tier).result()
    space.ensure_resident(["b"])
    got, stats = _scrape(mgr.metrics.port), mgr.stats()
    tiers = stats["tiers"]
    assert got[("kvtier_pool_pages", (("state", "in_use"),))] == stats["pool"]["pages_in_use"]
    assert got[("kvtier_pool_pages", (("state", "mapped_again"),))] == stats["pool"]["extra_mappings"] == 0
    assert got[("kvtier_space_stripes", (("space", "chat"), ("tier", "host")))] == stats["spaces"]["chat"]["stripes_host"]
    assert got[("kvtier_space_stripes", (("space", "chat"), ("tier", "gpu")))] == stats["spaces"]["chat"]["stripes_mapped"]
    for path in ("gpu->host", "gpu->nvme", "nvme->gpu"):
        assert got[("kvtier_path_bytes_total", (("path", path),))] == tiers["paths"][path]["bytes"] > 0
    assert got[("kvtier_demoted_stripes_total", ())] == sum(v["stripes"] for p, v in tiers["paths"].items()
                                                          if p.startswith("gpu->"))
    assert got[("kvtier_checksum_failures_total", (("tier", "nvme"),))] == 0
    assert got[("kvtier_tier_degraded", (("tier", "nvme"),))] == 0
    assert got[("kvtier_fault_back_stall_seconds_count", ())] == sum(tiers["stall_histogram"]["counts"])
    # a lost page shows as one
    space.offload("a", tier="nvme").result()
    with open(mgr.tiering.tier("nvme").path, "r+b") as f:
        unit = mgr.stats()["tiers"]["nvme"]["slot_bytes"]  # a slot is named by its first unit
        f.seek(space.pages.slots[space.block_books.pages_of_seqs(["a"])[0]][0] * unit)
        f.write(b"\xff" * 4096)
    with pytest.raises(kvtier.TransferError):
        space.ensure_resident(["a"])
    got = _scrape(mgr.metrics.port)
    assert got[("kvtier_lost_stripes_total", ())] >= 1
    assert got[("kvtier_checksum_failures_total", (("tier", "nvme"),))] == 1
    # closed: no thread left, the port is free again
    port = mgr.metrics.port
    mgr.close()
    assert threading.active_count() == threads
    with pytest.raises(OSError):  # nobody listens there any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_a_port_in_use_is_a_config_error_and_leaves_nothing_behind(make_manager):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        threads = threading.active_count()
        with pytest.raises(kvtier.ConfigError, match="metrics_port: cannot listen"):
            make_manager(metrics_port=taken.getsockname()[1])
        assert threading.active_count() == threads
