"""TieredCache against DynamicCache, differentially: transformers' own generation modes and hand-written loops, on
tiny random models of several architectures, with every layer resident, some streamed through host memory, or
none resident and streamed through NVMe. Tokens (and, where a loop reads them, keys) must be equal.
CPU here; a subset on the GPU under -m gpu."""

from __future__ import annotations

import warnings

import pytest
import torch

import kvtier

transformers = pytest.importorskip("transformers")
from transformers.generation import utils as generation_utils  # noqa: E402

from kvtier.integrations.transformers import TieredCache  # noqa: E402

CACHE_KW = "cache" if "cache" in getattr(generation_utils, "ALL_CACHE_NAMES", ()) else "past_key_values"
PAGE = 4 << 10  # 32 tokens of one row's K (or V) of a layer at 2 heads x 16 dims in fp32
TIERS = {  # name: (resident_layers, offload_tier)
    "resident": (None, "host"),
    "some-host": (1, "host"),
    "none-nvme": (0, "nvme"),
}
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=2048)


def _arch(name: str):
    torch.manual_seed(0)
    if name == "llama":
        config = transformers.LlamaConfig(**SMALL)
        return transformers.LlamaForCausalLM(config).eval(), config
    if name == "qwen2":
        config = transformers.Qwen2Config(**SMALL)
        return transformers.Qwen2ForCausalLM(config).eval(), config
    if name == "qwen3":
        config = transformers.Qwen3Config(**SMALL, head_dim=16)
        return transformers.Qwen3ForCausalLM(config).eval(), config
    if name == "mistral-window":
        config = transformers.MistralConfig(**SMALL, sliding_window=24)
        return transformers.MistralForCausalLM(config).eval(), config
    if name == "gemma2":
        config = transformers.Gemma2Config(**SMALL, head_dim=16, sliding_window=24)
        return transformers.Gemma2ForCausalLM(config).eval(), config
    if name == "gemma3":
        config = transformers.Gemma3TextConfig(**SMALL, head_dim=16, sliding_window=24)
        return transformers.Gemma3ForCausalLM(config).eval(), config
    if name == "gemma3n":  # KV sharing: the last layers read the K/V two earlier layers stored in this forward
        layer_types = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
                       "full_attention", "sliding_attention", "full_attention", "sliding_attention"]
        config = transformers.Gemma3nTextConfig(**dict(SMALL, num_hidden_layers=8), head_dim=16, sliding_window=8,
                                                num_kv_shared_layers=3, layer_types=layer_types, laurel_rank=8,
                                                hidden_size_per_layer_input=16, vocab_size_per_layer_input=128,
                                                altup_num_inputs=2, activation_sparsity_pattern=[0.0] * 8)
        return transformers.Gemma3nForCausalLM(config).eval(), config
    if name == "gpt2":
        config = transformers.GPT2Config(n_embd=64, n_layer=4, n_head=4, vocab_size=128, n_positions=2048)
        return transformers.GPT2LMHeadModel(config).eval(), config
    raise AssertionError(name)


def _tiered(config, tier: str, max_tokens: int = 512, **kwargs) -> TieredCache:
    resident, offload = TIERS[tier]
    kcfg = kvtier.Config(device="cpu", page_size=PAGE, pool_budget=2048 * PAGE, pool_ready=0,
                         host_size=1024 * PAGE, host_chunk=256 * PAGE, nvme_size=2048 * PAGE, debug_checks=True)
    return TieredCache(config, max_tokens=max_tokens, config=kcfg, resident_layers=resident, offload_tier=offload,
                       **kwargs)


def _generate(model, ids, cache, **kwargs):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(ids, **{CACHE_KW: cache}, pad_token_id=0, **kwargs)


def _both(model, config, tier, run):
    """``run(cache)`` with a DynamicCache and with a TieredCache; the TieredCache's books are checked."""
    expected = run(transformers.DynamicCache(config=config))
    cache = _tiered(config, tier)
    try:
        got = run(cache)
        if cache.manager is not None:
            cache.manager.check()
    finally:
        cache.close()
    return expected, got


def _ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- generation modes (Llama), every tier setting --------------------------------------------------------------
def _greedy(model, cache):
    return _generate(model, _ids(2, 40), cache, max_new_tokens=16, do_sample=False)


