"""A sequence whose prefix lives below while it keeps growing on the GPU (``offload_prefix``), and ``read``: its
bytes copied from every tier into the engine's buffers without mapping anything (CPU; CUDA under -m gpu).
Every scenario checks the bytes read against what was written."""

from __future__ import annotations

import pytest
import torch

from kvtier.errors import InvalidArgumentError, UnknownSequenceError
import kvtier
from tests.conftest import assert_seq, pattern, write_seq

BPP = 16  # blocks per page in the test shape


def _space(mgr, make_manager):
    return mgr.create_space("m", max_tokens=256 * make_manager.shape["block_size"], **make_manager.shape)


def _write(space, seq, first_block=0):
    """Write the pattern into ``seq``'s blocks from ``first_block`` on (those below may be unmapped)."""
    for layer in range(space.num_layers):
        for kv, tensor in enumerate(space.kv(layer)):
            for i, b in enumerate(space.blocks(seq)[first_block:], start=first_block):
                tensor[b] = pattern(space, seq, 0, i, layer, kv).to(tensor.device)


def _buffers(space):
    return [tuple(torch.zeros_like(t) for t in space.kv(layer)) for layer in range(space.num_layers)]


def _assert_read(space, seq, dst, blocks):
    for layer, pair in enumerate(dst):
        for kv, tensor in enumerate(pair):
            for i in blocks:
                b = space.blocks(seq)[i]
                assert torch.equal(tensor[b].cpu(), pattern(space, seq, 0, i, layer, kv)), f"block {i} differs"


@pytest.mark.parametrize("tier", ["host", "nvme"])
def test_a_prefix_kept_below_while_the_sequence_grows_reads_back_exactly(make_manager, tier):
    mgr = make_manager()
    space = _space(mgr, make_manager)
    bs = space.block_size
    space.allocate("a", int(2.5 * BPP) * bs)
    _write(space, "a")
    # the two full pages go down; the third (the tokens still being written) stays
    space.offload_prefix("a", 2 * BPP * bs, tier=tier).result()
    assert space.stripe_residency("a") == {"gpu": 1, "host": 2 if tier == "host" else 0,
                                         "nvme": 2 if tier == "nvme" else 0, "lost": 0}
    # the sequence is still active: it grows on the GPU
    space.allocate("a", 3 * BPP * bs + 3)
    _write(space, "a", first_block=int(2.5 * BPP))
    # a read copies every block into the engine's buffers, from both tiers, mapping nothing
    mapped = space.stats()["stripes_mapped"]
    dst = _buffers(space)
    space.read("a", dst).result()
    if dst[0][0].is_cuda:
        torch.cuda.synchronize()
    _assert_read(space, "a", dst, range(len(space.blocks("a"))))
    assert space.stats()["stripes_mapped"] == mapped
    # the prefix crossed down once; reading it again copies it up again, and only it
    down = mgr.stats()["tiers"]["paths"][f"gpu->{tier}"]
    assert down["stripes"] == 2
    dst = _buffers(space)
    space.read("a", dst, stop=2 * BPP * bs).wait()
    if dst[0][0].is_cuda:
        torch.cuda.synchronize()
    _assert_read(space, "a", dst, range(2 * BPP))
    assert not dst[0][0][space.blocks("a")[2 * BPP]].any()  # the third page was not part of it
    assert mgr.stats()["tiers"]["paths"][f"{tier}->read"]["stripes"] == 4
    mgr.check()
    # and prefetch brings the prefix back into the space itself
    space.ensure_resident(["a"])
    assert space.stripe_residency("a")["gpu"] == 4
    assert_seq(space, "a")
    mgr.check()


def test_pages_shared_or_still_written_stay(make_manager):
    mgr = make_manager()
    space = _space(mgr, make_manager)
    bs = space.block_size
    # two short sequences share the first page
    space.allocate("a", 4 * bs)
    space.allocate("b", 4 * bs)
    assert space.stripe_residency("a")["gpu"] == space.stripe_residency("b")["gpu"] == 1
    space.offload_prefix("a", 4 * bs).result()
    assert space.stripe_residency("a")["gpu"] == 1
    # a prefix short of a page boundary moves nothing either
    space.allocate("c", 3 * BPP * bs)
    space.offload_prefix("c", BPP * bs - 1).result()
    assert space.stripe_residency("c")["gpu"] == 3
    assert not mgr.stats()["tiers"]["paths"]
    mgr.check()


