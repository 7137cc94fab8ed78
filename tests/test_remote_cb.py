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
from tests.test_cb_prefix import _chat, _manager, _model, kvtier_engine

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
