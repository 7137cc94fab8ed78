"""The layers' seams: imports go one way, tiers are one enum with one map, plans change nothing until they commit,
queries only report (CPU; CUDA under -m gpu where a manager is made)."""

from __future__ import annotations

import ast
import os

import pytest

import kvtier
from kvtier.tiering import FIRST_LOWER, Tier
from tests.conftest import PAGE, assert_seq, write_seq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BPP = 16  # blocks per page in the test shape

# what each lower layer may import of kvtier (the front door, ``kvtier/``, may import them all)
ALLOWED = {
    "vmm": {"kvtier.errors", "kvtier.vmm"},
    "policies": {"kvtier.errors", "kvtier.policies"},
    "tiering": {"kvtier.errors", "kvtier.config", "kvtier.vmm", "kvtier.policies", "kvtier.tiering"},
}


def _kvtier_imports(path: str) -> set[str]:
    tree = ast.parse(open(path).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {n for n in names if n == "kvtier" or n.startswith("kvtier.")}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_go_one_way(layer):
    for folder, _, files in os.walk(os.path.join(ROOT, layer)):
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            for module in _kvtier_imports(path):
                assert any(module == a or module.startswith(a + ".") for a in ALLOWED[layer]), \
                    f"{os.path.relpath(path, ROOT)} imports {module}: a layer imports only what lies below it"


def test_tiers_are_numbered_in_their_configured_order_with_names_at_the_edges(make_manager):
    stack = make_manager().tiering.stack
    assert stack.names == ["host", "nvme"] and stack.ids == [FIRST_LOWER, FIRST_LOWER + 1]
    assert stack.named("host") == FIRST_LOWER and stack.label(FIRST_LOWER + 1) == "nvme"
    assert stack.label(Tier.GPU) == "gpu" and stack.below(Tier.GPU) == stack.ids
    with pytest.raises(kvtier.InvalidArgumentError, match="'ssd' is not a tier of this manager"):
        stack.named("ssd")


def test_every_lower_tier_has_books_and_every_pair_a_route(make_manager):
    mgr = make_manager()
    tiering = mgr.tiering
    for tier in tiering.stack:
        assert tiering.books(tier.id) is tier.books and tiering.tier(tier.name) is tier
        assert (Tier.GPU, tier.id) in tiering.mover.routes and (tier.id, Tier.GPU) in tiering.mover.routes
    host, nvme = tiering.stack.ids
    assert (host, nvme) in tiering.mover.routes and (nvme, host) in tiering.mover.routes


def test_an_allocate_that_cannot_be_backed_moves_nothing(make_manager):
    # a pool of 8 pages (4 handles each), and room below for one page in each tier
    handle = PAGE[make_manager.name]
    mgr = make_manager(pages=32, host_size=4 * handle, host_chunk=4 * handle, nvme_size=4 * handle)
    space = mgr.create_space("m", max_tokens=256 * make_manager.shape["block_size"], **make_manager.shape)
    # an idle sequence holds 4 pages on the GPU
    space.allocate("idle", 4 * BPP * space.block_size)
    write_seq(space, "idle")
    space.offload("idle")  # idle, left where it is (no background demotion here)
    assert space.stripe_residency("idle")["gpu"] == 4
    # a sequence of 7 pages: the pool has 4, and demoting could free only 2 -- so nothing is demoted
    with pytest.raises(kvtier.OutOfPagesError):
        space.allocate("big", 7 * BPP * space.block_size)
    assert space.stripe_residency("idle") == {"gpu": 4, "host": 0, "nvme": 0, "lost": 0}
    assert mgr.stats()["tiers"]["paths"] == {} and "big" not in space.sequences()
    mgr.check()
    # one of 5 pages fits after demoting one idle page: exactly one goes down
    space.allocate("fits", 5 * BPP * space.block_size)
    assert space.stripe_residency("idle")["gpu"] == 3 and sum(space.stripe_residency("idle").values()) == 4
    mgr.check()


def test_done_only_reports(make_manager):
    mgr = make_manager()
    space = mgr.create_space("m", max_tokens=256 * make_manager.shape["block_size"], **make_manager.shape)
    space.allocate("a", 2 * BPP * space.block_size)
    write_seq(space, "a")
    space.offload("a", tier="host").result()
    # holding the lock keeps the worker from committing: done() says no, and asking changes nothing
    with mgr.lock:
        handle = space.prefetch(["a"])
        for _ in range(3):
            assert not handle.done()
        assert set(space.pages.moving) == set(space.block_books.pages_of_seqs(["a"]))
    handle.result()  # commits
    assert handle.done() and not space.pages.moving
    assert_seq(space, "a")
    mgr.check()


def test_a_dropped_space_waits_for_its_transfers(make_manager):
    mgr = make_manager()
    space = mgr.create_space("m", max_tokens=256 * make_manager.shape["block_size"], **make_manager.shape)
    other = mgr.create_space("n", max_tokens=256 * make_manager.shape["block_size"], **make_manager.shape)
    for s in (space, other):
        s.allocate("a", 2 * BPP * s.block_size)
        write_seq(s, "a")
    # both go down at once; dropping one waits for its transfer, the other's lands untouched
    space.offload("a", tier="nvme")
    handle = other.offload("a", tier="nvme")
    mgr.drop_space("m")
    handle.result()
    other.ensure_resident(["a"])
    assert_seq(other, "a")
    assert mgr.stats()["tiers"]["nvme"]["slots_used"] == 0 or other.residency("a")["gpu"] > 0
    mgr.check()
