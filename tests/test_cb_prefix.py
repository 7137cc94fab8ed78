"""The engine's prefix sharing through kvtier's tiers (``kvtier.integrations.cb_prefix``), differentially: chats
of several turns over one system prompt, through transformers' continuous batching with its prefix sharing on,
give the same tokens as the engine as shipped, while the blocks the engine forgets under pressure (or at the end
of a session) come back from host memory or NVMe instead of being recomputed. Tiny models, random weights."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import PAGE
from tests.faults import FaultyFiles
from tests.test_continuous_batching import TOKENS_PER_BLOCK, _manager, _model, cb_integration, transformers

from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: E402

kvtier_engine = cb_integration.kvtier_engine
SYSTEM, QUESTION, FOLLOW_UP, NEW = 40, 10, 7, 8  # tokens: a shared system prompt, then per conversation
CONVERSATIONS, TURNS = 6, 3


def _config(num_blocks: int, tokens_per_block: int = TOKENS_PER_BLOCK, use_async_batching: bool = False,
            decode_graphs: bool = False) -> tuple[object, ContinuousBatchingConfig]:
    gen = transformers.GenerationConfig(max_new_tokens=NEW, eos_token_id=-1, pad_token_id=0, do_sample=False)
    cb = ContinuousBatchingConfig(page_size=tokens_per_block, num_blocks=num_blocks,
                                  max_batch_tokens=4 * tokens_per_block, allow_block_sharing=True,
                                  auto_switch_to_flash=False, use_cuda_graph=(False, decode_graphs),
                                  use_async_batching=use_async_batching)
    return gen, cb


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(1, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _chat(model: torch.nn.Module, num_blocks: int, one_session: bool, scale: int = 1,
          use_async_batching: bool = False, decode_graphs: bool = False) -> list[list[list[int]]]:
    """TURNS turns of CONVERSATIONS chats over one system prompt: each turn's prompt is the whole history so
    far. ``one_session``: one engine session serves every turn (its cache fills, and it forgets its cached
    blocks under pressure); otherwise each turn is a ``generate_batch`` of its own (a new cache each time).
    ``scale``: blocks and prompts that many times longer."""
    system = _tokens(SYSTEM * scale, 0)
    history = [system + _tokens(QUESTION * scale, 1 + i) for i in range(CONVERSATIONS)]
    gen, cb = _config(num_blocks, TOKENS_PER_BLOCK * scale, use_async_batching, decode_graphs)
    outputs = []
    server = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb) \
        if one_session else None
    if server is not None:
        server.start()
    try:
        for turn in range(TURNS):
            if server is not None:
                ids = [server.add_request(h, request_id=f"t{turn}c{i}") for i, h in enumerate(history)]
                results = {}
                while len(results) < len(ids):
                    result = server.get_result(timeout=120)
                    assert result is not None, f"the engine stopped: {server.background_thread_status.fatal_error}"
                    results[result.request_id] = list(result.generated_tokens)
                answers = [results[rid] for rid in ids]
            else:
                out = model.generate_batch(inputs=history, generation_config=gen, continuous_batching_config=cb)
                answers = [list(out[rid].generated_tokens) for rid in sorted(out, key=lambda r: int(r[4:]))]
            outputs.append(answers)
            history = [h + a + _tokens(FOLLOW_UP * scale, 100 * turn + i)
                       for i, (h, a) in enumerate(zip(history, answers))]
    finally:
        if server is not None:
            server.stop(block=True)
            model.destroy_cached_continuous_batching_manager()
    return outputs


@pytest.mark.parametrize("tier", ["host", "nvme"])
@pytest.mark.parametrize("one_session", [True, False], ids=["one-session", "a-session-a-turn"])
def test_chats_find_their_history_in_the_tiers_with_the_engines_tokens(backend_name, tier, one_session):
    model = _model(backend_name)
    blocks = 12  # less than a turn needs: the engine forgets its cached blocks and preempts within a turn
    # 1. the engine as shipped, its own prefix sharing on (GPU only)
    expected = _chat(model, blocks, one_session)
    # 2. the engine on kvtier: kept blocks go to `tier`; every turn after the first finds its history there
    mgr = _manager(backend_name)
    with kvtier_engine(model, mgr, swap_tier=tier) as engine:
        got = _chat(model, blocks, one_session)
        stats = engine.stats()
    assert got == expected
    assert stats["prefix_kept_blocks"] > 0 and stats["prefix_hit_blocks"] > 0
    assert stats["prefix_hit_tokens"] == stats["prefix_hit_blocks"] * TOKENS_PER_BLOCK
    assert stats["prefix_tiers"]["hit_blocks_by_tier"].get(tier, 0) > 0  # found where they were sent
    # 3. the `with` ended: nothing is kept, every page and slot is back
    assert not [name for name in mgr.spaces if "/prefix/" in name]
    mgr.check()
    mgr.close()


def test_engine_blocks_larger_than_kvtier_pages_are_kept_and_found_with_the_engines_tokens():
    # 32 KiB engine blocks over 4 KiB kvtier pages: each kept block spans four pages of the prefix space (the
    # middle ones its alone) -- kept, sent down, found and copied back in, with the engine's tokens
    model = _model("cpu", "llama-wide")
    expected = _chat(model, 12, one_session=False)
    with _manager("cpu", pages=512, page=4096, host_size=512 * 4096, host_chunk=128 * 4096) as mgr:
        with kvtier_engine(model, mgr, swap_tier="host") as engine:
            got = _chat(model, 12, one_session=False)
            stats = engine.stats()
        assert got == expected
        assert stats["prefix_kept_blocks"] > 0 and stats["prefix_hit_blocks"] > 0
        assert mgr.pool.in_use_pages == 0
        mgr.check()


def test_without_keep_prefixes_nothing_goes_down(backend_name):
    model = _model(backend_name)
    mgr = _manager(backend_name)
    with kvtier_engine(model, mgr, keep_prefixes=False) as engine:
        _chat(model, 14, one_session=False)
        stats = engine.stats()
    assert stats["prefix_kept_blocks"] == stats["prefix_hit_blocks"] == 0 and stats["prefix_tiers"] == {}
    mgr.check()
    mgr.close()


@pytest.mark.parametrize("path", ["staging", "direct"])
def test_kept_blocks_read_back_corrupt_are_a_miss_and_recomputed(path):
    model = _model("cpu", "llama" if path == "staging" else "llama-wide")
    expected = _chat(model, 14, one_session=False)
    # every read from the NVMe tier hands back a flipped byte: the tier's digest fails, the pages are lost, and
    # the prompts that would have found them compute them again (direct: read straight into the engine's blocks,
    # which go back to its pool)
    page = PAGE["cpu"] if path == "staging" else 4096
    files = FaultyFiles(page)
    files.corrupt("read")
    sizes = {} if path == "staging" else dict(pages=512, page=page, host_size=512 * page, host_chunk=128 * page,
                                               nvme_size=1024 * page)
    with _manager("cpu", files=files, **sizes) as mgr:
        with kvtier_engine(model, mgr, swap_tier="nvme") as engine:
            got = _chat(model, 14, one_session=False)
            stats = engine.stats()
        assert got == expected
        assert stats["prefix_kept_blocks"] > 0 and stats["prefix_hit_blocks"] == 0
        assert mgr.stats()["tiers"]["nvme"]["checksums"]["mismatches"] > 0
        assert mgr.pool.in_use_pages == 0
        mgr.check()


def test_a_restarted_server_finds_the_last_ones_history_on_a_kept_nvme_tier(tmp_path):
    model = _model("cpu")
    expected = _chat(model, 14, one_session=False)
    # two lives of a server on one NVMe directory kept across restarts ([nvme] persist): each runs the same chats
    # with the engine's tokens; the second also finds, from its first turn on, what the first one kept
    hits = []
    for life in range(2):
        with _manager("cpu", nvme_dir=str(tmp_path), nvme_persist=True) as mgr:
            with kvtier_engine(model, mgr, swap_tier="nvme") as engine:
                got = _chat(model, 14, one_session=False)
                stats = engine.stats()
            assert got == expected
            hits.append(stats["prefix_tiers"]["hit_blocks_by_tier"].get("nvme", 0))
            assert mgr.pool.in_use_pages == 0
            mgr.check()
    assert hits[0] > 0 and hits[1] > hits[0], hits


def test_requests_marked_do_not_retain_are_kept_nowhere_and_answer_the_same():
    model = _model("cpu")
    expected = _chat(model, 12, one_session=True)
    mgr = _manager("cpu")
    with kvtier_engine(model, mgr, swap_tier="host") as engine:
        engine.do_not_retain(*[f"t{turn}c{i}" for turn in range(TURNS) for i in range(CONVERSATIONS)])
        got = _chat(model, 12, one_session=True)
        stats = engine.stats()
    assert got == expected
    assert stats["prefix_kept_blocks"] == 0 and stats["prefix_tiers"]["cached_blocks"] == 0
    mgr.check()
    mgr.close()


DOCS = [_tokens(6 * TOKENS_PER_BLOCK, 50 + i) for i in range(3)]  # documents of 6 blocks
BLOCK_BYTES = 2 * 2 * 2 * 16 * TOKENS_PER_BLOCK * 4  # the tiny llama's: layers, K and V, KV heads, head dim, fp32


def ask_one_by_one(model: torch.nn.Module, asks: list[list[int]], num_blocks: int) -> list[list[int]]:
    """Each prompt of ``asks`` in turn, the next once the last was answered, in one engine session."""
    gen, cb = _config(num_blocks)
    server = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
    server.start()
    try:
        out = []
        for i, prompt in enumerate(asks):
            server.add_request(prompt, request_id=f"r{i}")
            result = server.get_result(timeout=120)
            assert result is not None, f"the engine stopped: {server.background_thread_status.fatal_error}"
            out.append(list(result.generated_tokens))
        return out
    finally:
        server.stop(block=True)
        model.destroy_cached_continuous_batching_manager()


@pytest.mark.parametrize("staging_blocks", [None, 2], ids=["default-staging", "staging-of-2-blocks"])
def test_a_hit_on_a_cache_full_of_cached_blocks_makes_room_for_itself(staging_blocks):
    # documents asked about one after another on a cache of 10 blocks, 7 a request: each next one makes the engine
    # forget the one before (kept below); when the first is asked about again the cache holds the third's 6
    # cached blocks and 4 free. The first's 6 blocks are found below: the engine's cached blocks are forgotten
    # (kept below too) to make room for them, and they are brought up, not computed again. With 4 KiB pages, a
    # pool of 30 and staging for 2 blocks, the pool's room left beside the engine's cache (24 pages at its peak)
    # takes 2 or 4 of the 6 blocks: they come up a chunk of 2 at a time, as many chunks as find room (all at once,
    # they took the room the engine needed next, and it stopped)
    model = _model("cpu")
    asks = DOCS + [DOCS[0] + _tokens(3, 7)]

    def serve() -> list[list[int]]:
        return ask_one_by_one(model, asks, 10)

    # 1. the engine as shipped
    expected = serve()
    # 2. on kvtier: the same tokens, and the last request's 6 blocks came from host memory
    tight = staging_blocks is not None
    page, pages = (4096, 30) if tight else (None, 64)
    with _manager("cpu", pages=pages, page=page, host_size=256 * 4096, host_chunk=64 * 4096) as mgr:
        sizes = dict(staging_bytes=staging_blocks * BLOCK_BYTES, capacity_bytes=(pages - 6) * 4096) if tight else {}
        with kvtier_engine(model, mgr, swap_tier="host", **sizes) as engine:
            got = serve()
            stats = engine.stats()
        assert got == expected
        if tight:  # as many chunks as found room when they came (it depends on when the earlier ones landed)
            assert 2 <= stats["prefix_hit_blocks"] <= 6, stats
            assert stats["prefix_tiers"]["hit_blocks_by_tier"].get("host", 0) >= stats["prefix_hit_blocks"]
        else:
            assert stats["prefix_hit_blocks"] == 6, stats
            assert stats["prefix_tiers"]["hit_blocks_by_tier"].get("host", 0) == 6
        mgr.check()


def _document_manager(path: str):
    """The manager of the document scenarios: "staging" on the default pages, "direct" on 4 KiB pages (the wide
    llama's 16 KiB block halves span them whole)."""
    page = None if path == "staging" else 4096
    return _manager("cpu", pages=64 if page is None else 1024, page=page, host_size=256 * 4096, host_chunk=64 * 4096)


def document_behind_a_long_prompt(tail: int, path: str = "staging"
                                  ) -> tuple[list[list[list[int]]], list[list[list[int]]], dict]:
    """A session answers two documents and ends (their blocks kept in host memory); the next gets, at once, a
    new prompt of 8 blocks and ``tail`` tokens on a cache of 10 blocks, and the first document with a new question.
    The engine as shipped, then on kvtier (checked after): both runs' tokens, and kvtier's engine stats. ``path``:
    "staging" (the tiny llama: hits come up through the prefix space) or "direct" (the wide llama on 4 KiB pages:
    hits are read straight into the engine's blocks)."""
    model = _model("cpu", "llama" if path == "staging" else "llama-wide")
    gen, cb = _config(10)
    first = [DOCS[0] + _tokens(3, 7), DOCS[1] + _tokens(3, 8)]
    second = [_tokens(8 * TOKENS_PER_BLOCK + tail, 9), DOCS[0] + _tokens(5, 10)]

    def serve() -> list[list[list[int]]]:
        out = []
        for inputs in (first, second):
            got = model.generate_batch(inputs=inputs, generation_config=gen, continuous_batching_config=cb)
            out.append([list(got[rid].generated_tokens) for rid in sorted(got, key=lambda r: int(r[4:]))])
        return out

    expected = serve()  # a new cache each session: the document is computed again
    with _document_manager(path) as mgr:
        with kvtier_engine(model, mgr, swap_tier="host") as engine:
            got = serve()
            stats = engine.stats()
        mgr.check()
    return expected, got, stats


@pytest.mark.parametrize("path", ["staging", "direct"])
def test_a_hit_short_of_room_at_its_lookup_is_brought_in_when_room_comes(path):
    # the long prompt's prefill takes the whole token budget of its steps; the document's lookup comes in the step
    # of its last 3 tokens, finds its 6 blocks below and room for 1. Its request then waits for room where it is,
    # part-way through its prompt (not swapped out: back, it would compute its next chunk at once); when room
    # comes, its lookup is made again before its next chunk is computed, and the other 5 come up too (before this,
    # 4 of them were computed)
    expected, got, stats = document_behind_a_long_prompt(3, path)
    # the same tokens as the engine as shipped; the document's 6 blocks came from host memory, 5 once room came
    assert got == expected
    assert stats["prefix_short_of_room"] >= 5, stats
    assert stats["prefix_hit_blocks"] == 6, stats


@pytest.mark.parametrize("path", ["staging", "direct"])
def test_a_request_holding_only_found_blocks_is_requeued_not_swapped_when_the_engine_must_preempt(path):
    # as above, but the long prompt's answer crosses into a tenth block: when it needs it, the document's request
    # holds the one block it found room for and waits for more, so nothing can be scheduled and the engine must
    # preempt. The document's request holds only blocks found below (resting there still): it is requeued from its
    # prompt, not copied down, and its next lookup finds all 6 again
    expected, got, stats = document_behind_a_long_prompt(10, path)
    # the same tokens; the document's request was requeued (no swap), and found its blocks again
    assert got == expected
    assert stats["prefix_requeued"] == 1 and stats["preempted_to_tiers"] == 0, stats
    assert stats["prefix_hit_blocks"] >= 6, stats


@pytest.mark.parametrize("path", ["staging", "direct"])
@pytest.mark.parametrize("tail", [3, 10], ids=["waits-for-room", "requeued"])
def test_forked_answers_of_a_document_waiting_for_room_are_the_engines(tail, path):
    # the two scenarios above with two answers a prompt (num_return_sequences: the engine forks each request's
    # blocks into its children once its prompt is in): the document's request waits for room or is requeued, its
    # children share what came up from below, and every answer equals the engine as shipped's
    model = _model("cpu", "llama" if path == "staging" else "llama-wide")
    gen = transformers.GenerationConfig(max_new_tokens=NEW, eos_token_id=-1, pad_token_id=0, do_sample=True,
                                        top_k=1, num_return_sequences=2)  # top_k=1: sampling that stays exact
    cb = _config(10)[1]
    first = [DOCS[0] + _tokens(3, 7), DOCS[1] + _tokens(3, 8)]
    second = [_tokens(8 * TOKENS_PER_BLOCK + tail, 9), DOCS[0] + _tokens(5, 10)]

    def serve() -> list[dict[str, list[int]]]:
        out = []
        for inputs in (first, second):
            got = model.generate_batch(inputs=inputs, generation_config=gen, continuous_batching_config=cb)
            out.append({rid: list(got[rid].generated_tokens) for rid in got})
        return out

    # 1. the engine as shipped: four answers a session
    expected = serve()
    assert [len(s) for s in expected] == [4, 4]
    # 2. on kvtier: the same answers, the document's blocks found below
    with _document_manager(path) as mgr:
        with kvtier_engine(model, mgr, swap_tier="host") as engine:
            got = serve()
            stats = engine.stats()
        assert got == expected
        assert stats["prefix_hit_blocks"] >= 6, stats
        mgr.check()


def test_a_request_holding_only_the_engines_match_waits_for_room_where_it_is():
    # one engine session: a chat's turn over the system prompt is answered (its blocks stay cached on the GPU); then
    # a long prompt of 140 tokens and a new document over the same system prompt come at once, on a cache of 14
    # blocks. The long prompt's prefill takes the token budget of two steps; in its third, the document's lookup
    # matches the system prompt's two blocks on the GPU (nothing below: the document is new), and there is no room
    # for its next chunk. It waits for room where it is while the long prompt decodes: swapped out, it would copy
    # the two cached blocks down, go to the back of the line and keep new requests out (the H100 documents load:
    # such requests waited 10-13 s for a first batch)
    model = _model("cpu")
    gen, cb = _config(14)
    system = _tokens(SYSTEM, 0)
    chat, long_prompt = system + _tokens(QUESTION, 1), _tokens(140, 2)
    document = system + _tokens(5 * TOKENS_PER_BLOCK, 3) + _tokens(4, 4)

    def serve() -> dict[str, list[int]]:
        server = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
        server.start()
        try:
            server.add_request(chat, request_id="chat")
            out = {}
            for wanted in (1, 2):
                if wanted == 2:
                    server.add_request(long_prompt, request_id="long")
                    server.add_request(document, request_id="document")
                while len(out) < 1 + 2 * (wanted == 2):
                    result = server.get_result(timeout=120)
                    assert result is not None, f"the engine stopped: {server.background_thread_status.fatal_error}"
                    out[result.request_id] = list(result.generated_tokens)
            return out
        finally:
            server.stop(block=True)
            model.destroy_cached_continuous_batching_manager()

    # 1. the engine as shipped (it recomputes the document after a soft reset)
    expected = serve()
    # 2. on kvtier: the same tokens; the document's request was never swapped out (it had been, before d8ed23a)
    with _manager("cpu", pages=64, host_size=256 * 4096, host_chunk=64 * 4096) as mgr:
        with kvtier_engine(model, mgr, swap_tier="host") as engine:
            got = serve()
            stats = engine.stats()
        mgr.check()
    assert got == expected
    assert stats["preempted_to_tiers"] == 0 and stats["soft_resets"] == 0 and stats["prefix_requeued"] == 0, stats


@pytest.mark.parametrize("path", ["staging", "direct"])
def test_kept_blocks_changed_in_host_memory_are_a_miss_and_recomputed(path):
    # staging: the tiny llama's 4 KiB block halves share 64 KiB pages, so a hit comes up through the prefix space's
    # staging room; direct: the wide llama's 16 KiB halves span 4 KiB pages whole, so a hit is read from host memory
    # straight into the engine's blocks and checked there
    model = _model("cpu", "llama" if path == "staging" else "llama-wide")
    gen, cb = _config(14)
    system = _tokens(SYSTEM, 0)
    first = [system + _tokens(QUESTION, 1 + i) for i in range(3)]

    def serve(between: object = None) -> list[list[list[int]]]:
        one = model.generate_batch(inputs=first, generation_config=gen, continuous_batching_config=cb)
        answers = [list(one[rid].generated_tokens) for rid in sorted(one, key=lambda r: int(r[4:]))]
        if between is not None:
            between()
        second = [p + a + _tokens(FOLLOW_UP, 20 + i) for i, (p, a) in enumerate(zip(first, answers))]
        two = model.generate_batch(inputs=second, generation_config=gen, continuous_batching_config=cb)
        return [answers, [list(two[rid].generated_tokens) for rid in sorted(two, key=lambda r: int(r[4:]))]]

    # 1. the engine as shipped: a new cache each session, the history computed again
    expected = serve()
    page = None if path == "staging" else 4096
    with _manager("cpu", pages=512 if page else 16, page=page, host_size=512 * 4096, host_chunk=128 * 4096) as mgr:
        host = mgr.tiering.stack.get("host")

        def change_a_byte_of_every_kept_page() -> None:
            # bytes at rest in host memory change (a stray write, a bad DIMM): every slot the prefix space holds
            (space,) = [s for name, s in mgr.spaces.items() if "/prefix/" in name]
            on_host = [p for p in space.pages.slots if space.pages.tier_of(p) == host.id]
            assert on_host
            for p in on_host:
                for slot in space.pages.slots[p]:
                    data = host.data(slot)
                    data[len(data) // 2] ^= 0x10

        # 2. on kvtier: the first session's blocks are kept in host memory, then changed there; the second's
        # prompts find their keys, and the checks where the bytes land fail: a miss, computed again, same tokens
        with kvtier_engine(model, mgr, swap_tier="host") as engine:
            got = serve(change_a_byte_of_every_kept_page)
            stats = engine.stats()
        assert got == expected
        assert stats["prefix_kept_blocks"] > 0 and stats["prefix_hit_blocks"] == 0, stats
        assert host.digests.counts()["mismatches"] > 0
        mgr.check()


@pytest.mark.parametrize("path", ["staging", "direct"])
def test_chats_of_engine_sized_blocks_find_their_history_with_the_engines_tokens(backend_name, path):
    # direct: blocks of 256 tokens of a wider model, 4 MiB (2 MiB K and V halves over whole pages): read straight into
    # the engine's blocks; staging: the tiny llama's 16-token blocks, up through the prefix space. On a GPU with
    # async batching and decode steps in CUDA graphs (the engine's defaults where its attention needs no mask): the
    # next batch is made while the GPU runs the one in flight, so a hit's copies into the engine's blocks queue behind
    # that batch, and the pages they read must stay mapped until they ran; a graph replays reads of the engine's
    # blocks at the addresses it was captured with
    page = PAGE[backend_name]
    torch.manual_seed(0)
    wide = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=8) if path == "direct" else {}
    config = transformers.LlamaConfig(**{**dict(vocab_size=128, hidden_size=64, intermediate_size=128,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                max_position_embeddings=8192), **wide})
    model = transformers.LlamaForCausalLM(config).to(backend_name).eval()
    model.config._attn_implementation = "sdpa"
    scale, served = (16 if path == "direct" else 1), backend_name == "cuda"
    # 1. the engine as shipped, one session: its cache fills and it forgets its cached blocks
    expected = _chat(model, 12, one_session=True, scale=scale, use_async_batching=served, decode_graphs=served)
    # 2. on kvtier: the same tokens, the history found below
    pool = (192 << 20) if path == "direct" else 16 * page
    with _manager(backend_name, pages=pool // page, host_size=512 << 20, host_chunk=32 << 20) as mgr:
        with kvtier_engine(model, mgr, swap_tier="host") as engine:
            got = _chat(model, 12, one_session=True, scale=scale, use_async_batching=served, decode_graphs=served)
            stats = engine.stats()
        assert got == expected
        assert stats["prefix_hit_blocks"] > 0, stats
        mgr.check()
