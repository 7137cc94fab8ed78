"""``kvtier bench remote``: the remote cache against the store's own client, on stores started here (127.0.0.1).

Per store (Valkey; Mooncake with a store service holding its memory): a prompt's KV of an 8-layer model shape (on
a GPU: Llama-3-8B's, 32 layers) is offered by one manager and found by another -- through kvtier's remote cache
(objects of ``object_bytes``, checked, staged in host memory, copied into fresh blocks) -- and the same number of
objects of the same size moved by the store's own client in the same run (Valkey: pipelined SET and MGET;
Mooncake: batch_put_from and batch_get_into from a registered buffer): the ratios are kvtier's share of what the
client reaches. Then the hit itself against the alternative, recomputing the prompt: a model of that KV shape
(random weights) prefills it.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch

from kvtier.bench.common import Table, random_model
from kvtier.bench.remote_servers import two_servers
from kvtier.bench.stores import START, Store, StoreUnavailable
from kvtier.config import Config, MiB
from kvtier.manager import TierManager
from kvtier.vmm import resolve_device

SHAPE = dict(num_layers=8, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, block_size=16)
OBJECT = 8 * MiB  # 16 blocks of this shape (4 of the GPU's)
# on a GPU the 8-layer model prefilled 4096 tokens in 6 ms (H200): no store can beat that, and no one serves it;
# the hit is weighed against the model whose KV it is
GPU_LAYERS, GPU_HIDDEN, GPU_FFN = 32, 4096, 14336


def _shape(device: torch.device) -> dict[str, Any]:
    return {**SHAPE, "num_layers": GPU_LAYERS} if device.type == "cuda" else dict(SHAPE)


def _manager(device: torch.device, store: Store, tokens: int) -> TierManager:
    shape = _shape(device)
    kv = tokens * 2 * shape["num_layers"] * shape["num_kv_heads"] * shape["head_dim"] * 2
    config = Config(device=str(device), pool_budget=2 * kv + 256 * MiB, pool_ready=0, host_size=0, nvme_size=0,
                    remote_object_bytes=OBJECT, remote_buffer=kv + 64 * MiB, remote_timeout_s=60.0,
                    remote_put_timeout_s=120.0, remote_negative_ttl_s=0.0, **store.config)
    mgr = TierManager(config)
    if mgr.remote is None or not mgr.remote.wait_connected(60):
        raise StoreUnavailable(f"{store.backend}: kvtier's client did not connect")
    return mgr


class Through:
    """kvtier's remote cache, a round at a time: one prompt of ``tokens`` under new keys each round (a salt),
    offered by one manager and found by another (then let go there); what came back is checked against what went."""

    def __init__(self, device: torch.device, store: Store, tokens: int) -> None:
        self.store, self.tokens = store, tokens
        self.a, self.b = _manager(device, store, tokens), _manager(device, store, tokens)
        self.space = self.a.create_space("bench", max_tokens=tokens, **_shape(device))
        self.space.allocate("p", tokens)
        for layer in range(self.space.num_layers):
            for t in self.space.kv(layer):
                t.normal_()
        self.found = self.b.create_space("bench", max_tokens=tokens, **_shape(device))
        self.rounds = 0

    def round(self) -> tuple[float, float]:
        """(send + flush seconds, find seconds)."""
        space, found, tokens = self.space, self.found, self.tokens
        keys = space.block_keys(list(range(tokens)), salt=b"round %d" % self.rounds)
        self.rounds += 1
        start = time.perf_counter()
        self.a.remote.send(space, space.blocks("p"), keys)
        assert self.a.remote.flush(300), "writes did not finish"
        put = time.perf_counter() - start
        start = time.perf_counter()
        got = self.b.remote.find(found, "q", keys)
        get = time.perf_counter() - start
        assert got == tokens, f"{self.store.backend}: {got} of {tokens} tokens found ({self.b.stats()['remote']})"
        for layer in range(space.num_layers):  # what came back is what was offered
            for mine, theirs in zip(space.kv(layer), found.kv(layer)):
                assert torch.equal(mine[space.blocks("p")].cpu(), theirs[found.blocks("q")].cpu())
        found.free("q", retain=False)
        return put, get

    def round_bytes(self) -> int:
        return self.a.stats()["remote"]["put_bytes"] // self.rounds

    def close(self) -> None:
        self.a.close()
        self.b.close()


class Client:
    """The store's own client, a round at a time: ``count`` values of ``size`` bytes under new keys each round,
    put from one buffer and read back into it (Valkey: pipelined SET, MGET; Mooncake: batch_put_from and
    batch_get_into from a registered buffer)."""

    def __init__(self, store: Store, count: int, size: int) -> None:
        self.store, self.count, self.size, self.rounds = store, count, size, 0
        self.buf = np.random.default_rng(0).integers(0, 255, count * size, dtype=np.uint8)
        if store.backend == "valkey":
            import valkey
            self.client = valkey.Valkey(host="127.0.0.1", port=store.port)
            return
        from mooncake.store import MooncakeDistributedStore
        self.client = MooncakeDistributedStore()
        assert self.client.setup("127.0.0.1", "P2PHANDSHAKE", 0, 16 << 20, "tcp", "",
                                 store.config["remote_master"]) == 0
        self.client.register_buffer(self.buf.ctypes.data, self.buf.nbytes)

    def round(self) -> tuple[float, float]:
        """(put seconds, get seconds)."""
        buf, size, count = self.buf, self.size, self.count
        keys = [f"raw/{self.rounds}/{i}" for i in range(count)]
        self.rounds += 1
        if self.store.backend == "valkey":
            start = time.perf_counter()
            pipe = self.client.pipeline(transaction=False)
            for i, k in enumerate(keys):
                pipe.set(k, buf[i * size:(i + 1) * size].tobytes())
            pipe.execute()
            put = time.perf_counter() - start
            start = time.perf_counter()
            for i, v in enumerate(self.client.mget(keys)):
                buf[i * size:(i + 1) * size] = np.frombuffer(v, dtype=np.uint8)
            return put, time.perf_counter() - start
        ptrs, sizes = [buf.ctypes.data + i * size for i in range(count)], [size] * count
        start = time.perf_counter()
        assert all(c == 0 for c in self.client.batch_put_from(keys, ptrs, sizes))
        put = time.perf_counter() - start
        start = time.perf_counter()
        assert all(g == size for g in self.client.batch_get_into(keys, ptrs, sizes))
        return put, time.perf_counter() - start

    def close(self) -> None:
        if self.store.backend == "mooncake":
            self.client.unregister_buffer(self.buf.ctypes.data)
        self.client.close()


def side_by_side(device: torch.device, store: Store, tokens: int,
                 rounds: int) -> tuple[list[tuple[float, float]], list[tuple[float, float]], int]:
    """Rounds of kvtier and of the store's client taking turns, so that both meet the same store and machine
    (run one after the other, the client's gets varied by 1.25x between stores started afresh: H200, 54e6c03):
    each side's (put, get) seconds of ``rounds`` rounds after a warm-up one, and the bytes a round moves."""
    through = Through(device, store, tokens)
    try:
        mine = [through.round()]  # the warm-up: touches the memory both managers use
        nbytes = through.round_bytes()
        objects = -(-nbytes // (OBJECT + 4096))
        client = Client(store, objects, nbytes // objects)
        try:
            theirs = [client.round()]
            for _ in range(rounds):
                mine.append(through.round())
                theirs.append(client.round())
        finally:
            client.close()
        return mine[1:], theirs[1:], nbytes
    finally:
        through.close()


def _prefill_seconds(device: torch.device, tokens: int) -> float:
    from transformers import LlamaConfig
    cuda, shape = device.type == "cuda", _shape(device)
    config = LlamaConfig(vocab_size=1024, hidden_size=GPU_HIDDEN if cuda else 1024,
                         intermediate_size=GPU_FFN if cuda else 2816, num_hidden_layers=shape["num_layers"],
                         num_attention_heads=32 if cuda else 8, num_key_value_heads=shape["num_kv_heads"],
                         head_dim=shape["head_dim"], max_position_embeddings=max(tokens, 4096))
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
    tokens = 2048 if quick else 4096
    rounds = 2 if quick else 7
    layers = _shape(dev)["num_layers"]
    table = Table(f"Remote cache vs the store's own client ({tokens}-token prompt of a {layers}-layer, 8-KV-head "
                  f"shape: {tokens * 2 * layers * 8 * 128 * 2 // MiB} MiB of KV, objects of {OBJECT // MiB} MiB; "
                  "127.0.0.1)",
                  ["store", "kvtier put GB/s", "client put GB/s", "put ratio", "kvtier get GB/s",
                   "client get GB/s", "get ratio", "hit ms", "recompute ms", "recompute / hit",
                   "2nd server TTFT hit ms", "TTFT miss ms", "miss / hit"])
    served = 1024 if quick else tokens  # the two-server rows' prompt (each server is a process of its own)
    try:
        recompute = _prefill_seconds(dev, tokens)
        engines = True
    except ImportError:
        recompute, engines = float("nan"), False
        table.notes.append("recompute and the two servers: need transformers")
    for backend in ("valkey", "mooncake"):
        try:
            size = 16 if dev.type == "cuda" else 4  # GB: every round's prompt, and the client's, held at once
            store = START[backend](**({"memory": f"{size}GB"} if backend == "mooncake" else
                                      {"maxmemory": f"{size}gb"}))
        except StoreUnavailable as exc:
            table.notes.append(f"{backend} skipped: {exc}")
            continue
        try:
            mine, theirs, nbytes = side_by_side(dev, store, tokens, rounds)
            put_s, get_s, raw_put, raw_get = (statistics.median(x) for x in (*zip(*mine), *zip(*theirs)))
            gb = nbytes / 1e9
            ttft = two_servers(str(dev), served, store.config, OBJECT) if engines else None
            table.add(backend, gb / put_s, gb / raw_put, raw_put / put_s, gb / get_s, gb / raw_get, raw_get / get_s,
                      1e3 * get_s, 1e3 * recompute, recompute / get_s, 1e3 * ttft["hit"] if ttft else None,
                      1e3 * ttft["miss"] if ttft else None, ttft["miss"] / ttft["hit"] if ttft else None)
        except StoreUnavailable as exc:
            table.notes.append(f"{backend} skipped: {exc}")
        finally:
            store.stop()
        if step is not None:
            step()
    if dev.type == "cuda":
        table.notes.append(f"on a GPU the puts, gets and the recompute use a Llama-3-8B shape ({GPU_LAYERS} layers, "
                           "random weights); the two servers' rows an 8-layer one")
    table.notes.append(f"medians of {rounds} rounds after a warm-up, new keys each, kvtier's and the client's "
                       "taking turns; ratio: the store's own client's time over kvtier's for the same bytes (1.0: as "
                       "fast); kvtier's get includes the lookup, the checks and the copy into the space's blocks; "
                       "hit ms: that get")
    table.notes.append(f"two servers: transformers' continuous batching on kvtier in separate processes, a "
                       f"{served}-token prompt; the second server's time to first token when the first one computed "
                       "the prompt (its blocks read from the store) against a prompt nobody computed (kvtier."
                       "bench.remote_servers)")
    return table
