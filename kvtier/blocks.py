"""The block books of one space: which blocks are free, which sequences hold which (a block may be held by
several: ``refs`` counts them -- a prefix shared by forked sequences), and how many live blocks lie on each page.

Blocks are ``block_bytes`` slices of a region; pages are ``page_size`` slices. A block may straddle two pages
when the sizes do not divide, so every block has a first and a last page. These books know nothing of tiers or
mapping: the space combines them with its page table.
"""

from __future__ import annotations

import math
from typing import Hashable, Iterable

import numpy as np

from kvtier.errors import UnknownSequenceError


# pages a grow or release counts one by one; more, with numpy: on the CPU machine the loop costs ~0.23 us a page
# and numpy ~20 us a call (grow + release of 64 blocks: 42 us looped, 46 us with numpy; of 512: 244 vs 94 us)
_LOOP = 64
# blocks a grow or release books one by one, not with numpy's indexing: a short request's or a decode step's
# (grow + release of one block: 10.5 -> 8.1 us, CPU machine)
_FEW = 4


def _distinct(pages: list[int], by_last: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ``pages`` in the order they first appear (``by_last``: last appear) -- as the loop would meet
    a page's first (last) block -- and how often each appears."""
    arr = np.asarray(pages, dtype=np.int64)
    uniq, at, counts = np.unique(arr[::-1] if by_last else arr, return_index=True, return_counts=True)
    order = np.argsort(-at if by_last else at, kind="stable")
    return uniq[order], counts[order].astype(np.int32)


def _tally(pages: list[int]) -> dict[int, int]:
    """How often each of ``pages`` appears, in the order they first appear. A dict of Python ints, and one numpy
    update a page after it: a loop indexing the numpy counts per block cost ~0.4 us a block (an alloc + free of 64
    blocks: 72 -> 55 us, CPU machine, 8b92b9d)."""
    counts: dict[int, int] = {}
    for p in pages:
        counts[p] = counts.get(p, 0) + 1
    return counts


class BlockBooks:
    def __init__(self, space_name: str, num_blocks: int, block_bytes: int, block_size: int, page_size: int) -> None:
        self.space_name, self.num_blocks, self.block_bytes = space_name, num_blocks, block_bytes
        self.block_size, self.page_size = block_size, page_size
        self.num_pages = math.ceil(num_blocks * block_bytes / page_size)
        b = np.arange(num_blocks, dtype=np.int64)
        self.first_page = b * block_bytes // page_size
        self.last_page = ((b + 1) * block_bytes - 1) // page_size
        # a block larger than a page can touch three or more (a large model's engine block as one kvtier token):
        # then the pages between its first and last are its too, and every per-block page test spans them
        self.wide = bool(num_blocks) and int((self.last_page - self.first_page).max()) > 1
        self.free = np.ones(num_blocks, dtype=bool)
        self.free_count = num_blocks
        self.refs = np.zeros(num_blocks, dtype=np.int32)  # sequences holding each block (0: free)
        self.live = np.zeros(self.num_pages, dtype=np.int32)  # live blocks touching each page
        self.seqs: dict[Hashable, list[int]] = {}
        self.tokens: dict[Hashable, int] = {}
        self.tail = np.zeros(self.num_pages, dtype=np.int32)  # sequences whose last block touches each page

    # --- queries -----------------------------------------------------------------------------------------------
    def pages_of(self, blocks: np.ndarray) -> list[int]:
        """Pages touched by each block, once per (block, page) pair."""
        if len(blocks) == 1 and not self.wide:  # a decode step's one block (twice a step): no numpy calls
            first_page, last_page = self._ends(int(blocks[0]))
            return [first_page] if first_page == last_page else [first_page, last_page]
        first, last = self.first_page[blocks], self.last_page[blocks]
        if self.wide:
            counts = last - first + 1
            offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
            return (np.repeat(first, counts) + offsets).tolist()
        pages = first.tolist()
        pages.extend(last[np.flatnonzero(last != first)].tolist())
        return pages

    def all_on(self, mask: np.ndarray, blocks: np.ndarray | None = None) -> np.ndarray:
        """For each of ``blocks`` (default: every block), whether every page it touches is set in the page mask
        ``mask``."""
        first = self.first_page if blocks is None else self.first_page[blocks]
        last = self.last_page if blocks is None else self.last_page[blocks]
        if not self.wide:
            return mask[first] & mask[last]
        counted = np.concatenate(([0], np.cumsum(mask, dtype=np.int64)))
        return counted[last + 1] - counted[first] == last - first + 1

    def live_bytes(self, page: int, align: int) -> int:
        """Bytes of ``page`` (in each region) from its start to the end of its last live block, rounded up to
        ``align``: what a move of the page carries (the blocks past it hold nothing live). 0: none live."""
        P, bb = self.page_size, self.block_bytes
        lo, hi = page * P // bb, min(self.num_blocks, -(-(page + 1) * P // bb))
        used = np.flatnonzero(~self.free[lo:hi])
        if not len(used):
            return 0
        end = min((lo + int(used[-1]) + 1) * bb - page * P, P)
        return min(P, -(-end // align) * align)

    def pages_of_seqs(self, seq_ids: Iterable[Hashable]) -> list[int]:
        """The distinct pages the blocks of ``seq_ids`` lie on, sorted."""
        blocks = [b for q in seq_ids for b in self.blocks_of(q)]
        return sorted(set(self.pages_of(np.asarray(blocks, dtype=np.int64))))

    def blocks_of(self, seq_id: Hashable) -> list[int]:
        try:
            return self.seqs[seq_id]
        except (KeyError, TypeError):
            raise UnknownSequenceError(f"space {self.space_name!r} has no sequence {seq_id!r}") from None

    def last_held(self, seq_id: Hashable) -> list[int]:
        """The blocks of ``seq_id`` no other sequence holds (those its release would free)."""
        held = self.blocks_of(seq_id)
        if len(held) <= _FEW:
            return [b for b in held if self.refs[b] == 1]
        arr = np.asarray(held, dtype=np.int64)
        return arr[self.refs[arr] == 1].tolist()

    def sequences_on(self, pages: Iterable[int]) -> list[Hashable]:
        wanted = set(pages)
        return [q for q, bl in self.seqs.items() if wanted & set(self.pages_of(np.asarray(bl, dtype=np.int64)))]

    def pages_used_by(self, seq_ids: Iterable[Hashable]) -> np.ndarray:
        """A mask of the pages holding blocks of ``seq_ids``."""
        mask = np.zeros(self.num_pages, dtype=bool)
        blocks = [b for q in seq_ids for b in self.seqs[q]]
        if blocks:
            mask[self.pages_of(np.asarray(blocks, dtype=np.int64))] = True
        return mask

    def blocks_needed(self, seq_id: Hashable, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size) - len(self.seqs.get(seq_id, ()))

    def fresh_pages_needed(self, blocks: int) -> int:
        return math.ceil(blocks * self.block_bytes / self.page_size)

    def _ends(self, block: int) -> tuple[int, int]:
        """The first and last page of ``block``, by integer arithmetic (``first_page``/``last_page`` hold the same):
        indexing the numpy books and converting cost ~0.6 us a block, this ~0.15 (CPU machine)."""
        start = block * self.block_bytes
        return start // self.page_size, (start + self.block_bytes - 1) // self.page_size

    # --- commands ----------------------------------------------------------------------------------------------
    def _tail_pages(self, seq_id: Hashable) -> list[int]:
        """The page(s) of the sequence's last block (plain ints: this runs on every decode-step allocation)."""
        held = self.seqs.get(seq_id)
        if not held:
            return []
        first, last = self._ends(held[-1])
        return list(range(first, last + 1))

    def _run_tally(self, start: int, stop: int) -> dict[int, int]:
        """``_tally`` of the pages of blocks ``start..stop-1`` (a run), counted page by page: block k touches page
        p when ``p*P // bb <= k < ceil((p+1)*P / bb)``."""
        first, last = self._ends(start)[0], self._ends(stop - 1)[1]
        if first == last:
            return {first: stop - start}
        P, bb = self.page_size, self.block_bytes
        return {p: min(stop, -(-(p + 1) * P // bb)) - max(start, p * P // bb) for p in range(first, last + 1)}

    def grow(self, seq_id: Hashable, blocks: np.ndarray, num_tokens: int) -> list[int]:
        """Give ``blocks`` (free) to ``seq_id``, now holding ``num_tokens``; return the pages that had no live
        block before (once each)."""
        return self.grow_touching(seq_id, blocks, num_tokens)[0]

    def grow_touching(self, seq_id: Hashable, blocks: np.ndarray, num_tokens: int) -> tuple[list[int], list[int]]:
        """``grow``; return the fresh pages and every page the blocks touch (once each, in block order)."""
        held = self.seqs.get(seq_id)
        if held:
            for p in self._tail_pages(seq_id):
                self.tail[p] -= 1
        else:
            held = self.seqs[seq_id] = []
        listed = blocks.tolist()
        n = len(listed)
        tally: dict[int, int] | None
        if n <= _FEW:
            for b in listed:
                self.free[b], self.refs[b] = False, 1
            tally = _tally(self.pages_of(blocks))
        elif listed[-1] - listed[0] == n - 1 and listed == list(range(listed[0], listed[0] + n)):
            # a run (a new request's blocks, mostly): slices and page arithmetic, no per-block work -- an
            # alloc + free of 64 blocks cost ~1 us a block more than of one through the general path
            start, stop = listed[0], listed[0] + n
            self.free[start:stop] = False
            self.refs[start:stop] = 1
            tally = self._run_tally(start, stop)
        else:
            self.free[blocks] = False
            self.refs[blocks] = 1
            pages = self.pages_of(blocks)
            tally = None if len(pages) > _LOOP else _tally(pages)
            if tally is None:
                touched, counts = _distinct(pages)
                fresh = touched[self.live[touched] == 0].tolist()
                self.live[touched] += counts
                touched_pages = touched.tolist()
        self.free_count -= n
        if tally is not None:
            fresh = [p for p in tally if self.live[p] == 0]  # in the order the pages first appear
            for p, c in tally.items():
                self.live[p] += c
            touched_pages = list(tally)
        held.extend(listed)  # in place: a copy of the whole list cost ~1 us a decode step at 256 blocks
        self.tokens[seq_id] = num_tokens
        for p in self._tail_pages(seq_id):
            self.tail[p] += 1
        return fresh, touched_pages

    def share(self, seq_id: Hashable, blocks: list[int], num_tokens: int) -> None:
        """A new sequence ``seq_id`` holding ``blocks`` -- live blocks of other sequences, whole and in order --
        as its first ``num_tokens`` tokens (a fork): each block is held once more; nothing is copied."""
        b = np.asarray(blocks, dtype=np.int64)
        assert seq_id not in self.seqs and not self.free[b].any(), "share live blocks into a new sequence"
        assert len(blocks) == math.ceil(num_tokens / self.block_size), (len(blocks), num_tokens)
        np.add.at(self.refs, b, 1)
        self.seqs[seq_id] = list(blocks)
        self.tokens[seq_id] = num_tokens
        np.add.at(self.tail, self._tail_pages(seq_id), 1)

    def swap(self, seq_id: Hashable, positions: list[int], other: Hashable) -> None:
        """Copy on write: ``seq_id``'s blocks at ``positions`` change places with ``other``'s blocks (as many, in
        order); each block stays held as often as before, so only the sequences' lists and their last blocks
        change."""
        mine, theirs = self.seqs[seq_id], self.seqs[other]
        assert len(positions) == len(theirs), "swap as many blocks as the other sequence holds"
        for seq in (seq_id, other):
            np.subtract.at(self.tail, self._tail_pages(seq), 1)
        for j, i in enumerate(positions):
            mine[i], theirs[j] = theirs[j], mine[i]
        for seq in (seq_id, other):
            np.add.at(self.tail, self._tail_pages(seq), 1)

    def release(self, seq_id: Hashable) -> list[int]:
        """Let go of every block of ``seq_id``; those no other sequence holds are free again. Return the pages
        left with no live block."""
        for p in self._tail_pages(seq_id):  # one or two pages: a loop costs a tenth of ``np.subtract.at``
            self.tail[p] -= 1
        listed = self.seqs.pop(seq_id)
        del self.tokens[seq_id]
        n = len(listed)
        if n > _FEW and listed[-1] - listed[0] == n - 1 and listed == list(range(listed[0], listed[0] + n)):
            start, stop = listed[0], listed[0] + n
            refs = self.refs[start:stop]
            refs -= 1
            if not refs.any():  # a run no other sequence holds: freed whole (see ``grow``)
                self.free[start:stop] = True
                self.free_count += n
                tally = self._run_tally(start, stop)
                for p, c in tally.items():
                    self.live[p] -= c
                return [p for p in tally if self.live[p] == 0]  # a run's pages empty in page order
            self.refs[start:stop] += 1  # shared in part: the general path below
        if n <= _FEW:
            gone = []
            for b in listed:  # a sequence holds a block once (``check``)
                left = self.refs[b] - 1
                self.refs[b] = left
                if not left:
                    self.free[b] = True
                    gone.append(b)
            self.free_count += len(gone)
            if len(gone) == 1 and not self.wide:  # as ``pages_of`` gives them, with no array built for one block
                ends = self._ends(gone[0])
                pages = [ends[0]] if ends[0] == ends[1] else list(ends)
            else:
                pages = self.pages_of(np.asarray(gone, dtype=np.int64))
        else:
            held = np.asarray(listed, dtype=np.int64)
            self.refs[held] -= 1
            blocks = held[self.refs[held] == 0]
            self.free[blocks] = True
            self.free_count += len(blocks)
            pages = self.pages_of(blocks)
        if len(pages) == 1:  # one block on one page: the common free of a short request
            p = pages[0]
            self.live[p] -= 1
            return [] if self.live[p] else [p]
        if len(pages) > _LOOP:
            touched, counts = _distinct(pages, by_last=True)  # a page empties at its last block
            self.live[touched] -= counts
            return touched[self.live[touched] == 0].tolist()
        tally, last = _tally(pages), {p: i for i, p in enumerate(pages)}
        for p, c in tally.items():
            self.live[p] -= c
        return sorted((p for p in tally if self.live[p] == 0), key=last.__getitem__)  # a page empties at its last

    def check(self) -> np.ndarray:
        """Verify the books (AssertionError on a broken invariant); return live blocks per page."""
        refs = np.zeros(self.num_blocks, dtype=np.int32)
        for seq, blocks in self.seqs.items():
            b = np.asarray(blocks, dtype=np.int64)
            assert len(blocks) == math.ceil(self.tokens[seq] / self.block_size), (seq, len(blocks))
            assert len(set(blocks)) == len(blocks) and not self.free[b].any(), f"block held twice or free: {seq}"
            np.add.at(refs, b, 1)
        assert (refs == self.refs).all(), "block reference counts disagree with the sequences"
        assert ((refs > 0) == ~self.free).all() and self.free_count == int(self.free.sum())
        live = np.zeros(self.num_pages, dtype=np.int32)
        np.add.at(live, self.pages_of(np.flatnonzero(refs > 0)), 1)
        assert (live == self.live).all(), "page live counts disagree with the sequences' blocks"
        tail = np.zeros(self.num_pages, dtype=np.int32)
        for seq in self.seqs:
            np.add.at(tail, self._tail_pages(seq), 1)
        assert (tail == self.tail).all(), "the books of last blocks disagree with the sequences"
        return live