def _sampling(model, cache):
    torch.manual_seed(7)
    return _generate(model, _ids(2, 40), cache, max_new_tokens=16, do_sample=True, top_k=20)


def _left_padded(model, cache):
    ids = _ids(3, 36)
    mask = torch.ones_like(ids)
    mask[0, :9], mask[2, :20] = 0, 0
    ids[mask == 0] = 0
    return _generate(model, ids, cache, attention_mask=mask, max_new_tokens=14, do_sample=False)


def _beam_search(model, cache):
    return _generate(model, _ids(2, 40), cache, max_new_tokens=10, num_beams=3, do_sample=False)


def _return_sequences(model, cache):
    torch.manual_seed(3)
    return _generate(model, _ids(1, 40), cache, max_new_tokens=10, do_sample=True, num_return_sequences=3)


def _chunked_prefill(model, cache):
    return _generate(model, _ids(2, 90), cache, max_new_tokens=12, do_sample=False, prefill_chunk_size=32)


def _chat(model, cache, reply: int = 4, turns: int = 4):
    ids, out = _ids(1, 30), []
    for turn in range(turns):
        ids = _generate(model, ids, cache, max_new_tokens=reply, do_sample=False)
        out.append(ids)
        ids = torch.cat([ids, _ids(1, 1 + turn % 2, seed=10 + turn)], dim=1)  # a one- or two-token user turn
    return torch.cat([o.flatten() for o in out])


def _chat_long_replies(model, cache):
    return _chat(model, cache, reply=40, turns=3)


def _prompt_lookup(model, cache):
    ids = torch.cat([_ids(1, 20)] * 3, dim=1)  # repeats, so that the lookup finds candidates
    return _generate(model, ids, cache, max_new_tokens=16, do_sample=False, prompt_lookup_num_tokens=3)


MODES = [_greedy, _sampling, _left_padded, _beam_search, _return_sequences, _chunked_prefill, _chat,
         _chat_long_replies, _prompt_lookup]


@pytest.mark.parametrize("tier", sorted(TIERS))
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.__name__.strip("_"))
def test_llama_generation_modes_give_dynamic_cache_tokens(mode, tier):
    model, config = _arch("llama")
    expected, got = _both(model, config, tier, lambda cache: mode(model, cache))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("tier", sorted(TIERS))
def test_assisted_decoding_gives_dynamic_cache_tokens(tier):
    model, config = _arch("llama")
    torch.manual_seed(1)
    assistant = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**SMALL, "num_hidden_layers": 1})).eval()
    run = lambda cache: _generate(model, _ids(1, 40), cache, max_new_tokens=16, do_sample=False,  # noqa: E731
                                  assistant_model=assistant)
    expected, got = _both(model, config, tier, run)
    assert torch.equal(got, expected)


# --- architectures, a few modes each ------------------------------------------------------------------------------
@pytest.mark.parametrize("tier", sorted(TIERS))
@pytest.mark.parametrize("mode", [_greedy, _beam_search, _chunked_prefill, _chat], ids=lambda m: m.__name__.strip("_"))
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral-window", "gemma2", "gemma3", "gemma3n", "gpt2"])
def test_architectures_give_dynamic_cache_tokens(arch, mode, tier):
    model, config = _arch(arch)
    expected, got = _both(model, config, tier, lambda cache: mode(model, cache))
    assert torch.equal(got, expected)


