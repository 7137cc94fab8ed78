"""The remote cache (``[remote]``) against real stores on 127.0.0.1 -- a Valkey server and a Mooncake master
started from their packages: whole blocks offered by one manager are found by another, byte for byte; and a store
that is killed, restarted empty, paused, full or holding garbage under a live key gives misses, never a wrong
byte and never a wait past the deadline (CPU; CUDA under -m gpu)."""

from __future__ import annotations

import time

import pytest

from tests.conftest import assert_holds, write_seq
from tests.stores import START

BLOCKS = 40  # whole blocks of the prompt: 2.5 pages of 16; groups of 8 blocks (object_bytes below)


@pytest.fixture(params=["valkey", "mooncake"])
def store(request):
    server = START[request.param]()
    yield server
    server.stop()


def _remote(make_manager, store, **overrides):
    page = make_manager.shape
    block_bytes = page["block_size"] * page["num_kv_heads"] * page["head_dim"] * 2
    options = dict(store.config, remote_object_bytes=8 * block_bytes * 2 * page["num_layers"],
                   remote_buffer=16 * (8 * block_bytes * 2 * page["num_layers"] + 8192), remote_timeout_s=2.0,
                   remote_negative_ttl_s=0.0)
    options.update(overrides)
    mgr = make_manager(**options)
    assert mgr.remote.wait_connected(60), mgr.stats()["remote"]
    return mgr


def _space(mgr, make_manager):
    return mgr.create_space("m", max_tokens=256 * make_manager.shape["block_size"], **make_manager.shape)


def _offer(mgr, make_manager, tokens):
    """A request computes ``tokens`` and offers its whole blocks: published here, sent to the store."""
    space = _space(mgr, make_manager)
    space.allocate("r1", len(tokens))
    write_seq(space, "r1")
    keys = space.block_keys(tokens)
    assert mgr.remote.offer(space, "r1", keys) == len(keys)
    assert mgr.remote.flush(30)
    return space, keys


def test_blocks_offered_by_one_manager_are_found_by_another(make_manager, store):
    bs = make_manager.shape["block_size"]
    tokens = list(range(BLOCKS * bs + 5))
    # 1. manager A computes a prompt and offers it: 5 groups of 8 blocks go to the store
    a = _remote(make_manager, store)
    _, keys = _offer(a, make_manager, tokens)
    assert a.stats()["remote"]["puts"] == 5
    # 2. manager B (another client of the store) starts a request with the same prompt: it finds every block
    b = _remote(make_manager, store)
    space = _space(b, make_manager)
    assert b.remote.find(space, "q", keys) == BLOCKS * bs
    assert_holds(space, "q", "r1", range(BLOCKS))
    assert b.stats()["remote"]["hit_blocks"] == BLOCKS
    b.check()
    # 3. they are published in B now: the next request finds them locally, without asking the store
    asked = b.stats()["remote"]["lookups"]
    assert b.remote.find(space, "q2", keys) == BLOCKS * bs and b.stats()["remote"]["lookups"] == asked
    # 4. a longer prompt that goes on past them: the store's blocks, then the rest is the engine's to compute;
    #    a prompt sharing only the first 20 blocks finds those 20 (the group holding block 19 is read whole)
    c = _remote(make_manager, store)
    other = _space(c, make_manager)
    longer = other.block_keys(tokens[:20 * bs] + [7] * (30 * bs))
    assert c.remote.find(other, "q", longer) == 16 * bs  # two whole groups; the third group's key is another
    assert_holds(other, "q", "r1", range(16))
    c.check()


