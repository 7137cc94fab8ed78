"""The ``kvtier`` command: ``--version``, ``info``, ``bench``, ``config``, ``replay``, ``ls``, ``top``, ``limit``."""

from __future__ import annotations

import json
import logging
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

import kvtier

console = Console()
if not console.is_terminal:  # to a file or a pipe: wide enough that no table is folded
    console = Console(width=200)


def _device_facts(device: str) -> dict[str, Any]:
    from kvtier.vmm import cuda_unavailable_reason, open_backend, resolve_device

    dev = resolve_device(device)
    facts = open_backend(dev).describe()
    if dev.type == "cpu" and device == "auto":
        facts["why"] = cuda_unavailable_reason()
    return facts


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(kvtier.__version__, prog_name="kvtier")
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
def main(verbose: bool) -> None:
    """kvtier: a virtual KV-cache address space on GPU virtual memory, with tiering."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")


@main.command()
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="A config file (default: Config(), with the KVTIER_* environment applied).")
def info(device: str, config_path: str | None) -> None:
    """The backend kvtier would use here, the facts about it, and the tiers a manager would have."""
    from kvtier.config import Config
    from kvtier.tiering.tiers.registry import tier_class, tier_settings
    from kvtier.vmm import open_backend, resolve_device

    config = Config.from_file(config_path) if config_path else Config()
    facts = _device_facts(device)
    dev = resolve_device(device)
    backend = open_backend(dev)
    try:
        page = config.page_size or backend.default_page_size
    finally:
        backend.close()
    facts.update({
        "page size": f"{page >> 20} MiB" if page % (1 << 20) == 0 else f"{page} bytes",
        "pool budget": f"{config.pool_budget:g} of the device's free memory at start"
                       if isinstance(config.pool_budget, float) else _size(config.pool_budget),
        "policy": config.policy})
    for name in config.tiers:  # nearest the GPU first
        cls = tier_class(name)
        settings = tier_settings(cls, config)
        facts[f"{name} tier"] = cls.summary(settings, dev) if hasattr(cls, "summary") else settings.model_dump()
    if config.remote_backend:  # not asked here: `kvtier config check` tries to reach it
        where = config.remote_address if config.remote_backend == "valkey" else config.remote_master
        facts["remote store"] = (f"{config.remote_backend} at {where} (lookups within {config.remote_timeout_s:g} s, "
                                 f"{_size(config.remote_buffer)} of staging, writes: {config.remote_write})")
    for key, value in facts.items():
        console.print(f"[bold]{key:>14}[/bold]  {escape(str(value))}")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.3g} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.3g} MiB"


def _bench_options(fn: Any) -> Any:
    fn = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")(fn)
    fn = click.option("--quick", is_flag=True, help="A short run (about a minute).")(fn)
    fn = click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True),
                      help="Also write the results to this JSON file.")(fn)
    fn = click.option("--plot", "plot_dir", type=click.Path(file_okay=False),
                      help="Write PNG plots (bandwidth vs size, with the ceilings) into this directory.")(fn)
    fn = click.option("--nvme-dir", type=click.Path(file_okay=False), help="Where NVMe files go (default: a "
                      "temporary directory; point it at the NVMe you will deploy on).")(fn)
    fn = click.option("--repeats", type=click.IntRange(1), default=None,
                      help="generate: interleaved runs of each cache (default 3 on a GPU); decode-pairs: rounds "
                      "(default 30); prefix: runs of both engines, taking turns, with each one's medians (default "
                      "1).")(fn)
    fn = click.option("--tokens", type=click.IntRange(256), default=None,
                      help="long-context: the context's length (default: sized to the GPU, 1.15x its memory in "
                      "KV; 2048 on CPU or with --quick).")(fn)
    fn = click.option("--workload", type=click.Choice(sorted(WORKLOADS)), default=None,
                      help="prefix: chats (default: short turns over one system prompt, a 1B shape) or documents "
                      "(each conversation opens with its own long document, then short questions; an 8B shape); "
                      "serve: small (default: a 1B shape, 32 requests) or 8b (GPU only: an 8B shape, 96 requests of "
                      "512-4096 prompt tokens, 8 GiB of KV budget).")(fn)
    fn = click.option("--cuda-graphs/--no-cuda-graphs", "graphs", default=True, show_default=True,
                      help="prefix and serve: run the engines' decode steps as CUDA graphs, every engine alike (the "
                      "engine's own default where attention needs no mask; SDPA, used here, needs one).")(fn)
    return fn


# name -> (what it measures, whether it needs transformers); ``kvtier bench`` with no name runs ALL
BENCHMARKS: dict[str, tuple[str, bool]] = {
    "vmm": ("Map/unmap cost vs page size, allocate latency, decode-attention overhead.", False),
    "tiers": ("Every tier path for a whole sequence, GPU<->host vs transfer size, and the peer tier (another GPU), "
              "against same-run ceilings.", False),
    "prefetch": ("Fault-back latency vs sequence length, mapping included.", False),
    "nvme": ("Disk throughput vs threads and I/O size; kvikio (GDS or compat) on GPU machines.", False),
    "generate": ("transformers generate: DynamicCache vs its offloaded variant vs TieredCache.", True),
    "decode-pairs": ("TieredCache all resident against DynamicCache in alternating blocks of decode steps: the "
                     "median and spread of the pairs (--repeats rounds).", True),
    "serve": ("transformers' continuous batching under a KV budget that forces preemption: the engine as shipped "
              "(soft reset; its pinned swap pool) against the engine on kvtier (transformers 5.24).", True),
    "prefix": ("Chats over one system prompt whose KV is several times the GPU's budget, through transformers' "
               "continuous batching with its prefix sharing: the engine as shipped against it on kvtier.", True),
    "colocated": ("Two models on one KV budget under bursts that take turns: a static equal split against kvtier's "
                  "shared pool; TTFT per model and KV memory over time.", True),
    "processes": ("Two engine processes (one model each) on one GPU under bursts that take turns: a static equal "
                  "split against kvtier's per-device ledger; TTFT per model and pages per process over time.", True),
    "remote": ("The remote cache's put and get through Valkey and Mooncake started here, against the store's own "
               "client moving the same bytes; a hit against recomputing the prompt.", False),
    "peers": ("The same allocation work through kvtier and kvcached in one run (kvcached in a child process; "
              "skipped where it is not installed).", False),
    "long-context": ("A context whose KV does not fit on the GPU (sized to it; --tokens): TieredCache where "
                     "DynamicCache runs out (host memory for the streamed layers: only when named).", True),
}
ALL = ["vmm", "tiers", "prefetch", "nvme", "generate"]
WORKLOADS = {"chats": "prefix", "documents": "prefix", "small": "serve", "8b": "serve"}  # --workload: its bench


def _parts(names: list[str], device: str, quick: bool, nvme_dir: str | None,
           repeats: int | None = None, context: int | None = None, workload: str | None = None,
           graphs: bool = True) -> list[tuple[str, int, Any]]:
    """(name, steps, run(step) -> tables) for each benchmark asked for; each module is imported only when its
    benchmark runs (those of transformers' engines need it installed)."""
    import importlib

    from kvtier.vmm import resolve_device

    def bench(module: str) -> Any:
        return importlib.import_module(f"kvtier.bench.{module}")

    cuda = resolve_device(device).type == "cuda"
    tokens = ([2048, 8192] if quick else [1024, 4096, 16384, 32768]) if cuda else [1024, 4096]
    threads, sizes = ([1, 4], [8 << 20]) if quick else ([1, 2, 4, 8], [1 << 20, 8 << 20, 32 << 20])
    table = {
        "vmm": (1, lambda step: bench("vmm").run(device, quick=quick)),
        "tiers": (1 + len(tokens), lambda step: bench("tiers").run(device, quick=quick, nvme_dir=nvme_dir)
                  + [bench("tiers").sweep(device, tokens, step), bench("host_capacity").run(device, quick=quick),
                     bench("peer_tier").run(device, quick=quick)]),
        "prefetch": (len(tokens), lambda step: [bench("prefetch").run(device, tokens, nvme_dir=nvme_dir, step=step)]),
        "nvme": (len(threads) * len(sizes), lambda step: [bench("nvme").run((256 if quick else 1024) << 20, threads,
                                                                            sizes, nvme_dir=nvme_dir, step=step)]),
        "generate": (20, lambda step: [bench("generate").run(device, quick=quick, step=step, repeats=repeats)]),
        "long-context": (3, lambda step: [bench("long_context").run(device, quick=quick, step=step, tokens=context)]),
        "serve": (3 if cuda else 2, lambda step: [bench("serve").run(device, quick=quick, step=step,
                                                                     workload=workload or "small", graphs=graphs)]),
        "prefix": (2 * (repeats or 1), lambda step: [bench("prefix").run(device, quick=quick, step=step,
                                                                          workload=workload or "chats",
                                                                          repeats=repeats or 1, graphs=graphs)]),
        "colocated": (2, lambda step: [bench("colocated").run(device, quick=quick, step=step)]),
        "processes": (2, lambda step: [bench("processes").run(device, quick=quick, step=step)]),
        "peers": (2, lambda step: bench("peers").run(device, quick=quick, step=step)),
        "remote": (2, lambda step: [bench("remote").run(device, quick=quick, step=step)]),
        "decode-pairs": (repeats or (30 if cuda else 4),
                         lambda step: [bench("pairs").run(device, quick=quick, rounds=repeats, step=step)]),
    }
    if any(BENCHMARKS[n][1] for n in names):
        try:
            import transformers  # noqa: F401
        except ImportError:
            skipped = [n for n in names if BENCHMARKS[n][1]]
            console.print(f"[yellow]skipping {', '.join(skipped)}[/yellow]: needs transformers "
                          + escape("(pip install 'kvtier[transformers]')"))
            names = [n for n in names if n not in skipped]
    return [(name, *table[name]) for name in names]


def _run_bench(names: list[str], device: str, quick: bool, json_path: str | None, plot_dir: str | None,
               nvme_dir: str | None, repeats: int | None = None, tokens: int | None = None,
               workload: str | None = None, graphs: bool = True) -> None:
    """System header first, then each table (a progress bar on a terminal, a line per step elsewhere); the same
    facts go to the JSON file. On the CPU backend the GPU targets are not judged (``met``: n/a)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from kvtier.bench.common import host_facts, system_info
    from kvtier.vmm import resolve_device

    dev = resolve_device(device)
    system = {**system_info(dev), **host_facts(nvme_dir or "/tmp")}
    console.print("[bold]System[/bold]  " + escape("  ".join(f"{k}={v}" for k, v in system.items())))
    tables: list[Any] = []
    kinds: dict[str, Any] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console,
                  transient=True, disable=not console.is_terminal) as progress:
        for name, steps, run in _parts(names, device, quick, nvme_dir, repeats, tokens, workload, graphs):
            task = progress.add_task(f"bench {name}", total=steps)
            done = [0]

            def step(task: Any = task, name: str = name, steps: int = steps) -> None:
                progress.advance(task)
                done[0] += 1
                if not console.is_terminal:  # a log file or a pipe: say it is alive
                    console.print(f"bench {name}: step {done[0]} of {steps}")
            if not console.is_terminal:
                console.print(f"bench {name}: started")
            produced = run(step)
            progress.update(task, completed=steps)
            if dev.type != "cuda":
                for table in produced:
                    _targets_not_judged(table)
            for table in produced:
                progress.console.print(table.render())
            tables += produced
            kinds.update({"sweep" if "transfer size" in t.title else name: t for t in produced})
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"benchmark": names, "system": system, "tables": [t.as_json() for t in tables]}, f, indent=1)
    if plot_dir:
        from kvtier.bench import plots
        title = " ".join(str(system[k]) for k in ("gpu", "driver", "nvme_io") if k in system) or "CPU backend"
        for path in plots.write(kinds, plot_dir, title):
            console.print(f"plot: {escape(path)}")


def _targets_not_judged(table: Any) -> None:
    """The targets are a GPU's (PCIe, the driver's mapping): on the CPU backend a row neither meets nor misses."""
    if "met" in table.columns:
        col = table.columns.index("met")
        for row in table.rows:
            row[col] = None
        if "CPU backend: the targets are a GPU's, not judged here (met: n/a)" not in table.notes:
            table.notes.append("CPU backend: the targets are a GPU's, not judged here (met: n/a)")


@main.command(context_settings={"help_option_names": ["-h", "--help"]},
              epilog="Benchmarks:\n\n" + "\n\n".join(f"{n}: {doc}" + (" Needs transformers." if tf else "")
                                                      for n, (doc, tf) in BENCHMARKS.items()))
@click.argument("names", nargs=-1, type=click.Choice(list(BENCHMARKS)))
@_bench_options
@click.option("--from-json", "from_json", type=click.Path(exists=True, dir_okay=False),
              help="Run nothing: draw the --plot PNGs of a run saved with --json (plots that match its tables).")
def bench(names: tuple[str, ...], device: str, quick: bool, json_path: str | None, plot_dir: str | None,
          nvme_dir: str | None, repeats: int | None, tokens: int | None, workload: str | None, graphs: bool,
          from_json: str | None) -> None:
    """Run the benchmarks NAMES in order (none: vmm, tiers, prefetch, nvme, generate; long-context only when
    named: it needs host memory for the layers it streams). The list of names is below."""
    if from_json:
        from kvtier.bench import plots
        if not plot_dir:
            raise click.UsageError("--from-json draws plots: give --plot DIR")
        with open(from_json) as f:
            system = json.load(f).get("system", {})
        title = " ".join(str(system[k]) for k in ("gpu", "driver", "nvme_io") if k in system) or "CPU backend"
        for path in plots.write(plots.tables_from_json(from_json), plot_dir, title):
            console.print(f"plot: {escape(path)}")
        return
    chosen = list(dict.fromkeys(names)) or list(ALL)
    if workload is not None and WORKLOADS[workload] not in chosen:
        raise click.UsageError(f"--workload {workload} is a workload of bench {WORKLOADS[workload]}, which is not "
                               f"among those asked for ({' '.join(chosen)})")
    if workload == "8b":
        from kvtier.vmm import resolve_device
        if resolve_device(device).type != "cuda":
            raise click.UsageError("--workload 8b needs a GPU (an 8B model with random weights, 16 GB in bf16)")
    _run_bench(chosen, device, quick, json_path, plot_dir, nvme_dir, repeats, tokens, workload, graphs)


@main.group()
def config() -> None:
    """Check and show policy config files (TOML)."""


@config.command("check")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--schema-only", is_flag=True, help="Check what the files say, not whether this machine takes them "
              "(no code named by a file is imported).")
def config_check(files: tuple[str, ...], schema_only: bool) -> None:
    """Pre-flight FILES: what each says (unknown keys, bad values, settings that disagree) and whether this
    machine takes it (device, page size, memory, NVMe and ledger directories, the policy built). Every problem of
    a file at once, each with its key; nothing is written. Exit 1 if any file is bad."""
    from kvtier.config import Config, toml_name

    bad = 0
    for path in files:
        config, problems = Config.check_file(path)
        if config is not None and not schema_only:
            from kvtier.preflight import machine_problems  # the device, memory and disks: torch and the driver
            said = {where for where, _ in problems}
            problems += [(toml_name(name), msg) for name, msg in machine_problems(config)
                         if toml_name(name) not in said]  # a default standing in for a bad value: not news
        if problems:
            bad += 1
            console.print(f"[red]bad[/red] {escape(path)}")
            for where, msg in problems:
                console.print(f"    {escape(where)}{': ' if where else ''}{escape(msg)}")
        else:
            console.print(f"[green]ok[/green]  {escape(path)}" + ("" if schema_only else " (on this machine)"))
    if bad:
        raise SystemExit(1)


@config.command("show")
@click.argument("file", required=False, type=click.Path(dir_okay=False))
def config_show(file: str | None) -> None:
    """Every setting FILE gives (none: the defaults), with the defaults and the environment (KVTIER_*) filled
    in, as a TOML file that ``config check`` accepts."""
    from kvtier.config import Config

    try:
        cfg = Config.from_file(file) if file else Config()
    except kvtier.ConfigError as exc:
        console.print(f"[red]bad[/red] {escape(str(exc))}")
        raise SystemExit(1) from None
    click.echo(cfg.to_toml(), nl=False)


@main.command()
@click.argument("trace", type=click.Path(exists=True, dir_okay=False))
@click.option("--config", "configs", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A config file to replay under (repeat to compare side by side). Default: Config().")
@click.option("--device", help="Override the configs' device (e.g. cpu).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write tier occupancy and stalls (PNG).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write all figures to a JSON file.")
def replay(trace: str, configs: tuple[str, ...], device: str | None, plot_path: str | None,
           json_path: str | None) -> None:
    """Replay a workload TRACE (JSON Lines) through the real manager and compare configs."""
    from kvtier.bench.common import Table
    from kvtier.config import Config
    from kvtier.replay import load_trace, plot, replay as run_replay, side_by_side

    tr = load_trace(trace)
    overrides = {"device": device} if device else {}
    chosen = {path.rsplit("/", 1)[-1]: Config.from_file(path, **overrides) for path in configs} or {
        "defaults": Config(**overrides)}
    results = {}
    for label, cfg in chosen.items():
        with console.status(f"replaying {trace} under {label}"):
            results[label] = run_replay(tr, cfg)
    table = Table(f"Replay of {trace} ({len(tr.events)} events)", ["space", "metric", *results])
    for row in side_by_side(results):
        table.add(*row)
    console.print(table.render())
    if plot_path:
        plot(results, plot_path, {name: shape.get("priority", 0) for name, shape in tr.spaces.items()})
        console.print(f"plot written to {escape(plot_path)}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({label: {k: v for k, v in r.items() if k != "timeline"} for label, r in results.items()}, f,
                      indent=1)
        console.print(f"figures written to {escape(json_path)}")


@main.command("trace")
@click.argument("kind", type=click.Choice(["chat", "bursty"]))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--seed", default=0, show_default=True)
@click.option("--size", default=None, type=int, help="Conversations (chat) or requests (bursty).")
def make_trace(kind: str, out: str, seed: int, size: int | None) -> None:
    """Write a synthetic trace: multi-turn chat, or bursty multi-model traffic with a long tail."""
    from kvtier.replay import save_trace
    from kvtier.traces import bursty_trace, chat_trace

    make = chat_trace if kind == "chat" else bursty_trace
    trace = make(size, seed=seed) if size else make(seed=seed)
    save_trace(trace, out)
    console.print(f"{out}: {len(trace.events)} events in {len(trace.spaces)} space(s)")


_LEDGER_DIR = click.option("--ledger-dir", default="/dev/shm", show_default=True, envvar="KVTIER_LEDGER_DIR",
                           type=click.Path(file_okay=False), help="Where the processes' ledgers are (ledger_dir).")


def _ledger_table() -> Any:
    """Every ledger under the directory: its processes, their pages and shares."""
    from rich.table import Table as RichTable

    from kvtier.errors import LedgerError
    from kvtier.vmm.ledger import ledgers, snapshot

    def table(directory: str) -> Any:
        out = RichTable(title=f"kvtier processes (ledgers in {directory})", title_justify="left")
        for column in ("device", "pid", "name", "priority", "pages", "GPU memory", "limit", "of the device",
                       "cache hits", "tokens saved", "hits from"):
            out.add_column(column, justify="left" if column in ("device", "name", "hits from") else "right")
        for path in ledgers(directory):
            device = path.rsplit("kvtier-ledger-", 1)[1]
            try:
                books = snapshot(path)
            except LedgerError as exc:
                out.add_row(device, "", f"[red]{escape(str(exc))}[/red]", end_section=True)
                continue
            page = books.get("page_size", 0)
            budget = books.get("budget_pages", 0)
            for proc in sorted(books["procs"].values(), key=lambda p: (-p["priority"], p["pid"])):
                limit = proc["limit_pages"]
                out.add_row(device, str(proc["pid"]), escape(proc["name"]), str(proc["priority"]), str(proc["pages"]),
                            _size(proc["pages"] * page), "none" if limit is None else _size(limit * page),
                            f"{proc['pages'] / budget:.0%}" if budget else "n/a", *_cache_cells(proc.get("cache")))
            used = sum(p["pages"] for p in books["procs"].values())
            out.add_row(device, "", "[bold]all[/bold]", "", str(used), _size(used * page), _size(budget * page),
                        f"{used / budget:.0%}" if budget else "n/a", end_section=True)
        return out
    return table


def _cache_cells(cache: dict[str, int] | None) -> tuple[str, str, str]:
    """A process's prefix-cache counters as the ledger has them: blocks found, tokens not computed, and where the
    blocks it shared rested (gpu, host, nvme..., remote)."""
    if not cache:
        return "", "", ""
    where = ", ".join(f"{k.removeprefix('from_')} {v}" for k, v in sorted(cache.items())
                      if k.startswith("from_") and v)
    return str(cache.get("hit_blocks", 0)), str(cache.get("tokens_saved", 0)), where


@main.command("ls")
@_LEDGER_DIR
def ls_command(ledger_dir: str) -> None:
    """The kvtier processes sharing each device (from the ledgers): pages, limits, priorities, prefix-cache hits."""
    console.print(_ledger_table()(ledger_dir))


@main.command("top")
@_LEDGER_DIR
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.05), help="Seconds between "
              "refreshes.")
@click.option("--count", default=0, type=click.IntRange(0), help="Stop after this many refreshes (0: never).")
def top_command(ledger_dir: str, interval: float, count: int) -> None:
    """kvtier ls, refreshed until interrupted."""
    import time

    from rich.live import Live

    render, shown = _ledger_table(), 0
    with Live(render(ledger_dir), console=console, refresh_per_second=max(1, int(1 / interval))) as live:
        while count == 0 or shown < count:
            time.sleep(interval)
            live.update(render(ledger_dir))
            shown += 1


@main.command("limit")
@click.argument("pid", type=int)
@click.argument("size")
@_LEDGER_DIR
def limit_command(pid: int, size: str, ledger_dir: str) -> None:
    """Set process PID's share of its device to SIZE (e.g. 20GiB; "none": no limit beyond its pool_budget). A
    lower share takes effect as its unused pages go back; pages in use go as they come free."""
    from kvtier.config import _size as parse_size
    from kvtier.errors import LedgerError
    from kvtier.vmm.ledger import ledgers, set_limit

    try:
        limit = None if size == "none" else int(parse_size(size))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="SIZE") from None
    matched = 0
    for path in ledgers(ledger_dir):
        try:
            matched += set_limit(path, pid, limit)
        except LedgerError as exc:
            raise click.ClickException(str(exc)) from None
    if not matched:
        raise click.ClickException(f"no live kvtier process with pid {pid} in the ledgers under {ledger_dir} "
                                   "(kvtier ls lists them)")
    console.print(f"pid {pid}: limit {size}")


def run() -> None:
    """The console script: kvtier's own errors print as one clear message, not a traceback."""
    try:
        main(standalone_mode=False)
    except click.exceptions.Abort:
        raise SystemExit(130) from None
    except click.ClickException as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except kvtier.KVTierError as exc:
        console.print(f"[red]error[/red] {escape(str(exc))}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    run()