def test_bad_reads_and_prefixes_are_refused_and_change_nothing(make_manager):
    mgr = make_manager()
    space = _space(mgr, make_manager)
    bs = space.block_size
    space.allocate("a", 2 * BPP * bs)
    _write(space, "a")
    with pytest.raises(InvalidArgumentError, match="tokens must be an int"):
        space.offload_prefix("a", 2 * BPP * bs + 1)
    with pytest.raises(InvalidArgumentError, match="not a tier"):
        space.offload_prefix("a", BPP * bs, tier="gpu")
    with pytest.raises(UnknownSequenceError):
        space.offload_prefix("zz", 0)
    with pytest.raises(InvalidArgumentError, match="one \\(K, V\\) pair per layer"):
        space.read("a", _buffers(space)[:1])
    wrong = [tuple(t.float() for t in pair) for pair in _buffers(space)]
    with pytest.raises(InvalidArgumentError, match="contiguous"):
        space.read("a", wrong)
    with pytest.raises(InvalidArgumentError, match="not within"):
        space.read("a", _buffers(space), start=5, stop=4)
    assert space.stripe_residency("a")["gpu"] == 2 and not mgr.stats()["tiers"]["paths"]
    assert_seq(space, "a")
    mgr.check()


def test_freeing_waits_for_a_read_in_flight(make_manager):
    mgr = make_manager()
    space = _space(mgr, make_manager)
    bs = space.block_size
    space.allocate("a", 2 * BPP * bs + 1)
    _write(space, "a")
    space.offload_prefix("a", 2 * BPP * bs).result()
    dst, blocks = _buffers(space), space.blocks("a")
    if dst[0][0].is_cuda:
        torch.cuda._sleep(50_000_000)  # the read's copies wait for the kernels queued before it
    handle = space.read("a", dst)
    # free must not give the slots back while they are still being copied from
    space.free("a")
    assert handle.done()
    for layer, pair in enumerate(dst):
        for kv, tensor in enumerate(pair):
            for i in range(2 * BPP):
                assert torch.equal(tensor[blocks[i]].cpu(), pattern(space, "a", 0, i, layer, kv))
    mgr.check()


def test_dropped_tokens_give_their_memory_back_and_are_never_read(make_manager):
    mgr = make_manager()
    space = mgr.create_space("m", max_tokens=256 * make_manager.shape["block_size"], **make_manager.shape)
    bpp = 16  # blocks per page in the test shape
    space.allocate("a", 3 * bpp * space.block_size)
    write_seq(space, "a")
    space.offload_prefix("a", bpp * space.block_size, tier="host").result()  # page 0 below, pages 1-2 on the GPU
    # the tokens of pages 0 and 1 fall out of a window: dropped, below and on the GPU alike
    space.drop_prefix("a", 2 * bpp * space.block_size + 3).result()
    mgr.drain()
    stats = space.stats()
    assert stats["stripes_dropped"] == 2 and stats["stripes_host"] == 0 and stats["stripes_mapped"] == 1
    assert mgr.stats()["tiers"]["host"]["slots_used"] == 0
    # the kept tokens read back exact; the dropped ones are refused, and check_resident refuses their blocks
    dst = [tuple(torch.empty_like(t) for t in space.kv(layer)) for layer in range(space.num_layers)]
    space.read("a", dst, start=2 * bpp * space.block_size).result()
    blocks = space.blocks("a")
    for i in range(2 * bpp, 3 * bpp):
        assert torch.equal(dst[0][0][blocks[i]].cpu(), pattern(space, "a", 0, i, 0, 0))
    with pytest.raises(kvtier.InvalidArgumentError, match="dropped"):
        space.read("a", dst, start=0)
    with pytest.raises(kvtier.NotResidentError):
        space.check_resident(blocks[:1])
    # the sequence grows on, goes down and comes back without its dropped pages, and is freed whole
    space.allocate("a", 3 * bpp * space.block_size + 1)
    space.offload("a", tier="nvme").result()
    space.ensure_resident(["a"])
    assert space.stripe_residency("a")["gpu"] == 2 and space.stats()["stripes_dropped"] == 2
    space.free("a")
    assert space.stats()["stripes_dropped"] == 0
    mgr.check()


