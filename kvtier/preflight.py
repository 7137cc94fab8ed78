"""``kvtier config check``'s second half: whether a manager would start on *this* machine with a config.

The schema (:class:`kvtier.config.Config`) checks what a file says; this checks it against the machine, every
problem at once: the device, the page size against the backend's granularity, the pool budget against the
device's free memory, the host tier against the memory the process may use, the NVMe directory. When none is
found, a manager is started and closed, so that "ok" means the manager accepts the file here.
"""

from __future__ import annotations

import os

from kvtier.config import Config
from kvtier.errors import KVTierError
from kvtier.tiering.host import memory_limit
from kvtier.vmm import open_backend, resolve_device


def machine_problems(config: Config) -> list[tuple[str, str]]:
    """(setting, message) for each thing this machine would refuse of ``config`` at start; empty when a manager
    started with it."""
    try:
        device = resolve_device(config.device)
        backend = open_backend(device)
    except KVTierError as exc:
        return [("device", str(exc))]
    problems = []
    try:
        page = config.page_size or backend.default_page_size
        if page % backend.granularity:
            problems.append(("page_size", f"{page} is not a multiple of the {backend.name} backend's granularity "
                                          f"{backend.granularity} on {device}"))
        free = backend.free_memory()
        budget = int(free * config.pool_budget) if isinstance(config.pool_budget, float) else config.pool_budget
        if budget // page < 1:
            problems.append(("pool_budget", f"{budget} bytes is less than one page of {page} bytes"))
        elif budget > free:
            problems.append(("pool_budget", f"{budget} bytes is more than the {free} bytes free on {device}"))
    finally:
        backend.close()
    limit, what = memory_limit()
    if config.host_size > limit:
        problems.append(("host_size", f"{config.host_size} bytes is more than the {limit} bytes this process may "
                                      f"use ({what})"))
    if config.nvme_dir is not None:
        problem = _directory_problem(config.nvme_dir)
        if problem:
            problems.append(("nvme_dir", problem))
    if not problems:  # nothing found by looking: start one, so that "ok" means what it says
        try:
            from kvtier.manager import TierManager
            TierManager(config.replace(pool_ready=0, background_demotion=False)).close()
        except KVTierError as exc:
            problems.append(("", str(exc)))
    return problems


def _directory_problem(path: str) -> str | None:
    """Why a slot file could not be made under ``path`` (it may not exist yet: its nearest parent must be
    writable), or None."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe!r} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe!r} is not writable by this user"
    return None
