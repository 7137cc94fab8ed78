"""Synthetic traces for ``kvtier replay``: multi-turn chat, and bursty multi-model traffic with a long tail."""

from __future__ import annotations

import numpy as np

from kvtier.replay import Trace

# Small enough for CPU runs; every space shares the shape (per token: 8 layers x K,V x 8 heads x 128 x 2 bytes).
SHAPE = dict(num_layers=8, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_size=16)


def _conversation(rng: np.random.Generator, seq: str, space: str, start: float, turns: int, prompt: int,
                  think: float, max_tokens: int) -> list[dict]:
    events, t, total = [], start, 0
    for turn in range(turns):
        grow = prompt if turn == 0 else int(rng.integers(prompt // 8, prompt // 3) + 1)
        decode = int(rng.integers(64, 320))
        if total + grow + decode > max_tokens:
            break
        events.append({"t": round(t, 3), "op": "arrive" if turn == 0 else "return", "space": space, "seq": seq,
                       "tokens": grow})
        t += decode * 0.02  # 20 ms a token
        events.append({"t": round(t, 3), "op": "decode", "seq": seq, "tokens": decode})
        total += grow + decode
        if turn < turns - 1:
            events.append({"t": round(t, 3), "op": "idle", "seq": seq})
            t += float(rng.exponential(think))
    events.append({"t": round(t + 0.001, 3), "op": "finish", "seq": seq})
    return events


def chat_trace(conversations: int = 40, seed: int = 0, duration: float = 600.0) -> Trace:
    """Multi-turn chat: long contexts that come back after think times (exponential, mean 30 s)."""
    rng = np.random.default_rng(seed)
    max_tokens = 16384
    events = []
    for i in range(conversations):
        prompt = int(rng.integers(1000, 6000))
        events += _conversation(rng, f"chat-{i}", "chat", float(rng.uniform(0, duration)), int(rng.integers(2, 6)),
                                prompt, 30.0, max_tokens)
    events.sort(key=lambda e: e["t"])
    return Trace({"chat": dict(SHAPE, max_tokens=max_tokens * conversations // 4)}, events)


def bursty_trace(requests: int = 90, seed: int = 0, duration: float = 300.0) -> Trace:
    """Three models on one GPU (the setting of kvcached and Prism): arrivals in bursts, prompt lengths with a long
    (Pareto) tail, and a high-priority interactive model whose users come back after short think times."""
    rng = np.random.default_rng(seed)
    spaces = {"interactive": 10, "assistant": 5, "batch": 0}
    max_tokens = 16384
    events = []
    bursts = np.sort(rng.uniform(0, duration, size=max(1, requests // 15)))
    for i in range(requests):
        space = rng.choice(list(spaces), p=[0.4, 0.3, 0.3])
        start = float(bursts[rng.integers(len(bursts))] + rng.exponential(2.0))
        prompt = int(min(max_tokens // 2, 300 * (1 + rng.pareto(1.5))))
        turns = int(rng.integers(2, 5)) if space != "batch" else 1
        think = 8.0 if space == "interactive" else 40.0
        events += _conversation(rng, f"{space}-{i}", str(space), start, turns, prompt, think, max_tokens)
    events.sort(key=lambda e: e["t"])
    return Trace({name: dict(SHAPE, max_tokens=max_tokens * 8, priority=p) for name, p in spaces.items()}, events)