def test_growing_never_hands_out_a_free_block_on_a_page_sent_down(make_manager):
    mgr = make_manager()
    space = mgr.create_space("m", max_tokens=256 * make_manager.shape["block_size"], **make_manager.shape)
    bs, bpp = space.block_size, 16
    # "a" fills page 0 but for one block that "b" held and gave back, then all of page 1
    space.allocate("a", 10 * bs)
    space.allocate("b", bs)
    space.allocate("a", 31 * bs)
    space.free("b")
    assert space.blocks("a")[-1] == 2 * bpp - 1
    # page 0 (with its free block) goes down as "a"'s prefix; "a" grows by one block
    space.offload_prefix("a", 15 * bs).result()
    assert space.stripe_residency("a")["host"] == 1
    blocks = space.allocate("a", 32 * bs)
    space.check_resident(blocks[15:])  # the new block is on a mapped page, not on page 0 below
    assert blocks[-1] >= 2 * bpp
    mgr.check()


@pytest.mark.parametrize("tier", ["gpu", "host", "nvme"])
def test_read_blocks_lands_each_block_where_the_caller_says_from_every_tier(make_manager, tier):
    # blocks of one whole page each (an engine's 256-token block of a large model, one kvtier token a block), a
    # sequence's four of them read into the rows of an engine's own cache, in an order of its choosing: K in the
    # first half of a row, V in the second
    mgr = make_manager()
    page = mgr.page_size
    space = mgr.create_space("blocks", num_layers=1, num_kv_heads=1, head_dim=page // 2, dtype=torch.float16,
                             block_size=1, max_tokens=16)
    space.allocate("a", 4)
    space.allocate("b", 2)
    write_seq(space, "a")
    write_seq(space, "b", salt=1)
    if tier != "gpu":
        space.offload("a", tier=tier).result()
    rows = torch.zeros(8, 2 * page, dtype=torch.uint8, device=space.kv(0)[0].device)
    order = [5, 0, 7, 2]  # the i-th block of "a" -> row order[i]

    def dst(region: int, i: int) -> torch.Tensor:
        return rows[order[i], region * page:(region + 1) * page]
    # 1. every block lands in its row, from wherever it rests; nothing else is written
    space.read_blocks("a", dst).result()
    if rows.is_cuda:
        torch.cuda.synchronize()
    for i, row in enumerate(order):
        for kv in (0, 1):
            expected = pattern(space, "a", 0, i, 0, kv).view(torch.uint8).view(-1)
            assert torch.equal(rows[row, kv * page:(kv + 1) * page].cpu(), expected), f"block {i}, region {kv}"
    assert not rows[[1, 3, 4, 6]].any()
    assert space.residency("a")[tier] > 0  # read, not moved
    # 2. the first two only
    rows.zero_()
    space.read_blocks("a", dst, count=2).result()
    if rows.is_cuda:
        torch.cuda.synchronize()
    assert rows[order[:2]].any(dim=1).all() and not rows[order[2:]].any()
    mgr.check()


def test_read_blocks_refuses_blocks_that_share_a_page(make_manager):
    mgr = make_manager()
    space = _space(mgr, make_manager)  # 16 blocks a page
    space.allocate("a", 4 * space.block_size)
    with pytest.raises(InvalidArgumentError, match="whole pages"):
        space.read_blocks("a", lambda region, i: torch.empty(0))
    mgr.check()


def test_read_blocks_refuses_places_of_the_wrong_size_before_copying_anything(make_manager):
    mgr = make_manager()
    page = mgr.page_size
    space = mgr.create_space("blocks", num_layers=1, num_kv_heads=1, head_dim=page // 2, dtype=torch.float16,
                             block_size=1, max_tokens=4)
    space.allocate("a", 2)
    write_seq(space, "a")
    space.offload("a", tier="host").result()
    short = torch.zeros(2, page // 2, dtype=torch.uint8, device=space.kv(0)[0].device)  # half a block each
    with pytest.raises(InvalidArgumentError, match="bytes"):
        space.read_blocks("a", lambda region, i: short[i])
    # nothing was started: the sequence reads back whole, and comes back
    space.ensure_resident(["a"])
    assert_seq(space, "a")
    mgr.check()