# --- sliding windows: only about two windows are kept ---------------------------------------------------------------
@pytest.mark.parametrize("arch", ["mistral-window", "gemma2"])
@pytest.mark.parametrize("mode", ["greedy", "beam", "loop"])
def test_sliding_layers_keep_only_their_window(arch, mode):
    model, config = _arch(arch)  # a window of 24 tokens; 32 tokens a page
    runs = {
        "greedy": lambda c: _generate(model, _ids(2, 200), c, max_new_tokens=40, do_sample=False),
        "beam": lambda c: _generate(model, _ids(1, 200), c, max_new_tokens=12, num_beams=2, do_sample=False),
        "loop": lambda c: _loop(model, c, steps=(150, 1, 3, 1, -2, 1, 5, -4, 1, 1), ids=_ids(2, 170, seed=4)),
    }
    expected = runs[mode](transformers.DynamicCache(config=config))
    cache = _tiered(config, "some-host")
    try:
        got = runs[mode](cache)
        if mode == "loop":  # tokens, and every layer's keys (a sliding layer's: its last window - 1 tokens)
            assert torch.equal(got[0], expected[0])
            assert all(torch.equal(a, b) for a, b in zip(got[1], expected[1]))
        else:
            assert torch.equal(got, expected)
        cache.manager.drain()
        stats = cache.manager.stats()["spaces"]
        sliding = [i for i, layer in enumerate(cache.layers) if layer.is_sliding]
        assert sliding and all(layer.is_sliding == (cache.layers[i].window is not None)
                               for i, layer in enumerate(cache.layers))
        for i in sliding:  # old pages dropped: what stays mapped is about two windows a row
            s = stats[cache.spaces[i].name]
            assert s["stripes_dropped"] > 0 and s["stripes_mapped"] <= 4 * cache.rows, s
        cache.manager.check()
    finally:
        cache.close()


def test_a_sliding_layer_refuses_a_crop_past_what_it_kept():
    model, config = _arch("mistral-window")
    cache = _tiered(config, "resident")
    try:
        with torch.no_grad():
            model(_ids(1, 200), **{CACHE_KW: cache})
        cache.crop(-10)  # within the slack: fine
        with pytest.raises(kvtier.InvalidArgumentError, match="cannot be cropped back"):
            cache.crop(-60)
    finally:
        cache.close()


