"""An optional Prometheus endpoint per process: what ``mgr.stats()`` says, scraped in the exposition format.

Started by a manager whose config sets ``metrics_port`` (``[metrics] port``, ``KVTIER_METRICS_PORT``; 0 picks a
free port, ``mgr.metrics.port`` says which), stopped by ``close()``. Needs ``prometheus-client``
(``pip install kvtier[metrics]``). Values are read from the manager's books at scrape time, so nothing is added to
the decode path. Labels: ``device`` on every metric (several managers may share a process), plus those the
README lists (Metrics) with every metric.
"""

from __future__ import annotations

from typing import Any, Iterator

from kvtier.errors import ConfigError

class MetricsServer:
    """The HTTP endpoint of one manager's metrics; ``close()`` stops its thread and frees its port."""

    def __init__(self, manager: Any, port: int, addr: str) -> None:
        try:
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError:
            raise ConfigError("metrics_port: the metrics endpoint needs prometheus-client (pip install "
                              "kvtier[metrics]); or leave metrics_port unset") from None
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(manager))
        try:
            self._server, self._thread = start_http_server(port, addr, registry)
        except OSError as exc:
            raise ConfigError(f"metrics_port: cannot listen on {addr}:{port} ({exc.strerror or exc}); pick a free "
                              "port, or 0 for any") from None
        self.port = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class _Collector:
    def __init__(self, manager: Any) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        if self.manager.closed:
            return
        stats = self.manager.stats()
        tiers, device = stats["tiers"], stats["device"]
        order = tiers["order"]  # the configured lower tiers, nearest first

        def family(kind: Any, name: str, doc: str, labels: tuple[str, ...] = (),
                   rows: list[tuple[tuple[str, ...], float]] | None = None) -> Any:
            metric = kind(name, doc, labels=("device", *labels))
            for values, value in rows or []:
                metric.add_metric((device, *values), value)
            return metric

        pool = stats["pool"]
        yield family(GaugeMetricFamily, "kvtier_pool_pages", "GPU pages of the pool", ("state",),
                     [(("free",), pool["pages_free"]), (("in_use",), pool["pages_in_use"]),
                      (("budget",), pool["budget_pages"]),
                      (("mapped_again",), pool["extra_mappings"])])  # pages two spaces map (share_pages)
        yield family(GaugeMetricFamily, "kvtier_space_stripes", "Stripes of each space per tier (a stripe: one page of every (layer, K|V) region)", ("space", "tier"),
                     [((name, tier), s[key]) for name, s in stats["spaces"].items()
                      for tier, key in (("gpu", "stripes_mapped"), *((t, f"stripes_{t}") for t in order),
                                        ("lost", "stripes_lost"))])
        yield family(GaugeMetricFamily, "kvtier_tier_slots", "Slots of the lower tiers", ("tier", "state"),
                     [((t, state), tiers[t][key]) for t in order for state, key in (("used", "slots_used"),
                                                                                    ("total", "slots"))])
        paths = tiers["paths"]
        yield family(CounterMetricFamily, "kvtier_path_bytes", "Bytes moved per path", ("path",),
                     [((p,), v["bytes"]) for p, v in paths.items()])
        yield family(CounterMetricFamily, "kvtier_path_stripes", "Stripes moved per path", ("path",),
                     [((p,), v["stripes"]) for p, v in paths.items()])
        yield family(CounterMetricFamily, "kvtier_demoted_stripes", "Stripes sent down from the GPU", (),
                     [((), sum(v["stripes"] for p, v in paths.items() if p.startswith("gpu->")))])
        yield family(CounterMetricFamily, "kvtier_lost_stripes", "Stripes lost: a read back failed, or failed its "
                     "checksum", (), [((), tiers["lost_stripes"])])
        yield family(CounterMetricFamily, "kvtier_checksum_failures", "Reads whose bytes did not match their digest",
                     ("tier",), [((t,), tiers[t]["checksums"]["mismatches"]) for t in order
                                 if isinstance(tiers[t]["checksums"], dict)])
        yield family(CounterMetricFamily, "kvtier_failed_writes", "Page writes into a lower tier that failed",
                     ("tier",), [((t,), tiers[t]["health"]["failed_writes"]) for t in order])
        yield family(GaugeMetricFamily, "kvtier_tier_degraded", "1 while the tier's writes are failing", ("tier",),
                     [((t,), float(tiers[t]["health"]["degraded"])) for t in order])
        prefix = {name: s["prefix"] for name, s in stats["spaces"].items()}
        yield family(CounterMetricFamily, "kvtier_prefix_shared_blocks", "Blocks found by content and shared into "
                     "a new sequence, by the tier they rested in", ("space", "tier"),
                     [((name, tier), n) for name, p in prefix.items() for tier, n in p["shared_blocks"].items()])
        yield family(CounterMetricFamily, "kvtier_prefix_tokens_shared", "Prompt tokens found by content (not "
                     "computed again)", ("space",), [((name,), p["tokens_shared"]) for name, p in prefix.items()])
        yield family(CounterMetricFamily, "kvtier_prefix_lookups_short", "Prefix lookups that stopped short of "
                     "their last key", ("space",), [((name,), p["lookups_short"]) for name, p in prefix.items()])
        remote = stats["remote"]
        if remote is not None:  # the remote cache ([remote]): is the store answering, what it served, what it cost
            yield family(GaugeMetricFamily, "kvtier_remote_up", "1 while the remote store is asked (not backing "
                         "off after a failure)", (), [((), int(remote["up"]))])
            for name, key, doc in (("hit_blocks", "hit_blocks", "Blocks found in the remote store"),
                                   ("hit_bytes", "hit_bytes", "Bytes read from the remote store for hits"),
                                   ("put_objects", "puts", "Objects written to the remote store"),
                                   ("put_bytes", "put_bytes", "Bytes written to the remote store"),
                                   ("dropped_objects", "puts_dropped", "Writes dropped (no staging memory, store "
                                    "down)"),
                                   ("bad_objects", "gets_bad", "Objects read that failed their check (not served)"),
                                   ("errors", "errors", "Calls to the remote store that failed or passed their "
                                    "deadline")):
                yield family(CounterMetricFamily, f"kvtier_remote_{name}", doc, (), [((), remote.get(key, 0))])
        hist = tiers["stall_histogram"]
        stalls = HistogramMetricFamily("kvtier_fault_back_stall_seconds", "How long steps waited on pages coming "
                                       "back", labels=("device",))
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, hist["le"]), "+Inf"], hist["counts"]):
            cumulative += count
            buckets.append((bound, cumulative))
        stalls.add_metric((device,), buckets, hist["sum_seconds"])
        yield stalls
