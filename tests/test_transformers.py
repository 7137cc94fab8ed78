"""TieredCache in ``model.generate``: the same greedy tokens as DynamicCache, with pages forced through host and
NVMe. A tiny Llama built from a config with random weights: no downloads."""

from __future__ import annotations

import warnings

import pytest
import torch

import kvtier

transformers = pytest.importorskip("transformers")
from kvtier.integrations.transformers import TieredCache  # noqa: E402


def _model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=2048)
    return transformers.LlamaForCausalLM(config).eval(), config


def _generate(model, ids, cache):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5.2x renames past_key_values to cache
        return model.generate(ids, past_key_values=cache, max_new_tokens=30, do_sample=False)


@pytest.mark.parametrize("tier", ["host", "nvme"])
def test_tiered_cache_generates_the_same_tokens_as_dynamic_cache(tier):
    model, config = _model()
    ids = torch.randint(0, 128, (2, 40))
    expected = _generate(model, ids, transformers.DynamicCache(config=config))
    page = 64 << 10
    kcfg = kvtier.Config(device="cpu", page_size=page, pool_budget=64 * page, pool_ready=0, host_size=256 * page,
                         host_chunk=64 * page, nvme_size=1024 * page, debug_checks=True)
    # one layer stays resident; the other three stream through the tier on every step
    cache = TieredCache(config, max_tokens=512, batch_size=2, config=kcfg, resident_layers=1, offload_tier=tier)
    try:
        got = _generate(model, ids, cache)
        assert torch.equal(got, expected)
        paths = cache.manager.stats()["tiers"]["paths"]
        assert paths[f"gpu->{tier}"]["pages"] > 20 and paths[f"{tier}->gpu"]["pages"] > 20
        cache.manager.check()
    finally:
        cache.close()


def test_fully_resident_cache_moves_nothing():
    model, config = _model()
    ids = torch.randint(0, 128, (1, 24))
    expected = _generate(model, ids, transformers.DynamicCache(config=config))
    cache = TieredCache(config, max_tokens=256, config=kvtier.Config(device="cpu", page_size=64 << 10,
                                                                     host_size=4 << 20, nvme_size=4 << 20))
    try:
        assert torch.equal(_generate(model, ids, cache), expected)
        assert cache.residency()["gpu"] > 0 and cache.residency()["host"] == 0
        assert not cache.manager.stats()["tiers"]["paths"]
    finally:
        cache.close()


def test_streaming_fits_a_pool_of_two_layers():
    # eight layers, all streamed, a pool that holds two: every step waits for the layer on its way down to land
    # before it maps the next one (allocate and prefetch wait for pages in flight instead of failing)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=4096)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, 600))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        expected = model.generate(ids, past_key_values=transformers.DynamicCache(config=config), max_new_tokens=20,
                                  do_sample=False)
        page = 16 << 10  # 620 tokens of a layer here are 10 handles (K and V, five pages each)
        kcfg = kvtier.Config(device="cpu", page_size=page, pool_budget=20 * page, pool_ready=0,
                             host_size=256 * page, host_chunk=64 * page, nvme_size=1024 * page)
        cache = TieredCache(config, max_tokens=1024, config=kcfg, resident_layers=0)
        try:
            got = model.generate(ids, past_key_values=cache, max_new_tokens=20, do_sample=False)
            assert torch.equal(got, expected)
            stats = cache.manager.stats()
            assert stats["pool"]["peak_bytes_created"] <= 20 * page
            # the streamed KV went up every step, but down only where new tokens were written
            up, down = (stats["tiers"]["paths"][path]["pages"] for path in ("host->gpu", "gpu->host"))
            assert stats["tiers"]["copies"]["reused_pages"] > 0 and down < up / 3
        finally:
            cache.close()


def test_prefill_leaves_room_for_activations_and_decode_brings_resident_layers_back():
    model, config = _model()
    ids = torch.randint(0, 128, (1, 300))
    kcfg = kvtier.Config(device="cpu", page_size=16 << 10, host_size=4 << 20, nvme_size=4 << 20)
    cache = TieredCache(config, max_tokens=512, config=kcfg, resident_layers=2)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            token = model(ids, past_key_values=cache).logits[:, -1:].argmax(-1)
            cache.manager.drain()
            # after the prefill only the last layer is on the GPU: the others went down as the next one began
            on_gpu = [cache.spaces[i].residency(0)["gpu"] > 0 for i in range(4)]
            assert on_gpu == [False, False, False, True]
            model(token, past_key_values=cache)
            cache.manager.drain()
            # one decode step later the two resident layers are back (and stay); the streamed ones are spread
            # among them and come and go: layer 1 went down as layer 2 began (and is on its way up for the next
            # step), so its pages crossed twice more than a resident layer's
            assert cache.streamed_layers == [1, 3]
            on_gpu = [cache.spaces[i].residency(0)["gpu"] > 0 for i in range(4)]
            assert on_gpu[0] and on_gpu[2]
            stats = cache.manager.stats()["spaces"]
            assert stats["tiered-cache.L1"]["map_calls"] > stats["tiered-cache.L0"]["map_calls"]
    finally:
        cache.close()


def test_mask_sizes_take_the_query_length_or_the_cache_positions():
    model, config = _model()
    cache = TieredCache(config, max_tokens=256, config=kvtier.Config(device="cpu", page_size=64 << 10,
                                                                     host_size=4 << 20, nvme_size=4 << 20))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model(torch.randint(0, 128, (1, 24)), past_key_values=cache)
        layer = cache.layers[0]
        # transformers 5.2x passes the query length; earlier 5.x releases the new tokens' positions
        assert layer.get_mask_sizes(1) == (25, 0)
        assert layer.get_mask_sizes(torch.arange(24, 25)) == (25, 0)
    finally:
        cache.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("resident", [None, 1])
def test_tiered_cache_on_the_gpu_generates_the_same_tokens(resident):
    model, config = _model()
    model = model.cuda()
    ids = torch.randint(0, 128, (2, 40), device="cuda")
    expected = _generate(model, ids, transformers.DynamicCache(config=config))
    kcfg = kvtier.Config(device="cuda", pool_budget=64 << 20, pool_ready=8 << 20, host_size=64 << 20,
                         nvme_size=64 << 20, debug_checks=True)
    cache = TieredCache(config, max_tokens=512, batch_size=2, config=kcfg, resident_layers=resident)
    try:
        assert torch.equal(_generate(model, ids, cache), expected)
        cache.manager.drain()
        cache.manager.check()
    finally:
        cache.close()