# --- hand-written loops: 1- and k-token steps, crop, iteration, keys -----------------------------------------------
def _loop(model, cache, steps=(40, 1, 1, 3, 1, 5, 1, 1, -4, 1, 2, 1, -1, 1), ids=None):
    """Feed the model chunks of ``k`` tokens (``-k``: crop k tokens and go on from there); return every logit
    row's argmax, and each layer's keys at the end."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = _ids(2, 80, seed=5) if ids is None else ids
        tokens, pos = [], 0
        if any(cache.is_sliding) and hasattr(cache, "activate_past_recording"):
            cache.activate_past_recording()  # DynamicCache's sliding layers refuse a crop past the window otherwise
        for k in steps:
            if k < 0:
                cache.crop(k)
                pos += k
                continue
            out = model(ids[:, pos:pos + k], **{CACHE_KW: cache}, use_cache=True)
            tokens.append(out.logits.argmax(-1))
            pos += k
        assert cache.get_seq_length() == pos
        cache.crop(0)  # DynamicCache's sliding layers recording their past go back to their window
        keys = [item[0].clone() for item in cache]
        return torch.cat(tokens, dim=1), keys


@pytest.mark.parametrize("steps", [(40, 1, 1, 3, 1, 5, 1, 1, -4, 1, 2, 1, -1, 1),
                                   # a crop back below tokens a streamed layer keeps below, then rewritten
                                   (64, 1, 1, -5, 3, 1, 1, 30, 1, -3, 2, 1)], ids=["crops", "crop-below"])
@pytest.mark.parametrize("tier", sorted(TIERS))
def test_a_manual_loop_with_k_token_steps_and_crops(tier, steps):
    model, config = _arch("llama")
    run = lambda cache: _loop(model, cache, steps, ids=_ids(2, 120, seed=5))  # noqa: E731
    (expected, keys), (got, got_keys) = _both(model, config, tier, run)
    assert torch.equal(got, expected)
    assert len(got_keys) == len(keys) and all(torch.equal(a, b) for a, b in zip(got_keys, keys))


def test_keys_and_values_stay_readable_after_reset_and_after_a_prefill_sent_layers_down():
    model, config = _arch("llama")
    cache = _tiered(config, "some-host")
    try:
        with torch.no_grad():
            model(_ids(1, 100), **{CACHE_KW: cache})
        reference = transformers.DynamicCache(config=config)
        with torch.no_grad():
            model(_ids(1, 100), **{CACHE_KW: reference})
        # after the prefill, resident layers are down and streamed ones partly below: keys are read back whole
        for layer, ref in zip(cache.layers, reference.layers):
            assert torch.equal(layer.keys, ref.keys) and torch.equal(layer.values, ref.values)
        cache.reset()
        assert all(layer.keys is None and layer.values is None for layer in cache.layers)
        assert cache.get_seq_length() == 0
    finally:
        cache.close()


def test_the_batch_is_learned_from_the_first_update_and_may_change_after_reset():
    model, config = _arch("llama")
    cache = _tiered(config, "some-host")
    try:
        for batch in (2, 4, 1):
            expected = _generate(model, _ids(batch, 40), transformers.DynamicCache(config=config),
                                 max_new_tokens=8, do_sample=False)
            assert torch.equal(_generate(model, _ids(batch, 40), cache, max_new_tokens=8, do_sample=False), expected)
            assert cache.rows == batch
            cache.reset()
        # a different batch while the cache holds tokens is refused, saying what to do
        with torch.no_grad():
            model(_ids(2, 10), **{CACHE_KW: cache})
        with pytest.raises(kvtier.InvalidArgumentError, match="reset"):
            with torch.no_grad():
                model(_ids(3, 1), **{CACHE_KW: cache})
    finally:
        cache.close()


def test_batch_select_and_repeat_keep_each_rows_past():
    model, config = _arch("llama")
    for tier in sorted(TIERS):
        reference, cache = transformers.DynamicCache(config=config), _tiered(config, tier)
        try:
            with torch.no_grad():
                for c in (reference, cache):
                    model(_ids(3, 70), **{CACHE_KW: c})
                    c.batch_select_indices(torch.tensor([2, 0]))
                    c.batch_repeat_interleave(2)  # four rows: 2, 2, 0, 0 -- more than the cache first held
                    model(_ids(4, 1), **{CACHE_KW: c})
            for (k, v, *_), (rk, rv, *_) in zip(cache, reference):
                assert torch.equal(k, rk) and torch.equal(v, rv)
            cache.manager.check()
        finally:
            cache.close()


@pytest.mark.parametrize("max_tokens", [512, 500])
def test_a_beam_reorder_maps_rows_whole_pages_instead_of_copying_them(max_tokens):
    # beams reordered as beam search does, step after step: a row that takes another's past maps that row's whole
    # pages (the four beams' common prompt held once), copies only its last page; crops back into the remapped
    # past and reorders again; every K and V equal DynamicCache's, and the pool holds what was shared once. (500
    # tokens a row are not whole pages: the row's room is rounded up to them)
    model, config = _arch("llama")
    prompt = _ids(1, 130).repeat(4, 1)  # four beams over one prompt: 4 whole pages of 32 tokens a row, and 2
    reference, cache = transformers.DynamicCache(config=config), _tiered(config, "resident", max_tokens=max_tokens)
    try:
        with torch.no_grad():
            for c in (reference, cache):
                model(prompt, **{CACHE_KW: c})
            before = cache.manager.pool.in_use_pages
            steps = [[0, 0, 0, 0], [1, 0, 3, 2], [2, 2, 1, 0], [3, 3, 3, 3]]
            for n, order in enumerate(steps):
                for c in (reference, cache):
                    c.reorder_cache(torch.tensor(order))
                    model(_ids(4, 1, seed=40 + n), **{CACHE_KW: c})
                if n == 0:  # every row maps row 0's whole pages: three rows' worth of them went back
                    regions = 2 * len(cache.layers)
                    assert cache.manager.pool.in_use_pages == before - 3 * 4 * regions
                    assert all(len(s.pages.shared) == 16 for s in cache.spaces)
                cache.manager.check()
            for c in (reference, cache):  # back into the remapped past, then on
                c.crop(-40)
                model(_ids(4, 2, seed=50), **{CACHE_KW: c})
                c.reorder_cache(torch.tensor([2, 3, 0, 1]))
                model(_ids(4, 1, seed=51), **{CACHE_KW: c})
        for (k, v, *_), (rk, rv, *_) in zip(cache, reference):
            assert torch.equal(k, rk) and torch.equal(v, rv)
        cache.manager.check()
    finally:
        cache.close()


def test_a_positive_crop_is_refused_as_dynamic_cache_refuses_it():
    model, config = _arch("llama")
    cache = _tiered(config, "resident")
    try:
        with torch.no_grad():
            model(_ids(1, 10), **{CACHE_KW: cache})
        with pytest.raises(ValueError):
            cache.crop(3)
        assert cache.get_seq_length() == 10
    finally:
        cache.close()


# --- on the GPU: a subset, with a model whose prompt fills 2 MiB pages ----------------------------------------------
def _gpu_llama():
    """A 4-layer Llama with 8 KV heads of 128 (2 KiB of K a token: 1024 tokens a 2 MiB page), fp32, on the GPU."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2048, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=8, vocab_size=128,
                                      max_position_embeddings=4096)
    return transformers.LlamaForCausalLM(config).eval().cuda(), config


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["beam", "chunked", "chat", "loop"])
@pytest.mark.parametrize("resident", [None, 1])
def test_modes_on_the_gpu(mode, resident):
    model, config = _gpu_llama()
    ids = _ids(2, 600).cuda()
    runs = {
        "beam": lambda c: _generate(model, ids, c, max_new_tokens=8, num_beams=2, do_sample=False),
        "chunked": lambda c: _generate(model, ids, c, max_new_tokens=8, do_sample=False, prefill_chunk_size=256),
        "chat": lambda c: _gpu_chat(model, ids[:1], c),
        "loop": lambda c: _loop(model, c, steps=(600, 1, 3, 1, -2, 1, 1), ids=_ids(2, 620).cuda())[0],
    }
    expected = runs[mode](transformers.DynamicCache(config=config))
    # a layer holds 4 rows (2 prompts x 2 beams) of 1024 tokens: 32 MiB; all four fit the pool, or one beside the
    # ring (two layers) and the three streamed layers' last pages
    kcfg = kvtier.Config(device="cuda", page_size=2 << 20, pool_budget=256 << 20, pool_ready=8 << 20,
                         host_size=256 << 20, nvme_size=64 << 20, debug_checks=True)
    cache = TieredCache(config, max_tokens=1024, config=kcfg, resident_layers=resident)
    try:
        assert torch.equal(runs[mode](cache), expected)
        cache.manager.drain()
        cache.manager.check()
    finally:
        cache.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_copies_of_a_prompt_cache_share_its_pages_on_the_gpu():
    # the same physical pages mapped by two caches (cuMemMap of one handle at two places): copies answer as
    # DynamicCache's do, one cropped back into the shared pages gets its own, the original goes on and closes first
    import copy
    model, config = _gpu_llama()
    prompt, question = _ids(1, 2100).cuda(), _ids(1, 6, seed=21).cuda()  # two whole 2 MiB pages a row, and some

    def run(prompt_cache):
        with torch.no_grad():
            model(prompt, **{CACHE_KW: prompt_cache})
        cropped, later = copy.deepcopy(prompt_cache), copy.deepcopy(prompt_cache)
        if isinstance(prompt_cache, TieredCache):
            assert all(s.pages.shared for s in cropped.spaces) and prompt_cache.manager.pool.extra_mappings > 0
        cropped.crop(-1200)
        out = [_generate(model, torch.cat([prompt[:, :900], question], dim=1), cropped, max_new_tokens=8,
                         do_sample=False),
               _generate(model, torch.cat([prompt, question[:, :3]], dim=1), prompt_cache, max_new_tokens=8,
                         do_sample=False)]
        if isinstance(prompt_cache, TieredCache):
            _shares_only_below(cropped, 900)
            prompt_cache.manager.check()
            prompt_cache.close()
        out.append(_generate(model, torch.cat([prompt, question], dim=1), later, max_new_tokens=8, do_sample=False))
        for cache in (cropped, later):
            if isinstance(cache, TieredCache):
                cache.manager.check()
                cache.close()
        return out

    expected = run(transformers.DynamicCache(config=config))
    kcfg = kvtier.Config(device="cuda", page_size=2 << 20, pool_budget=512 << 20, pool_ready=8 << 20,
                         host_size=256 << 20, nvme_size=64 << 20, debug_checks=True)
    got = run(TieredCache(config, max_tokens=4096, config=kcfg))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_beam_reorder_maps_rows_whole_pages_on_the_gpu():
    # the CPU test's reorders with 2 MiB pages: two whole pages a row remapped (cuMemUnmap/cuMemMap of the same
    # handles at another row), the rest copied; K and V equal DynamicCache's
    model, config = _gpu_llama()
    prompt = _ids(1, 2100).cuda().repeat(4, 1)
    kcfg = kvtier.Config(device="cuda", page_size=2 << 20, pool_budget=512 << 20, pool_ready=8 << 20,
                         host_size=256 << 20, nvme_size=64 << 20, debug_checks=True)
    reference, cache = transformers.DynamicCache(config=config), TieredCache(config, max_tokens=4096, config=kcfg)
    try:
        with torch.no_grad():
            for c in (reference, cache):
                model(prompt, **{CACHE_KW: c})
            for n, order in enumerate([[0, 0, 0, 0], [1, 0, 3, 2], [3, 3, 3, 3]]):
                for c in (reference, cache):
                    c.reorder_cache(torch.tensor(order).cuda())
                    model(_ids(4, 1, seed=40 + n).cuda(), **{CACHE_KW: c})
                assert all(s.pages.shared for s in cache.spaces)
                cache.manager.check()
        for (k, v, *_), (rk, rv, *_) in zip(cache, reference):
            assert torch.equal(k, rk) and torch.equal(v, rv)
    finally:
        cache.close()


