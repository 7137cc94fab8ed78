"""Prompt caches found by content (``kvtier.integrations.prompt_caches``), differentially: a chat whose every
turn starts from the kept cache of the one before (found by its tokens, deep-copied from whichever tier it
rests in, cropped to whole blocks) generates DynamicCache's tokens computed from scratch."""

from __future__ import annotations

import pytest
import torch

import kvtier
from tests.test_cache_contract import SMALL, _generate, _ids

transformers = pytest.importorskip("transformers")
from kvtier.integrations.prompt_caches import PromptCaches  # noqa: E402
from kvtier.integrations.transformers import TieredCache  # noqa: E402

PAGE = 4 << 10


def _llama_and_manager(pool_pages: int):
    """The tiny Llama of the cache contract's tests, and a CPU manager with a pool of ``pool_pages`` pages."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SMALL)
    model = transformers.LlamaForCausalLM(config).eval()
    kcfg = kvtier.Config(device="cpu", page_size=PAGE, pool_budget=pool_pages * PAGE, pool_ready=0,
                         host_size=1024 * PAGE, host_chunk=256 * PAGE, nvme_size=2048 * PAGE, debug_checks=True)
    return model, config, kvtier.TierManager(kcfg)


@pytest.mark.parametrize("resident_layers, tier", [(None, "host"), (0, "nvme")], ids=["resident", "streamed-nvme"])
def test_each_turn_of_a_chat_starts_from_the_kept_cache_of_the_last(resident_layers, tier):
    model, config, mgr = _llama_and_manager(pool_pages=2048)
    system = _ids(1, 50)
    made = [0]

    def fresh() -> TieredCache:
        made[0] += 1
        return TieredCache(config, max_tokens=512, manager=mgr, resident_layers=resident_layers, offload_tier=tier,
                           name=f"turn{made[0]}")

    with PromptCaches(model_id="tiny-llama") as caches:
        history = system
        for turn in range(3):
            prompt = torch.cat([history, _ids(1, 6 + turn, seed=40 + turn)], dim=1)
            # 1. the longest kept prefix of this prompt: none at first, then the whole of the last turn's blocks
            cache, found = caches.lookup(prompt)
            if turn == 0:
                assert cache is None and found == 0
                cache = fresh()
            else:
                assert found == (history.shape[1] - 1) // 16 * 16 and cache.get_seq_length() == found
            # 2. the same tokens as DynamicCache computing the whole prompt
            out = _generate(model, prompt, cache, max_new_tokens=8, do_sample=False)
            expected = _generate(model, prompt, transformers.DynamicCache(config=config), max_new_tokens=8,
                                 do_sample=False)
            assert torch.equal(out, expected)
            if turn and resident_layers is None:  # the prefix found stays in pages shared with the kept cache
                assert all(s.pages.shared for s in cache.spaces) and mgr.pool.extra_mappings > 0
            # 3. kept for the next turn (the last token generated has no KV: left out)
            assert caches.add(out, cache) > 0
            mgr.check()
            history = out
        # 4. another system prompt finds nothing; a prompt of one block's tokens never takes the whole prompt
        assert caches.lookup(_ids(1, 40, seed=99)) == (None, 0)
        one_block = system[:, :16]
        assert caches.lookup(one_block) == (None, 0)
        assert caches.stats()["hits"] == 2 and caches.stats()["tokens_found"] > 0
    mgr.check()
    assert mgr.pool.in_use_pages == 0  # every kept cache was closed
    mgr.close()


def test_bad_input_is_refused_naming_what_to_do():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SMALL)
    with pytest.raises(kvtier.InvalidArgumentError, match="block_size"):
        PromptCaches(block_size=0)
    with PromptCaches() as caches:
        with pytest.raises(kvtier.InvalidArgumentError, match="one row"):
            caches.add([1, 2, 3], TieredCache(config, max_tokens=64))  # nothing stored yet
        with pytest.raises(kvtier.InvalidArgumentError, match="one row"):
            caches.lookup(torch.zeros(2, 5, dtype=torch.long))


def test_kept_caches_go_down_under_pressure_and_answer_from_there():
    # more kept prompts than the GPU pool holds: the caches PromptCaches keeps are idle, so they go down to host
    # memory as new prompts need the room (before, they pinned their pages and the fourth prompt failed); a later
    # question over each kept prompt finds it there and answers as DynamicCache does from scratch
    model, config, mgr = _llama_and_manager(pool_pages=48)
    prompts = [_ids(1, 200, seed=50 + k) for k in range(6)]
    with PromptCaches(model_id="tiny-llama") as caches:
        # 1. six prompts of 200 tokens, each kept (about 3x what the pool holds at once)
        for k, prompt in enumerate(prompts):
            cache = TieredCache(config, max_tokens=256, manager=mgr, name=f"kept{k}")
            with torch.no_grad():
                model(prompt, **_kw(cache))
            caches.add(prompt[0], cache)
            mgr.check()
        assert mgr.stats()["tiers"]["host"]["ready_slots"] > 0
        assert sum(c.residency()["host"] for c in caches.caches) > 0  # some went down
        # 2. a question over each: found, copied from where it rests, the same tokens as computed from scratch
        for k, prompt in enumerate(prompts):
            ids = torch.cat([prompt, _ids(1, 4, seed=70 + k)], dim=1)
            cache, found = caches.lookup(ids)
            assert cache is not None and found == 192
            out = _generate(model, ids, cache, max_new_tokens=4, do_sample=False)
            expected = _generate(model, ids, transformers.DynamicCache(config=config), max_new_tokens=4,
                                 do_sample=False)
            assert torch.equal(out, expected)
            cache.close()
            mgr.check()
    assert mgr.pool.in_use_pages == 0
    mgr.close()


def _kw(cache):
    from kvtier.integrations.transformers import cache_kwarg
    return {cache_kwarg(): cache}
