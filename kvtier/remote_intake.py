"""The read side of a remote cache's ``find``: the objects read for one lookup, checked and copied into fresh
blocks of its sequence one by one, then published (see :mod:`kvtier.remote`).

An object copied whole into a run of blocks is checked where it landed: its header in staging, its payload's
digest in the blocks after the copy (``digest_of_rows``; on the GPU queued after the copy on its stream), all of a
lookup's waited for once before anything is published or returned; an object that fails takes the sequence back
to before it. An object copied in part, or into scattered blocks, is checked in staging before it is copied. On a
GPU the host digest was the largest part of a hit after the reads (H100, 3717152, a 4096-token Llama-3-8B hit
from Mooncake: 33-40 ms of checks in a 170-190 ms lookup, docs/experiments/remote_get.py)."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, Callable, Hashable, Sequence

import numpy as np
import torch

from kvtier import remote_objects as obj
from kvtier.errors import KVTierError
from kvtier.space import KVSpace
from kvtier.tiering.tiers.digest import ROW, digest_of_rows

if TYPE_CHECKING:
    from kvtier.remote import RemoteCache

log = logging.getLogger("kvtier.remote")


class Intake:
    """The groups read for one ``find``, checked and copied into fresh blocks of its sequence one by one."""

    def __init__(self, cache: RemoteCache, space: KVSpace, seq_id: Hashable, keys: Sequence[bytes], start: int,
                 have: int, stream: Any, name: Callable[[bytes], str], salt: bytes = b"") -> None:
        self.cache, self.space, self.seq_id, self.keys, self.stream = cache, space, seq_id, keys, stream
        self.name, self.salt = name, salt
        self.start, self.have, self.total = start, have, have  # chain positions: asked from, held, held now
        self.layout = obj.layout_id(space.layout_tag)
        self.owned: list[int] = []  # staging slots read into: given back when done
        self.cuda = space.kv(0)[0].is_cuda
        # objects copied before their payload's check: (its first block held, its last, the digest it must have,
        # the digest of what landed, where it landed; None: it failed in staging after its blocks were allocated)
        self.pending: list[tuple[int, int, bytes, torch.Tensor | None]] = []

    def take(self, first: int, last: int, slot: int, size: int) -> str | None:
        """Check the object of group ``first..last`` read into ``slot`` (all of it, or its end) and copy its blocks
        past ``total`` into new blocks of the sequence; None if it could, else why not: "gap" (it starts past
        ``total``), "bad"."""
        sp, cache = self.space, self.cache
        why, n, value = obj.check_header(cache._span(slot), size, list(self.keys[first:last + 1]), sp.num_regions,
                                         sp.block_bytes, self.layout)
        held = last + 1 - n  # the object's first block
        if why is None and held > self.total:
            cache._count("gets_gap")
            return "gap"
        landed_check = why is None and held == self.total and n * sp.block_bytes % ROW == 0  # all of it, in rows
        if why is None and not landed_check and not obj.payload_matches(cache._span(slot), n, sp.block_bytes,
                                                                  sp.num_regions, value):
            why = "its bytes changed (digest mismatch)"
        if why is not None:
            self._bad(first, last, why)
            return "bad"
        try:
            blocks = sp.allocate(self.seq_id, (last + 1 - self.start) * sp.block_size)[self.total - self.start:]
        except KVTierError as exc:  # no room for them now: the engine computes them
            cache._count("gets_no_room")
            log.info("remote hit of blocks %d..%d not taken: %s", self.total, last, exc)
            return "bad"
        if landed_check and blocks != list(range(blocks[0], blocks[0] + len(blocks))):  # scattered: in staging
            landed_check = False
            if not obj.payload_matches(cache._span(slot), n, sp.block_bytes, sp.num_regions, value):
                self._bad(first, last, "its bytes changed (digest mismatch)")
                self.pending.append((self.total, last, value, None))  # its blocks (not written) go at the end
                return "bad"
        landed = self._copy(blocks, n, self.total - held, slot, landed_check)
        if landed is not None:
            self.pending.append((self.total, last, value, landed))
        self.total = last + 1
        cache._remember(self.name(self.keys[last]))
        return None

    def _bad(self, first: int, last: int, why: str) -> None:
        self.cache._count("gets_bad")
        log.warning("remote object for blocks %d..%d is not served: %s", first, last, why)

    def _copy(self, blocks: list[int], n: int, skip: int, slot: int, check: bool) -> torch.Tensor | None:
        """Blocks ``skip..n`` of the group in ``slot`` into ``blocks``, every region (queued on the stream); with
        ``check`` (all of them, into a run), the digest of what landed, queued after the copy."""
        sp, bb, R = self.space, self.space.block_bytes, self.space.num_regions
        src = self.cache._payload(slot)[:R * n * bb].view(R, n * bb)[:, skip * bb:]  # a region's blocks a row
        with torch.cuda.stream(self.stream) if self.cuda and self.stream is not None else contextlib.nullcontext():
            if blocks == list(range(blocks[0], blocks[0] + len(blocks))):  # a run (fresh blocks mostly are): one copy
                rows = sp.block_rows(blocks[0], len(blocks))
                rows.copy_(src, non_blocking=self.cuda)
                return digest_of_rows(rows) if check else None
            idx = torch.as_tensor(blocks, dtype=torch.int64, device=sp.kv(0)[0].device)
            for r in range(R):
                tensor = sp.kv(r // 2)[r % 2]
                rows = src[r].view(tensor.dtype).view(len(blocks), *tensor.shape[1:])
                tensor.index_copy_(0, idx, rows.to(tensor.device, non_blocking=self.cuda))
            return None

    def _verify(self) -> None:
        """Wait for the digests of what landed; at the first object whose bytes changed (or that was not copied),
        take the sequence back to the blocks before it: they are published, and it holds just them."""
        if not self.pending:
            return
        landed = [d for _, _, _, d in self.pending if d is not None]
        with torch.cuda.stream(self.stream) if self.cuda and self.stream is not None else contextlib.nullcontext():
            got = iter(torch.stack(landed).cpu().numpy().view(np.uint64).tolist() if landed else [])
        for held, last, value, d in self.pending:
            if d is not None:
                a, b = next(got)
                if a.to_bytes(8, "little") + b.to_bytes(8, "little") == value:
                    continue
                self._bad(held, last, "its bytes changed (digest mismatch where they landed)")
            self.cache._forget(self.name(self.keys[last]))  # not known to be stored whole: a later offer sends it
            self._cut(held)
            break
        self.pending = []

    def abandon(self) -> None:
        """An error not of the store's: blocks not checked yet are not kept (the sequence goes back to before
        them), and the staging goes back."""
        try:
            if self.pending:
                self._cut(self.pending[0][0])
                self.pending = []
        finally:
            self.release()

    def _cut(self, stop: int) -> None:
        """The sequence holds chain positions ``start..stop`` and no more (``stop`` < ``total``): it is started
        again from its published blocks (those before ``stop``; the rest are freed with it)."""
        sp, keys = self.space, list(self.keys[self.start:stop])
        if keys:
            sp.publish(self.seq_id, keys, self.salt)
        sp.free(self.seq_id, self.stream)
        self.total = self.start + (sp.share_prefix(self.seq_id, keys) if keys else 0) // sp.block_size

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
        try:
            self._verify()
        finally:
            self.release()
        found = max(0, self.total - self.have)  # a cut may find fewer than were held (evicted meanwhile)
        with cache._lock:
            cache.counts["hit_blocks"] += found
            cache.counts["hit_bytes"] += found * sp.block_bytes * sp.num_regions
        if self.total > self.have:
            sp.publish(self.seq_id, list(self.keys[self.start:self.total]), self.salt)
        return (self.total - self.start) * sp.block_size
