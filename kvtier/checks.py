"""Checks of a public call's arguments: each bad one is an :class:`InvalidArgumentError` naming the argument and
what to pass, raised before anything changes."""

from __future__ import annotations

import operator
from typing import Any, Hashable, Iterable

from kvtier.errors import InvalidArgumentError

INT64 = 2**63  # priorities and ids live in numpy int64 books


def int_arg(name: str, value: Any, low: int = 0, high: int = INT64 - 1) -> int:
    """``value`` if it is an int (not a bool) in ``low..high``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgumentError(f"{name} must be an int in {low}..{high}, got {value!r}")
    return value


def seq_id_arg(seq_id: Any) -> Hashable:
    try:
        hash(seq_id)
    except TypeError:
        raise InvalidArgumentError(f"sequence id {seq_id!r} is not hashable (use an int or a str)") from None
    return seq_id


def seq_ids_arg(call: str, seq_ids: Any) -> list[Hashable]:
    """A list of sequence ids from an iterable of them (a lone string is not one: it would be its characters)."""
    if isinstance(seq_ids, (str, bytes)):
        raise InvalidArgumentError(f"{call} takes a list of sequence ids, got the string {seq_ids!r} (write "
                                   f"{call}([{seq_ids!r}]))")
    try:
        seqs = list(seq_ids)
    except TypeError:
        raise InvalidArgumentError(f"{call} takes a list of sequence ids, got {seq_ids!r}") from None
    for seq in seqs:
        seq_id_arg(seq)
    return seqs


def block_ids_arg(block_ids: Any) -> list[int]:
    """A list of block ids from an iterable of ints (numpy ints, one-element integer tensors)."""
    if isinstance(block_ids, (str, bytes)) or not isinstance(block_ids, Iterable):
        raise InvalidArgumentError(f"block ids must be a list of ints, got {block_ids!r}")
    ids = []
    for b in block_ids:
        try:
            ids.append(operator.index(b))
        except TypeError:
            raise InvalidArgumentError(f"block ids must be ints, got {b!r}") from None
    return ids