def _gpu_chat(model, ids, cache):
    out = []
    for turn in range(3):
        ids = _generate(model, ids, cache, max_new_tokens=4, do_sample=False)
        out.append(ids)
        ids = torch.cat([ids, _ids(1, 1 + turn % 2, seed=10 + turn).cuda()], dim=1)
    return torch.cat([o.flatten() for o in out])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sliding_window_on_the_gpu():
    # a window of 256 tokens, 512 tokens a 2 MiB page: a 1500-token prompt keeps about two windows, drops the rest
    torch.manual_seed(0)
    config = transformers.MistralConfig(hidden_size=1024, intermediate_size=2048, num_hidden_layers=4,
                                        num_attention_heads=8, num_key_value_heads=8, vocab_size=128,
                                        max_position_embeddings=4096, sliding_window=256)
    model = transformers.MistralForCausalLM(config).eval().cuda()
    ids = _ids(2, 1500).cuda()
    run = lambda c: _generate(model, ids, c, max_new_tokens=24, do_sample=False)  # noqa: E731
    expected = run(transformers.DynamicCache(config=config))
    kcfg = kvtier.Config(device="cuda", page_size=2 << 20, pool_budget=256 << 20, pool_ready=8 << 20,
                         host_size=256 << 20, nvme_size=64 << 20, debug_checks=True)
    cache = TieredCache(config, max_tokens=2048, config=kcfg)
    try:
        assert torch.equal(run(cache), expected)
        cache.manager.drain()
        assert all(layer.is_sliding for layer in cache.layers)
        assert all(cache.manager.stats()["spaces"][s.name]["stripes_dropped"] > 0 for s in cache.spaces)
        cache.manager.check()
    finally:
        cache.close()


