"""Shared pieces of the benchmarks: the system header, timers and result tables."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from kvtier.tiering.tiers.nvme import io_mode


def system_info(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on (printed first, stored in the JSON)."""
    info: dict[str, Any] = {"host": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                            "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), torch_cuda=torch.version.cuda)
        try:
            from cuda.bindings import driver
            _, v = driver.cuDriverGetVersion()
            info["driver_cuda"] = f"{v // 1000}.{v % 1000 // 10}"
        except ImportError:
            pass
        for name in ("current_link_speed", "current_link_width", "numa_node"):  # the PCIe link the copies cross
            path = f"/sys/bus/pci/devices/{_pci_bus_id(device)}/{name}"
            if os.path.exists(path):
                info[f"pcie_{name.removeprefix('current_')}"] = open(path).read().strip()
    else:
        info["cpu"] = platform.processor() or platform.machine()
    info["nvme_io"] = io_mode(device)
    return info


def host_facts(directory: str | None = None) -> dict[str, Any]:
    """Host memory, and the filesystem (and its mount) that the NVMe tier's directory is on."""
    facts: dict[str, Any] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                facts["host_memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    if directory:
        best = ("", "?", "?")
        with open("/proc/mounts") as f:
            for line in f:
                dev, mount, fstype = line.split()[:3]
                if os.path.realpath(directory).startswith(mount) and len(mount) > len(best[0]):
                    best = (mount, fstype, dev)
        facts.update(nvme_dir=directory, filesystem=f"{best[1]} on {best[2]} (mounted at {best[0]})")
    return facts


def _pci_bus_id(device: torch.device) -> str:
    try:
        props = torch.cuda.get_device_properties(device)
        return f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    except (AttributeError, RuntimeError):
        return "unknown"


def random_model(config: Any, device: torch.device) -> Any:
    """A LlamaForCausalLM with random weights: bf16 made on the GPU (no fp32 copy of billions of weights on the
    way), fp32 on the CPU."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        with torch.device(device):
            return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)


def with_scratch_dir(run: Callable[..., Any]) -> Callable[..., Any]:
    """For a bench's ``run(..., nvme_dir=None)``: without a directory given, a temporary one, removed after."""
    @functools.wraps(run)
    def wrapped(*args: Any, nvme_dir: str | None = None, **kwargs: Any) -> Any:
        with _scratch(nvme_dir) as directory:
            return run(*args, nvme_dir=directory, **kwargs)
    return wrapped


@contextlib.contextmanager
def _scratch(given: str | None) -> Iterator[str]:
    if given:
        yield given
        return
    directory = tempfile.mkdtemp(prefix="kvtier-bench-")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def time_host(fn: Callable[[], Any], repeat: int, warmup: int = 2) -> list[float]:
    """Wall times (s) of ``fn`` on the host (for CPU-side work such as mapping)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def time_device(fn: Callable[[], Any], device: torch.device, repeat: int, warmup: int = 3) -> list[float]:
    """Times (s) of ``fn``'s device work: CUDA events on a GPU, wall time on the CPU."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        return time_host(fn, repeat, warmup=0)
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


@dataclass
class Table:
    """One result table: printed with rich, stored in the JSON as a list of row dicts."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # name -> (x, y) points, for plots

    def add(self, *row: Any) -> None:
        self.rows.append(list(row))

    def as_json(self) -> dict[str, Any]:
        out = {"title": self.title, "rows": [dict(zip(self.columns, r)) for r in self.rows], "notes": self.notes}
        if self.series:
            out["series"] = self.series
        return out

    def render(self) -> Any:
        from rich.table import Table as RichTable
        table = RichTable(title=self.title, title_justify="left")
        for c in self.columns:  # fold, never cut: a narrow terminal wraps a header instead of "map+acce…"
            table.add_column(c, justify="right" if c != self.columns[0] else "left", overflow="fold")
        for r in self.rows:
            table.add_row(*[_fmt(v) for v in r])
        if self.notes:
            table.caption = "\n".join(self.notes)
            table.caption_justify = "left"
        return table


def _fmt(value: Any) -> str:
    if value is None:  # not measurable on this machine (e.g. kvikio without a CUDA driver)
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)
