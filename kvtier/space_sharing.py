"""Sharing within a space: forks, copy on write, KV found by content (``kvtier/prefix.py``) and the cache of
published blocks no sequence holds any more. A :class:`SpaceSharing` belongs to one space (``space.sharing``),
whose public methods of the same names call it; it changes the space's books only through the space's own
transitions (``_allocate``, ``_free``, ``BlockBooks.share``/``swap``), under the manager's lock.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Hashable, Sequence

import numpy as np
import torch

from kvtier.checks import seq_id_arg
from kvtier.errors import InvalidArgumentError, NotResidentError, PagesInFlight
from kvtier.policies import PageRef
from kvtier.prefix import PrefixIndex, block_keys, check_keys, fingerprint
from kvtier.tiering import Tier

if TYPE_CHECKING:
    from kvtier.space import KVSpace


@dataclass(frozen=True)
class _CopyOf:
    """The private sequence that holds a copy on write's new blocks for a moment (see ``KVSpace.own``)."""

    seq_id: Hashable


@dataclass(frozen=True)
class _Cached:
    """The private sequence that keeps one published block once no sequence holds it (see ``KVSpace.free``)."""

    block: int


class SpaceSharing:
    """Forks, copy on write, the prefix index and the cached blocks of one :class:`KVSpace` (see the module
    docstring)."""

    def __init__(self, space: "KVSpace") -> None:
        self.space = space
        self.prefix = PrefixIndex()  # whole blocks by content (publish, share_prefix)
        self.cached: OrderedDict[_Cached, None] = OrderedDict()  # published blocks kept, oldest first

    def retain(self, blocks: list[int]) -> list[int]:
        """``blocks`` are about to be freed: keep the published ones whose data is there, each held by a private
        idle sequence of its own (demotable like any idle page, found by its key, dropped by ``evict_cached``);
        return the others."""
        if not self.prefix.key_of:
            return blocks
        sp, gone = self.space, self.gone(blocks)
        kept = {b for b, g in zip(blocks, gone) if not g and b in self.prefix.key_of}
        for b in kept:
            holder = _Cached(b)
            sp.block_books.share(holder, [b], sp.block_size)
            sp._offloaded.add(holder)
            self.cached[holder] = None
        return [b for b in blocks if b not in kept]

    def is_holder(self, seq_id: Hashable) -> bool:
        return isinstance(seq_id, _Cached)

    def dropped(self, seq_id: Hashable) -> None:
        """``seq_id`` was freed: if it held a cached block, that block is no longer cached."""
        if isinstance(seq_id, _Cached):
            del self.cached[seq_id]

    # --- forks and copy on write ----------------------------------------------------------------------------------
    def fork(self, parent: Hashable, child: Hashable, stream: Any = None) -> list[int]:
        """A new sequence ``child`` holding what ``parent`` holds, without copying its whole blocks: they are
        shared (each held by both, reference-counted, wherever they rest), and freed only when the last holder lets
        go. A partly filled last block is copied into a block of the child's own on ``stream`` (default: current),
        so that each goes on writing its own blocks: the parent's page holding it must be on the GPU (prefetch the
        parent first). Return the child's block ids. Shared blocks are read-only: ``own`` before rewriting."""
        return self.space._room.run_planned(lambda: self._fork(parent, child, stream))

    def _fork(self, parent: Hashable, child: Hashable, stream: Any) -> list[int]:
        sp = self.space
        sp._check_open()
        seq_id_arg(child)
        books = sp.block_books
        held, tokens = books.blocks_of(parent), books.tokens[parent]
        if child in books.seqs:
            raise InvalidArgumentError(f"space {sp.name!r}: sequence {child!r} exists already; fork into a new id")
        whole = tokens // sp.block_size
        tail = held[whole:]  # the partly filled last block, if any
        if tail:
            self._require_on_gpu(tail, f"{parent!r}'s last block", parent)
        books.share(child, held[:whole], whole * sp.block_size)
        if not tail:
            return list(held[:whole])
        try:
            blocks = sp._allocate(child, tokens, None)
        except BaseException:
            books.release(child)  # nothing was copied: the child goes, the parent's blocks stay as they were
            raise
        self._copy(tail, blocks[-1:], stream)
        return blocks

    def own(self, seq_id: Hashable, start: int, stop: int, stream: Any = None) -> list[int]:
        """Copy on write: before rewriting tokens ``start..stop`` of ``seq_id``, give it its own copy of every
        block there that another sequence shares (a fork, a shared prefix), copied on ``stream`` (default:
        current); the others keep the old ones. Its pages there must be on the GPU. Return its block ids."""
        return self.space._room.run_planned(lambda: self._own(seq_id, start, stop, stream))

    def _own(self, seq_id: Hashable, start: int, stop: int, stream: Any) -> list[int]:
        sp = self.space
        sp._check_open()
        books = sp.block_books
        held, tokens = books.blocks_of(seq_id), books.tokens[seq_id]
        if isinstance(start, bool) or isinstance(stop, bool) or not isinstance(start, int) or \
                not isinstance(stop, int) or not 0 <= start <= stop <= tokens:
            raise InvalidArgumentError(f"tokens {start!r}..{stop!r} are not a range of the {tokens} tokens "
                                       f"{seq_id!r} holds")
        span = range(start // sp.block_size, -(-stop // sp.block_size))
        positions = [i for i in span if books.refs[held[i]] > 1]
        if not positions:
            return list(held)
        shared = [held[i] for i in positions]
        self._require_on_gpu(shared, f"{seq_id!r}'s shared blocks", seq_id)
        scratch = _CopyOf(seq_id)  # blocks of its own, booked to a private sequence, then swapped in
        fresh = sp._allocate(scratch, len(positions) * sp.block_size, None)
        self._copy(shared, fresh, stream)
        books.swap(seq_id, positions, scratch)
        sp._free(scratch, stream)  # the shared blocks go on with their other holders
        return list(books.seqs[seq_id])

    def _require_on_gpu(self, blocks: Sequence[int], what: str, seq_id: Hashable) -> None:
        sp = self.space
        pages = set(sp.block_books.pages_of(np.asarray(blocks, dtype=np.int64)))
        pending = sp.pages.in_flight(pages)
        if pending:
            raise PagesInFlight(f"space {sp.name!r}: {what} are in flight", pending)
        if any(sp.pages.tier[p] != Tier.GPU for p in pages):
            raise NotResidentError(f"space {sp.name!r}: {what} are not on the GPU; prefetch {seq_id!r} first")

    def _copy(self, src: Sequence[int], dst: Sequence[int], stream: Any) -> None:
        """Blocks ``src`` into blocks ``dst`` in every region, on ``stream`` (default: current)."""
        kv = self.space._kv
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            a, b = (torch.as_tensor(list(x), dtype=torch.int64, device=kv[0][0].device) for x in (src, dst))
            for pair in kv:
                for t in pair:
                    t.index_copy_(0, b, t.index_select(0, a))

    # --- KV by content (kvtier/prefix.py) ---------------------------------------------------------------------------
    def block_keys(self, tokens: Sequence[int], salt: bytes = b"", model: str = "") -> list[bytes]:
        """Keys of the whole blocks of ``tokens`` in this space's layout (``model``: the engine's id of the model;
        ``salt``: a tenant's, whose blocks no other salt finds)."""
        return block_keys(tokens, self.space.block_size, fingerprint(*self.space._layout, model=model), salt)

    def publish(self, seq_id: Hashable, keys: Sequence[bytes], salt: bytes = b"") -> int:
        """Offer ``seq_id``'s first whole blocks for reuse under ``keys`` (its tokens' keys, ``block_keys``, made
        with ``salt``: ``erase(salt)`` forgets them); it must hold their tokens. Return how many were indexed (a
        key held already keeps its block)."""
        keys = check_keys(keys)
        sp = self.space
        with sp._lock:
            sp._check_open()
            held, whole = sp.block_books.blocks_of(seq_id), sp.block_books.tokens[seq_id] // sp.block_size
            if len(keys) > whole:
                raise InvalidArgumentError(f"space {sp.name!r}: {len(keys)} keys for the {whole} whole blocks "
                                           f"{seq_id!r} holds (publish after its tokens are written)")
            held = held[:len(keys)]
            return self.prefix.add(keys[:self.servable(held)], held, salt)

    def erase(self, salt: bytes) -> int:
        """Forget every block published under ``salt`` (a tenant's): no key finds them any more, and those only
        the cache held are freed, in whatever tier they rest. Sequences holding them keep them. Return how many
        were forgotten."""
        return self.space._room.run_planned(lambda: self._erase(salt))

    def _erase(self, salt: bytes) -> int:
        sp = self.space
        sp._check_open()
        blocks = self.prefix.salted(salt)
        holders = [_Cached(b) for b in blocks if _Cached(b) in self.cached and sp.block_books.refs[b] == 1]
        pending = sp.pages.in_flight(sp.block_books.pages_of_seqs(holders))
        if pending:
            raise PagesInFlight(f"space {sp.name!r}: cached blocks to erase are in flight", pending)
        self.prefix.forget(blocks)
        for holder in holders:
            sp._free(holder, None)
        sp._tiering.erased(sp, salt)  # and from a kept tier's journal: not restored after a restart either
        return len(blocks)

    def share_prefix(self, seq_id: Hashable, keys: Sequence[bytes]) -> int:
        """Start a new sequence ``seq_id`` with the longest prefix of ``keys`` this space holds: those blocks are
        shared, wherever they rest (``prefetch`` brings them up before the step). Return the tokens it holds (0:
        a miss; it then holds nothing, and ``allocate`` starts it as usual). The engine computes the rest."""
        keys = check_keys(keys)
        sp = self.space
        with sp._lock:
            sp._check_open()
            seq_id_arg(seq_id)
            books = sp.block_books
            if seq_id in books.seqs:
                raise InvalidArgumentError(f"space {sp.name!r}: sequence {seq_id!r} exists already; share a prefix "
                                           "into a new id")
            found = self.prefix.lookup(keys)
            found = found[:self.servable(found)]
            if found:
                blocks = np.asarray(found, dtype=np.int64)
                books.share(seq_id, found, len(found) * sp.block_size)
                for p in set(books.pages_of(blocks)):
                    sp._tiering.policy.on_use(PageRef(sp.name, p))
                places = [sp._tiering.stack.label(int(t)) for t in sp.pages.tier[books.first_page[blocks]]]
                self.prefix.counted(places, len(found) * sp.block_size)
            return len(found) * sp.block_size

    def indexed(self, keys: Sequence[bytes]) -> list[bool]:
        """Which of ``keys`` the index holds a block for (a look that counts no hit and shares nothing)."""
        keys = check_keys(keys)
        with self.space._lock:
            return [k in self.prefix.block_of for k in keys]

    def servable(self, blocks: Sequence[int]) -> int:
        """How many of ``blocks``, from the first, lie on pages that hold their data (not lost, not dropped);
        those that do not are forgotten (and dropped, if only the cache held them)."""
        gone = self.gone(blocks)
        n = int(np.argmax(gone)) if gone.any() else len(blocks)
        lost = [int(b) for b, g in zip(blocks, gone) if g]
        self.prefix.forget(lost)
        for b in lost:
            if _Cached(b) in self.cached and self.space.block_books.refs[b] == 1:
                self.space._free(_Cached(b), None)
        return n

    def gone(self, blocks: Sequence[int]) -> np.ndarray:
        """Which of ``blocks`` lie on a page whose data is gone (lost, dropped)."""
        sp, b = self.space, np.asarray(blocks, dtype=np.int64)
        tier, books = sp.pages.tier, sp.block_books
        return ~books.all_on(~np.isin(tier, (Tier.LOST, Tier.DROPPED)), b)

    # --- kept across restarts ([nvme] persist) ---------------------------------------------------------------------
    def prefix_blocks(self, page: int) -> list[tuple[int, bytes, bytes]]:
        """The indexed whole blocks lying on ``page`` alone: (index within the page, key, salt)."""
        sp = self.space
        per, rest = divmod(sp.page_size, sp.block_bytes)
        if rest or not self.prefix.key_of:  # blocks straddling pages are not restored
            return []
        first = page * per
        return [(b - first, self.prefix.key_of[b], self.prefix.salt_of[b])
                for b in range(first, min(first + per, sp.num_blocks)) if b in self.prefix.key_of]

    def restore(self) -> int:
        """Take the pages a kept tier restored for this space (same name and layout): each goes to a vacant page,
        its blocks cached (idle, in that tier, found by their keys; the bytes are verified when first read).
        Records that do not fit (no vacant page, keys held already) give their slots back. Return the blocks
        restored. Called once, as the space is made."""
        sp = self.space
        books, restored = sp.block_books, 0
        per, rest = divmod(sp.page_size, sp.block_bytes)
        vacant = iter(np.flatnonzero(sp.pages.vacant() & (books.live == 0)).tolist())
        for tier, record in sp._tiering.restorable(sp):
            wanted = self._restorable_blocks(record) if len(record.slots) == sp.num_regions and not rest else {}
            page = next(vacant, None) if wanted else None
            blocks = [] if page is None else [(page * per + i, k, salt) for i, (k, salt) in wanted.items()
                                              if page * per + i < sp.num_blocks]
            if page is None or not blocks:
                sp._tiering.give_back([(tier, record.slots)])
                continue
            sp.pages.restored(page, tier, record.slots)
            for b, key, salt in blocks:
                holder = _Cached(b)
                for p in books.grow(holder, np.asarray([b], dtype=np.int64), sp.block_size):
                    sp._tiering.policy.on_create(PageRef(sp.name, p), sp.priority)
                sp._offloaded.add(holder)
                self.cached[holder] = None
                self.prefix.add([key], [b], salt)
            restored += len(blocks)
        return restored

    def _restorable_blocks(self, record: Any) -> dict[int, tuple[bytes, bytes]]:
        """A record's blocks this space can take: index within the page -> (key, salt); each index and key once,
        none past the bytes its slots hold, none whose key is indexed already."""
        sp, wanted, keys = self.space, {}, set()
        for i, k, salt in record.blocks:
            key = bytes.fromhex(k)
            if 0 <= i < sp.page_size // sp.block_bytes and (i + 1) * sp.block_bytes <= min(record.held) and \
                    i not in wanted and key not in keys and key not in self.prefix.block_of:
                wanted[i] = (key, bytes.fromhex(salt))
                keys.add(key)
        return wanted

    # --- the cache gives way ----------------------------------------------------------------------------------------
    def evict_cached(self, pages: int, blocks: int = 0) -> int:
        """Drop cached blocks no sequence holds, oldest first, until ``pages`` pages (in any tier) and ``blocks``
        blocks came free, or none is left; return the blocks dropped. Holders in flight are skipped."""
        sp = self.space
        freed_pages = freed_blocks = 0
        for holder in list(self.cached):
            if freed_pages >= pages and freed_blocks >= blocks:
                break
            if sp.block_books.refs[holder.block] > 1 or sp.pages.in_flight(sp.block_books.pages_of_seqs([holder])):
                continue  # a sequence holds it (a hit), or it is moving
            freed_pages += sp._free(holder, None)
            freed_blocks += 1
        return freed_blocks
