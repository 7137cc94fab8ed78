"""A small registry of named policies. Third-party policies register through the entry-point group
``kvtier.policies`` or are named by a ``module:Class`` path; an unknown name fails with the list of known ones."""

from __future__ import annotations

import importlib
import inspect
import re
from importlib.metadata import entry_points
from typing import Any, Callable

from kvtier.errors import ConfigError

_POLICIES: dict[str, Callable[..., Any]] = {}


def register_policy(name: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        _POLICIES[name] = cls
        return cls
    return add


def _plugins() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group="kvtier.policies")}


def known_policies() -> list[str]:
    return sorted(set(_POLICIES) | set(_plugins()))


def policy_source(name: str) -> str | None:
    """Where the policy ``name`` would come from, without importing any code for it: "registered" (a built-in,
    or registered in this process), "plugin" (an entry point), "path" (a ``module:Class`` path), or None."""
    if name in _POLICIES:
        return "registered"
    if name in _plugins():
        return "plugin"
    if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", name):
        return "path"
    return None


def _resolve(name: str) -> Callable[..., Any]:
    if name in _POLICIES:
        return _POLICIES[name]
    plugins = _plugins()
    if name in plugins:
        return plugins[name].load()
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"[policy] name: {name!r} cannot be loaded ({exc})") from exc
    raise ConfigError(f"[policy] name: {name!r} is unknown (known: {', '.join(known_policies())}; "
                      "or give a 'module:Class' path)")


def make_policy(name: str, nvme_min_uses: int = 0, clock: Callable[[], float] | None = None, **params: Any) -> Any:
    """The policy ``name`` built with ``params`` (and ``clock`` when given), wrapped in the NVMe admission
    filter if ``nvme_min_uses``."""
    cls = _resolve(name)
    accepted = [p for p in inspect.signature(cls).parameters if p not in ("self", "clock", "args", "kwargs")]
    unknown = sorted(set(params) - set(accepted))
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in inspect.signature(cls).parameters.values()):
        raise ConfigError(f"[policy] {', '.join(unknown)}: not a parameter of the {name!r} policy (its parameters: "
                          f"{', '.join(accepted) or 'none'})")
    try:
        policy = cls(**params) if clock is None else cls(clock=clock, **params)
    except TypeError as exc:
        raise ConfigError(f"[policy] {name}: bad parameters {sorted(params)} ({exc})") from exc
    if nvme_min_uses:
        from kvtier.policies.admission import NvmeAdmission
        policy = NvmeAdmission(policy, nvme_min_uses)
    return policy
