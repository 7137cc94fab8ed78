"""Fixtures: every test taking ``make_manager`` runs on the CPU backend, and again on CUDA under ``-m gpu``."""

from __future__ import annotations

from typing import Any, Hashable, Iterable

import os

import pytest
import torch

import kvtier
from kvtier.vmm import cuda as vmm_cuda

# The suite makes hundreds of managers, most with the default 4 GiB NVMe tier: their slot files stay sparse
# (test_slot_files.py checks that preallocation reserves the disk, and that a disk short of room is refused).
os.environ.setdefault("KVTIER_NVME_PREALLOCATE", "0")

# Per backend: the smallest page it can map, and a space shape giving 16 blocks per page on both, so that the
# same scripted scenarios cross page boundaries at the same block ids.
PAGE = {"cpu": 64 << 10, "cuda": 2 << 20}
SHAPE = {"cpu": dict(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, block_size=16),
         "cuda": dict(num_layers=2, num_kv_heads=8, head_dim=256, dtype=torch.bfloat16, block_size=32)}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Soak tests run only when asked for by name (``-m soak``): ``-m gpu`` would otherwise select their cuda
    variants, which take many minutes."""
    if "soak" not in (config.getoption("markexpr") or ""):
        kept = [item for item in items if item.get_closest_marker("soak") is None]
        if len(kept) < len(items):
            config.hook.pytest_deselected(items=[i for i in items if i not in kept])
            items[:] = kept


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def backend_name(request: pytest.FixtureRequest) -> str:
    if request.param == "cuda" and not vmm_cuda.available():
        pytest.skip("needs a CUDA GPU and cuda-python (kvtier[cu12] or kvtier[cu13])")
    return request.param


@pytest.fixture
def make_manager(backend_name: str) -> Any:
    made: list[kvtier.TierManager] = []

    def make(pages: int = 64, files: Any = None, backend: Any = None, clock: Any = None,
             **overrides: Any) -> kvtier.TierManager:
        """A manager whose pool holds ``pages`` handles; ``files``: the NVMe tier's file layer, ``backend``: the
        device layer (tests/faults.py), ``clock``: the policy's and the reserves' clock."""
        page = PAGE[backend_name]
        options = dict(device=backend_name, page_size=page, pool_budget=pages * page, pool_ready=0,
                       debug_checks=True, host_size=16 * page, host_chunk=4 * page, nvme_size=128 * page,
                       background_demotion=False, space_reserve_window_s=0)  # a fixed reserve: no clock
        options.update(overrides)
        mgr = kvtier.TierManager(kvtier.Config(**options), clock=clock, files=files, backend=backend)
        mgr.tiering.wait_ready()
        made.append(mgr)
        return mgr

    make.shape = SHAPE[backend_name]  # type: ignore[attr-defined]
    make.name = backend_name  # type: ignore[attr-defined]
    yield make
    for mgr in made:
        mgr.close()


def pattern(space: kvtier.KVSpace, seq: Hashable, salt: int, block: int, layer: int, kv: int) -> torch.Tensor:
    """Distinct, reproducible content for one block of one layer's K or V."""
    shape = (space.block_size, space.num_kv_heads, space.head_dim)
    gen = torch.Generator().manual_seed(hash((str(seq), salt, block, layer, kv)) & 0x7FFFFFFF)
    return torch.randn(shape, generator=gen).to(space.dtype)


def write_seq(space: kvtier.KVSpace, seq: Hashable, salt: int = 0) -> None:
    for layer in range(space.num_layers):
        for kv, tensor in enumerate(space.kv(layer)):
            for i, b in enumerate(space.blocks(seq)):
                tensor[b] = pattern(space, seq, salt, i, layer, kv).to(tensor.device)


def assert_seq(space: kvtier.KVSpace, seq: Hashable, salt: int = 0) -> None:
    for layer in range(space.num_layers):
        for kv, tensor in enumerate(space.kv(layer)):
            for i, b in enumerate(space.blocks(seq)):
                expected = pattern(space, seq, salt, i, layer, kv)
                assert torch.equal(tensor[b].cpu(), expected), f"{seq} block {i} layer {layer} kv {kv} differs"


def assert_holds(space: kvtier.KVSpace, seq: Hashable, source: Hashable, blocks: Iterable[int]) -> None:
    """``seq``'s blocks of index ``blocks`` hold what ``write_seq(space, source)`` wrote into ``source``'s blocks
    of the same index (a fork, a shared prefix)."""
    held = space.blocks(seq)
    for layer in range(space.num_layers):
        for kv, tensor in enumerate(space.kv(layer)):
            for i in blocks:
                assert torch.equal(tensor[held[i]].cpu(), pattern(space, source, 0, i, layer, kv)), (seq, i, layer, kv)
