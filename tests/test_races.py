"""Races between an engine's thread and the transfer worker's commits. The worker's commits are slowed at random
between each of their steps (a trace function on the worker thread sleeps at every line of the commit code: no
hook in kvtier itself), so that any call that reads page state between two steps of a commit would see it half
done; many rounds and seeds, and every byte read back must be the last one written."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from tests.conftest import write_seq


COMMIT_POINTS = {"_commit_locked", "_apply_move", "_undo_move", "_commit_read"}


@pytest.fixture
def slow_commits(request):
    """Threads started from here on (the manager's worker) pause a random 0-300 us at every line of a commit."""
    rng = random.Random(request.node.callspec.params.get("seed", 0))

    def pause(frame, event, arg):
        if event == "line":
            time.sleep(rng.uniform(0, 3e-4))
        return pause

    def tracer(frame, event, arg):
        return pause if frame.f_code.co_name in COMMIT_POINTS else None

    threading.settrace(tracer)
    yield
    threading.settrace(None)


def _rewrite(k: torch.Tensor, v: torch.Tensor, block: int, salt: int) -> None:
    """Rewrite one block through the tensors, as a kernel would (no kvtier call, so no lock taken)."""
    k[block] = salt
    v[block] = -salt


@pytest.mark.parametrize("seed", range(4))
def test_mark_written_while_the_worker_commits_a_prefetch_never_brings_old_bytes_back(make_manager, slow_commits,
                                                                                     seed):
    # a sequence goes down and comes back again and again; as soon as the step may run (wait), the engine rewrites
    # an early block and says so (mark_written) -- while the worker may still be committing the prefetch, which
    # keeps the page's host slots as a copy. Had mark_written looked at the page between the two steps of that
    # commit, the copy would survive and the next offload would reuse it: the old bytes would come back
    torch.manual_seed(seed)
    mgr = make_manager(pages=64, keep_copies=True)
    space = mgr.create_space("s", **make_manager.shape)
    per_stripe = space.page_size // space.block_bytes * space.block_size
    space.allocate("a", 2 * per_stripe)  # two stripes; the first holds no last block: brought up, it keeps a copy
    write_seq(space, "a")
    rng = random.Random(seed)
    k, v = space.kv(0)
    block = space.blocks("a")[0]  # block ids never change: an engine keeps its block table
    for salt in range(1, 60):
        space.offload_prefix("a", per_stripe, tier="host").result()  # the first stripe alone goes down
        space.prefetch(["a"]).wait(None)  # the step may run; the commit may still be under way
        time.sleep(rng.uniform(0, 8e-3))  # the engine's other work: the rewrite lands anywhere in the commit
        _rewrite(k, v, block, salt)
        space.mark_written("a", 0, space.block_size)
        space.offload_prefix("a", per_stripe, tier="host").result()  # a kept copy would be reused here
        space.prefetch(["a"]).result()
        assert (k[block] == salt).all() and (v[block] == -salt).all(), f"round {salt}: old bytes came back"
    mgr.check()


@pytest.mark.parametrize("seed", range(3))
def test_shared_blocks_found_forked_and_copied_on_write_while_the_worker_commits(make_manager, slow_commits, seed):
    # a prompt is published and freed (cached); a request shares it and is sent down -- not waited for -- while
    # another request shares the same blocks, is brought back (the step may run before the commits end), forked,
    # and the fork rewrites its first block after copy on write. Whatever point of the worker's commits each call
    # lands in, every sharer reads the prompt's bytes and the fork reads its own
    from tests.conftest import assert_holds
    rng = random.Random(seed)
    mgr = make_manager(pages=64, keep_copies=True)
    space = mgr.create_space("s", **make_manager.shape)
    bs, per_stripe = space.block_size, space.page_size // space.block_bytes
    k, v = space.kv(0)
    for r in range(25):
        tokens = list(range(r * 10_000, r * 10_000 + 2 * per_stripe * bs))  # new keys each round
        keys = space.block_keys(tokens)
        space.allocate("p", len(tokens))
        write_seq(space, "p")
        space.publish("p", keys)
        space.free("p")  # cached: found by its keys
        assert space.share_prefix("q", keys) == len(tokens)
        down = space.offload("q", tier="host")  # its stripes go down; not waited for
        time.sleep(rng.uniform(0, 4e-3))
        assert space.share_prefix("r", keys) == len(tokens)
        space.prefetch(["r"]).wait(None)  # the step may run; commits may still be under way
        assert_holds(space, "r", "p", range(2 * per_stripe))
        space.fork("r", "fork")  # whole blocks: shared, nothing copied
        space.own("fork", 0, bs)  # copy on write before the fork rewrites its first block
        _rewrite(k, v, space.blocks("fork")[0], r + 1)
        assert_holds(space, "r", "p", range(2 * per_stripe))  # the others still read the prompt
        assert (k[space.blocks("fork")[0]] == r + 1).all() and space.blocks("fork")[1:] == space.blocks("r")[1:]
        down.settle()
        space.prefetch(["q"]).result()
        assert_holds(space, "q", "p", range(2 * per_stripe))
        for seq in ("q", "r", "fork"):
            space.free(seq, retain=False)
        space.erase(b"")  # the cached prompt goes too: the next round starts empty
        mgr.check()


@pytest.mark.parametrize("seed", range(4))
def test_pages_shared_with_another_space_while_the_worker_sends_them_down(make_manager, slow_commits, seed):
    # a sequence's first stripes go down -- not waited for -- while another space shares its whole pages (what a
    # copy of an idle TieredCache does while the demoter works): pages in flight or below are not shared (the copy
    # reads them from wherever they are), the rest are; every byte both sides read is the sequence's, and a write on one side
    # after unshare is not seen by the other
    import numpy as np
    from tests.conftest import assert_seq
    rng = random.Random(seed)
    mgr = make_manager(pages=96)
    a = mgr.create_space("a", **make_manager.shape)
    b = mgr.create_space("b", **make_manager.shape)
    bs, per_stripe = a.block_size, a.page_size // a.block_bytes
    for r in range(20):
        tokens = (3 * per_stripe + rng.randrange(per_stripe)) * bs
        a.allocate("s", tokens, first_block=0)
        write_seq(a, "s", salt=r)
        down = a.offload_prefix("s", rng.randrange(1, 3) * per_stripe * bs, tier="host")  # its first stripes go
        #                                                                                      down, not waited for
        time.sleep(rng.uniform(0, 3e-3))
        shared = set(b.share_whole_pages(a, {"s": tokens}))
        b.allocate("s", tokens, first_block=0)
        books = b.block_books
        rest = [i for i, blk in enumerate(b.blocks("s"))
                if not set(books.pages_of(np.asarray([blk], dtype=np.int64))) <= shared]
        for i in rest:  # the blocks not shared: read from wherever they are (a read waits for pages in flight)
            a.read("s", [b.kv(layer) for layer in range(b.num_layers)], start=i * bs, stop=(i + 1) * bs).result()
        assert_seq(b, "s", salt=r)
        assert shared  # the stripes that stayed on the GPU
        down.settle()
        a.ensure_resident(["s"])
        assert_seq(a, "s", salt=r)
        b.unshare()
        write_seq(b, "s", salt=r + 100)
        assert_seq(a, "s", salt=r)
        a.free("s")
        b.free("s")
        mgr.check()
    assert mgr.pool.extra_mappings == 0