# --- the real client under disk faults ---------------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["write-eio", "write-short", "write-corrupt", "read-corrupt", "read-eio"])
def test_generate_under_disk_faults_gives_the_same_tokens_or_a_clear_error(fault):
    # every layer streamed through NVMe while the disk fails on cue: a failed write leaves the page on the GPU
    # (same tokens); bad bytes read back are a lost sequence (TransferError), never different tokens
    from tests.faults import FaultyFiles
    import errno
    model, config = _arch("llama")
    expected = _greedy(model, transformers.DynamicCache(config=config))
    files = FaultyFiles(PAGE)
    op, kind = fault.split("-")
    if kind == "corrupt":
        files.corrupt(op, times=2)
    elif kind == "short":
        files.shorten(op, times=2)
    else:
        files.fail(op, errno.EIO, times=2)
    kcfg = kvtier.Config(device="cpu", page_size=PAGE, pool_budget=2048 * PAGE, pool_ready=0, host_size=1024 * PAGE,
                         host_chunk=256 * PAGE, nvme_size=2048 * PAGE, debug_checks=True)
    mgr = kvtier.TierManager(kcfg, files=files)
    cache = TieredCache(config, max_tokens=512, manager=mgr, resident_layers=0, offload_tier="nvme")
    try:
        try:
            got = _greedy(model, cache)
        except kvtier.TransferError as failure:
            assert op == "read" or kind == "corrupt", f"a failed write must not lose data: {failure}"
            assert failure.lost, "a failed read names what was lost"
        else:
            assert torch.equal(got, expected)
        assert sum(files.fired.values()) > 0, "the fault never fired: the test tested nothing"
        mgr.check()
    finally:
        cache.close()
        mgr.close()


