"""``kvtier bench remote``: the remote cache against the store's own client, on stores started here (127.0.0.1).

Per store (Valkey; Mooncake with a store service holding its memory): a prompt's KV of an 8-layer model shape is
offered by one manager and found by another -- through kvtier's remote cache (objects of ``object_bytes``,
checked, staged in host memory, copied into fresh blocks) -- and the same number of objects of the same size
moved by the store's own client in the same run (Valkey: pipelined SET and MGET; Mooncake: batch_put_from and
batch_get_into from a registered buffer): the ratios are kvtier's share of what the client reaches. Then the hit
itself against the alternative, recomputing the prompt: a model of that KV shape (random weights) prefills it.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from kvtier.bench.common import Table, random_model
from kvtier.bench.stores import START, Store, StoreUnavailable
from kvtier.config import Config, MiB
from kvtier.manager import TierManager
from kvtier.vmm import resolve_device

SHAPE = dict(num_layers=8, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, block_size=16)
OBJECT = 8 * MiB  # 16 blocks of this shape


def _manager(device: torch.device, store: Store, tokens: int) -> TierManager:
    kv = tokens * 2 * SHAPE["num_layers"] * SHAPE["num_kv_heads"] * SHAPE["head_dim"] * 2
    config = Config(device=str(device), pool_budget=2 * kv + 256 * MiB, pool_ready=0, host_size=0, nvme_size=0,
                    remote_object_bytes=OBJECT, remote_buffer=kv + 64 * MiB, remote_timeout_s=60.0,
                    remote_put_timeout_s=120.0, remote_negative_ttl_s=0.0, **store.config)
    mgr = TierManager(config)
    if mgr.remote is None or not mgr.remote.wait_connected(60):
        raise StoreUnavailable(f"{store.backend}: kvtier's client did not connect")
    return mgr


def _through_kvtier(device: torch.device, store: Store, tokens: int) -> tuple[float, float, int, float]:
    """(offer+flush seconds, find seconds, bytes, prefill-free hit seconds) for one prompt of ``tokens``."""
    a, b = _manager(device, store, tokens), _manager(device, store, tokens)
    try:
        space = a.create_space("bench", max_tokens=tokens, **SHAPE)
        space.allocate("p", tokens)
        for layer in range(space.num_layers):
            for t in space.kv(layer):
                t.normal_()
        found = b.create_space("bench", max_tokens=tokens, **SHAPE)
        for salt in (b"warm-up", b""):  # the first round touches the memory both sides use (steady state)
            keys = space.block_keys(list(range(tokens)), salt=salt)
            start = time.perf_counter()
            a.remote.offer(space, "p", keys, salt=salt)
            assert a.remote.flush(300), "writes did not finish"
            put_s = time.perf_counter() - start
            start = time.perf_counter()
            got = b.remote.find(found, "q", keys)
            get_s = time.perf_counter() - start
            if salt:
                found.free("q", retain=False)
        assert got == tokens, f"{store.backend}: {got} of {tokens} tokens found ({b.stats()['remote']})"
        for layer in range(space.num_layers):  # what came back is what was offered
            for mine, theirs in zip(space.kv(layer), found.kv(layer)):
                assert torch.equal(mine[space.blocks("p")].cpu(), theirs[found.blocks("q")].cpu())
        return put_s, get_s, a.stats()["remote"]["put_bytes"] // 2, get_s
    finally:
        a.close()
        b.close()


def _store_client(store: Store, count: int, size: int) -> tuple[float, float]:
    """(put seconds, get seconds) of ``count`` values of ``size`` bytes through the store's own client."""
    buf = np.random.default_rng(0).integers(0, 255, count * size, dtype=np.uint8)
    keys = [f"raw/{time.time_ns()}/{i}" for i in range(count)]
    if store.backend == "valkey":
        import valkey
        client = valkey.Valkey(host="127.0.0.1", port=store.port)
        start = time.perf_counter()
        pipe = client.pipeline(transaction=False)
        for i, k in enumerate(keys):
            pipe.set(k, buf[i * size:(i + 1) * size].tobytes())
        pipe.execute()
        put_s = time.perf_counter() - start
        start = time.perf_counter()
        values = client.mget(keys)
        for i, v in enumerate(values):
            buf[i * size:(i + 1) * size] = np.frombuffer(v, dtype=np.uint8)
        get_s = time.perf_counter() - start
        client.close()
        return put_s, get_s
    from mooncake.store import MooncakeDistributedStore
    client = MooncakeDistributedStore()
    assert client.setup("127.0.0.1", "P2PHANDSHAKE", 0, 16 << 20, "tcp", "", store.config["remote_master"]) == 0
    base = buf.ctypes.data
    client.register_buffer(base, buf.nbytes)
    ptrs, sizes = [base + i * size for i in range(count)], [size] * count
    start = time.perf_counter()
    assert all(c == 0 for c in client.batch_put_from(keys, ptrs, sizes))
    put_s = time.perf_counter() - start
    start = time.perf_counter()
    assert all(g == size for g in client.batch_get_into(keys, ptrs, sizes))
    get_s = time.perf_counter() - start
    client.unregister_buffer(base)
    client.close()
    return put_s, get_s


def _prefill_seconds(device: torch.device, tokens: int) -> float:
    from transformers import LlamaConfig
    config = LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2816,
                         num_hidden_layers=SHAPE["num_layers"], num_attention_heads=8,
                         num_key_value_heads=SHAPE["num_kv_heads"], head_dim=SHAPE["head_dim"],
                         max_position_embeddings=max(tokens, 4096))
    model = random_model(config, device)
    ids = torch.randint(0, 1024, (1, tokens), device=device)
    with torch.no_grad():
        model(ids)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(ids)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run(device: str = "auto", quick: bool = False, step: Any = None) -> Table:
    dev = resolve_device(device)
    tokens = 2048 if quick or dev.type != "cuda" else 4096
    table = Table(f"Remote cache vs the store's own client ({tokens}-token prompt of an 8-layer, 8-KV-head shape: "
                  f"{tokens * 2 * 8 * 8 * 128 * 2 // MiB} MiB of KV, objects of {OBJECT // MiB} MiB; 127.0.0.1)",
                  ["store", "kvtier put GB/s", "client put GB/s", "put ratio", "kvtier get GB/s",
                   "client get GB/s", "get ratio", "hit ms", "recompute ms", "recompute / hit"])
    try:
        recompute = _prefill_seconds(dev, tokens)
    except ImportError:
        recompute = float("nan")
        table.notes.append("recompute: needs transformers")
    for backend in ("valkey", "mooncake"):
        try:
            store = START[backend]()
        except StoreUnavailable as exc:
            table.notes.append(f"{backend} skipped: {exc}")
            continue
        try:
            put_s, get_s, nbytes, hit_s = _through_kvtier(dev, store, tokens)
            objects = -(-nbytes // (OBJECT + 4096))
            raw_put, raw_get = _store_client(store, objects, nbytes // objects)
            gb = nbytes / 1e9
            table.add(backend, gb / put_s, gb / raw_put, raw_put / put_s, gb / get_s, gb / raw_get, raw_get / get_s,
                      1e3 * hit_s, 1e3 * recompute, recompute / hit_s)
        except StoreUnavailable as exc:
            table.notes.append(f"{backend} skipped: {exc}")
        finally:
            store.stop()
        if step is not None:
            step()
    table.notes.append("ratio: the store's own client's time over kvtier's for the same bytes (1.0: as fast); "
                       "kvtier's get includes the lookup, the checks and the copy into the space's blocks")
    return table