def test_an_offer_short_of_staging_sends_what_fits_and_drops_the_rest(make_manager, store):
    bs = make_manager.shape["block_size"]
    page = make_manager.shape
    group = 8 * bs * page["num_kv_heads"] * page["head_dim"] * 2 * 2 * page["num_layers"]
    tokens = list(range(BLOCKS * bs))
    # 1. a manager whose staging holds two objects offers five groups: two are sent, three dropped, never waited
    a = _remote(make_manager, store, remote_buffer=2 * (group + 8192))
    space = _space(a, make_manager)
    space.allocate("r1", len(tokens))
    write_seq(space, "r1")
    keys = space.block_keys(tokens)
    assert a.remote.send(space, space.blocks("r1"), keys) == 2 and a.remote.flush(30)
    assert a.stats()["remote"]["puts"] == 2 and a.stats()["remote"]["puts_dropped"] == 3
    # 2. another manager finds those two groups, byte for byte; the engine computes the rest
    b = _remote(make_manager, store)
    found = _space(b, make_manager)
    assert b.remote.find(found, "q", keys) == 16 * bs
    assert_holds(found, "q", "r1", range(16))
    # 3. the staging came back: the next offer sends the three left (the two sent are known to be stored)
    assert a.remote.send(space, space.blocks("r1"), keys) == 2 and a.remote.flush(30)
    assert a.remote.send(space, space.blocks("r1"), keys) == 1 and a.remote.flush(30)
    assert b.remote.find(found, "q2", keys) == BLOCKS * bs
    assert_holds(found, "q2", "r1", range(BLOCKS))
    a.check()
    b.check()


