"""KV found again by content: a space's whole blocks indexed by chained keys, shared by new sequences wherever
they rest, never served once their bytes may have changed (CPU; CUDA under -m gpu)."""

from __future__ import annotations

import pytest
import torch

import kvtier
from kvtier.prefix import KEY_BYTES, block_keys, fingerprint, keys_from_hashes
from tests.conftest import assert_holds, pattern, write_seq


def _space(mgr, make_manager, blocks=256):
    return mgr.create_space("m", max_tokens=blocks * make_manager.shape["block_size"], **make_manager.shape)


def test_keys_chain_and_separate_layouts_models_and_salts():
    layout = fingerprint(2, 2, 64, "bfloat16", 16)
    prompt = list(range(40))
    keys = block_keys(prompt, 16, layout)
    assert len(keys) == 2 and all(len(k) == KEY_BYTES for k in keys)  # whole blocks only
    assert block_keys(prompt + [7] * 9, 16, layout)[:2] == keys  # a longer prompt shares the prefix's keys
    assert block_keys([1] + prompt[1:], 16, layout)[1] != keys[1]  # a key covers every token before it
    assert block_keys(prompt, 16, fingerprint(2, 2, 64, "float16", 16))[0] != keys[0]
    assert block_keys(prompt, 16, fingerprint(2, 2, 64, "bfloat16", 16, model="other"))[0] != keys[0]
    assert block_keys(prompt, 16, layout, salt=b"tenant-a")[0] != keys[0]
    as_bytes = [(1).to_bytes(16, "little"), (2).to_bytes(16, "little")]
    assert keys_from_hashes([1, 2], layout) == keys_from_hashes(as_bytes, layout)


def test_a_shared_system_prompt_is_computed_once_and_found_wherever_it_rests(make_manager):
    mgr = make_manager()
    space = _space(mgr, make_manager)
    bs = space.block_size
    system = list(range(1000, 1000 + 36 * bs))  # 36 whole blocks (2.25 pages)
    # the first request computes the system prompt and its question, and offers the whole blocks for reuse
    space.allocate("r1", len(system) + 10)
    write_seq(space, "r1")
    keys = space.block_keys(system + [1] * 10)
    assert space.publish("r1", keys) == 36
    # a second request with the same system prompt and another question: 36 blocks found, nothing copied
    keys2 = space.block_keys(system + [2] * 20)
    assert space.share_prefix("r2", keys2) == 36 * bs
    assert space.blocks("r2") == space.blocks("r1")[:36]
    space.allocate("r2", len(system) + 20)  # its own question, on blocks of its own
    assert space.blocks("r2")[36:] != space.blocks("r1")[36:]
    assert_holds(space, "r2", "r1", range(36))
    mgr.check()
    # the first request ends: the blocks stay the second's, and stay found
    space.free("r1")
    assert space.share_prefix("r3", keys2[:20]) == 20 * bs
    mgr.check()
    # the second goes idle and down to NVMe: a hit there is shared below and comes back with a prefetch
    space.free("r3")
    space.offload("r2", tier="nvme").result()
    assert space.residency("r2")["gpu"] == 0
    assert space.share_prefix("r4", keys2) == 36 * bs
    space.prefetch(["r4"]).result()
    assert_holds(space, "r4", "r1", range(36))
    prefix = space.stats()["prefix"]
    assert prefix["shared_blocks"] == {"gpu": 36 + 20, "nvme": 36} and prefix["tokens_shared"] == (36 + 20 + 36) * bs
    # another salt, another model: no hit
    assert space.share_prefix("r5", space.block_keys(system, salt=b"other tenant")) == 0
    assert space.share_prefix("r6", space.block_keys(system, model="another model")) == 0
    assert "r5" not in space.sequences() and "r6" not in space.sequences()
    mgr.check()
    # once no sequence holds them, the published blocks stay cached: found again, from wherever they rest
    space.free("r4")
    space.free("r2")
    assert space.stats()["cached_blocks"] == 36 and space.sequences() == []
    assert space.share_prefix("r7", keys2) == 36 * bs
    space.prefetch(["r7"]).result()
    assert_holds(space, "r7", "r1", range(36))
    # a request that must not be kept is freed at once: with it, nothing holds the blocks but the cache
    space.free("r7", retain=False)
    assert space.stats()["cached_blocks"] == 36
    mgr.check()


