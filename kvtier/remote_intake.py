"""The read side of a remote cache's ``find``: the objects read for one lookup, checked and copied into fresh
blocks of its sequence one by one, then published (see :mod:`kvtier.remote`)."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, Callable, Hashable, Sequence

import torch

from kvtier import remote_objects as obj
from kvtier.errors import KVTierError
from kvtier.space import KVSpace

if TYPE_CHECKING:
    from kvtier.remote import RemoteCache

log = logging.getLogger("kvtier.remote")


class Intake:
    """The groups read for one ``find``, checked and copied into fresh blocks of its sequence one by one."""

    def __init__(self, cache: RemoteCache, space: KVSpace, seq_id: Hashable, keys: Sequence[bytes], start: int,
                 have: int, stream: Any, name: Callable[[bytes], str]) -> None:
        self.cache, self.space, self.seq_id, self.keys, self.stream = cache, space, seq_id, keys, stream
        self.name = name
        self.start, self.have, self.total = start, have, have  # chain positions: asked from, held, held now
        self.layout = obj.layout_id(space.layout_tag)
        self.owned: list[int] = []  # staging slots read into: given back when done
        self.cuda = space.kv(0)[0].is_cuda

    def take(self, first: int, last: int, slot: int, size: int) -> str | None:
        """Check the object of group ``first..last`` read into ``slot`` (all of it, or its end) and copy its blocks
        past ``total`` into new blocks of the sequence; None if it could, else why not: "gap" (it starts past
        ``total``), "bad"."""
        sp, cache = self.space, self.cache
        why, n = obj.check(cache._span(slot), size, list(self.keys[first:last + 1]), sp.num_regions,
                           sp.block_bytes, self.layout)
        if why is not None:
            cache._count("gets_bad")
            log.warning("remote object for blocks %d..%d is not served: %s", first, last, why)
            return "bad"
        held = last + 1 - n  # the object's first block
        if held > self.total:
            cache._count("gets_gap")
            return "gap"
        try:
            blocks = sp.allocate(self.seq_id, (last + 1 - self.start) * sp.block_size)[self.total - self.start:]
        except KVTierError as exc:  # no room for them now: the engine computes them
            cache._count("gets_no_room")
            log.info("remote hit of blocks %d..%d not taken: %s", self.total, last, exc)
            return "bad"
        self._copy(blocks, n, self.total - held, slot)
        self.total = last + 1
        cache._remember(self.name(self.keys[last]))
        return None

    def _copy(self, blocks: list[int], n: int, skip: int, slot: int) -> None:
        """Blocks ``skip..n`` of the group in ``slot`` into ``blocks``, every region (queued on the stream)."""
        sp, bb, R = self.space, self.space.block_bytes, self.space.num_regions
        src = self.cache._payload(slot)[:R * n * bb].view(R, n * bb)[:, skip * bb:]  # a region's blocks a row
        with torch.cuda.stream(self.stream) if self.cuda and self.stream is not None else contextlib.nullcontext():
            if blocks == list(range(blocks[0], blocks[0] + len(blocks))):  # a run (fresh blocks mostly are): one copy
                sp.block_rows(blocks[0], len(blocks)).copy_(src, non_blocking=self.cuda)
                return
            idx = torch.as_tensor(blocks, dtype=torch.int64, device=sp.kv(0)[0].device)
            for r in range(R):
                tensor = sp.kv(r // 2)[r % 2]
                rows = src[r].view(tensor.dtype).view(len(blocks), *tensor.shape[1:])
                tensor.index_copy_(0, idx, rows.to(tensor.device, non_blocking=self.cuda))

    def release(self) -> None:
        """The copies landed (waited for); the staging read into goes back."""
        if self.cuda and self.owned:
            (self.stream or torch.cuda.current_stream(self.space.kv(0)[0].device)).synchronize()
        with self.cache._lock:
            self.cache._give(self.owned)
        self.owned = []

    def finish(self) -> int:
        """The staging goes back, the new blocks are published; the tokens the sequence holds."""
        sp, cache = self.space, self.cache
        self.release()
        with cache._lock:
            cache.counts["hit_blocks"] += self.total - self.have
            cache.counts["hit_bytes"] += (self.total - self.have) * sp.block_bytes * sp.num_regions
        if self.total > self.have:
            sp.publish(self.seq_id, list(self.keys[self.start:self.total]))
        return (self.total - self.start) * sp.block_size
