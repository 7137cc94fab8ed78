"""The tier half of a :class:`kvtier.space.KVSpace`'s API: sending sequences down (``offload``,
``offload_prefix``, ``drop_prefix``), bringing them back (``prefetch``, ``stage``, ``ensure_resident``), reading a
prefix kept below without mapping it (``read``), and where a sequence's bytes are (``residency``).

A :class:`SpaceTiers` belongs to one space (``space.tiers``), whose public methods of the same names call it: it
plans against the space's books (``block_books``, ``pages``, ``_offloaded``) under the manager's lock and hands
the moves to ``kvtier.tiering``, as the rest of the space does for allocation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable, Sequence

import numpy as np
import torch

from kvtier.checks import int_arg, seq_ids_arg
from kvtier.errors import InvalidArgumentError, PagesInFlight, TransferError
from kvtier.policies import PageRef
from kvtier.tiering import FIRST_LOWER, Tier, TierStack, TransferHandle

if TYPE_CHECKING:
    from kvtier.space import KVSpace


def _offload_tier(stack: TierStack, tier: str | None, optional: bool) -> int | None:
    if tier is None and optional:
        return None
    if not isinstance(tier, str) or stack.get(tier) is None:
        names = ", ".join(repr(t) for t in ([None] if optional else []) + stack.names)
        raise InvalidArgumentError(f"tier {tier!r} is not a tier to offload to (use {names})")
    return stack.named(tier)


class SpaceTiers:
    """Offload, prefetch, stage and read for one :class:`KVSpace`, which owns this object and calls it (see the
    module docstring)."""

    def __init__(self, space: "KVSpace") -> None:
        self.space = space
        # the space's parts this half works with (fixed for the space's life)
        self._room, self._backend, self._lock, self._tiering = space._room, space._backend, space._lock, space._tiering
        self.pages, self.block_books = space.pages, space.block_books

    def offload(self, seq_id: Hashable, tier: str | None = None, stream: Any = None) -> TransferHandle:
        """Mark ``seq_id`` idle (e.g. waiting for its next turn). With ``tier=None`` the policy decides when and
        where its pages go (under GPU pressure); with a tier's name (``"host"``, ``"nvme"``, or another of
        ``[tiers] order``) they start going there now -- a GPU page spills to a tier below it when it is full, and
        pages in the tiers above it go on down too. Pages it shares with active sequences stay. ``stream``: where
        its last kernels ran (default: current); demotion copies wait for them."""
        dst = _offload_tier(self._tiering.stack, tier, optional=True)
        with self._lock:
            self.space._check_open()
            pages = self.block_books.pages_of_seqs([seq_id])
            self.space._offloaded.add(seq_id)
            self.space.idle_fence = self._backend.record_fence(stream)
            for p in pages:
                self._tiering.policy.on_use(PageRef(self.space.name, p))  # its last use: the policy ages it from here
            if dst is None:
                self._tiering.poke()
                return TransferHandle(self._tiering, "demote", [])
            movable = set(self.space.idle_pages())
            above = (self.pages.tier >= FIRST_LOWER) & (self.pages.tier < dst)
            if above.any():  # pages already in a tier above it go on down too
                movable |= set(np.flatnonzero(above & ~self.pages.moving_mask()).tolist())
            plan = self._tiering.plan_demote(self.space, [p for p in pages if p in movable], dst)
            return self._start(plan, self.space.idle_fence)

    def offload_prefix(self, seq_id: Hashable, tokens: int, tier: str = "host", stream: Any = None) -> TransferHandle:
        """Start moving down the pages that hold only ``seq_id``'s first ``tokens`` tokens, while the sequence
        stays active: it keeps growing in its later pages, and :meth:`read` copies the prefix into the engine's
        buffer when a step needs it (a layer streamed through host memory, whose past is never written again).
        A page holding later tokens or another sequence's blocks stays. ``stream``: where the kernels that wrote
        (or copied) the prefix ran; the copies down wait for them."""
        dst = _offload_tier(self._tiering.stack, tier, optional=False)
        with self._lock:
            self.space._check_open()
            movable = self.pages.allocatable()
            pages = [p for p in self._prefix_pages(seq_id, tokens) if movable[p]]
            plan = self._tiering.plan_demote(self.space, pages, dst)
            return self._start(plan, self._backend.record_fence(stream))

    def _prefix_pages(self, seq_id: Hashable, tokens: int) -> list[int]:
        """The pages that hold nothing but ``seq_id``'s first ``tokens`` tokens (whole blocks below ``tokens``; no
        later block of it, no block of another sequence)."""
        b = self.block_books
        blocks = np.asarray(b.blocks_of(seq_id), dtype=np.int64)
        if isinstance(tokens, bool) or not isinstance(tokens, int) or not 0 <= tokens <= b.tokens[seq_id]:
            raise InvalidArgumentError(f"tokens must be an int in 0..{b.tokens[seq_id]} (the tokens "
                                       f"{seq_id!r} holds), got {tokens!r}")
        cut = tokens // self.space.block_size  # blocks wholly below ``tokens``
        ours = np.bincount(np.asarray(b.pages_of(blocks[:cut]), dtype=np.int64), minlength=self.space.num_pages)
        later = set(b.pages_of(blocks[cut:]))
        shared = set(b.pages_of(blocks[:cut][b.refs[blocks[:cut]] > 1]))  # blocks a fork holds too: not ours alone
        return [p for p in np.flatnonzero(ours).tolist() if ours[p] == b.live[p] and p not in later | shared]

    def drop_prefix(self, seq_id: Hashable, tokens: int, stream: Any = None) -> TransferHandle:
        """Drop the pages that hold only ``seq_id``'s first ``tokens`` tokens: tokens the engine will never read
        again (they fell out of a sliding window). The sequence keeps its blocks and goes on growing; the pages'
        memory goes back (a GPU page once the kernels queued on ``stream`` are done, a page below at once). A
        dropped token is gone: ``read`` and ``check_resident`` refuse it, ``prefetch`` skips it."""
        with self._lock:
            self.space._check_open()
            moving = self.pages.moving_mask()
            shared = self.pages.shared  # mapped by another space too: it stays, the tokens are still never read
            pages = [p for p in self._prefix_pages(seq_id, tokens) if not moving[p] and p not in shared]
            tiers = self.pages.tier[pages] if pages else np.zeros(0, dtype=np.int8)
            self._tiering.drop_below(self.space, [p for p, t in zip(pages, tiers) if t >= FIRST_LOWER])
            plan = self._tiering.plan_drop(self.space, [p for p, t in zip(pages, tiers) if t == Tier.GPU])
            return self._start(plan, self._backend.record_fence(stream))

    def _start(self, plan: Any, after: Any) -> TransferHandle:
        handles = self._tiering.start_demotion(plan, after=after)
        return handles[0] if handles else TransferHandle(self._tiering, "demote", [])

    def prefetch(self, seq_ids: Iterable[Hashable], start: int = 0) -> TransferHandle:
        """Start bringing every page of ``seq_ids`` to the GPU -- with ``start``, only those holding their tokens
        from ``start`` on (a past kept below with ``offload_prefix`` stays there); they become active again. The
        handle's ``wait(stream)`` makes the step's stream wait on the device; ``result()`` blocks. Raises
        OutOfPagesError (nothing started) when the GPU cannot take them even after demoting idle pages."""
        seqs = seq_ids_arg("prefetch", seq_ids)
        int_arg("start", start, 0, self.space.max_tokens)
        return self._room.run_planned(lambda: self._prefetch(seqs, start))

    def _prefetch(self, seqs: list[Hashable], start: int = 0) -> TransferHandle:
        self.space._check_open()
        b = self.block_books
        pages = b.pages_of_seqs(seqs) if not start else sorted({p for q in seqs for p in b.pages_of(
            np.asarray(b.blocks_of(q)[start // self.space.block_size:], dtype=np.int64))})
        pending = self.pages.in_flight(pages)
        if pending:
            raise PagesInFlight(f"space {self.space.name!r}: pages in flight", pending)
        self._refuse_lost(pages)
        below = [p for p in pages if self.pages.tier[p] >= FIRST_LOWER]
        room = self._room.plan_room(self.space, len(below) * self.space.num_regions, keep=set(pages)) if below else None
        # commit
        handles = self._room.take_room(room) if room is not None else []
        self.space._offloaded.difference_update(seqs)
        handle = self._tiering.promote(self.space, below, handles)
        for p in pages:
            self._tiering.policy.on_use(PageRef(self.space.name, p))
        return handle

    def _refuse_lost(self, pages: Sequence[int]) -> None:
        lost = [p for p in pages if self.pages.tier[p] == Tier.LOST]
        if lost:
            raise TransferError(f"space {self.space.name!r}: stripes {lost} were lost (a read back failed); free and "
                                "recompute these sequences", self.space.sequences_on(lost))

    def read(self, seq_id: Hashable, dst: Sequence[tuple[torch.Tensor, torch.Tensor]], start: int = 0,
             stop: int | None = None, stream: Any = None) -> TransferHandle:
        """Copy the KV of ``seq_id``'s tokens ``start..stop`` (default: all) into ``dst`` -- one (K, V) pair per
        layer, shaped and typed like :meth:`kv`, on the space's device -- at the same block positions, from
        whichever tier each page is in. Nothing is mapped: this is how a step reads a prefix kept below (see
        :meth:`offload_prefix`). Whole pages are copied (the bytes of other blocks on them come along).

        GPU pages are copied on ``stream`` (default: current) at once; host and NVMe pages on the transfer
        stream (NVMe: by the I/O worker), after the work queued on ``stream`` so far, which may still read
        ``dst``. ``handle.wait(stream)`` orders the step after them. Pages in flight are waited for first; the
        pages read stay where they are until the read is done. Raises TransferError for lost pages."""
        self._check_read_target(dst)
        return self._room.run_planned(lambda: self._read(seq_id, dst, start, stop, stream))

    def _read(self, seq_id: Hashable, dst: Sequence[tuple[torch.Tensor, torch.Tensor]], start: int,
              stop: int | None, stream: Any) -> TransferHandle:
        self.space._check_open()
        b = self.block_books
        held = b.blocks_of(seq_id)
        stop = b.tokens[seq_id] if stop is None else stop
        if isinstance(start, bool) or isinstance(stop, bool) or not isinstance(start, int) or \
                not isinstance(stop, int) or not 0 <= start <= stop <= b.tokens[seq_id]:
            raise InvalidArgumentError(f"tokens {start!r}..{stop!r} are not within the "
                                       f"{b.tokens[seq_id]} tokens {seq_id!r} holds")
        blocks = np.asarray(held[start // self.space.block_size: -(-stop // self.space.block_size)], dtype=np.int64)
        pages = np.unique(np.asarray(b.pages_of(blocks), dtype=np.int64)).tolist()
        moving = self.pages.moving
        pending = list({moving[p] for p in pages if p in moving}) if moving else []
        if pending:
            raise PagesInFlight(f"space {self.space.name!r}: pages in flight", pending)
        self._refuse_lost(pages)
        if (self.pages.tier[pages] == Tier.DROPPED).any():
            raise InvalidArgumentError(f"space {self.space.name!r}: tokens {start}..{stop} of {seq_id!r} include "
                                       "dropped ones (drop_prefix); read only the tokens kept")
        flat = [t.view(torch.uint8).view(-1) for pair in dst for t in pair]
        used, P = flat[0].numel(), self.space.page_size

        def target(region: int, page: int) -> torch.Tensor:  # the page's bytes in dst (the last page is short)
            return flat[region][page * P: min((page + 1) * P, used)]
        return self._tiering.read(self.space, pages, target, stream)

    def read_blocks(self, seq_id: Hashable, dst: Callable[[int, int], torch.Tensor], count: int | None = None,
                    stream: Any = None) -> TransferHandle:
        """Copy the bytes of ``seq_id``'s first ``count`` blocks (default: all) into ``dst(region, i)`` -- the
        i-th block's bytes of that region, a contiguous tensor of ``block_bytes`` bytes on the space's device,
        anywhere (an engine's own blocks) -- from whichever tier each page is in, as :meth:`read` does: nothing
        mapped, GPU pages copied on ``stream`` at once, lower ones after the work queued on it so far, checked
        where they land (host checksums). Needs blocks of whole pages (``block_bytes`` a multiple of the page
        size: each page then holds one block's bytes). ``handle.result()``: the copies from below and their checks
        done (TransferError: a page failed its check and is lost); copies of GPU pages run on ``stream``: hold
        ``seq_id`` until the stream got past them (let go, its pages may go down and be unmapped)."""
        B, P = self.space.block_bytes, self.space.page_size
        if B % P:
            raise InvalidArgumentError(f"space {self.space.name!r}: read_blocks needs blocks of whole pages "
                                       f"({B} bytes a block, pages of {P}); use read()")
        return self._room.run_planned(lambda: self._read_blocks(seq_id, dst, count, stream))

    def _read_blocks(self, seq_id: Hashable, dst: Callable[[int, int], torch.Tensor], count: int | None,
                     stream: Any) -> TransferHandle:
        self.space._check_open()
        held = self.block_books.blocks_of(seq_id)
        count = len(held) if count is None else count
        int_arg("count", count, 0, len(held))
        per = self.space.block_bytes // self.space.page_size  # pages a block spans in each region
        index = {b * per + k: (i, k) for i, b in enumerate(held[:count]) for k in range(per)}  # page -> (i, part)
        pages = sorted(index)
        moving = self.pages.moving
        pending = list({moving[p] for p in pages if p in moving}) if moving else []
        if pending:
            raise PagesInFlight(f"space {self.space.name!r}: pages in flight", pending)
        self._refuse_lost(pages)
        P, B, device = self.space.page_size, self.space.block_bytes, self.space.range.whole.device
        places: dict[tuple[int, int], torch.Tensor] = {}  # (region, i) -> the block's bytes there, checked first
        for region in range(self.space.num_regions):
            for i in range(count):
                t = dst(region, i)
                if not isinstance(t, torch.Tensor) or t.device.type != device.type or not t.is_contiguous() or \
                        t.numel() * t.element_size() != B or t.data_ptr() % 8:
                    raise InvalidArgumentError(f"read_blocks: dst({region}, {i}) must be a contiguous, 8-byte "
                                               f"aligned tensor of {B} bytes on {device}")
                places[(region, i)] = t.view(torch.uint8).view(-1)

        def target(region: int, page: int) -> torch.Tensor:
            i, part = index[page]
            return places[(region, i)][part * P:(part + 1) * P]
        return self._tiering.read(self.space, pages, target, stream)

    def _check_read_target(self, dst: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        shape = (self.space.num_blocks, self.space.block_size, self.space.num_kv_heads, self.space.head_dim)
        ok = isinstance(dst, (list, tuple)) and len(dst) == self.space.num_layers and \
            all(isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in dst)
        tensors = [t for pair in dst for t in pair] if ok else []
        device = self.space.range.whole.device
        for t in tensors:
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != self.space.dtype or \
                    t.device.type != device.type or not t.is_contiguous():
                tensors = []
                break
        if len(tensors) != self.space.num_regions:
            raise InvalidArgumentError(f"read needs one (K, V) pair per layer ({self.space.num_layers}), each a "
                                       f"contiguous {self.space.dtype} tensor of shape {list(shape)} on {device} "
                                       "(like kv(layer))")

    def stage(self, seq_ids: Iterable[Hashable]) -> TransferHandle:
        """Start reading the pages of ``seq_ids`` that are on a disk tier (NVMe) into host memory, ahead of a
        ``prefetch`` (which then crosses PCIe only). Pages for which the host tier has no room stay where they
        are."""
        seq_ids = seq_ids_arg("stage", seq_ids)
        with self._lock:
            self.space._check_open()
            moving = self.pages.moving_mask()
            pages = [p for p in self.block_books.pages_of_seqs(seq_ids)
                     if self._tiering.stage_target(int(self.pages.tier[p])) is not None and not moving[p]]
            return self._tiering.stage(self.space, pages)

    def ensure_resident(self, seq_ids: Iterable[Hashable]) -> None:
        """``prefetch(seq_ids).result()``: blocks until every page is on the GPU."""
        self.prefetch(seq_ids).result()

    def residency(self, seq_id: Hashable) -> dict[str, int]:
        """Bytes of ``seq_id``'s blocks per place: ``gpu``, each configured tier (``host``, ``nvme``...),
        ``lost``."""
        with self._lock:
            self.space._check_open()
            blocks = np.asarray(self.block_books.blocks_of(seq_id), dtype=np.int64)
            tiers = self.pages.tier[self.block_books.first_page[blocks]]
            per_block = self.space.block_bytes * self.space.num_regions
            return {name: int((tiers == t).sum()) * per_block for name, t in self._places()}

    def stripe_residency(self, seq_id: Hashable) -> dict[str, int]:
        """Distinct pages holding ``seq_id``'s blocks, per tier (pages may be shared with other sequences)."""
        with self._lock:
            self.space._check_open()
            tiers = self.pages.tier[self.block_books.pages_of_seqs([seq_id])]
            return {name: int((tiers == t).sum()) for name, t in self._places()}

    def _places(self) -> list[tuple[str, int]]:
        return self._tiering.stack.storage() + [("lost", int(Tier.LOST))]
