"""Placement: which free blocks a growing sequence gets, and which pages must be mapped for them.

A mixin of :class:`kvtier.space.KVSpace` (it reads the space's books and changes nothing). Kept apart because it
is the one piece of policy in the space: pages stay per sequence where memory allows, so that a sequence can
later be demoted by whole pages, and short sequences share pages so that a page is not spent per request.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from kvtier.errors import SpaceFullError


class Placement:
    # provided by KVSpace
    name: str
    num_blocks: int
    num_pages: int
    page_size: int
    block_bytes: int
    quota_bytes: int | None
    page_bytes: int
    _mgr: Any
    _block_free: np.ndarray
    _free_blocks: int
    _first_page: np.ndarray
    _last_page: np.ndarray
    _page_live: np.ndarray
    pages: Any

    if TYPE_CHECKING:  # provided by KVSpace; real stubs here would shadow its methods in the MRO
        def _pages_of(self, blocks: np.ndarray) -> list[int]: ...

        def _idle_pages(self) -> list[int]: ...

    def _plan(self, held: list[int], need: int) -> tuple[np.ndarray, list[int]]:
        """Pick ``need`` free blocks for a sequence holding ``held`` and the pages to map for them.

        Pages stay per sequence where memory allows, so that a sequence can later be demoted by whole pages:
        1. free blocks on pages the sequence already uses (after its last block first); a sequence shorter than
           one page also takes free blocks on any mapped page, so short requests share pages;
        2. then empty mapped pages and fresh pages (one run right after its last page when possible), if the
           pool and the quota can back them;
        3. else free blocks on pages other sequences use (packing under pressure), then fresh pages anyway
           (``allocate`` then raises the pool's or the quota's error).
        No side effects.
        """
        if need > self._free_blocks:
            raise SpaceFullError(f"space {self.name!r}: {need} more blocks wanted, {self._free_blocks} free of "
                                 f"{self.num_blocks}; free sequences or create the space with a larger max_tokens")
        first, last = self._first_page, self._last_page
        last_block = held[-1] if held else -1
        taken = np.zeros(self.num_blocks, dtype=bool)
        chosen: list[np.ndarray] = []

        def take(pages: np.ndarray) -> int:  # take free blocks lying wholly on ``pages``; return still needed
            cands = np.flatnonzero(self._block_free & ~taken & pages[first] & pages[last])
            got = self._prefer_after(cands, last_block)[:need - int(taken.sum())]
            taken[got] = True
            chosen.append(got)
            return need - int(taken.sum())

        own = np.zeros(self.num_pages, dtype=bool)
        if held:
            own[self._pages_of(np.asarray(held, dtype=np.int64))] = True
        mapped = self.pages.allocatable()
        mapped[self._idle_pages()] = False  # pages of idle sequences stay theirs, so they can be demoted whole
        allowed = own
        rest = take(allowed)
        if rest and len(held) + need < self.page_size // self.block_bytes:
            allowed = mapped.copy()  # a sequence shorter than a page packs with others: no page per request
            rest = take(allowed)
        if rest:
            allowed = allowed | (mapped & (self._page_live == 0))
            rest = take(allowed)
        unmapped = np.flatnonzero(self.pages.vacant())  # never over pages whose data is elsewhere
        after_page = int(last[last_block]) + 1 if last_block >= 0 else 0
        sharing = allowed is not own and bool((allowed == mapped).all())
        if rest and not sharing and not self._mgr._can_back(self, self._fresh_pages_needed(rest)):
            allowed, sharing = mapped.copy(), True  # pressure: share pages with other sequences rather than fail
            rest = take(allowed)
        while True:
            if rest == 0:
                return np.concatenate(chosen), []
            for k in range(self._fresh_pages_needed(rest), len(unmapped) + 1):
                pages = self._pick_pages(unmapped, k, after_page)
                grown = allowed.copy()
                grown[pages] = True
                cands = np.flatnonzero(self._block_free & ~taken & grown[first] & grown[last])
                if len(cands) >= rest:
                    blocks = np.concatenate(chosen + [cands[:rest]])
                    used = set(self._pages_of(blocks))
                    return blocks, [p for p in pages if p in used]
            if sharing:
                raise SpaceFullError(f"space {self.name!r}: no room for {need} more blocks in unmapped pages")
            allowed, sharing = mapped.copy(), True  # the reservation is short of fresh pages: share
            rest = take(allowed)

    def _plan_range(self, first_block: int, held: int, need: int) -> tuple[np.ndarray, list[int]]:
        """Blocks ``first_block + held ...`` for ``need`` more, and the vacant pages they touch. No side effects."""
        from kvtier.errors import InvalidArgumentError
        start, stop = first_block + held, first_block + held + need
        if isinstance(first_block, bool) or not isinstance(first_block, int) or first_block < 0 or stop > self.num_blocks:
            raise InvalidArgumentError(f"first_block {first_block!r}: blocks {start}..{stop - 1} are outside the "
                                       f"space's 0..{self.num_blocks - 1}")
        blocks = np.arange(start, stop, dtype=np.int64)
        if not self._block_free[blocks].all():
            raise SpaceFullError(f"space {self.name!r}: blocks {start}..{stop - 1} are not all free")
        pages = sorted(set(self._pages_of(blocks)))
        tier = self.pages.tier[pages]
        # a page on its way up is mapped already; writes ordered after the prefetch's wait(stream) land after it
        moving = self.pages.moving
        usable = self.pages.allocatable()[pages] | [p in moving and moving[p].kind == "promote" for p in pages]
        if ((tier != 0) & ~usable).any():
            raise SpaceFullError(f"space {self.name!r}: pages of blocks {start}..{stop - 1} hold data elsewhere")
        return blocks, [p for p, t in zip(pages, tier) if t == 0]

    def _within_quota(self, new_pages: int) -> bool:
        return self.quota_bytes is None or (len(self.pages.handles) + new_pages) * self.page_bytes <= self.quota_bytes

    def _fresh_pages_needed(self, blocks: int) -> int:
        return math.ceil(blocks * self.block_bytes / self.page_size)

    @staticmethod
    def _prefer_after(candidates: np.ndarray, last_block: int) -> np.ndarray:
        if last_block < 0:
            return candidates
        split = np.searchsorted(candidates, last_block, side="right")
        return np.concatenate([candidates[split:], candidates[:split]])

    @staticmethod
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
