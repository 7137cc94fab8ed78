"""One immutable configuration object for a :class:`kvtier.TierManager`.

Every field has a default, so ``Config()`` works anywhere. Settings that operators flip without touching code
also read an environment variable, named next to each field (the variable only changes the default; an explicit
keyword wins).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from kvtier.errors import ConfigError

MiB = 1 << 20
GiB = 1 << 30


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Config:
    """Settings of one manager (one device's page pool and the spaces on it).

    device: ``"auto"`` (the current CUDA device when a usable one is present, else ``"cpu"``), ``"cuda"``,
        ``"cuda:N"`` or ``"cpu"``. Env ``KVTIER_DEVICE``.
    page_size: bytes of one physical page (one handle). A multiple of the backend's granularity (2 MiB on CUDA,
        4 KiB on the CPU backend). ``None`` takes the backend's default, 8 MiB, chosen by measurement (README):
        bigger pages map faster (the driver's cost is per handle), smaller pages evict finer.
    pool_budget: the most memory the page pool may hold: bytes (int), or a fraction (float in (0, 1]) of the
        device's free memory when the manager starts.
    pool_ready: bytes of created-but-unused pages the pool keeps ahead of need, so that creating handles
        (slow on CUDA) stays off the allocation path. The pool refills below half of it and releases above
        twice of it (hysteresis). 0 turns ahead-of-need creation off.
    space_reserve_pages: empty pages a space keeps mapped after its sequences free them, to avoid churn.
        The pool reclaims them when it runs short.
    debug_checks: check residency of every block handed to ``space.check_resident`` and the books after
        every operation. Env ``KVTIER_DEBUG``.

    Tiers below the GPU (the defaults give a working three-tier setup anywhere):
    host_size: bytes of page-locked host memory for demoted pages; pinned in ``host_chunk`` pieces by a
        background thread, usable while it grows.
    nvme_dir: directory of the NVMe slot file (``None``: a fresh temporary directory, removed at close).
        Env ``KVTIER_NVME_DIR``. nvme_size: its size cap. nvme_threads: I/O threads (kvikio's pool on GPU
        machines, a POSIX pool elsewhere). nvme_direct: use O_DIRECT where the filesystem allows it.
    gpu_low_watermark / gpu_high_watermark: fractions of the pool budget. When fewer pages than the low mark
        are free, the background demoter moves idle pages down until the high mark is free.
    host_high_watermark / host_low_watermark: fractions of the host tier; above the high mark its coldest
        pages cascade to NVMe until the low mark.
    keep_copies: a page brought back up keeps its host/NVMe copy until a token is allocated in it again, so
        offloading it once more unmaps it without copying (KV is append-only: an engine writes a token's K/V once,
        after ``allocate`` covers it). Copies are dropped first whenever a tier runs short. Turn off for an engine
        that rewrites K/V in place.
    demote_on_allocate: an ``allocate``/``prefetch`` that finds no page demotes idle pages synchronously
        instead of failing.
    background_demotion: run the background demoter.
    policy: the eviction policy: a registered name (``lru``, ``lfu``, ``priority``, entry-point plug-ins) or a
        ``module:Class`` path; policy_params: its keyword arguments. nvme_min_uses: NVMe admission filter, only
        pages used at least this often go to NVMe (0: off).
    spaces: per-space defaults by space name, ``{"name": {"quota_bytes": ..., "priority": ...}}``, used by
        ``create_space`` when it is not given them.
    """

    device: str = field(default_factory=lambda: os.environ.get("KVTIER_DEVICE", "auto"))
    page_size: int | None = None
    pool_budget: int | float = 0.9
    pool_ready: int = 256 * MiB
    space_reserve_pages: int = 2
    debug_checks: bool = field(default_factory=lambda: _env_bool("KVTIER_DEBUG", False))
    host_size: int = 1 * GiB
    host_chunk: int = 128 * MiB
    nvme_dir: str | None = field(default_factory=lambda: os.environ.get("KVTIER_NVME_DIR"))
    nvme_size: int = 4 * GiB
    nvme_threads: int = 4
    nvme_direct: bool = True
    gpu_low_watermark: float = 0.05
    gpu_high_watermark: float = 0.10
    host_high_watermark: float = 0.90
    host_low_watermark: float = 0.80
    keep_copies: bool = True
    demote_on_allocate: bool = True
    background_demotion: bool = True
    policy: str = "lru"
    policy_params: Mapping[str, Any] = field(default_factory=dict)
    nvme_min_uses: int = 0
    spaces: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not self.device:
            raise ConfigError(f"device: {self.device!r} is not a device (use 'auto', 'cpu', 'cuda' or 'cuda:N')")
        if self.page_size is not None and (not _is_int(self.page_size) or self.page_size <= 0):
            raise ConfigError(f"page_size: {self.page_size!r} is not a positive number of bytes (e.g. {2 * MiB})")
        budget = self.pool_budget
        if isinstance(budget, float):
            if not 0.0 < budget <= 1.0:
                raise ConfigError(f"pool_budget: fraction {budget} is outside (0, 1] (use e.g. 0.9, or bytes)")
        elif not _is_int(budget) or budget <= 0:
            raise ConfigError(f"pool_budget: {budget!r} is neither bytes > 0 nor a fraction in (0, 1]")
        if not _is_int(self.pool_ready) or self.pool_ready < 0:
            raise ConfigError(f"pool_ready: {self.pool_ready!r} is not a number of bytes >= 0")
        if not _is_int(self.space_reserve_pages) or self.space_reserve_pages < 0:
            raise ConfigError(f"space_reserve_pages: {self.space_reserve_pages!r} is not a count >= 0")
        for name in ("host_size", "host_chunk", "nvme_size"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not a number of bytes >= 0")
        if not _is_int(self.nvme_threads) or self.nvme_threads < 1:
            raise ConfigError(f"nvme_threads: {self.nvme_threads!r} is not a count >= 1")
        for low, high in (("gpu_low_watermark", "gpu_high_watermark"), ("host_low_watermark", "host_high_watermark")):
            lo, hi = getattr(self, low), getattr(self, high)
            if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and 0 <= lo <= hi <= 1):
                raise ConfigError(f"{low}/{high}: {lo!r}/{hi!r} must be fractions with 0 <= low <= high <= 1")

    @classmethod
    def from_file(cls, path: str, **overrides: Any) -> "Config":
        """Load a TOML config file (see ``configs/``); unknown keys and bad values raise ConfigError naming the
        file and the key. Keyword ``overrides`` win over the file."""
        from kvtier.config_file import load_file
        return cls._checked(load_file(path), str(path), overrides)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>", **overrides: Any) -> "Config":
        """The same, from a mapping shaped like the file (``{"gpu": {...}, "host": {...}, ...}``)."""
        from kvtier.config_file import parse_config
        return cls._checked(parse_config(data, source), source, overrides)

    @classmethod
    def _checked(cls, kwargs: dict[str, Any], source: str, overrides: Mapping[str, Any]) -> "Config":
        from kvtier.policies import make_policy
        try:
            config = cls(**{**kwargs, **overrides})
            make_policy(config.policy, config.nvme_min_uses, **dict(config.policy_params))  # checks its params
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        return config

    def replace(self, **changes: object) -> "Config":
        """A copy with some fields changed (validated like a new one)."""
        return dataclasses.replace(self, **changes)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
