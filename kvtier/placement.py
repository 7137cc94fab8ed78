"""Placement: which free blocks a growing sequence gets, and which pages must be mapped for them.

Pure functions of the block books and the page masks they are given: a plan, no side effects. Kept apart because
it is the one piece of policy in the space: pages stay per sequence where memory allows, so that a sequence can
later be demoted by whole pages, and short sequences share pages so that a page is not spent per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from kvtier.blocks import BlockBooks
from kvtier.errors import InvalidArgumentError, SpaceFullError


@dataclass(frozen=True)
class PageMasks:
    """The page table as placement sees it: ``allocatable`` (mapped, not in flight), ``idle`` (pages of idle
    sequences: they stay theirs, so that they can be demoted whole), ``vacant`` (no data anywhere),
    ``promoting`` (on their way up: mapped already)."""

    allocatable: np.ndarray
    idle: np.ndarray
    vacant: np.ndarray
    promoting: np.ndarray


def plan_blocks(books: BlockBooks, held: list[int], need: int, masks: PageMasks,
                can_back: Callable[[int], bool]) -> tuple[np.ndarray, list[int]]:
    """Pick ``need`` free blocks for a sequence holding ``held`` and the vacant pages to map for them.

    1. free blocks on pages the sequence already uses (after its last block first); a sequence shorter than
       one page also takes free blocks on any mapped page, so short requests share pages;
    2. then empty mapped pages and fresh pages (one run right after its last page when possible), if
       ``can_back(fresh pages)`` says the pool and the quota can back them;
    3. else free blocks on pages other sequences use (packing under pressure), then fresh pages anyway (the
       caller then raises the pool's or the quota's error).
    """
    if need > books.free_count:
        raise SpaceFullError(f"space {books.space_name!r}: {need} more blocks wanted, {books.free_count} free of "
                             f"{books.num_blocks}; free sequences or create the space with a larger max_tokens")
    last_block = held[-1] if held else -1
    taken = np.zeros(books.num_blocks, dtype=bool)
    chosen: list[np.ndarray] = []
    got_count = 0

    def take(pages: np.ndarray) -> int:  # take free blocks lying wholly on ``pages``; return still needed
        nonlocal got_count
        cands = np.flatnonzero(books.free & ~taken & books.all_on(pages))
        got = _prefer_after(cands, last_block)[:need - got_count]
        taken[got] = True
        chosen.append(got)
        got_count += len(got)
        return need - got_count

    own = np.zeros(books.num_pages, dtype=bool)
    if held:
        own[books.pages_of(np.asarray(held, dtype=np.int64))] = True
        # never a block on a page whose data is elsewhere (its prefix sent down, say): it is not mapped. A page on
        # its way up is (writes ordered after the prefetch's wait(stream) land after it)
        own &= masks.allocatable | masks.promoting
    mapped = masks.allocatable & ~masks.idle
    allowed = own
    rest = take(allowed) if held else need  # a new sequence has no pages of its own to look over
    if rest and len(held) + need < books.page_size // books.block_bytes:
        allowed = mapped.copy()  # a sequence shorter than a page packs with others: no page per request
        rest = take(allowed)
    if rest:
        allowed = allowed | (mapped & (books.live == 0))
        rest = take(allowed)
    if rest == 0:  # the common case: mapped pages had room (no fresh pages to pick)
        return np.concatenate(chosen), []
    unmapped = np.flatnonzero(masks.vacant)  # never over pages whose data is elsewhere
    after_page = int(books.last_page[last_block]) + 1 if last_block >= 0 else 0
    sharing = allowed is not own and bool((allowed == mapped).all())
    if rest and not sharing and not can_back(books.fresh_pages_needed(rest)):
        allowed, sharing = mapped.copy(), True  # pressure: share pages with other sequences rather than fail
        rest = take(allowed)
    while True:
        if rest == 0:
            return np.concatenate(chosen), []
        for k in range(books.fresh_pages_needed(rest), len(unmapped) + 1):
            pages = _pick_pages(unmapped, k, after_page)
            grown = allowed.copy()
            grown[pages] = True
            cands = np.flatnonzero(books.free & ~taken & books.all_on(grown))
            if len(cands) >= rest:
                blocks = np.concatenate(chosen + [cands[:rest]])
                used = set(books.pages_of(blocks))
                return blocks, [p for p in pages if p in used]
        if sharing:
            raise SpaceFullError(f"space {books.space_name!r}: no room for {need} more blocks in unmapped pages")
        allowed, sharing = mapped.copy(), True  # the reservation is short of fresh pages: share
        rest = take(allowed)


_FIRST_PAGES = 8  # mapped pages looked at one by one before the whole space is scanned


def first_on_mapped(books: BlockBooks, need: int, mapped: np.ndarray) -> np.ndarray | None:
    """What :func:`plan_blocks` picks for a new sequence of ``need`` blocks, fewer than a page holds, when
    ``mapped`` (pages allocatable and not idle) has room for them: the first free blocks lying wholly on those
    pages; None when they are too few (the full plan then decides). Found without the plan's scaffolding: a
    request's first allocation cost ~15 us of the ~50 of an alloc + free of one block there (CPU machine,
    8b92b9d)."""
    if need >= books.page_size // books.block_bytes or need > books.free_count:
        return None
    # the mapped pages' blocks first, a page at a time, in block order: mostly the first page or two has room, and a
    # scan of the whole space's blocks cost ~12 us of an alloc + free of one block (2048 blocks, CPU machine)
    # (``ndarray.nonzero`` of a 1-d mask, not ``np.flatnonzero``: ~0.5 against ~1.9 us a call, CPU machine)
    P, bb, start = books.page_size, books.block_bytes, 0
    found: list[int] = []
    for p in mapped.nonzero()[0][:_FIRST_PAGES].tolist():
        lo, hi = max(start, p * P // bb), min(books.num_blocks, -(-(p + 1) * P // bb))
        if lo < hi:
            ok = books.free[lo:hi]
            if P % bb:  # blocks may straddle two pages: those count only if both are mapped
                ok = ok & mapped[books.first_page[lo:hi]] & mapped[books.last_page[lo:hi]]
            if need == 1:  # a one-block request: the first free block, if any (argmax: ~0.6 us)
                i = int(ok.argmax())
                if ok[i]:
                    return np.array([lo + i], dtype=np.int64)
            else:
                found.extend((ok.nonzero()[0][:need - len(found)] + lo).tolist())
                if len(found) == need:
                    return np.asarray(found, dtype=np.int64)
        start = max(start, hi)
    cands = np.flatnonzero(books.free & books.all_on(mapped))
    return cands[:need] if len(cands) >= need else None


def plan_range(books: BlockBooks, first_block: int, held: int, need: int,
               masks: PageMasks) -> tuple[np.ndarray, list[int]]:
    """Blocks ``first_block + held ...`` for ``need`` more, and the vacant pages they touch."""
    if isinstance(first_block, bool) or not isinstance(first_block, int):
        raise InvalidArgumentError(f"first_block must be an int, got {first_block!r}")
    start, stop = first_block + held, first_block + held + need
    if first_block < 0 or stop > books.num_blocks:
        raise InvalidArgumentError(f"first_block {first_block!r}: blocks {start}..{stop - 1} are outside the "
                                   f"space's 0..{books.num_blocks - 1}")
    blocks = np.arange(start, stop, dtype=np.int64)
    if not books.free[blocks].all():
        raise SpaceFullError(f"space {books.space_name!r}: blocks {start}..{stop - 1} are not all free")
    pages = sorted(set(books.pages_of(blocks)))
    # a page on its way up is mapped already; writes ordered after the prefetch's wait(stream) land after it
    usable = masks.allocatable[pages] | masks.promoting[pages]
    vacant = masks.vacant[pages]
    if (~vacant & ~usable).any():
        raise SpaceFullError(f"space {books.space_name!r}: pages of blocks {start}..{stop - 1} hold data elsewhere")
    return blocks, [p for p, v in zip(pages, vacant) if v]


def _prefer_after(candidates: np.ndarray, last_block: int) -> np.ndarray:
    if last_block < 0:
        return candidates
    split = np.searchsorted(candidates, last_block, side="right")
    return np.concatenate([candidates[split:], candidates[:split]])


def _pick_pages(unmapped: np.ndarray, k: int, after_page: int) -> list[int]:
    """``k`` unmapped pages: a run starting at ``after_page`` if free, else the first run of ``k``, else the
    lowest ``k``. Runs matter: one set-access covers a whole run."""
    if len(unmapped) >= k:
        starts = np.flatnonzero(unmapped[k - 1:] - unmapped[:len(unmapped) - k + 1] == k - 1)
        if starts.size:
            at = np.searchsorted(unmapped, after_page)
            first = at if at in starts else int(starts[0])
            return unmapped[first:first + k].tolist()
    return unmapped[:k].tolist()
