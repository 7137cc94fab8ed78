"""Fences on CUDA streams (``CudaBackend.record_fence``): pooled driver events that answer as torch's do."""

from __future__ import annotations

import pytest
import torch

from kvtier.vmm import cuda as vmm_cuda

pytestmark = pytest.mark.gpu


@pytest.fixture
def backend():
    if not vmm_cuda.available():
        pytest.skip("needs a CUDA GPU and cuda-python (kvtier[cu12] or kvtier[cu13])")
    b = vmm_cuda.CudaBackend(0)
    yield b
    b.close()


def test_a_fence_marks_its_point_on_the_stream_and_streams_wait_on_it(backend):
    busy, other = torch.cuda.Stream(), torch.cuda.Stream()
    y = torch.zeros(1 << 20, device="cuda")
    x = torch.zeros_like(y)
    torch.cuda.synchronize()
    # a long kernel, then a write, on one stream: the fence after them is not reached yet
    with torch.cuda.stream(busy):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU clocks
        y.fill_(1)
    fence = backend.record_fence(busy)
    assert not fence.query()
    # another stream waits on it (as torch's wait_event does with an event), then reads what was written
    other.wait_event(fence)
    with torch.cuda.stream(other):
        x.copy_(y)
    fence.synchronize()
    assert fence.query()
    other.synchronize()
    assert bool((x == 1).all())
    # the current stream by default
    torch.cuda._sleep(100_000_000)
    assert not backend.record_fence().query()
    torch.cuda.synchronize()


def test_a_fences_event_is_reused_only_once_no_holder_is_left(backend):
    first = backend.record_fence()
    made = backend._events.made
    # two pages emptied by one free share its fence: its event stays theirs while either holds it
    second_holder = first
    del first
    fresh = backend.record_fence()
    assert backend._events.made == made + 1 and fresh._event is not second_holder._event
    event = second_holder._event
    del second_holder
    again = backend.record_fence()
    assert backend._events.made == made + 1 and again._event is event
    torch.cuda.synchronize()
    assert again.query() and fresh.query()
