"""A small registry of named policies; unknown names fail with the list of known ones."""

from __future__ import annotations

from typing import Any, Callable

from kvtier.errors import ConfigError

_POLICIES: dict[str, Callable[..., Any]] = {}


def register_policy(name: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        _POLICIES[name] = cls
        return cls
    return add


def make_policy(name: str, **params: Any) -> Any:
    if name not in _POLICIES:
        raise ConfigError(f"policy {name!r} is unknown (known: {', '.join(sorted(_POLICIES))})")
    return _POLICIES[name](**params)


def known_policies() -> list[str]:
    return sorted(_POLICIES)
