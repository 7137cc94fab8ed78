"""The ``kvtier`` command: ``--version``, ``info`` and ``bench``."""

from __future__ import annotations

import json
import logging
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

import kvtier

console = Console()


def _device_facts(device: str) -> dict[str, Any]:
    from kvtier.vmm import cuda as vmm_cuda
    from kvtier.vmm import open_backend, resolve_device

    dev = resolve_device(device)
    facts = open_backend(dev).describe()
    if dev.type == "cpu" and device == "auto":
        facts["why"] = ("cuda-python is not installed (install kvtier[cu12] or kvtier[cu13])"
                        if vmm_cuda._drv is None else "torch sees no CUDA device")
    return facts


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(kvtier.__version__, prog_name="kvtier")
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
def main(verbose: bool) -> None:
    """kvtier: a virtual KV-cache address space on GPU virtual memory, with tiering."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")


@main.command()
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")
def info(device: str) -> None:
    """The backend kvtier would use here, and the facts about it."""
    for key, value in _device_facts(device).items():
        console.print(f"[bold]{key:>14}[/bold]  {escape(str(value))}")


def _bench_options(fn: Any) -> Any:
    fn = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")(fn)
    fn = click.option("--quick", is_flag=True, help="A short run (about a minute).")(fn)
    fn = click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True),
                      help="Also write the results to this JSON file.")(fn)
    return fn


def _run_bench(name: str, device: str, json_path: str | None, run: Any) -> None:
    """System header first, then each table; the same facts go to the JSON file."""
    from kvtier.bench.common import system_info
    from kvtier.vmm import resolve_device

    system = system_info(resolve_device(device))
    console.print("[bold]System[/bold]  " + escape("  ".join(f"{k}={v}" for k, v in system.items())))
    tables = run()
    for table in tables:
        console.print(table.render())
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"benchmark": name, "system": system, "tables": [t.as_json() for t in tables]}, f, indent=1)


@main.group(invoke_without_command=True)
@_bench_options
@click.pass_context
def bench(ctx: click.Context, device: str, quick: bool, json_path: str | None) -> None:
    """Benchmarks; with no sub-command, run them all."""
    if ctx.invoked_subcommand is None:
        from kvtier.bench import tiers, vmm

        _run_bench("all", device, json_path,
                   lambda: vmm.run(device, quick=quick) + tiers.run(device, quick=quick))


@bench.command("vmm")
@_bench_options
def bench_vmm(device: str, quick: bool, json_path: str | None) -> None:
    """Map/unmap cost vs page size, allocate latency, decode-attention overhead."""
    from kvtier.bench import vmm

    _run_bench("vmm", device, json_path, lambda: vmm.run(device, quick=quick))


@bench.command("tiers")
@_bench_options
@click.option("--nvme-dir", type=click.Path(file_okay=False), help="Where the NVMe tier's file goes (default: a "
              "temporary directory; point it at the NVMe you will deploy on).")
def bench_tiers(device: str, quick: bool, json_path: str | None, nvme_dir: str | None) -> None:
    """Bandwidth of every tier path for a whole sequence, against same-run PCIe and disk ceilings."""
    from kvtier.bench import tiers

    _run_bench("tiers", device, json_path, lambda: tiers.run(device, quick=quick, nvme_dir=nvme_dir))


@main.group()
def config() -> None:
    """Check and show policy config files (TOML)."""


@config.command("check")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
def config_check(files: tuple[str, ...]) -> None:
    """Validate FILES; print every problem with its file and key; exit 1 if any file is bad."""
    from kvtier.config import Config

    bad = 0
    for path in files:
        try:
            Config.from_file(path)
            console.print(f"[green]ok[/green]  {escape(path)}")
        except kvtier.ConfigError as exc:
            bad += 1
            console.print(f"[red]bad[/red] {escape(str(exc))}")
    if bad:
        raise SystemExit(1)


@config.command("show")
@click.argument("file", type=click.Path(dir_okay=False))
def config_show(file: str) -> None:
    """Every setting FILE gives, with the defaults filled in."""
    import dataclasses

    from kvtier.config import Config

    try:
        cfg = Config.from_file(file)
    except kvtier.ConfigError as exc:
        console.print(f"[red]bad[/red] {escape(str(exc))}")
        raise SystemExit(1) from None
    for f in dataclasses.fields(cfg):
        console.print(f"{f.name:>22} = {escape(repr(getattr(cfg, f.name)))}")


if __name__ == "__main__":
    main()
