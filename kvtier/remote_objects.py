"""The objects a remote cache stores: a group of a chain's consecutive whole blocks, named by the key of its last.

A chain of block keys (``kvtier.prefix``) is cut into groups from its start -- blocks ``0..G-1``, ``G..2G-1``,
... -- ``G`` chosen so that a group holds at most ``[remote] object_bytes``, and the last group may be short. A
group is stored under its last block's key: that key names every token before it, so the object can only hold
those blocks' KV, in that layout, for that model and tenant. Fewer keys than one a block: a Mooncake master has run
out of memory near 12.5 million keys. An object may hold only the end of its group -- blocks ``s..last`` -- when
its writer had the rest already sent as a shorter chain's last object (the next turn of a chat goes on from
there); a reader takes it if it holds the blocks before ``s``.

An object is a 4 KiB header and the payload: each region's blocks in order (region 0's blocks, then region 1's...),
padded to whole 4 KiB rows. The header holds the layout's fingerprint, the sizes, the payload's digest
(``kvtier.tiering.tiers.digest``), the keys of every block in the group and a blake2b check of itself; a reader
serves an object only if all of them match what it asked for, so a value overwritten, torn, from another layout or
under a colliding name is a miss.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any, Sequence

import numpy as np
import torch

from kvtier.tiering.tiers.digest import ROW, digest

MAGIC = b"KVTRMT01"
HEADER = 4096
_FIXED = struct.Struct("<8sIIQQ16s16s")  # magic, blocks, regions, block bytes, payload bytes, layout, digest
MAX_BLOCKS = (HEADER - _FIXED.size - 16) // 16  # keys of 16 bytes, then a 16-byte check


def layout_id(layout_tag: Sequence[Any]) -> bytes:
    return hashlib.blake2b(json.dumps(list(layout_tag)).encode(), digest_size=16).digest()


def group_blocks(block_bytes: int, regions: int, object_bytes: int) -> int:
    """Blocks a group holds: as many as ``object_bytes`` takes, at least one, at most what a header lists."""
    return max(1, min(MAX_BLOCKS, object_bytes // (block_bytes * regions)))


def groups(num_keys: int, per: int, start: int = 0) -> list[tuple[int, int]]:
    """The groups (first, last block) of a chain of ``num_keys`` blocks from the group holding ``start``."""
    return [(g, min(g + per, num_keys) - 1) for g in range(start - start % per, num_keys, per)]


def payload_bytes(blocks: int, block_bytes: int, regions: int) -> int:
    return -(-blocks * block_bytes * regions // ROW) * ROW


def seal(buf: np.ndarray, keys: Sequence[bytes], regions: int, block_bytes: int, layout: bytes,
         value: tuple[int, int] | None = None) -> int:
    """Write the header of the object whose payload lies in ``buf[HEADER:]`` (``value``: its digest, taken where
    the bytes came from; None: taken here); return the object's size."""
    size = payload_bytes(len(keys), block_bytes, regions)
    payload = torch.from_numpy(buf[HEADER:HEADER + size])
    payload[len(keys) * block_bytes * regions:] = 0  # the padding: part of what the digest covers
    a, b = digest(payload) if value is None else value
    head = _FIXED.pack(MAGIC, len(keys), regions, block_bytes, size, layout,
                       a.to_bytes(8, "little") + b.to_bytes(8, "little")) + b"".join(keys)
    buf[:len(head)] = np.frombuffer(head, dtype=np.uint8)
    buf[len(head):len(head) + 16] = np.frombuffer(hashlib.blake2b(head, digest_size=16).digest(), dtype=np.uint8)
    return HEADER + size


def check_header(buf: np.ndarray, size: int, keys: Sequence[bytes], regions: int, block_bytes: int,
                 layout: bytes) -> tuple[str | None, int, bytes]:
    """Whether the object of ``size`` bytes in ``buf`` is, by its header, the group of ``keys`` (or its end) in
    this layout: why not (None: it is), how many of the last ``keys`` it holds, and the digest its payload must have
    (16 bytes: two little-endian words, as :func:`digest` gives them; :func:`payload_matches` checks it in
    staging, ``digest_of_rows`` where the payload landed)."""
    if size < HEADER:
        return "shorter than its header", 0, b""
    raw = buf[:HEADER].tobytes()
    magic, blocks, regs, bb, nbytes, lay, value = _FIXED.unpack_from(raw)
    head_len = _FIXED.size + 16 * blocks if magic == MAGIC and blocks <= MAX_BLOCKS else 0
    if not head_len or hashlib.blake2b(raw[:head_len], digest_size=16).digest() != raw[head_len:head_len + 16]:
        return "not a kvtier object, or its header changed", 0, b""
    if (lay, regs, bb) != (layout, regions, block_bytes):
        return "another layout", 0, b""
    if not 0 < blocks <= len(keys) or raw[_FIXED.size:head_len] != b"".join(keys[len(keys) - blocks:]) or \
            nbytes != payload_bytes(blocks, bb, regs):
        return "another chain of blocks", 0, b""
    if size != HEADER + nbytes:
        return f"{size} bytes where its header says {HEADER + nbytes}", 0, b""
    return None, blocks, value


def payload_matches(buf: np.ndarray, blocks: int, block_bytes: int, regions: int, value: bytes) -> bool:
    """Whether the payload in ``buf`` (after the header) of an object of ``blocks`` has the digest ``value``."""
    nbytes = payload_bytes(blocks, block_bytes, regions)
    a, b = digest(torch.from_numpy(buf[HEADER:HEADER + nbytes]))
    return a.to_bytes(8, "little") + b.to_bytes(8, "little") == value