def test_cached_blocks_go_down_under_pressure_and_give_way_last(make_manager):
    page = {"cpu": 64 << 10, "cuda": 2 << 20}[make_manager.name]
    # a pool of 8 pages (4 handles each: 2 layers), 2 pages of host memory, 4 of NVMe
    mgr = make_manager(pages=32, host_size=8 * page, host_chunk=4 * page, nvme_size=16 * page)
    space = _space(mgr, make_manager)
    bs = space.block_size
    # six prompts of one page each are published and freed: cached, idle
    keys = {}
    for i in range(6):
        seq = f"p{i}"
        space.allocate(seq, 16 * bs)
        write_seq(space, seq)
        keys[seq] = space.block_keys(list(range(i * 10**4, i * 10**4 + 16 * bs)))
        space.publish(seq, keys[seq])
        space.free(seq)
    assert space.stats()["cached_blocks"] == 6 * 16
    # a live sequence needs 6 pages: cached pages go down first (2 to host, then NVMe), none is dropped yet
    space.allocate("live", 6 * 16 * bs)
    write_seq(space, "live")
    assert space.stats()["cached_blocks"] == 6 * 16
    mgr.check()
    # a second one needs 8 pages (128 blocks, 64 more than the space has free): the oldest cached blocks give way
    space.offload("live", tier="nvme").result()
    space.allocate("more", 8 * 16 * bs)
    found = {seq: space.share_prefix(f"{seq}-again", k) for seq, k in keys.items()}
    assert found["p0"] == 0 and space.stats()["cached_blocks"] < 6 * 16
    assert all(v in (0, 16 * bs) for v in found.values())
    for seq, tokens in found.items():
        if tokens:
            space.free(f"{seq}-again")
    mgr.check()
    # the live data was never dropped: it comes back whole
    space.free("more")
    space.prefetch(["live"]).result()
    for layer in range(space.num_layers):
        for kv, tensor in enumerate(space.kv(layer)):
            for i, b in enumerate(space.blocks("live")):
                assert torch.equal(tensor[b].cpu(), pattern(space, "live", 0, i, layer, kv))
    mgr.check()


def test_blocks_whose_bytes_may_have_changed_are_never_served(make_manager):
    mgr = make_manager()
    space = _space(mgr, make_manager)
    bs = space.block_size
    tokens = list(range(8 * bs))
    space.allocate("a", len(tokens))
    write_seq(space, "a")
    keys = space.block_keys(tokens)
    space.publish("a", keys)
    # rewritten (mark_written): its blocks from there on are forgotten; the ones before still serve
    space.mark_written("a", 5 * bs, 6 * bs)
    assert space.share_prefix("b", keys) == 5 * bs
    space.free("b")
    # dropped (drop_prefix): a page whose data is gone is never served
    space.allocate("c", 40 * bs)
    write_seq(space, "c")
    ckeys = space.block_keys(list(range(10**6, 10**6 + 40 * bs)))
    space.publish("c", ckeys)
    space.drop_prefix("c", 16 * space.block_size).result()  # its first page (16 blocks)
    assert space.share_prefix("d", ckeys) == 0
    mgr.check()
    # keys for more blocks than it holds, or of the wrong kind, are refused
    with pytest.raises(kvtier.InvalidArgumentError, match="whole blocks"):
        space.publish("a", keys + keys)
    with pytest.raises(kvtier.InvalidArgumentError, match="16-byte keys"):
        space.share_prefix("e", ["not a key"])
    with pytest.raises(kvtier.InvalidArgumentError, match="exists already"):
        space.share_prefix("a", keys)
    mgr.check()


def test_a_tenant_erased_is_found_no_more_in_any_tier(make_manager):
    mgr = make_manager()
    space = _space(mgr, make_manager)
    bs = space.block_size
    prompt = list(range(32 * bs))
    # two tenants publish the same prompt under their own salts; a's goes idle to NVMe, b's is freed to the cache
    for tenant in (b"a", b"b"):
        seq = tenant.decode()
        space.allocate(seq, len(prompt))
        write_seq(space, seq)
        space.publish(seq, space.block_keys(prompt, salt=tenant), salt=tenant)
    space.offload("a", tier="nvme").result()
    space.free("b")
    assert space.stats()["cached_blocks"] == 32
    # erasing b: its cached blocks are freed, its keys find nothing; a's are untouched
    assert space.erase(b"b") == 32
    assert space.stats()["cached_blocks"] == 0 and space.share_prefix("b2", space.block_keys(prompt, salt=b"b")) == 0
    assert space.share_prefix("a2", space.block_keys(prompt, salt=b"a")) == 32 * bs
    # erasing a: a keeps its blocks (it holds them), but no key finds them
    assert space.erase(b"a") == 32
    assert space.share_prefix("a3", space.block_keys(prompt, salt=b"a")) == 0
    space.prefetch(["a"]).result()
    assert_holds(space, "a", "a", range(32))
    mgr.check()



def test_under_the_priority_policy_cached_pages_go_down_before_idle_sequences(make_manager):
    # a pool of 8 pages (4 handles each: 2 layers), the priority policy
    mgr = make_manager(pages=32, policy="priority")
    space = _space(mgr, make_manager)
    bs = space.block_size
    # 1. three prompts of one page each, published and freed: cached
    keys = {}
    for i in range(3):
        space.allocate(f"p{i}", 16 * bs)
        write_seq(space, f"p{i}")
        keys[i] = space.block_keys(list(range(i * 10**4, i * 10**4 + 16 * bs)))
        space.publish(f"p{i}", keys[i])
        space.free(f"p{i}")
    # 2. then an idle sequence of a low priority (below the published ones'), one page
    space.allocate("idle", 16 * bs)
    write_seq(space, "idle")
    space.set_priority("idle", -5)
    # 3. a live sequence needs 6 pages: the room comes from the cached pages; the idle one stays up
    space.allocate("live", 6 * 16 * bs)
    assert space.residency("idle")["gpu"] > 0 and space.residency("idle")["host"] == 0
    assert space.stats()["stripes_host"] == 2
    # 4. a hit on a cached page below: the prompt's bytes
    assert space.share_prefix("again", keys[0]) == 16 * bs
    space.prefetch(["again"]).result()
    assert_holds(space, "again", "p0", range(16))
    mgr.check()