# --- copies, shapes, architectures it cannot hold -------------------------------------------------------------------
@pytest.mark.parametrize("tier", sorted(TIERS))
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_a_deep_copied_prompt_cache_answers_several_questions_as_dynamic_cache(arch, tier):
    # transformers' prompt-reuse recipe: the prompt's cache computed once, a deepcopy of it for each question
    import copy
    model, config = _arch(arch)
    prompt = _ids(1, 70)
    questions = [_ids(1, 5 + 3 * q, seed=20 + q) for q in range(3)]

    def answers(prompt_cache):
        with torch.no_grad():
            model(prompt, **{CACHE_KW: prompt_cache})
        out = []
        for q, question in enumerate(questions):
            cache = copy.deepcopy(prompt_cache)
            # the second question by prompt-lookup decoding: k-token steps into the copy, crops of what is rejected
            lookup = {"prompt_lookup_num_tokens": 3} if q == 1 else {}
            out.append(_generate(model, torch.cat([prompt, question], dim=1), cache, max_new_tokens=12,
                                 do_sample=False, **lookup))
            if isinstance(cache, TieredCache):
                cache.manager.check()
                cache.close()
                cache.close()  # twice: it must not count itself out of the shared manager again
        return out

    expected = answers(transformers.DynamicCache(config=config))
    original = _tiered(config, tier)
    try:
        got = answers(original)
        assert original.get_seq_length() == 70  # the original is as it was
    finally:
        original.close()
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert original.manager.closed  # the last of the caches sharing its manager closed it


