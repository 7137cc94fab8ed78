"""``kvtier config check``'s second half: whether a manager would start on *this* machine with a config.

The schema (:class:`kvtier.config.Config`) checks what a file says; this checks it against the machine, every
problem at once: the device (one page is created and released on it), the page size against the backend's
granularity, the pool budget against the device's free memory, the host tier against the memory the process may
use, the NVMe directory and the room on its disk, the ledger directory and the live processes' page size, and
the policy built with its parameters (a plug-in's or a ``module:Class``'s code runs here, as it would at start).

Nothing is written: no directory, lock or slot file is made (a check on a production machine must not leave
files behind or take locks others wait on).
"""

from __future__ import annotations

import os

from kvtier.config import Config, policy_problem
from kvtier.errors import KVTierError
from kvtier.tiering.tiers.host import memory_limit
from kvtier.vmm import open_backend, resolve_device


def machine_problems(config: Config) -> list[tuple[str, str]]:
    """(setting, message) for each thing this machine would refuse of ``config`` at start; empty when none."""
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
        else:
            try:  # the driver takes a page of this size (released at once)
                backend.release(backend.create(page))
            except KVTierError as exc:
                problems.append(("page_size", f"a page of {page} bytes cannot be created on {device}: {exc}"))
        free = backend.free_memory()
        budget = int(free * config.pool_budget) if isinstance(config.pool_budget, float) else config.pool_budget
        if budget // page < 1:
            problems.append(("pool_budget", f"{budget} bytes is less than one page of {page} bytes"))
        elif budget > free:
            problems.append(("pool_budget", f"{budget} bytes is more than the {free} bytes free on {device}"))
        if config.ledger_dir is not None:
            problems += _ledger_problems(config, backend.device_key, page)
    finally:
        backend.close()
    limit, what = memory_limit()
    if "host" in config.tiers and config.host_size > limit:
        problems.append(("host_size", f"{config.host_size} bytes is more than the {limit} bytes this process may "
                                      f"use ({what})"))
    if "nvme" in config.tiers and config.nvme_size:
        problem = _directory_problem(config.nvme_dir or _tempdir(), config.nvme_size if config.nvme_preallocate
                                     else 0)
        if problem:
            problems.append(("nvme_dir", problem))
    policy = policy_problem(config)
    if policy:
        problems.append(policy)
    if config.remote_backend:
        unreachable = remote_problem(config)
        if unreachable:
            problems.append(unreachable)
    from kvtier.tiering.tiers.registry import section_problems, tier_class, tier_settings
    problems += [p for p in section_problems(config, load=True) if p not in problems]
    if not any(where.startswith("tier") for where, _ in problems):
        for name in config.tiers:  # a tier that would be unavailable here (the peer tier without a peer) says why
            cls = tier_class(name)
            why = cls.problem(tier_settings(cls, config), device) if hasattr(cls, "problem") else None
            if why:
                problems.append((f"tier_settings.{name}", why))
    return problems


def _tempdir() -> str:
    import tempfile
    return tempfile.gettempdir()


def _nearest(path: str) -> str:
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return probe


def _directory_problem(path: str, room: int = 0) -> str | None:
    """Why a slot file of ``room`` bytes could not be made under ``path`` (it may not exist yet: its nearest
    parent must be writable), or None."""
    probe = _nearest(path)
    if not os.path.isdir(probe):
        return f"{probe!r} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe!r} is not writable by this user"
    if room:
        stat = os.statvfs(probe)
        free = stat.f_bavail * stat.f_frsize
        if room > free:
            return (f"{path!r} has {free} bytes free, and nvme_size reserves {room} there at start; lower nvme_size, "
                    "free room, or set [nvme] preallocate = false")
    return None


def _ledger_problems(config: Config, device_key: str, page: int) -> list[tuple[str, str]]:
    """Whether this process could join the device's ledger (read only: the books are not locked or written)."""
    from kvtier.vmm.ledger import ledger_path, live_page_sizes
    directory = config.ledger_dir or ""  # only called with a ledger_dir
    problem = _directory_problem(directory)
    if problem:
        return [("ledger_dir", problem)]
    live = live_page_sizes(ledger_path(directory, device_key))
    other = {size for size in live.values() if size != page}
    if other:
        return [("page_size", f"the live processes on the device's ledger ({', '.join(live)}) count pages of "
                              f"{', '.join(map(str, sorted(other)))} bytes, this config {page}: give every process "
                              "on the device one page_size")]
    return []


REMOTE_CHECK_S = 15.0  # Mooncake's client retries its setup for seconds against a master that is not there


def remote_problem(config: Config) -> tuple[str, str] | None:
    """Whether the ``[remote]`` store answers: connected and asked for one key, within ``REMOTE_CHECK_S``."""
    import threading

    import numpy as np

    from kvtier.remote_store import open_store
    where = config.remote_address if config.remote_backend == "valkey" else config.remote_master
    setting = "remote_address" if config.remote_backend == "valkey" else "remote_master"
    outcome: list[BaseException | None] = []

    def ask() -> None:
        try:
            store = open_store(config, np.zeros(4096, dtype=np.uint8))
            try:
                store.exists(["kvtier/check"])
            finally:
                store.close()
            outcome.append(None)
        except Exception as exc:  # noqa: BLE001 - reported, whatever the client raised
            outcome.append(exc)
    thread = threading.Thread(target=ask, name="kvtier-remote-check", daemon=True)
    thread.start()
    thread.join(REMOTE_CHECK_S)
    if not outcome:
        return setting, f"the {config.remote_backend} store at {where} did not answer within {REMOTE_CHECK_S:g} s"
    if outcome[0] is not None:
        return setting, (f"the {config.remote_backend} store at {where} cannot be used: {outcome[0]} (kvtier would "
                         "run without it, every lookup a miss)")
    return None
