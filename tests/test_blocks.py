"""The block books with blocks held by several sequences (reference counts): what a fork of a prompt will do --
the books' own scenario, ahead of the space's fork (the prefix cache builds on it)."""

from __future__ import annotations

import numpy as np

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
