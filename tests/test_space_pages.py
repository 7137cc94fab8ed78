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
    # 7. with the other side gone, its pages are its own again: they go down and come back like any other
    assert b.pages.shared == {1, 2}
    b.offload("s", tier="host").result()
    assert not b.pages.shared and all(b.pages.tier_of(p) != Tier.GPU for p in (0, 1, 2))  # (3: "other" is on it)
    b.ensure_resident(["s"])
    _assert_blocks(b, "s", dict.fromkeys(page0, 1))
    mgr.check()
    # 8. unsharing then copies nothing; freeing the copy gives every page back
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


@pytest.mark.parametrize("seed", range(8))
def test_a_random_walk_of_two_spaces_sharing_pages_reads_back_what_each_wrote(make_manager, seed):
    _walk(make_manager, seed)


def test_the_random_walks_wrote_into_shared_pages(make_manager):
    # the walks are worth something only if they rewrote pages both sides mapped
    assert sum(_walk(make_manager, seed) for seed in range(8)) > 0


def _walk(make_manager, seed: int) -> int:
    """A random walk (see the test above); the pages ``unshare`` copied."""
    # two spaces hold one sequence each way: they share its whole pages, grow it, rewrite blocks (unsharing the
    # page first, as the contract says), free it, send it down and back; every byte each side reads is what that
    # side last wrote, and the books agree after every step
    import random
    rng = random.Random(seed)
    mgr = make_manager(pages=96)
    sides = [mgr.create_space(name, max_tokens=8 * BLOCKS_PER_PAGE * make_manager.shape["block_size"],
                              **make_manager.shape) for name in "ab"]
    bs = sides[0].block_size
    salts: list[dict[int, int] | None] = [None, None]  # per side: block index -> salt written (None: no sequence)
    counter = iter(range(1, 10_000))

    def page_of(space: kvtier.KVSpace, i: int) -> list[int]:
        block = space.blocks("s")[i]
        return sorted({block * space.block_bytes // space.page_size,
                       ((block + 1) * space.block_bytes - 1) // space.page_size})

    copied = 0  # pages unshare copied: the walk wrote into shared pages
    for step in range(40):
        k = rng.randrange(2) if step > 1 else step  # it starts by making the sequence on one side, sharing it
        me, other = sides[k], sides[1 - k]
        op = rng.choice(["make", "share", "grow", "rewrite", "free", "down-up"]) if step > 1 else \
            ["make", "share"][step]
        if op == "make" and salts[k] is None:
            n = rng.randrange(1 if step else 2 * BLOCKS_PER_PAGE, 4 * BLOCKS_PER_PAGE)
            me.allocate("s", n * bs, first_block=0)
            salts[k] = {}
            _write_blocks(me, "s", range(n), salt=0)
            salts[k] = dict.fromkeys(range(n), 0)
        elif op == "share" and salts[k] is None and salts[1 - k] is not None:
            tokens = other.num_tokens("s")
            pages = other.whole_pages({"s": tokens})
            me.share_pages(other, pages)
            me.allocate("s", tokens, first_block=0)
            n = len(other.blocks("s"))
            rest = [i for i in range(n) if not set(page_of(me, i)) <= set(pages)]
            for layer in range(me.num_layers):
                for src, dst in zip(other.kv(layer), me.kv(layer)):
                    dst[rest] = src[rest]
            salts[k] = dict(salts[1 - k])
        elif op == "grow" and salts[k] is not None:
            n = len(salts[k])
            more = min(rng.randrange(1, BLOCKS_PER_PAGE), 8 * BLOCKS_PER_PAGE - n)
            me.allocate("s", (n + more) * bs, first_block=0)
            salt = next(counter)
            if any(p in me.pages.shared for i in range(n, n + more) for p in page_of(me, i)):
                pytest.fail("a sequence's new blocks fell on a shared page")
            _write_blocks(me, "s", range(n, n + more), salt)
            salts[k].update(dict.fromkeys(range(n, n + more), salt))
        elif op == "rewrite" and salts[k]:
            i, salt = rng.randrange(len(salts[k])), next(counter)
            copied += me.unshare(page_of(me, i))  # the contract: a writer unshares first
            _write_blocks(me, "s", range(i, i + 1), salt)
            salts[k][i] = salt
        elif op == "free" and salts[k] is not None:
            me.free("s")
            salts[k] = None
        elif op == "down-up" and salts[k] is not None:
            me.offload("s", tier=rng.choice(["host", "nvme"])).result()
            me.ensure_resident(["s"])
        mgr.check()
        for side, expected in zip(sides, salts):
            if expected is not None:
                _assert_blocks(side, "s", expected)
    for side, expected in zip(sides, salts):
        if expected is not None:
            side.free("s")
    mgr.check()
    assert mgr.pool.extra_mappings == 0
    return copied


def test_alias_pages_maps_one_page_onto_another_of_the_same_space(make_manager):
    mgr = make_manager(pages=64)
    space = mgr.create_space("s", max_tokens=8192, **make_manager.shape)
    pool = mgr.pool
    n = 2 * BLOCKS_PER_PAGE * space.block_size
    for seq, first in (("x", 0), ("y", 2 * BLOCKS_PER_PAGE)):  # two stripes each: pages 0-1 and 2-3
        space.allocate(seq, n, first_block=first)
        write_seq(space, seq, salt=1 if seq == "x" else 2)
    used = pool.in_use_pages
    # 1. swapped: x's pages map y's memory and y's map x's, read from the state before (no byte copied)
    assert space.alias_pages([(2, 0), (3, 1), (0, 2), (1, 3)]) == 4
    for i in range(2 * BLOCKS_PER_PAGE):
        for layer in range(space.num_layers):
            for kv, t in enumerate(space.kv(layer)):
                assert torch.equal(t[i].cpu(), pattern(space, "y", 2, i, layer, kv))
                assert torch.equal(t[2 * BLOCKS_PER_PAGE + i].cpu(), pattern(space, "x", 1, i, layer, kv))
    assert pool.in_use_pages == used and pool.extra_mappings == 0  # each handle still mapped once
    mgr.check()
    # 2. a page onto another: the memory it held goes back to the pool; mapping it again changes nothing
    assert space.unshare() == 0  # (nothing is mapped twice: only the flags go)
    assert space.alias_pages([(0, 2)]) == 1 and space.alias_pages([(0, 2)]) == 0
    assert pool.in_use_pages == used - space.num_regions and pool.extra_mappings == space.num_regions
    # 3. refused: a page mapped anew twice, a page not on the GPU; nothing changed
    with pytest.raises(InvalidArgumentError, match="at most once"):
        space.alias_pages([(0, 3), (1, 3)])
    with pytest.raises(InvalidArgumentError, match="on the GPU"):
        space.alias_pages([(0, space.num_pages - 1)])
    with pytest.raises(InvalidArgumentError, match="must lie in"):
        space.alias_pages([(0, space.num_pages)])
    assert pool.in_use_pages == used - space.num_regions
    # 4. freed: the last mapping of each handle gives it back
    space.free("x")
    space.free("y")
    mgr.check()
    assert pool.extra_mappings == 0


def test_the_source_dropped_before_the_copy_books_its_pages_leaves_the_copy_whole(make_manager):
    mgr = make_manager(pages=64)
    a = mgr.create_space("a", max_tokens=8192, **make_manager.shape)
    b = mgr.create_space("b", max_tokens=8192, **make_manager.shape)
    n = 2 * BLOCKS_PER_PAGE * a.block_size
    a.allocate("s", n, first_block=0)
    write_seq(a, "s")
    # 1. shared, then the source space goes (its mapping with it) before the copy books a block
    assert b.share_whole_pages(a, {"s": n}) == [0, 1]
    mgr.drop_space("a")
    assert mgr.pool.extra_mappings == 0
    # 2. the copy books them: the bytes are the source's, the memory now the copy's alone
    b.allocate("s", n, first_block=0)
    assert_seq(b, "s")
    mgr.check()
    b.free("s")
    mgr.check()
    assert mgr.pool.in_use_pages == 0
