"""Lower tiers are plug-ins: a class registered here (``@register_tier``) or found through the entry-point group
``kvtier.tiers``, named in ``[tiers] order``.

A tier class provides:
- ``name``: its name (``offload(tier=name)``, stats, metrics) and its TOML section, ``[tiers.NAME]``;
- ``Settings``: a pydantic model of that section (every field with a default); ``config check`` validates the
  section with it, and ``settings_from(config)`` may build it from other settings instead (the built-in tiers
  keep their historical sections, ``[host]`` and ``[nvme]``);
- ``open(settings, context) -> LowerTier``: the tier, built for one manager (see :class:`TierContext`).

Everything else -- slot books, routes, stats, watermarks -- is the :class:`~kvtier.tiering.state.tier.LowerTier` it
returns. ``docs/architecture.md`` ("Adding a tier") walks through one.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable, Mapping

from kvtier.errors import ConfigError

if TYPE_CHECKING:
    from kvtier.config import Config
    from kvtier.tiering.state.tier import LowerTier, TierStack

_BUILT_IN = {"host": "kvtier.tiering.tiers.host:HostTier", "nvme": "kvtier.tiering.tiers.nvme:NvmeTier",
             "peer": "kvtier.tiering.tiers.peer:PeerTier"}
_TIERS: dict[str, Any] = {}


@dataclass(frozen=True)
class TierContext:
    """What a tier is built with: the manager's device and backend, the slot size (one page of one region), the
    file layer the tests put under disk tiers (None: the real one), the tiers opened before it (nearer the GPU),
    and the manager's config (read-only: e.g. the ledger's directory, for a tier that shares a device's pages)."""

    device: Any
    backend: Any
    slot_size: int
    files: Any = None
    above: tuple["LowerTier", ...] = ()
    config: Any = None


def register_tier(cls: Any) -> Any:
    """Class decorator: make the tier class ``cls`` (see the module docstring) known as ``cls.name``."""
    _TIERS[cls.name] = cls
    return cls


def _plugins() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group="kvtier.tiers")}


def known_tiers() -> list[str]:
    return sorted(set(_BUILT_IN) | set(_TIERS) | set(_plugins()))


def tier_source(name: str) -> str | None:
    """Where the tier ``name`` would come from, without importing its code: "built-in", "registered" (in this
    process), "plugin" (an entry point), or None (unknown)."""
    if name in _TIERS:
        return "registered"
    if name in _BUILT_IN:
        return "built-in"
    if name in _plugins():
        return "plugin"
    return None


def tier_class(name: str) -> Any:
    """The class of the tier ``name`` (its code imported)."""
    if name in _TIERS:
        return _TIERS[name]
    if name in _BUILT_IN:
        module, _, attr = _BUILT_IN[name].partition(":")
        return getattr(importlib.import_module(module), attr)
    plugins = _plugins()
    if name in plugins:
        try:
            return plugins[name].load()
        except Exception as exc:  # noqa: BLE001 - a broken plug-in is a configuration problem
            raise ConfigError(f"[tiers] order: the tier {name!r} cannot be loaded ({exc})") from exc
    raise ConfigError(f"[tiers] order: {name!r} is not a tier (known: {', '.join(known_tiers())})")


def tier_settings(cls: Any, config: "Config") -> Any:
    """The settings of tier class ``cls`` under ``config``: its own ``settings_from(config)``, or its section
    ``[tiers.NAME]`` validated by its ``Settings`` model (ConfigError naming each bad key)."""
    if hasattr(cls, "settings_from"):
        return cls.settings_from(config)
    return validate_section(cls, config.tier_settings.get(cls.name, {}))


def validate_section(cls: Any, raw: Mapping[str, Any]) -> Any:
    from pydantic import ValidationError
    try:
        return cls.Settings(**dict(raw))
    except ValidationError as exc:
        problems = [(f"tier_settings.{cls.name}.{'.'.join(str(x) for x in e['loc'])}",
                     "unknown key" if e["type"] == "extra_forbidden" else
                     f"{e.get('input')!r}: {e['msg'].removeprefix('Value error, ')}") for e in exc.errors()]
        raise ConfigError("\n".join(f"[tiers.{cls.name}] {k.split('.', 2)[2]}: {m}" for k, m in problems),
                          problems) from None


def section_problems(config: "Config", load: bool = False) -> list[tuple[str, str]]:
    """What is wrong with ``[tiers]``: unknown tier names, sections of tiers not in the order, and the sections
    of tiers whose code is already loaded (registered in this process; every one with ``load``)."""
    problems: list[tuple[str, str]] = []
    for name in config.tiers:
        if tier_source(name) is None:
            problems.append(("tiers", f"{name!r} is not a tier (known: {', '.join(known_tiers())})"))
    if len(set(config.tiers)) != len(config.tiers):
        problems.append(("tiers", f"{list(config.tiers)}: each tier may appear once"))
    for name, raw in config.tier_settings.items():
        if name not in config.tiers:
            problems.append((f"tier_settings.{name}", f"settings of a tier not in [tiers] order "
                                                      f"({list(config.tiers)}): add it there, or remove the section"))
            continue
        source = tier_source(name)
        if source is None or (source == "plugin" and not load):
            continue
        cls = tier_class(name)
        if hasattr(cls, "settings_from"):
            problems.append((f"tier_settings.{name}", f"the {name} tier is set in its own section, not [tiers.{name}]"))
            continue
        try:
            validate_section(cls, raw)
        except ConfigError as exc:
            problems += exc.problems
    return problems


def open_stack(config: "Config", context: TierContext,
               opened: Callable[["LowerTier"], None] = lambda tier: None) -> "TierStack":
    """The configured tiers, opened nearest first (each sees the ones above it); if one fails to open, those
    opened already are closed and the error raised."""
    from kvtier.tiering.state.tier import TierStack
    tiers: list[LowerTier] = []
    try:
        for name in config.tiers:
            cls = tier_class(name)
            ctx = TierContext(context.device, context.backend, context.slot_size, context.files, tuple(tiers), config)
            tiers.append(cls.open(tier_settings(cls, config), ctx))
            opened(tiers[-1])
        return TierStack(tiers)
    except BaseException:
        for tier in reversed(tiers):
            tier.close()
        raise
