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
