"""GPU-only scenarios: kernels on the space's tensors while other pages are mapped and unmapped, and
stream-ordered unmapping. Run with ``pytest -m gpu`` on a GPU machine."""

from __future__ import annotations

import pytest
import torch

import kvtier
from kvtier.vmm import cuda as vmm_cuda
from tests.conftest import PAGE, SHAPE

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not vmm_cuda.available(), reason="needs a CUDA GPU and cuda-python")]


@pytest.fixture
def mgr():
    m = kvtier.TierManager(kvtier.Config(device="cuda", page_size=PAGE["cuda"], pool_budget=256 * PAGE["cuda"],
                                         pool_ready=32 * PAGE["cuda"], space_reserve_pages=0, debug_checks=True))
    yield m
    m.close()


def test_kernels_read_and_write_while_other_pages_map_and_unmap(mgr):
    space = mgr.create_space("m", max_tokens=1 << 14, **SHAPE["cuda"])
    blocks = torch.tensor(space.allocate("a", 64 * space.block_size), device="cuda")
    side = torch.cuda.Stream()
    k, v = space.kv(1)
    with torch.cuda.stream(side):
        # a long chain of kernels writes and reads "a" on a side stream...
        k[blocks] = 1.0
        for _ in range(200):
            k[blocks] = k[blocks] * 1.0 + 1.0
        v[blocks] = k[blocks] * 2.0
    # ...while the host maps and unmaps other sequences' pages
    for i in range(20):
        space.allocate(f"b{i}", 40 * space.block_size)
        space.free(f"b{i}")
    side.synchronize()
    assert torch.all(k[blocks] == 201.0) and torch.all(v[blocks] == 402.0)
    mgr.check()


def test_unmap_waits_for_the_kernels_still_reading(mgr):
    space = mgr.create_space("m", max_tokens=1 << 14, **SHAPE["cuda"])
    blocks = torch.tensor(space.allocate("a", 48 * space.block_size), device="cuda")
    k, _ = space.kv(0)
    k[blocks] = 3.0
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # keep the stream busy (~100 ms) before the read
        copy = k[blocks].clone()
    # free on that stream: the pages must stay mapped until the read has run
    space.free("a", stream=side)
    assert space.stats()["stripes_mapped"] == 3
    space.allocate("tiny", 1)  # a later call trims only what is safe
    assert space.stats()["stripes_mapped"] >= 3
    side.synchronize()
    assert torch.all(copy == 3.0)
    space.free("tiny")
    assert space.stats()["stripes_mapped"] == 0
    mgr.check()


def test_decode_attention_matches_plain_tensors(mgr):
    from kvtier.bench.vmm import decode_overhead
    table = decode_overhead("cuda", batch=4, tokens=1024, repeat=2)  # asserts equal outputs inside
    assert table.rows[1][2] > 0


@pytest.fixture
def tier_mgr():
    page = PAGE["cuda"]
    m = kvtier.TierManager(kvtier.Config(device="cuda", page_size=page, pool_budget=256 * page, pool_ready=32 * page,
                                         debug_checks=True, host_size=64 * page, host_chunk=16 * page,
                                         nvme_size=128 * page, background_demotion=False))
    m.tiering.wait_ready()
    yield m
    m.close()


@pytest.mark.parametrize("tier", ["host", "nvme"])
def test_demotion_waits_for_the_kernel_still_writing(tier_mgr, tier):
    space = tier_mgr.create_space("m", max_tokens=1 << 14, **SHAPE["cuda"])
    blocks = torch.tensor(space.allocate("a", 48 * space.block_size), device="cuda")
    k, v = space.kv(1)
    k[blocks] = 1.0
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # the write below lands ~100 ms after offload is called
        k[blocks] = 7.0
        v[blocks] = 9.0
    # offload right away, naming the stream that is still writing
    space.offload("a", tier=tier, stream=side).result()
    space.ensure_resident(["a"])
    # what came back is what the kernel wrote, never the stale 1.0
    assert torch.all(k[blocks] == 7.0) and torch.all(v[blocks] == 9.0)
    tier_mgr.check()


def test_prefetch_wait_is_device_side(tier_mgr):
    space = tier_mgr.create_space("m", max_tokens=1 << 14, **SHAPE["cuda"])
    blocks = torch.tensor(space.allocate("a", 64 * space.block_size), device="cuda")
    k, _ = space.kv(0)
    k[blocks] = 5.0
    space.offload("a", tier="host").result()
    step = torch.cuda.Stream()
    handle = space.prefetch(["a"])
    handle.wait(step)  # returns at once; the step's stream waits on the copy
    with torch.cuda.stream(step):
        total = k[blocks].float().sum()
    step.synchronize()
    assert total.item() == 5.0 * k[blocks].numel()
    handle.result()
    assert tier_mgr.stats()["tiers"]["stalls"]["count"] >= 1
    tier_mgr.check()


def test_a_page_digest_is_the_same_on_the_gpu_and_the_host():
    # the digest of an NVMe slot is taken where the bytes are (GPU for kvikio's direct I/O, host for the cascade)
    # and verified where they land: both must give the same value for the same bytes, and see one flipped bit
    from kvtier.tiering.tiers.digest import digest
    gen = torch.Generator().manual_seed(5)
    for nbytes in (4096, 2 << 20, 8 << 20):
        host = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
        assert digest(host) == digest(host.cuda())
        flipped = host.clone()
        flipped[nbytes // 3] ^= 4
        assert digest(flipped.cuda()) != digest(host)
    ones = torch.full((8 << 20,), 255, dtype=torch.uint8)  # every word's sum wraps: the same wrap on both
    assert digest(ones) == digest(ones.cuda())
