"""One immutable configuration object for a :class:`kvtier.TierManager`.

Every field has a default, so ``Config()`` works anywhere. Settings that operators flip without touching code
also read an environment variable, named next to each field (the variable only changes the default; an explicit
keyword wins).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

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
    """

    device: str = field(default_factory=lambda: os.environ.get("KVTIER_DEVICE", "auto"))
    page_size: int | None = None
    pool_budget: int | float = 0.9
    pool_ready: int = 256 * MiB
    space_reserve_pages: int = 2
    debug_checks: bool = field(default_factory=lambda: _env_bool("KVTIER_DEBUG", False))

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

    def replace(self, **changes: object) -> "Config":
        """A copy with some fields changed (validated like a new one)."""
        return dataclasses.replace(self, **changes)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
