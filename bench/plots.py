"""PNG plots for ``kvtier bench --plot DIR``: bandwidth vs transfer size per path with its ceiling drawn."""

from __future__ import annotations

import os
from typing import Any

from kvtier.bench.common import Table
from kvtier.errors import ConfigError


def _pyplot() -> Any:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib: pip install 'kvtier[plot]'") from exc
    return plt


def _col(table: Table, name: str) -> list[Any]:
    i = table.columns.index(name)
    return [row[i] for row in table.rows]


def write(tables: dict[str, Table], directory: str, title: str) -> list[str]:
    """One PNG per table kind present; returns the paths written."""
    plt = _pyplot()
    os.makedirs(directory, exist_ok=True)
    written = []
    if "sweep" in tables:
        t = tables["sweep"]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        mib = _col(t, "MiB")
        for path, color in (("down", "tab:blue"), ("up", "tab:orange")):
            ax.plot(mib, _col(t, f"{path} GB/s"), "o-", color=color, label=f"kvtier GPU {path}")
            ax.plot(mib, _col(t, f"{path} ceiling"), "x--", color=color, label=f"pinned copy {path} (ceiling)")
            if any(_col(t, f"naive {path}")):
                ax.plot(mib, _col(t, f"naive {path}"), ":", color=color, label=f"naive .cpu()/.cuda() {path}")
        ax.set(xscale="log", xlabel="transfer (one sequence), MiB", ylabel="GB/s", ylim=(0, None))
        _ticks_at(ax, mib)
        written.append(_save(fig, directory, "tiers.png", "GPU <-> host vs transfer size", title))
    if "prefetch" in tables:
        t = tables["prefetch"]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        mib = _col(t, "MiB")
        ax.plot(mib, _col(t, "from host ms"), "o-", label="prefetch from host")
        ax.plot(mib, _col(t, "pinned copy ms"), "x--", label="pinned copy (ceiling)")
        ax.plot(mib, _col(t, "from nvme ms"), "s-", label="prefetch from NVMe")
        ax.plot(mib, _col(t, "raw read ms"), "+:", label="raw O_DIRECT read (ceiling)")
        ax.set(xscale="log", yscale="log", xlabel="sequence, MiB", ylabel="ms")
        _ticks_at(ax, mib)
        written.append(_save(fig, directory, "prefetch.png", "fault-back latency vs sequence length", title))
    if "nvme" in tables:
        t = tables["nvme"]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for size in sorted(set(_col(t, "I/O MiB"))):
            rows = [r for r in t.rows if r[1] == size]
            ax.plot([r[0] for r in rows], [r[3] for r in rows], "o-", label=f"raw read, {size} MiB I/O")
            ax.plot([r[0] for r in rows], [r[2] for r in rows], "s--", label=f"raw write, {size} MiB I/O")
            if any(r[5] for r in rows):
                ax.plot([r[0] for r in rows], [r[5] for r in rows], "^:", label=f"kvikio read, {size} MiB")
        ax.set(xlabel="threads", ylabel="GB/s", ylim=(0, None))
        written.append(_save(fig, directory, "nvme.png", "NVMe throughput vs threads", title))
    for kind, what, held in (("colocated", "two models, one budget", "KV mapped"),
                             ("processes", "two engine processes, one device budget", "pages held")):
        if kind not in tables:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, points in tables[kind].series.items():
            style = "--" if name.startswith("static") else "-"
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=f"{name} ({held})")
        ax.set(xlabel="seconds", ylabel="MiB", ylim=(0, None))
        written.append(_save(fig, directory, f"{kind}.png", what, title))
    if "prefix" in tables and tables["prefix"].series:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, points in tables["prefix"].series.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], "-", label=f"{name} (blocks found, total)")
        ax.set(xlabel="seconds", ylabel="blocks", ylim=(0, None))
        what = "documents" if tables["prefix"].title.startswith("Documents") else "chats"
        written.append(_save(fig, directory, "prefix.png", f"{what}' history found below the GPU, over time", title))
    return written


def _ticks_at(ax: Any, values: list[Any]) -> None:
    """A log axis labelled at the measured sizes only (matplotlib's minor labels overlap there)."""
    from matplotlib.ticker import NullFormatter
    ax.set_xticks(values, [f"{v:g}" for v in values])
    ax.xaxis.set_minor_formatter(NullFormatter())


def _save(fig: Any, directory: str, name: str, what: str, system: str) -> str:
    """Title above, the system it ran on beneath it in small type, the legend below the axes (never over data)."""
    ax = fig.axes[0]
    ax.set_title(what, fontsize=11)
    fig.text(0.5, 0.005, system, ha="center", va="bottom", fontsize=7, color="0.35")
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.04), ncol=2, fontsize=7, frameon=False)
    rows = -(-len(labels) // 2)
    fig.tight_layout(rect=(0, 0.06 + 0.045 * rows, 1, 1))
    path = os.path.join(directory, name)
    fig.savefig(path, dpi=110)
    return path


def tables_from_json(path: str) -> dict[str, Table]:
    """The tables of a ``kvtier bench --json`` file, keyed as ``write`` takes them (to plot a committed run)."""
    import json
    with open(path) as f:
        saved = json.load(f)
    kinds = {"GPU <-> host": "sweep", "Fault-back": "prefetch", "NVMe throughput": "nvme", "Two models": "colocated",
             "Two engine processes": "processes",
             "Chats over one system prompt": "prefix", "Documents asked about": "prefix"}
    tables = {}
    for t in saved["tables"]:
        kind = next((k for prefix, k in kinds.items() if t["title"].startswith(prefix)), None)
        if kind is None or not t["rows"]:
            continue
        columns = list(t["rows"][0])
        tables[kind] = Table(t["title"], columns, [[r[c] for c in columns] for r in t["rows"]], t.get("notes", []),
                             {k: [tuple(p) for p in v] for k, v in t.get("series", {}).items()})
    return tables
