"""Forks: a sequence started from another's tokens shares its whole blocks (reference-counted, in any tier) and
copies only a partly filled last block (CPU; CUDA under -m gpu)."""

from __future__ import annotations

import pytest
import torch

import kvtier
from tests.conftest import assert_holds, pattern, write_seq

BPP = 16  # blocks per page in the suite's shapes


def _space(mgr, make_manager, blocks=256):
    return mgr.create_space("m", max_tokens=blocks * make_manager.shape["block_size"], **make_manager.shape)


def test_a_fork_shares_whole_blocks_and_copies_the_last_one(make_manager):
    mgr = make_manager()
    space = _space(mgr, make_manager)
    bs = space.block_size
    # a prompt of 40 whole blocks (2.5 pages) and 5 tokens more
    space.allocate("prompt", 40 * bs + 5)
    write_seq(space, "prompt")
    # two forks: the 40 whole blocks are the prompt's, held three times; each has its own copy of the last block
    a, b = space.fork("prompt", "a"), space.fork("prompt", "b")
    prompt = space.blocks("prompt")
    assert a[:40] == b[:40] == prompt[:40] and len({a[40], b[40], prompt[40]}) == 3
    assert space.block_books.refs[prompt[:40]].tolist() == [3] * 40 and space.num_tokens("a") == 40 * bs + 5
    assert_holds(space, "a", "prompt", range(41))
    mgr.check()
    # each grows on blocks of its own; the prompt's bytes do not change
    space.allocate("a", 60 * bs)
    space.allocate("b", 45 * bs)
    for layer in range(space.num_layers):
        for tensor in space.kv(layer):
            tensor[space.blocks("a")[41:]] = 1
            tensor[space.blocks("b")[41:]] = 2
    assert_holds(space, "prompt", "prompt", range(41))
    # the prompt goes: the forks keep the blocks they share, with its bytes
    space.free("prompt")
    assert_holds(space, "a", "prompt", range(40))
    assert_holds(space, "b", "prompt", range(40))
    mgr.check()

    # a shared page goes down only once every sequence on it is idle, and comes back for both
    space.offload("a", tier="host").result()
    assert space.stripe_residency("a")["host"] >= 1 and space.stripe_residency("a")["gpu"] >= 3
    assert space.residency("b")["host"] == 0  # b is active: the pages it shares with a stayed up
    space.offload("b", tier="nvme").result()
    assert space.residency("a")["gpu"] == 0 and space.residency("b")["gpu"] == 0
    space.prefetch(["b"]).result()
    assert_holds(space, "b", "prompt", range(40))
    space.prefetch(["a"]).result()
    assert_holds(space, "a", "prompt", range(40))
    mgr.check()

    # a prefix dropped by one fork stays the other's
    on_gpu = space.residency("b")["gpu"]
    space.drop_prefix("a", 40 * bs).result()
    assert space.residency("b")["gpu"] == on_gpu
    assert_holds(space, "b", "prompt", range(40))
    mgr.check()
    space.free("a")
    space.free("b")
    assert not space.block_books.refs.any()
    assert all(mgr.stats()["tiers"][t]["slots_used"] == 0 for t in ("host", "nvme"))
    mgr.check()


def test_a_fork_needs_the_parents_last_block_on_the_gpu_and_a_new_id(make_manager):
    mgr = make_manager()
    space = _space(mgr, make_manager)
    bs = space.block_size
    space.allocate("prompt", 3 * bs + 1)
    write_seq(space, "prompt")
    space.allocate("other", bs)
    with pytest.raises(kvtier.InvalidArgumentError, match="exists already"):
        space.fork("prompt", "other")
    # below, its last block cannot be copied: prefetch first; nothing changed meanwhile
    space.free("other")  # (it shared the prompt's page, which would stay up)
    space.offload("prompt", tier="host").result()
    with pytest.raises(kvtier.NotResidentError, match="prefetch 'prompt'"):
        space.fork("prompt", "child")
    assert "child" not in space.sequences()
    mgr.check()
    space.prefetch(["prompt"]).result()
    space.fork("prompt", "child")
    assert_holds(space, "child", "prompt", range(4))
    # a parent of whole blocks only is shared whole, nothing copied
    space.allocate("whole", 2 * bs)
    write_seq(space, "whole")
    assert space.fork("whole", "twin") == space.blocks("whole")
    mgr.check()


def test_a_fork_rewriting_shared_tokens_copies_them_first(make_manager):
    mgr = make_manager()
    space = _space(mgr, make_manager)
    bs = space.block_size
    space.allocate("prompt", 20 * bs)
    write_seq(space, "prompt")
    space.fork("prompt", "beam")
    # rewriting shared tokens without a copy is refused (the prompt would read the beam's bytes)
    with pytest.raises(kvtier.InvalidArgumentError, match="call own"):
        space.mark_written("beam", 2 * bs, 3 * bs)
    # own(): the beam gets its own copies of blocks 2..4 (tokens 40..70 of 16-token blocks and the like)
    before = space.blocks("beam")
    after = space.own("beam", 2 * bs + 3, 4 * bs + 1)
    assert after[:2] == before[:2] and after[5:] == before[5:]
    assert not set(after[2:5]) & set(space.blocks("prompt"))
    assert space.block_books.refs[space.blocks("prompt")[2:5]].tolist() == [1, 1, 1]
    assert_holds(space, "beam", "prompt", range(20))
    # the beam rewrites them: the prompt keeps its bytes
    for layer in range(space.num_layers):
        for tensor in space.kv(layer):
            tensor[after[2:5]] = 3
    space.mark_written("beam", 2 * bs, 5 * bs)
    assert_holds(space, "prompt", "prompt", range(20))
    assert space.own("beam", 2 * bs, 5 * bs) == after  # its own already: nothing to copy
    mgr.check()
    space.free("prompt")
    space.free("beam")
    assert not space.block_books.refs.any()
    mgr.check()
