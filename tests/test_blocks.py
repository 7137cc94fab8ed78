"""The block books with blocks held by several sequences (reference counts): what a fork of a prompt will do --
the books' own scenario, ahead of the space's fork (the prefix cache builds on it)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.blocks import BlockBooks


def test_blocks_shared_by_two_sequences_stay_live_until_both_let_go():
    # 4 blocks a page, 16 tokens a block
    books = BlockBooks("s", num_blocks=32, block_bytes=1024, block_size=16, page_size=4096)
    # a prompt of 5 blocks (80 tokens) on pages 0 and 1
    assert books.grow("prompt", np.arange(5, dtype=np.int64), 80) == [0, 1]
    # a fork holds its first 4 blocks (the whole ones: 64 tokens) and grows on a page of its own
    books.share("fork", [0, 1, 2, 3], 64)
    assert books.grow("fork", np.arange(8, 10, dtype=np.int64), 96) == [2]
    assert books.refs[:6].tolist() == [2, 2, 2, 2, 1, 0]
    live = books.check()
    assert live[:3].tolist() == [4, 1, 2]  # a shared block counts once on its page
    # the prompt goes: its shared blocks stay the fork's; only its own last block is free again, and its page empties
    assert books.release("prompt") == [1]
    assert books.free[:6].tolist() == [False] * 4 + [True, True] and books.refs[:4].tolist() == [1] * 4
    books.check()
    # the fork goes too: every page is empty now
    assert sorted(books.release("fork")) == [0, 2]
    assert books.free.all() and not books.refs.any() and not books.live.any() and not books.tail.any()
    books.check()


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_grow_and_release_report_each_page_once_in_the_order_first_touched(data):
    """Grow and release count pages one by one for a few blocks and with numpy for many (a new sequence of 512
    blocks took ~300 us in the loop): either way, the pages that became live (grow) or empty (release) are reported
    once each, in the order their blocks came, and the books check -- blocks that straddle pages, blocks wider
    than a page, blocks in any order, runs of consecutive blocks (counted with slices and page arithmetic), runs
    a fork shares in part. A page is reported as a loop over the blocks meets it: grown at its first block,
    emptied at its last."""
    block_bytes = data.draw(st.sampled_from([512, 1024, 1536, 4096, 10240]), label="block_bytes")
    books = BlockBooks("s", num_blocks=160, block_bytes=block_bytes, block_size=16, page_size=4096)
    seqs: dict[str, list[int]] = {}
    for step in range(data.draw(st.integers(1, 10), label="steps")):
        free = np.flatnonzero(books.free).tolist()
        if seqs and (not free or data.draw(st.booleans(), label=f"release {step}")):
            name = data.draw(st.sampled_from(sorted(seqs)), label=f"which {step}")
            blocks = seqs.pop(name)
            others = {p for q in seqs.values() for p in books.pages_of(np.asarray(q, dtype=np.int64))}
            want = list(dict.fromkeys(p for p in books.pages_of(np.asarray(blocks, dtype=np.int64))
                                      if p not in others))
            _reported_once_each(books.release(name), [p for p in _last_touched(books, blocks) if p in want], blocks)
        elif seqs and data.draw(st.integers(0, 3), label=f"fork? {step}") == 0:  # a fork of a whole prefix
            parent = data.draw(st.sampled_from(sorted(seqs)), label=f"parent {step}")
            shared = seqs[parent][:data.draw(st.integers(1, len(seqs[parent])), label=f"shared {step}")]
            books.share(f"f{step}", shared, 16 * len(shared))
            seqs[f"f{step}"] = shared
        else:
            size = data.draw(st.sampled_from([1, 3, 20, 70, 120]), label=f"size {step}")  # either side of _LOOP
            runs = [b for b in free if books.free[b:b + size].all() and b + size <= books.num_blocks]
            if runs and data.draw(st.booleans(), label=f"run? {step}"):
                start = data.draw(st.sampled_from(runs), label=f"run at {step}")
                blocks = list(range(start, start + size))
            else:
                blocks = data.draw(st.permutations(free), label=f"blocks {step}")[:size]
            before = books.live.copy()
            name = f"q{step}"
            got = books.grow(name, np.asarray(blocks, dtype=np.int64), 16 * len(blocks))
            _reported_once_each(got, [p for p in _first_touched(books, blocks) if before[p] == 0], blocks)
            seqs[name] = blocks
        books.check()


def _reported_once_each(got: list[int], want: list[int], blocks: list[int]) -> None:
    """``got`` are ``want``'s pages once each: in ``pages_of``'s order, or -- a run of blocks all of which the
    call counted page by page -- in page order (as a loop over its blocks meets them)."""
    run = len(blocks) > 1 and blocks == list(range(blocks[0], blocks[0] + len(blocks)))
    assert got == want or run and got == sorted(want), (got, want)


def _first_touched(books: BlockBooks, blocks: list[int]) -> list[int]:
    """The pages ``blocks`` touch, each once, in the order ``pages_of`` lists them."""
    return list(dict.fromkeys(books.pages_of(np.asarray(blocks, dtype=np.int64))))


def _last_touched(books: BlockBooks, blocks: list[int]) -> list[int]:
    """The pages ``blocks`` touch, each once, in the order ``pages_of`` lists them for the last time."""
    pages = books.pages_of(np.asarray(blocks, dtype=np.int64))
    return list(dict.fromkeys(reversed(pages)))[::-1]


@pytest.mark.parametrize("block_bytes", [512, 1536, 4096, 6144, 10240])
def test_the_pages_of_a_block_are_those_its_bytes_lie_on(block_bytes):
    # one block (a decode step's: plain ints) or many (numpy), straddling pages or wider than one
    books = BlockBooks("s", num_blocks=40, block_bytes=block_bytes, block_size=16, page_size=4096)
    want = {b: list(range(b * block_bytes // 4096, ((b + 1) * block_bytes - 1) // 4096 + 1)) for b in range(40)}
    for b in range(40):
        assert books.pages_of(np.asarray([b], dtype=np.int64)) == want[b]
    assert sorted(books.pages_of(np.arange(40, dtype=np.int64))) == sorted(p for b in range(40) for p in want[b])


@settings(max_examples=300, deadline=None)
@given(block_bytes=st.sampled_from([1024, 1536, 3000]), seed=st.integers(0, 2**32 - 1),
       need=st.integers(1, 3), mapped_share=st.floats(0.0, 1.0), free_share=st.floats(0.0, 1.0))
def test_the_first_blocks_on_mapped_pages_are_the_whole_scans(block_bytes, seed, need, mapped_share, free_share):
    # blocks that divide the page (1024) and blocks that straddle two pages (1536, 3000), twenty pages of which any
    # may be mapped (more than the eight looked at one by one), any block free: the page-at-a-time search gives
    # what a scan of every block gives -- the first free blocks lying wholly on mapped pages -- or None when short
    from kvtier.placement import first_on_mapped
    rng = np.random.default_rng(seed)
    books = BlockBooks("s", num_blocks=20 * 4096 // block_bytes, block_bytes=block_bytes, block_size=16,
                       page_size=4096)
    books.free = rng.random(books.num_blocks) < free_share
    books.free_count = int(books.free.sum())
    mapped = rng.random(books.num_pages) < mapped_share
    whole = np.flatnonzero(books.free & books.all_on(mapped))
    want = whole[:need].tolist() if len(whole) >= need and need < 4096 // block_bytes and need <= books.free_count \
        else None
    got = first_on_mapped(books, need, mapped)
    assert (got.tolist() if got is not None else None) == want
