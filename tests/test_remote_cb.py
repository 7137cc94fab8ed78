"""Two servers share a prefix through a store: transformers' continuous batching on kvtier in two processes, one
store (a real Valkey server, a real Mooncake master, on 127.0.0.1). The first process serves chats over a system
prompt; the blocks its engine forgets go to the store. The second serves the same chats and finds them there from
its first turn -- and both give the tokens of the engine as shipped (CPU, fp32, tiny model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.stores import START
from tests.test_cb_prefix import BLOCK_BYTES, DOCS, _chat, _manager, _model, _tokens, ask_one_by_one, kvtier_engine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVE = """
import json, sys
from tests.test_cb_prefix import _chat, _manager, _model, kvtier_engine
with _manager("cpu", **json.loads(sys.argv[1])) as mgr:
    assert mgr.remote.wait_connected(60)
    model = _model("cpu")
    with kvtier_engine(model, mgr, swap_tier="host") as engine:
        got = _chat(model, 14, one_session=False)
    assert mgr.remote.flush(60)
    print(json.dumps({"tokens": got, "remote": mgr.stats()["remote"]}))
"""


def _serve_elsewhere(config: dict) -> dict:
    """One server's life in a process of its own."""
    done = subprocess.run([sys.executable, "-c", SERVE, json.dumps(config)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "GLOG_minloglevel": "2"})
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", ["valkey", "mooncake"])
def test_a_second_server_finds_the_first_ones_prefixes_in_the_store(backend):
    store = START[backend]()
    try:
        expected = _chat(_model("cpu"), 14, one_session=False)  # the engine as shipped
        config = dict(store.config, remote_timeout_s=5.0, remote_negative_ttl_s=0.0)
        # 1. the first server: the engine's tokens; what it forgot went to the store
        first = _serve_elsewhere(config)
        assert first["tokens"] == expected
        assert first["remote"]["puts"] > 0 and first["remote"].get("hit_blocks", 0) == 0
        # 2. the second server, here: the same tokens, and blocks from the store from its first turn on
        with _manager("cpu", **config) as mgr:
            assert mgr.remote.wait_connected(60)
            model = _model("cpu")
            with kvtier_engine(model, mgr, swap_tier="host") as engine:
                got = _chat(model, 14, one_session=False)
                stats = engine.stats()
            assert got == expected
            assert mgr.stats()["remote"]["hit_blocks"] > 0
            assert stats["prefix_hit_blocks"] >= mgr.stats()["remote"]["hit_blocks"]
            mgr.check()
    finally:
        store.stop()


def test_documents_found_in_the_store_come_up_whole_on_a_tight_pool():
    # a first server reads three documents (6 blocks each) and forgets them into a Valkey store; a second, on a
    # pool of 28 pages of 4 KiB with staging for 2 blocks, reads the second and the third and asks about the first
    # again: each prompt's blocks come from the store whole (a store's objects are read at once) into the little
    # room its engine leaves -- the engine's tokens, blocks from the store taken as far as room goes (16 of 18 in
    # the run that sized it)
    store = START["valkey"]()
    try:
        model = _model("cpu")
        asks = DOCS[1:] + [DOCS[0] + _tokens(3, 7)]
        expected = ask_one_by_one(model, asks, 10)  # the engine as shipped
        config = dict(store.config, remote_timeout_s=5.0, remote_negative_ttl_s=0.0, host_size=256 * 4096,
                      host_chunk=64 * 4096)
        # 1. the first server: its forgotten blocks (and those kept at its end) go to the store
        with _manager("cpu", pages=1024, page=4096, **config) as mgr:  # the same page: the objects' layout
            assert mgr.remote.wait_connected(60)
            with kvtier_engine(model, mgr, swap_tier="host"):
                ask_one_by_one(model, DOCS, 10)
            assert mgr.remote.flush(60) and mgr.stats()["remote"]["puts"] > 0
        # 2. the second server, on a tight pool: the engine's tokens, with blocks from the store
        with _manager("cpu", pages=28, page=4096, **config) as mgr:
            assert mgr.remote.wait_connected(60)
            with kvtier_engine(model, mgr, swap_tier="host", staging_bytes=2 * BLOCK_BYTES,
                               capacity_bytes=22 * 4096) as engine:
                got = ask_one_by_one(model, asks, 10)
                stats = engine.stats()
            assert got == expected
            assert mgr.stats()["remote"]["hit_blocks"] > 0 and stats["prefix_hit_blocks"] > 0, stats
            mgr.check()
    finally:
        store.stop()
