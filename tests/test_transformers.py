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


@pytest.mark.parametrize("tier", ["host", "nvme", "peer"])
def test_tiered_cache_generates_the_same_tokens_as_dynamic_cache(tier):
    model, config = _model()
    ids = torch.randint(0, 128, (2, 40))
    expected = _generate(model, ids, transformers.DynamicCache(config=config))
    page = 4 << 10  # 32 tokens of one row's K (or V) in a layer
    kcfg = kvtier.Config(device="cpu", page_size=page, pool_budget=1024 * page, pool_ready=0,
                         host_size=1024 * page, host_chunk=256 * page, nvme_size=1024 * page, debug_checks=True,
                         # the peer tier on cpu:1, the CPU backend's stand-in for a second GPU
                         tiers=["peer", "host", "nvme"] if tier == "peer" else ["host", "nvme"],
                         tier_settings={"peer": {"device": "cpu:1", "size": 1024 * page}} if tier == "peer" else {})
    # one layer stays resident; the other three keep their filled pages in the tier and read them every step
    cache = TieredCache(config, max_tokens=512, batch_size=2, config=kcfg, resident_layers=1, offload_tier=tier)
    try:
        got = _generate(model, ids, cache)
        assert torch.equal(got, expected)
        cache.manager.drain()
        paths = cache.manager.stats()["tiers"]["paths"]
        # each filled page of the streamed layers went down once: tokens 0-31 after the prefill, 32-63 during
        # decode (3 layers, 2 rows); the resident layer's two pages a row went down for the prefill, and back
        assert paths[f"gpu->{tier}"]["stripes"] == 3 * 2 * 2 + 2 * 2
        assert paths[f"{tier}->gpu"]["stripes"] == 2 * 2
        # the streamed pages below were read (into the ring, nothing mapped) on every decode step
        assert paths[f"{tier}->read"]["stripes"] >= 29 * 3 * 2
        assert cache.residency()[tier] == 3 * 2 * 2 * 2 * page  # K and V
        cache.manager.check()
        # a reset cache generates the same again (reads ahead into the ring are settled, the ring given back)
        cache.reset()
        assert not any(cache.residency().values())
        assert torch.equal(_generate(model, ids, cache), expected)
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


def test_all_layers_streamed_within_the_pool_the_cache_asks_for():
    # eight layers, none resident: the pool holds the ring (two layers), each layer's last page per row, a spare
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
        page = 16 << 10  # 128 tokens of a layer's K (or V): a layer at 1024 tokens is 16 handles
        budget = TieredCache.pool_bytes(config, max_tokens=1024, resident_layers=0, page_size=page, itemsize=4)
        assert budget == 2 * 16 * page + 8 * 2 * page + 2 * page
        kcfg = kvtier.Config(device="cpu", page_size=page, pool_budget=budget, pool_ready=0,
                             host_size=256 * page, host_chunk=64 * page, nvme_size=1024 * page)
        cache = TieredCache(config, max_tokens=1024, config=kcfg, resident_layers=0)
        try:
            got = model.generate(ids, past_key_values=cache, max_new_tokens=20, do_sample=False)
            assert torch.equal(got, expected)
            cache.manager.drain()
            stats = cache.manager.stats()
            assert stats["pool"]["peak_bytes_created"] <= budget
            # the four filled pages of each layer (tokens 0-511) went down once, and were read on each of the
            # 19 decode steps (layer 0's once more: read ahead for a step that never came); each layer mapped its
            # five pages (K and V) once, and keeps the last one
            assert stats["tiers"]["paths"]["gpu->host"]["stripes"] == 8 * 4
            assert stats["tiers"]["paths"]["host->read"]["stripes"] == 19 * 8 * 4 + 4
            layers = [stats["spaces"][f"tiered-cache.L{i}"] for i in range(8)]
            assert all(s["map_calls"] == 2 * 5 and s["stripes_mapped"] == 1 for s in layers)
        finally:
            cache.close()


def test_prefill_leaves_room_for_activations_and_decode_brings_resident_layers_back():
    model, config = _model()
    ids = torch.randint(0, 128, (1, 300))
    page = 16 << 10  # 128 tokens of a layer's K (or V)
    kcfg = kvtier.Config(device="cpu", page_size=page, host_size=4 << 20, nvme_size=4 << 20)
    cache = TieredCache(config, max_tokens=512, config=kcfg, resident_layers=2)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            token = model(ids, past_key_values=cache).logits[:, -1:].argmax(-1)
            cache.manager.drain()
            # after the prefill the resident layers 0 and 2 are down (the next layer's activations had the room);
            # streamed layer 1 kept its last page (tokens 256-299) and layer 3, the last, all three for now
            assert cache.streamed_layers == [1, 3]
            pages = [cache.spaces[i].stripe_residency(0) for i in range(4)]
            assert [p["gpu"] for p in pages] == [0, 1, 0, 3] and [p["host"] for p in pages] == [3, 2, 3, 0]
            model(token, past_key_values=cache)
            cache.manager.drain()
            # one decode step later the resident layers are back, and layer 3 keeps only its last page too
            pages = [cache.spaces[i].stripe_residency(0) for i in range(4)]
            assert [p["gpu"] for p in pages] == [3, 1, 3, 1] and [p["host"] for p in pages] == [0, 2, 0, 2]
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
    torch.manual_seed(0)
    # 4 KiB of K per token, so that 512 tokens fill a 2 MiB page and a 600-token prompt streams
    config = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2048, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=8, vocab_size=128,
                                      max_position_embeddings=2048)
    model = transformers.LlamaForCausalLM(config).eval().cuda()
    ids = torch.randint(0, 128, (2, 600), device="cuda")
    expected = _generate(model, ids, transformers.DynamicCache(config=config))
    kcfg = kvtier.Config(device="cuda", page_size=2 << 20, pool_budget=128 << 20, pool_ready=8 << 20,
                         host_size=128 << 20, nvme_size=64 << 20, debug_checks=True)
    cache = TieredCache(config, max_tokens=1024, batch_size=2, config=kcfg, resident_layers=resident)
    try:
        assert torch.equal(_generate(model, ids, cache), expected)
        cache.manager.drain()
        cache.manager.check()
        read = cache.manager.stats()["tiers"]["paths"].get("host->read", {}).get("stripes", 0)
        # all four layers fit the pool; with one resident, three read their first page from host every step
        assert read == 0 if resident is None else read >= 29 * 3 * 2
        cache.reset()
        assert torch.equal(_generate(model, ids, cache), expected)
        cache.manager.drain()
        cache.manager.check()
    finally:
        cache.close()
