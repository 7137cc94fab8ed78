"""Real stores on 127.0.0.1 for the remote cache's tests (``kvtier.bench.stores``): a test whose store this
machine cannot run is skipped with the reason."""

from __future__ import annotations

from typing import Any, Callable

import pytest

from kvtier.bench.stores import Store, StoreUnavailable, free_port, start_mooncake, start_valkey

__all__ = ["START", "Store", "free_port"]


def _or_skip(start: Callable[..., Store]) -> Callable[..., Store]:
    def started(*args: Any, **kwargs: Any) -> Store:
        try:
            return start(*args, **kwargs)
        except StoreUnavailable as exc:
            pytest.skip(str(exc))
    return started


START = {"valkey": _or_skip(start_valkey), "mooncake": _or_skip(start_mooncake)}