@pytest.mark.parametrize("tier", ["resident", "some-host"])
def test_copies_of_a_prompt_cache_share_its_pages_and_each_writes_only_its_own(tier):
    # copies that crop back into the prompt, reorder their rows and generate, while the original goes on and
    # closes first: each side's tokens are DynamicCache's, whatever the other side wrote into pages they shared
    import copy
    model, config = _arch("llama")
    prompt = _ids(2, 70)
    question = _ids(2, 6, seed=21)

    def run(prompt_cache):
        with torch.no_grad():
            model(prompt, **{CACHE_KW: prompt_cache})
        cropped, swapped, later = (copy.deepcopy(prompt_cache) for _ in range(3))
        out = []
        if isinstance(prompt_cache, TieredCache):
            # 1. the copies map the original's whole pages of its resident layers: no new memory for them
            for twin in (cropped, swapped, later):  # each copy, not only the first
                assert all(s.pages.shared for i, s in enumerate(twin.spaces) if i not in twin.streamed_layers)
            assert prompt_cache.manager.pool.extra_mappings == 3 * sum(
                len(s.pages.shared) * s.num_regions for s in cropped.spaces)
        # 2. a copy cropped back into the shared pages writes there: it gets pages of its own first
        cropped.crop(-30)
        out.append(_generate(model, torch.cat([prompt[:, :40], question], dim=1), cropped, max_new_tokens=8,
                             do_sample=False))
        _shares_only_below(cropped, 40)  # the pages wholly before the crop stay shared
        # 3. another copy swaps its rows, as a beam reorder does: each row maps the other's whole pages
        swapped.batch_select_indices(torch.tensor([1, 0]))
        out.append(_generate(model, torch.cat([prompt.flip(0), question], dim=1), swapped, max_new_tokens=8,
                             do_sample=False))
        _shares_only_below(swapped, 64)  # the rows swapped their whole pages (remapped, not copied)
        # 4. the original answers too, then closes while a copy still reads the pages they shared
        out.append(_generate(model, torch.cat([prompt, question[:, :3]], dim=1), prompt_cache, max_new_tokens=8,
                             do_sample=False))
        # 5. the original is reset and fills again with another prompt: the pages its copy reads stay as they were
        prompt_cache.reset()
        out.append(_generate(model, question, prompt_cache, max_new_tokens=4, do_sample=False))
        if isinstance(prompt_cache, TieredCache):
            prompt_cache.manager.check()
            prompt_cache.close()
        out.append(_generate(model, torch.cat([prompt, question], dim=1), later, max_new_tokens=8,
                             do_sample=False))
        if isinstance(later, TieredCache):
            later.manager.check()
        for cache in (cropped, swapped, later):
            if isinstance(cache, TieredCache):
                cache.close()
        return out

    expected = run(transformers.DynamicCache(config=config))
    original = _tiered(config, tier)
    got = run(original)
    assert original.manager.closed
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("tier", sorted(TIERS))
def test_an_idle_cache_sent_down_steps_again_as_dynamic_cache(tier):
    # a cache kept idle (idle(): what PromptCaches does with the caches it keeps) whose pages then all go down, as
    # pressure would send them: a copy of it, and the cache itself stepped again, answer as DynamicCache does
    import copy
    model, config = _arch("llama")
    prompt, question = _ids(2, 70), _ids(2, 5, seed=30)

    def run(cache):
        with torch.no_grad():
            model(prompt, **{CACHE_KW: cache})
        if isinstance(cache, TieredCache):
            cache.idle()
            for space in cache.spaces:
                for row in space.sequences():
                    space.offload(row, tier=cache.offload_tier).result()
            assert cache.residency()["gpu"] == 0
        twin = copy.deepcopy(cache)
        out = [_generate(model, torch.cat([prompt, question], dim=1), c, max_new_tokens=6, do_sample=False)
               for c in (twin, cache)]
        if isinstance(cache, TieredCache):
            cache.manager.check()
            twin.close()
            cache.close()
        return out

    expected = run(transformers.DynamicCache(config=config))
    got = run(_tiered(config, tier))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def _shares_only_below(cache, tokens: int) -> None:
    """A TieredCache that rewrote its tokens from ``tokens`` on shares no page holding them; pages wholly before
    them stay shared in its resident layers."""
    if not isinstance(cache, TieredCache):
        return
    import numpy as np
    for i, space in enumerate(cache.spaces):
        first = tokens // cache.block_size
        later = np.asarray([r * cache.blocks_per_row + k for r in range(cache.rows)
                            for k in range(first, cache.blocks_per_row)], dtype=np.int64)
        assert not space.pages.shared & set(space.block_books.pages_of(later))
        if i not in cache.streamed_layers and tokens >= space.page_size // (space.block_bytes // space.block_size):
            assert space.pages.shared  # a page of a row's tokens lies wholly before them


def test_the_first_updates_shape_is_what_the_cache_holds_falcon_multi_query():
    # Falcon's multi_query keeps one K/V head whatever num_kv_heads says: the cache holds what the first update
    # gives (not a head per attention head), and generates DynamicCache's tokens
    torch.manual_seed(0)
    config = transformers.FalconConfig(hidden_size=64, num_attention_heads=8, num_hidden_layers=2, vocab_size=128,
                                       multi_query=True, new_decoder_architecture=False)
    model = transformers.FalconForCausalLM(config).eval()
    expected, got = _both(model, config, "some-host", lambda cache: _greedy(model, cache))
    assert torch.equal(got, expected)
    cache = _tiered(config, "resident")
    try:
        _greedy(model, cache)
        assert cache.num_kv_heads == 1 and cache.spaces[0].num_kv_heads == 1
        # a later update of another shape is refused, naming it
        with pytest.raises(kvtier.InvalidArgumentError, match="different K/V shapes"):
            cache.update(torch.zeros(2, 2, 1, 8), torch.zeros(2, 2, 1, 8), 1)
    finally:
        cache.close()


@pytest.mark.parametrize("name", ["DeepseekV2Config", "DeepseekV3Config", "JambaConfig", "Zamba2Config",
                                  "MambaConfig", "Qwen3NextConfig", "Gemma4TextConfig"])
def test_architectures_it_cannot_hold_are_refused_when_the_cache_is_built(name):
    config = getattr(transformers, name)()
    with pytest.raises(kvtier.InvalidArgumentError, match="TieredCache cannot hold"):
        TieredCache(config)
