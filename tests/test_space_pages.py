"""Pages two spaces map together (``KVSpace.share_pages``): one physical copy read by both, copied only when one
side writes (``unshare``), never demoted, handed out or kept as an empty page while shared (CPU; CUDA under -m gpu).
"""

from __future__ import annotations

import pytest
import torch

import kvtier
from kvtier.errors import InvalidArgumentError
from kvtier.tiering import Tier
from tests.conftest import assert_seq, pattern, write_seq

BLOCKS_PER_PAGE = 16  # the conftest shapes


def _write_blocks(space: kvtier.KVSpace, seq: str, blocks: range, salt: int) -> None:
    """``write_seq``'s content for blocks of index ``blocks`` of ``seq`` only."""
    held = space.blocks(seq)
    for layer in range(space.num_layers):
        for kv, tensor in enumerate(space.kv(layer)):
            for i in blocks:
                tensor[held[i]] = pattern(space, seq, salt, i, layer, kv).to(tensor.device)


def _assert_blocks(space: kvtier.KVSpace, seq: str, salts: dict[int, int]) -> None:
    """Block ``i`` of ``seq`` holds ``write_seq``'s content with salt ``salts.get(i, 0)``."""
    held = space.blocks(seq)
    for layer in range(space.num_layers):
        for kv, tensor in enumerate(space.kv(layer)):
            for i, b in enumerate(held):
                expected = pattern(space, seq, salts.get(i, 0), i, layer, kv)
                assert torch.equal(tensor[b].cpu(), expected), (seq, i, layer, kv)


def _copy_blocks(src: kvtier.KVSpace, dst: kvtier.KVSpace, blocks: range) -> None:
    for layer in range(src.num_layers):
        for a, b in zip(src.kv(layer), dst.kv(layer)):
            b[blocks.start:blocks.stop] = a[blocks.start:blocks.stop]


def test_a_space_shares_whole_pages_of_another_until_it_writes_them(make_manager):
    mgr = make_manager(pages=64)
    a = mgr.create_space("a", max_tokens=16384, **make_manager.shape)
    b = mgr.create_space("b", max_tokens=16384, **make_manager.shape)
    pool = mgr.pool
    tokens = (3 * BLOCKS_PER_PAGE + 3) * a.block_size - 5  # three whole pages, then part of a fourth
    # 1. the original: three pages of whole blocks, and a last page it is still writing (a free block on it)
    a.allocate("s", tokens, first_block=0)
    write_seq(a, "s")
    assert a.whole_pages({"s": tokens}) == [0, 1, 2]
    assert a.whole_pages({"s": 2 * BLOCKS_PER_PAGE * a.block_size - 1}) == [0]  # page 1's last block is not whole
    used = pool.in_use_pages
    # 2. the copy maps those pages with the same handles: nothing new taken from the pool, no byte copied
    b.share_pages(a, [0, 1, 2])
    assert pool.in_use_pages == used and pool.extra_mappings == 3 * a.num_regions
    assert a.pages.shared == b.pages.shared == {0, 1, 2}
    # 3. it books the same blocks; only the page it will write is new, and only its blocks are copied
    b.allocate("s", tokens, first_block=0)
    assert pool.in_use_pages == used + a.num_regions
    _copy_blocks(a, b, range(3 * BLOCKS_PER_PAGE, 3 * BLOCKS_PER_PAGE + 3))
    assert_seq(b, "s")
    mgr.check()
    # 4. a shared page is not handed to another sequence, nor demoted with its sequence: it stays where both read it
    b.allocate("other", 4 * b.block_size)
    assert not set(b.blocks("other")) & set(range(3 * BLOCKS_PER_PAGE))
    a.offload("s", tier="host").result()
    assert a.pages.tier_of(3) != Tier.GPU and all(a.pages.tier_of(p) == Tier.GPU for p in (0, 1, 2))
    a.ensure_resident(["s"])
    assert_seq(a, "s")
    mgr.check()
    # 5. the copy writes a page: it gets one of its own first; the original does not see the write
    assert b.unshare([0]) == 1
    assert b.pages.shared == {1, 2} and pool.in_use_pages == used + 2 * a.num_regions
    page0 = range(BLOCKS_PER_PAGE)
    _write_blocks(b, "s", page0, salt=1)
    assert_seq(a, "s")
    _assert_blocks(b, "s", dict.fromkeys(page0, 1))
    mgr.check()
    # 6. the original frees its sequence: its shared pages are unmapped at once (never reused: the copy reads
    #    them), and the pool takes their handles back only with the copy's mapping
    a.free("s")
    assert not a.range.handles.keys() & {0, 1, 2} and pool.extra_mappings == 0
    _assert_blocks(b, "s", dict.fromkeys(page0, 1))
    mgr.check()
    # 7. with the other side gone, unsharing copies nothing; freeing the copy gives every page back
    assert b.unshare() == 0 and not b.pages.shared
    b.free("s")
    b.free("other")
    mgr.check()


def test_share_pages_refuses_what_it_cannot_share_and_changes_nothing(make_manager):
    mgr = make_manager(pages=64)
    a = mgr.create_space("a", max_tokens=8192, **make_manager.shape)
    b = mgr.create_space("b", max_tokens=8192, **make_manager.shape)
    other = mgr.create_space("c", max_tokens=8192, **{**make_manager.shape, "num_layers": 1})
    a.allocate("s", 2 * BLOCKS_PER_PAGE * a.block_size, first_block=0)
    b.allocate("t", a.block_size, first_block=0)
    # 1. pages the copy holds data on already, pages the original has not mapped, another layout, itself
    with pytest.raises(InvalidArgumentError, match="hold data already"):
        b.share_pages(a, [0])
    with pytest.raises(InvalidArgumentError, match="on the GPU"):
        b.share_pages(a, [5])
    with pytest.raises(InvalidArgumentError, match="same layout"):
        other.share_pages(a, [1])
    with pytest.raises(InvalidArgumentError, match="another space"):
        a.share_pages(a, [1])
    # 2. nothing changed: no page shared, no extra mapping
    assert not a.pages.shared and not b.pages.shared and mgr.pool.extra_mappings == 0
    mgr.check()


def test_an_adopted_page_can_be_unshared_before_any_block_is_booked_on_it(make_manager):
    mgr = make_manager(pages=64)
    a = mgr.create_space("a", max_tokens=8192, **make_manager.shape)
    b = mgr.create_space("b", max_tokens=8192, **make_manager.shape)
    a.allocate("s", BLOCKS_PER_PAGE * a.block_size, first_block=0)
    write_seq(a, "s")
    b.share_pages(a, [0])
    b.allocate("s", BLOCKS_PER_PAGE * a.block_size, first_block=0)
    # the copy rewrites every block: its own page first, then the write; each side keeps what it wrote
    b.unshare()
    write_seq(b, "s", salt=3)
    assert_seq(a, "s")
    assert_seq(b, "s", salt=3)
    mgr.check()