def test_blocks_scattered_in_both_spaces_go_and_come_back_whole(make_manager, store):
    # both managers' spaces hold a pinned block on every page, in a pool of just those pages: a sequence's blocks
    # then skip one on each page, and a group of 8 is not one run of blocks -- copied out and in region by region,
    # not as one run of every region
    bs, per_page = make_manager.shape["block_size"], 16
    pages = 16 * 2 * make_manager.shape["num_layers"]  # the space's 16 stripes of pages, one a region
    tokens = list(range(BLOCKS * bs))

    def pinned(mgr):
        space = _space(mgr, make_manager)
        for p in range(space.num_blocks // per_page):
            space.allocate(("pin", p), bs, first_block=p * per_page + 4)
        return space

    def scattered(blocks):
        return any(y - x != 1 for x, y in zip(blocks[:8], blocks[1:8]))

    # 1. manager A's request computes the prompt on scattered blocks and offers it
    a = _remote(make_manager, store, pages=pages)
    src = pinned(a)
    src.allocate("r1", len(tokens))
    assert scattered(src.blocks("r1"))
    write_seq(src, "r1")
    keys = src.block_keys(tokens)
    assert a.remote.offer(src, "r1", keys) == len(keys) and a.remote.flush(30)
    # 2. manager B finds all of it, into scattered fresh blocks, byte for byte
    b = _remote(make_manager, store, pages=pages)
    dst = pinned(b)
    assert b.remote.find(dst, "q", keys) == BLOCKS * bs
    assert scattered(dst.blocks("q"))
    assert_holds(dst, "q", "r1", range(BLOCKS))
    # 3. the group of blocks 8..15 is damaged in the store: C checks it in staging (its fresh blocks are no run),
    #    after they were allocated -- the sequence goes back to the first group, which is served
    _damage(store, keys[15])
    c = _remote(make_manager, store, pages=pages)
    again = pinned(c)
    assert c.remote.find(again, "q", keys) == 8 * bs and len(again.blocks("q")) == 8
    assert_holds(again, "q", "r1", range(8))
    assert c.stats()["remote"]["gets_bad"] == 1
    a.check()
    b.check()
    c.check()


def test_blocks_larger_than_an_object_are_kept_local_and_said_so(make_manager, store, caplog):
    # object_bytes below one block of the space (every region): offers publish locally and send nothing, lookups
    # find what is local only -- no error reaches the engine, a warning names the setting, stats count it
    bs = make_manager.shape["block_size"]
    block = make_manager.shape["block_size"] * make_manager.shape["num_kv_heads"] * make_manager.shape["head_dim"]
    a = _remote(make_manager, store, remote_object_bytes=block)  # a region's block, of 2 x layers regions
    tokens = list(range(8 * bs))
    space, keys = _offer(a, make_manager, tokens)
    assert a.stats()["remote"].get("puts", 0) == 0 and a.stats()["remote"]["blocks_too_large"] > 0
    assert "raise object_bytes" in caplog.text
    assert a.remote.find(space, "q", keys) == 8 * bs  # published here: found locally
    b = _remote(make_manager, store, remote_object_bytes=block)
    assert b.remote.find(_space(b, make_manager), "q", keys) == 0
    a.check()
    b.check()


def test_a_reader_only_process_finds_what_others_wrote_and_writes_nothing(make_manager, store):
    # [remote] write = "none": a replica reads what a writer offered, and its own offers stay local
    bs = make_manager.shape["block_size"]
    tokens = list(range(16 * bs))
    a = _remote(make_manager, store)
    _, keys = _offer(a, make_manager, tokens[:8 * bs])
    reader = _remote(make_manager, store, remote_write="none")
    space = _space(reader, make_manager)
    assert reader.remote.find(space, "q", keys) == 8 * bs
    assert_holds(space, "q", "r1", range(8))
    space.allocate("mine", 16 * bs)
    write_seq(space, "mine", salt=3)
    theirs = space.block_keys(list(range(1000, 1000 + 16 * bs)))
    assert reader.remote.offer(space, "mine", theirs) == 16 and reader.remote.flush(30)
    assert reader.stats()["remote"].get("puts", 0) == 0
    third = _remote(make_manager, store)
    assert third.remote.find(_space(third, make_manager), "q", theirs) == 0
    reader.check()


def test_a_shorter_chain_is_found_to_its_last_block_by_a_longer_prompt(make_manager, store):
    bs = make_manager.shape["block_size"]
    tokens = list(range(BLOCKS * bs))
    # A offers a 20-block prompt: groups 0..7, 8..15 and the short last one 16..19
    a = _remote(make_manager, store)
    _offer(a, make_manager, tokens[:20 * bs])
    # B's prompt goes on past it: the two whole groups, then the store is asked inside the third: 16..19
    b = _remote(make_manager, store)
    space = _space(b, make_manager)
    assert b.remote.find(space, "q", space.block_keys(tokens)) == 20 * bs
    assert_holds(space, "q", "r1", range(20))
    b.check()


def test_a_chain_extended_mid_group_is_found_whole_across_its_turns(make_manager, store):
    # the next turn of a chat: A offers 20 blocks (groups 0..7, 8..15 and the short 16..19), then the chain goes on
    # to 40 from block 20 -- the group 16..23 is written as its end only (20..23), beside the earlier 16..19
    bs = make_manager.shape["block_size"]
    tokens = list(range(BLOCKS * bs))
    a = _remote(make_manager, store)
    space, _ = _offer(a, make_manager, tokens[:20 * bs])
    space.allocate("r1", BLOCKS * bs)
    write_seq(space, "r1")  # the same content pattern: blocks 0..19 unchanged, 20..39 new
    keys = space.block_keys(tokens)
    assert a.remote.send(space, space.blocks("r1")[20:], keys[20:], start=20) == 3 and a.remote.flush(30)
    # B's 40-block prompt: 0..15 whole, then 16..19 (the shorter chain's end), then 20..23 and on: all 40
    b = _remote(make_manager, store)
    found = _space(b, make_manager)
    assert b.remote.find(found, "q", keys) == BLOCKS * bs
    assert_holds(found, "q", "r1", range(BLOCKS))
    assert b.stats()["remote"]["gets_gap"] == 1
    b.check()
    # a writer of the whole chain stored earlier is not overwritten by an end: C holds all 40 from the start
    c = _remote(make_manager, store)
    other = _space(c, make_manager)
    salted = other.block_keys(tokens, salt=b"t2")
    other.allocate("w", BLOCKS * bs)
    write_seq(other, "w")  # other bytes under the same keys: which object is served shows in the bytes
    assert c.remote.send(other, other.blocks("w"), salted, salt=b"t2") == 5 and c.remote.flush(30)
    assert a.remote.send(space, space.blocks("r1")[20:], space.block_keys(tokens, salt=b"t2")[20:], start=20,
                         salt=b"t2") == 3 and a.remote.flush(30)
    assert a.stats()["remote"]["puts_ends_not_needed"] == 1
    d = _remote(make_manager, store)
    mine = _space(d, make_manager)
    assert d.remote.find(mine, "q", salted, salt=b"t2") == BLOCKS * bs
    # C's group 16..23 whole: the end A offered later was not put over it (which copy of a whole group a re-put
    # leaves is the store's choice -- Valkey's is the last, Mooncake's the first -- equal bytes in a real chain)
    assert_holds(mine, "q", "w", range(24))
    d.check()


def test_a_prefix_held_locally_is_extended_from_the_store(make_manager, store):
    bs = make_manager.shape["block_size"]
    tokens = list(range(BLOCKS * bs))
    a = _remote(make_manager, store)
    _, keys = _offer(a, make_manager, tokens)
    b = _remote(make_manager, store)
    space = _space(b, make_manager)
    # B holds the first 12 blocks itself (computed, published): a request finds 12 here and 28 more remotely
    space.allocate("mine", 12 * bs)
    write_seq(space, "mine")
    space.publish("mine", keys[:12])
    assert b.remote.find(space, "q", keys) == BLOCKS * bs
    assert_holds(space, "q", "mine", range(12))
    assert_holds(space, "q", "r1", range(12, BLOCKS))
    b.check()


def test_a_store_that_goes_away_is_a_miss_within_the_deadline_and_comes_back(make_manager, store):
    bs = make_manager.shape["block_size"]
    tokens = list(range(BLOCKS * bs))
    a = _remote(make_manager, store)
    _, keys = _offer(a, make_manager, tokens)
    b = _remote(make_manager, store, remote_timeout_s=0.5)
    space = _space(b, make_manager)
    # 1. the server stops answering (SIGSTOP): the lookup is a miss, returned at its deadline, not a hang
    store.pause()
    started = time.monotonic()
    assert b.remote.find(space, "q", keys) == 0
    assert time.monotonic() - started < 5.0, "a lookup waited far past its deadline"
    assert not b.stats()["remote"]["up"] and b.stats()["remote"]["errors"] >= 1
    assert space.sequences() == []
    # 2. while it is down, requests do not wait on it at all
    assert b.remote.find(space, "q", keys) == 0
    # 3. it is killed and started again, empty: once the back-off passes, lookups ask again, and miss
    store.restart()
    _wait_up(b)
    assert b.remote.find(space, "q", keys) == 0 and space.sequences() == []
    # 4. A offers again (its known keys were in a store that lost them: a fresh manager sends them); B finds them
    #    as soon as its client is through to the new server (Mooncake's reconnects within seconds): until then,
    #    misses that hold nothing
    a2 = _remote(make_manager, store)
    _offer(a2, make_manager, tokens)
    deadline = time.monotonic() + 60
    for attempt in range(10**6):
        found = b.remote.find(space, ("q", attempt), keys)
        if found:
            break
        assert ("q", attempt) not in space.sequences() and time.monotonic() < deadline, b.stats()["remote"]
        time.sleep(0.2)
    assert found == BLOCKS * bs
    assert_holds(space, ("q", attempt), "r1", range(BLOCKS))
    b.check()


def test_a_store_killed_in_the_middle_of_reads_gives_whole_hits_or_misses(make_manager, store):
    import threading
    bs = make_manager.shape["block_size"]
    a = _remote(make_manager, store)
    _, keys = _offer(a, make_manager, list(range(BLOCKS * bs)))
    b = _remote(make_manager, store, remote_timeout_s=1.0)
    space = _space(b, make_manager)
    # lookups run back to back while the server is killed under them: each one is a whole hit with the offered
    # bytes, or a miss that holds nothing -- never part of a group, never other bytes, never a hang
    killer = threading.Timer(0.05, store.stop)
    killer.start()
    outcomes = []
    for i in range(40):
        found = b.remote.find(space, ("q", i), keys)
        outcomes.append(found)
        if found:
            assert found % (8 * bs) == 0 or found == BLOCKS * bs
            assert_holds(space, ("q", i), "r1", range(found // bs))
            space.free(("q", i), retain=False)  # not kept here: the next lookup asks the store again
        else:
            assert ("q", i) not in space.sequences()
    killer.join()
    assert 0 in outcomes  # the server went away during the run
    b.check()


def _wait_up(mgr, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        space_free = mgr.stats()["remote"]
        if space_free["up"]:
            return
        assert time.monotonic() < deadline, space_free
        time.sleep(0.1)


def test_the_metrics_endpoint_says_what_the_remote_cache_did(make_manager, store):
    from tests.test_metrics import _scrape
    bs = make_manager.shape["block_size"]
    a = _remote(make_manager, store, metrics_port=0)
    _, keys = _offer(a, make_manager, list(range(BLOCKS * bs)))
    b = _remote(make_manager, store, metrics_port=0)
    space = _space(b, make_manager)
    assert b.remote.find(space, "q", keys) == BLOCKS * bs
    put, got = _scrape(a.metrics.port), _scrape(b.metrics.port)
    assert put[("kvtier_remote_up", ())] == 1 and put[("kvtier_remote_put_objects_total", ())] == 5
    assert put[("kvtier_remote_put_bytes_total", ())] == a.stats()["remote"]["put_bytes"]
    assert got[("kvtier_remote_hit_blocks_total", ())] == BLOCKS and got[("kvtier_remote_errors_total", ())] == 0
    store.pause()  # a store that stops answering shows as down
    b.remote.find(space, "q2", keys[:1] + [bytes(16)] * 3)
    assert _scrape(b.metrics.port)[("kvtier_remote_up", ())] == 0
    store.resume()


def _damage(store, key):
    """One byte of the payload of the object named by ``key`` flipped, under its live key, behind kvtier's back."""
    from kvtier.remote import _namer
    raw = _raw_client(store)
    name = _namer(b"")(key)  # its name in the store: kvtier/<tenant>/<key>
    value = bytearray(raw.get(name))
    value[5000] ^= 0x40
    raw.put(name, bytes(value))


@pytest.mark.parametrize("damaged", [0, 1])
def test_garbage_under_a_live_key_is_a_miss_never_served(make_manager, store, caplog, damaged):
    bs = make_manager.shape["block_size"]
    tokens = list(range(BLOCKS * bs))
    a = _remote(make_manager, store)
    _, keys = _offer(a, make_manager, tokens)
    # the group of blocks 0..7 or 8..15 is overwritten, under its live key, with other bytes of the same size
    _damage(store, keys[8 * damaged + 7])
    b = _remote(make_manager, store)
    space = _space(b, make_manager)
    # the groups before it are served; the damaged one fails its check (where it landed): the chain stops there
    assert b.remote.find(space, "q", keys) == 8 * damaged * bs
    if damaged:
        assert space.blocks("q") and len(space.blocks("q")) == 8
        assert_holds(space, "q", "r1", range(8))
    else:
        assert "q" not in space.sequences()
    assert b.stats()["remote"]["gets_bad"] == 1
    assert any("not served" in r.getMessage() for r in caplog.records)
    # nothing of the damaged group is published: a sequence sharing the prompt finds the groups before it only
    assert space.share_prefix("q2", keys) == 8 * damaged * bs
    # asked again, the space gives what it holds and the store the damaged group again: cut back to the same point
    assert b.remote.find(space, "q3", keys) == 8 * damaged * bs
    if damaged:
        assert len(space.blocks("q3")) == 8
        assert_holds(space, "q3", "r1", range(8))
    assert b.stats()["remote"]["gets_bad"] == 2
    b.check()


@pytest.mark.parametrize("backend", ["valkey", "mooncake"])
def test_a_full_store_evicts_and_the_cache_keeps_working(make_manager, backend):
    # Valkey with room for 16 objects beside its own megabyte (allkeys-lru: 3 MB on the CPU shape; a fixed 3 MB
    # held not one object of the CUDA shape, 4 MiB); Mooncake with a store service of 64 objects, 16 MB at least:
    # it refuses a put while it has no room and then evicts 5 % of its objects, so a store of 16 objects freed one
    # at a time and took only each prompt's first object (84 of 180 puts refused, no prompt found whole)
    page = make_manager.shape
    obj = 8 * page["block_size"] * page["num_kv_heads"] * page["head_dim"] * 2 * 2 * page["num_layers"] + 4096
    store = START[backend](**({"maxmemory": str((1 << 20) + 16 * obj)} if backend == "valkey" else
                              {"memory": f"{max(16, -(-64 * obj >> 20))}MB"}))
    try:
        bs = make_manager.shape["block_size"]
        a = _remote(make_manager, store)
        space = _space(a, make_manager)
        # many prompts, several times what the store holds: nothing fails on our side
        prompts = [[p] * (16 * bs) for p in range(1, 13 if backend == "valkey" else 91)]
        for i, tokens in enumerate(prompts):
            space.allocate(("r", i), len(tokens))
            write_seq(space, ("r", i))
            a.remote.offer(space, ("r", i), space.block_keys(tokens))
            assert a.remote.flush(30)
            space.free(("r", i), retain=False)
        # each prompt found again is a whole hit with its bytes, or a miss; some of each
        b = _remote(make_manager, store)
        found = _space(b, make_manager)
        got = {}
        for i, tokens in enumerate(prompts):
            got[i] = b.remote.find(found, ("q", i), found.block_keys(tokens))
            if got[i]:
                assert_holds(found, ("q", i), ("r", i), range(got[i] // bs))
                found.free(("q", i), retain=False)
        assert max(got.values()) == 16 * bs and min(got.values()) == 0, got
        if backend == "valkey":  # least recently used first: the newest is there
            assert got[len(prompts) - 1] == 16 * bs
        b.check()
    finally:
        store.stop()


class _raw_client:
    """The store's own client, to write behind kvtier's back."""

    def __init__(self, store):
        if store.backend == "valkey":
            import valkey
            self.c = valkey.Valkey(host="127.0.0.1", port=store.port)
            self.get, self.put = self.c.get, self.c.set
        else:
            from mooncake.store import MooncakeDistributedStore
            self.c = MooncakeDistributedStore()
            assert self.c.setup("127.0.0.1", "P2PHANDSHAKE", 64 << 20, 16 << 20, "tcp", "",
                                store.config["remote_master"]) == 0
            self.get = self.c.get
            self.put = self.c.upsert  # a put of a key held already keeps the old value


def test_config_check_says_whether_the_store_answers(tmp_path):
    from click.testing import CliRunner

    from kvtier.cli import main
    from tests.stores import free_port
    store = START["valkey"]()
    try:
        up, down = tmp_path / "up.toml", tmp_path / "down.toml"
        up.write_text(f'[gpu]\ndevice = "cpu"\n[remote]\nbackend = "valkey"\naddress = "127.0.0.1:{store.port}"\n')
        down.write_text(f'[gpu]\ndevice = "cpu"\n[remote]\nbackend = "valkey"\naddress = "127.0.0.1:{free_port()}"\n')
        result = CliRunner().invoke(main, ["config", "check", str(up), str(down)])
        assert result.exit_code == 1
        assert f"ok  {up}" in result.output
        assert "[remote] address: the valkey store at 127.0.0.1:" in result.output and "cannot be used" in result.output
        info = CliRunner().invoke(main, ["info"], env={"KVTIER_REMOTE_BACKEND": "valkey", "KVTIER_DEVICE": "cpu",
                                                       "KVTIER_REMOTE_ADDRESS": f"127.0.0.1:{store.port}"})
        assert f"remote store  valkey at 127.0.0.1:{store.port}" in info.output
    finally:
        store.stop()


def test_erase_removes_a_tenants_objects_from_the_store_and_no_other(make_manager, store):
    bs = make_manager.shape["block_size"]
    tokens = list(range(BLOCKS * bs))
    # two tenants offer the same prompt: under their salts, their objects are their own
    a = _remote(make_manager, store)
    space = _space(a, make_manager)
    keys = {}
    for tenant in (b"tenant-a", b"tenant-b"):
        seq = ("r", tenant)
        space.allocate(seq, len(tokens))
        write_seq(space, seq)
        keys[tenant] = space.block_keys(tokens, salt=tenant)
        a.remote.offer(space, seq, keys[tenant], salt=tenant)
    assert a.remote.flush(30)
    # a reads tenant-a's once (Mooncake holds a read lease on it for a while: the erase goes through it)
    b = _remote(make_manager, store)
    found = _space(b, make_manager)
    assert b.remote.find(found, "warm", keys[b"tenant-a"], salt=b"tenant-a") == BLOCKS * bs
    assert found.erase(b"tenant-a") == BLOCKS  # published in b's space under its tenant's salt
    # tenant-a is erased from the store: another manager finds nothing of it, and all of tenant-b
    assert a.remote.erase(b"tenant-a") == 5
    c = _remote(make_manager, store)
    other = _space(c, make_manager)
    assert c.remote.find(other, "qa", keys[b"tenant-a"], salt=b"tenant-a") == 0
    assert c.remote.find(other, "qb", keys[b"tenant-b"], salt=b"tenant-b") == BLOCKS * bs
    assert_holds(other, "qb", ("r", b"tenant-b"), range(BLOCKS))
    # a key of one tenant looked up under another's salt is another name: a miss
    assert c.remote.find(other, "qx", keys[b"tenant-a"], salt=b"tenant-b") == 0
    c.check()
