"""KV found again by content: block keys, and the index of a space's whole blocks by key.

A block's key is a chained hash -- ``blake2b(parent key, layout fingerprint, salt, the block's token ids)``, 128
bits -- so equal keys mean the same tokens after the same prefix, in a space of the same layout (layers, KV
heads, head dim, dtype, block size) and model, for the same tenant (``salt``). Engines that hash blocks
themselves (vLLM, Dynamo) pass their own hashes through :func:`keys_from_hashes`, which folds the same
fingerprint and salt in.

A :class:`PrefixIndex` belongs to one space and maps keys to blocks that hold those bytes now: a block enters
when a sequence publishes it (``space.publish``); once no sequence holds it the space keeps it cached (held by a
private idle sequence: it goes down the tiers like any idle page); it leaves when it is really freed (``retain=
False``, or given way to live data under pressure), rewritten (``mark_written``), or its page is dropped or lost
-- so a key never leads to other bytes. ``lookup`` walks a request's keys and returns
the longest prefix held; ``space.share_prefix`` makes a new sequence hold those blocks (reference-counted,
wherever they rest: a hit below the GPU comes back with the sequence's ``prefetch``).
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import numpy as np

from kvtier.errors import InvalidArgumentError

KEY_BYTES = 16  # 128-bit keys: a 64-bit hash collides somewhere in a cluster's lifetime of blocks
ROOT = bytes(KEY_BYTES)  # the parent of a sequence's first block


def fingerprint(num_layers: int, num_kv_heads: int, head_dim: int, dtype: str, block_size: int,
                model: str = "") -> bytes:
    """What makes two spaces' bytes interchangeable: their layout and the model (an engine-given id)."""
    text = f"{num_layers}/{num_kv_heads}/{head_dim}/{dtype}/{block_size}/{model}"
    return hashlib.blake2b(text.encode(), digest_size=KEY_BYTES).digest()


def block_keys(tokens: Sequence[int], block_size: int, layout: bytes, salt: bytes = b"",
               parent: bytes = ROOT) -> list[bytes]:
    """Keys of the whole blocks of ``tokens`` (a trailing partial block has none), chained from ``parent``."""
    ids = np.asarray(tokens, dtype=np.int64)
    keys = []
    for start in range(0, len(ids) - block_size + 1, block_size):
        parent = _key(parent, layout, salt, ids[start:start + block_size].tobytes())
        keys.append(parent)
    return keys


def keys_from_hashes(hashes: Iterable[bytes | int], layout: bytes, salt: bytes = b"",
                     parent: bytes = ROOT) -> list[bytes]:
    """Keys from an engine's own per-block hashes (bytes, or ints below 2**128), chained the same way."""
    keys = []
    for h in hashes:
        raw = h.to_bytes(KEY_BYTES, "little") if isinstance(h, int) else bytes(h)
        parent = _key(parent, layout, salt, raw)
        keys.append(parent)
    return keys


def _key(parent: bytes, layout: bytes, salt: bytes, content: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    for part in (parent, layout, len(salt).to_bytes(4, "little"), salt, content):
        h.update(part)
    return h.digest()


def check_keys(keys: Sequence[bytes]) -> list[bytes]:
    if not isinstance(keys, (list, tuple)) or not all(isinstance(k, bytes) and len(k) == KEY_BYTES for k in keys):
        raise InvalidArgumentError(f"keys must be a list of {KEY_BYTES}-byte keys (kvtier.prefix.block_keys), got "
                                   f"{type(keys).__name__}")
    return list(keys)


class PrefixIndex:
    """Keys -> blocks of one space (see the module docstring); the space calls it under its manager's lock."""

    def __init__(self) -> None:
        self.block_of: dict[bytes, int] = {}
        self.key_of: dict[int, bytes] = {}
        self.salt_of: dict[int, bytes] = {}  # the tenant salt a block was published under (erase)
        self.hits = 0     # blocks found by lookups
        self.misses = 0   # lookups that stopped short of their last key
        self.shared: dict[str, int] = {}  # blocks shared into new sequences, by where they rested (gpu, host...)
        self.tokens_shared = 0  # tokens new sequences did not have to compute

    def add(self, keys: Sequence[bytes], blocks: Sequence[int], salt: bytes = b"") -> int:
        """Index ``blocks`` under ``keys`` (pairwise), published under ``salt``; a key held already keeps its
        block. Return how many were added."""
        added = 0
        for key, block in zip(keys, blocks):
            if key not in self.block_of and block not in self.key_of:
                self.block_of[key], self.key_of[block], self.salt_of[block] = block, key, salt
                added += 1
        return added

    def salted(self, salt: bytes) -> list[int]:
        """The blocks published under ``salt``."""
        return [b for b, s in self.salt_of.items() if s == salt]

    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """The blocks of the longest prefix of ``keys`` held, in order."""
        blocks = []
        for key in keys:
            block = self.block_of.get(key)
            if block is None:
                break
            blocks.append(block)
        self.hits += len(blocks)
        self.misses += len(blocks) < len(keys)
        return blocks

    def forget(self, blocks: Iterable[int]) -> None:
        """``blocks`` no longer hold what their keys say (freed, rewritten, dropped, lost)."""
        if not self.key_of:  # the common case: nothing published in this space
            return
        for block in blocks:
            key = self.key_of.pop(int(block), None)
            if key is not None:
                del self.block_of[key]
                del self.salt_of[int(block)]

    def counted(self, places: Sequence[str], tokens: int) -> None:
        """A share of blocks resting at ``places`` (one name a block), saving ``tokens``."""
        for place in places:
            self.shared[place] = self.shared.get(place, 0) + 1
        self.tokens_shared += tokens

    def stats(self) -> dict[str, object]:
        return {"blocks_indexed": len(self.block_of), "lookup_hit_blocks": self.hits,
                "lookups_short": self.misses, "shared_blocks": dict(self.shared), "tokens_shared": self.tokens_shared}

    def check(self, free: np.ndarray) -> None:
        assert len(self.block_of) == len(self.key_of) == len(self.salt_of), "prefix index: keys and blocks disagree"
        for key, block in self.block_of.items():
            assert self.key_of[block] == key and not free[block], f"prefix index: block {block} is free or mislabeled"
