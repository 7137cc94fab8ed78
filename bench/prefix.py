"""``kvtier bench prefix``: chats of several turns over one system prompt, through transformers' continuous
batching with its prefix sharing on, where the conversations' KV is several times the GPU's KV budget.

One model with random weights and one seeded workload, served twice with the same KV budget: the engine as
shipped (its prefix sharing keeps finished requests' full blocks on the GPU and forgets them all under
pressure) and the engine on kvtier (what it forgets goes down to host memory, and comes back for the next turn).
Conversations start at Poisson arrivals; each next turn is asked a think-time after the answer came, its prompt
the whole conversation so far. Reported: output tokens/s, TTFT p50/p99, prompt tokens computed against the
tokens asked, blocks found per tier, bytes brought up, peak GPU memory, and whether every output equals the
first run's; and, for the plot, hits per tier over time.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from kvtier.bench.common import Table, percentile, random_model
from kvtier.config import Config, GiB, MiB
from kvtier.manager import TierManager

SAMPLE_S = 0.25  # how often the hits per tier are sampled for the plot


@dataclass
class Chats:
    system: list[int]
    turns: list[list[tuple[list[int], int]]]  # per conversation: (the user's tokens, tokens to answer) per turn
    starts: list[float]  # when each conversation's first turn arrives, seconds after the start
    think: list[list[float]]  # per conversation, per turn after the first: the gap after the previous answer
    page_size: int

    @classmethod
    def make(cls, conversations: int, turns: int, system: int, user: tuple[int, int], answer: tuple[int, int],
             rate: float, think_s: float, vocab: int, page_size: int, seed: int = 0,
             first: tuple[int, int] | None = None) -> "Chats":
        """``first``: the length of each conversation's first user turn (a document asked about), if not ``user``."""
        gen = torch.Generator().manual_seed(seed)

        def uniform(lo: int, hi: int) -> int:
            return int(torch.randint(lo, hi + 1, (1,), generator=gen))

        def tokens(n: int) -> list[int]:
            return torch.randint(1, vocab, (n,), generator=gen).tolist()

        chats = [[(tokens(uniform(*(first if first and t == 0 else user))), uniform(*answer)) for t in range(turns)]
                 for _ in range(conversations)]
        gaps = torch.empty(conversations).exponential_(rate, generator=gen).tolist()
        starts = [sum(gaps[:i]) for i in range(conversations)]
        think = [torch.empty(turns).exponential_(1 / think_s, generator=gen).tolist() if think_s > 0
                 else [0.0] * turns for _ in range(conversations)]
        return cls(tokens(system), chats, starts, think, page_size)

    def kv_tokens(self) -> int:
        """Tokens of KV the conversations hold at their end, the system prompt's once (the working set)."""
        return len(self.system) + sum(len(u) + a for turns in self.turns for u, a in turns)

    def new_tokens(self) -> int:
        """Prompt tokens no engine can have computed before: the system prompt's once, every user turn's, and a
        turn's last answer token (never fed back while it was answered)."""
        return len(self.system) + sum(len(u) + (i > 0) for turns in self.turns for i, (u, _) in enumerate(turns))


def _serve(model: Any, chats: Chats, cb: Any, timeout: float, sample: Callable[[], dict[str, int]] | None
           ) -> dict[str, Any]:
    """Serve every conversation turn by turn; return outputs, timings, prompt tokens asked, hits over time."""
    from transformers import GenerationConfig
    gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0,
                           max_new_tokens=max(a for turns in chats.turns for _, a in turns))
    history = [list(chats.system) for _ in chats.turns]
    arrived: dict[str, float] = {}
    results: dict[str, Any] = {}
    asked = [0]
    series: list[tuple[float, dict[str, int]]] = []
    total = sum(len(t) for t in chats.turns)
    with model.continuous_batching_context_manager(generation_config=gen, continuous_batching_config=cb) as manager:
        start = time.perf_counter()
        due: list[tuple[float, int, int]] = [(start + at, c, 0) for c, at in enumerate(chats.starts)]
        lock = threading.Lock()

        def ask(c: int, turn: int) -> None:
            user, answer = chats.turns[c][turn]
            history[c] += user
            rid = f"c{c}t{turn}"
            asked[0] += len(history[c])
            arrived[rid] = time.perf_counter()
            manager.add_request(list(history[c]), request_id=rid, max_new_tokens=answer, record_timestamps=True)

        def feed() -> None:  # asks each turn when it is due (a conversation's next turn: after its answer)
            while len(results) < total and time.perf_counter() < start + timeout:
                now = time.perf_counter()
                with lock:
                    ready = [d for d in due if d[0] <= now]
                    for d in ready:
                        due.remove(d)
                for _, c, turn in ready:
                    ask(c, turn)
                time.sleep(0.001)

        feeder = threading.Thread(target=feed, name="bench-prefix-turns", daemon=True)
        feeder.start()
        told = start
        if sample is not None:
            series.append((0.0, sample()))
        while len(results) < total and time.perf_counter() < start + timeout:
            result = manager.get_result(timeout=0.5)
            if result is not None and result.is_finished():
                results[result.request_id] = result
                c, turn = (int(x) for x in result.request_id[1:].split("t"))
                history[c] += list(result.generated_tokens)
                if turn + 1 < len(chats.turns[c]):
                    with lock:
                        due.append((time.perf_counter() + chats.think[c][turn + 1], c, turn + 1))
            elif result is None and not manager.is_running():
                fatal = manager.background_thread_status.fatal_error
                raise RuntimeError(f"bench prefix: the engine stopped after {len(results)} of {total} requests: "
                                   f"{fatal!r}") from fatal
            if sample is not None and time.perf_counter() - told > SAMPLE_S:
                told = time.perf_counter()
                series.append((told - start, sample()))
        feeder.join()
        if sample is not None:
            series.append((time.perf_counter() - start, sample()))
    if len(results) < total:
        raise TimeoutError(f"bench prefix: {len(results)} of {total} requests done in {timeout:.0f} s")
    ttft, tokens, by_request = [], 0, {}
    for rid, r in results.items():
        tokens += len(r.generated_tokens)
        if r.timestamps:
            ttft.append(r.timestamps[0] - arrived[rid])
            by_request[rid] = (ttft[-1], arrived[rid] - start)  # its TTFT and when it came (for the tail's story)
    end = max(r.timestamps[-1] for r in results.values() if r.timestamps)
    return {"tokens": {rid: list(r.generated_tokens) for rid, r in results.items()},
            "errors": sum(r.error is not None for r in results.values()), "tok_s": tokens / (end - start),
            "ttft": ttft, "ttft_by_request": by_request, "asked": asked[0], "series": series, "start": start}


class _Counted:
    """What the engine computed and matched, counted at its own call sites: the query tokens of every batch (the
    scheduler's count, before any padding) and the prompt tokens its own (GPU) prefix match found."""

    def __init__(self) -> None:
        from transformers.generation.continuous_batching.cache import PagedAttentionCache
        from transformers.generation.continuous_batching.scheduler import SCHEDULER_MAPPING
        self.patched = [(PagedAttentionCache, "search_prefix_match", self._matched)]
        self.patched += [(cls, "schedule_batch", self._scheduled) for cls in set(SCHEDULER_MAPPING.values())]
        self.originals = [getattr(cls, name) for cls, name, _ in self.patched]
        self.matched = self.query_tokens = 0

    def _matched(self, original: Any) -> Any:
        def counted(cache: Any, request_id: str, prompt_ids: list[int]) -> int:
            found = original(cache, request_id, prompt_ids)
            self.matched += found
            return int(found)
        return counted

    def _scheduled(self, original: Any) -> Any:
        def counted(scheduler: Any, *args: Any, **kwargs: Any) -> Any:
            out = original(scheduler, *args, **kwargs)
            if out[0] is not None:
                self.query_tokens += int(out[2])
            return out
        return counted

    def __enter__(self) -> "_Counted":
        for (cls, name, wrap), original in zip(self.patched, self.originals):
            setattr(cls, name, wrap(original))
        return self

    def __exit__(self, *exc: object) -> None:
        for (cls, name, _), original in zip(self.patched, self.originals):
            setattr(cls, name, original)


def run(device: str = "auto", quick: bool = False, step: Callable[[], None] | None = None,
        workload: str = "chats", repeats: int = 1, graphs: bool = True) -> Table:
    """``workload``: "chats" (turns of a few hundred tokens over one system prompt: what the engine's own sharing
    mostly keeps) or "documents" (each conversation opens with its own document of thousands of tokens, then asks
    short questions about it: what it forgets between turns is most of each prompt). ``repeats``: runs of the two
    engines, taking turns, and each engine's medians over them (one run's TTFT is a loose figure: the engine as
    shipped ran the same seeded documents at a p50 of 3.95 s and of 6.93 s on two H200s). ``graphs``: on a GPU, both
    engines run their decode steps as CUDA graphs, as served (a decode step of the 8B shape: 80 ms without them on an
    H100, 40-50 ms with them; with slow steps a turn's first token waits mostly for KV room, not for prefill)."""
    from transformers import LlamaConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from kvtier.integrations.continuous_batching import kvtier_engine
    from kvtier.vmm import resolve_device

    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    if cuda:  # a Llama-3.2-1B shape: 32 KiB of KV a token in bf16
        config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                             num_key_value_heads=8, vocab_size=32000, max_position_embeddings=16384)
        # turns come a think-time after their answer, conversations two a second: the engine keeps up, and a
        # turn's history is forgotten by the time it comes again (at 8/s, 0.5 s of thought and 32-96 new tokens,
        # the engine as shipped ran a queue of 24 s TTFT p50: a measure of queueing, not of prefixes)
        # (48 conversations at 2/s, 3 s of thought, 16-48 new tokens: still a queue, TTFT p50 8.7 s, e22baa3)
        chats = Chats.make(12 if quick else 32, 4, 2048, (128, 512), (8, 24), rate=1.0, think_s=4.0,
                           vocab=32000, page_size=256)
        budget_share, max_batch = 0.25, 4096
        if workload == "documents":  # a Llama-3-8B shape (128 KiB of KV a token): a document's prefill is long
            config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                 max_position_embeddings=16384)
            chats = Chats.make(8 if quick else 16, 4, 512, (64, 256), (16, 32), rate=0.5, think_s=2.0,
                               vocab=32000, page_size=256, first=(4096, 8192))
    else:
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=128, max_position_embeddings=2048)
        chats = Chats.make(6 if quick else 10, 3, 40, (8, 16), (4, 8), rate=1e6, think_s=0.0, vocab=128,
                           page_size=16)
        if workload == "documents":  # as on a GPU, a document spans chunks of the engine's steps (8 blocks here)
            chats = Chats.make(6 if quick else 10, 4, 40, (8, 32), (4, 8), rate=20.0, think_s=0.05, vocab=128,
                               page_size=16, first=(200, 400))
        budget_share, max_batch = 0.4, 128
    model = random_model(config, dev)
    model.config._attn_implementation = "sdpa"
    head_dim = config.hidden_size // config.num_attention_heads
    block_bytes = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * model.dtype.itemsize * \
        chats.page_size
    working = -(-chats.kv_tokens() // chats.page_size)
    budget_blocks = max(8, int(working * budget_share))
    budget = budget_blocks * block_bytes
    timeout = 400.0 if cuda else 180.0
    what = "Documents asked about" if workload == "documents" else "Chats"
    table = Table(f"{what} over one system prompt ({len(chats.turns)} conversations x {len(chats.turns[0])} turns, "
                  f"{config.num_hidden_layers}-layer Llama) with KV for {budget_blocks} blocks of "
                  f"{chats.page_size} tokens ({budget / MiB:.0f} MiB; the chats' KV: {working} blocks)",
                  ["engine", "output tok/s", "TTFT p50 s", "TTFT p99 s", "prompt tokens", "computed",
                   "recomputed", "hits gpu", "hits host", "hits nvme", "MiB up", "peak GPU GiB",
                   "outputs differing"])
    first: dict[str, list[int]] | None = None

    def cb_config(num_blocks: int | None) -> Any:
        return ContinuousBatchingConfig(page_size=chats.page_size, num_blocks=num_blocks, max_batch_tokens=max_batch,
                                        allow_block_sharing=True, auto_switch_to_flash=False,
                                        use_cuda_graph=(False, graphs and cuda))

    def measure(label: str, serve: Callable[[], tuple[dict[str, Any], dict[str, int], int, int]]) -> None:
        nonlocal first
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with _Counted() as counted:
            out, hits, up, extra = serve()
        peak = (torch.cuda.max_memory_allocated() + extra) / GiB if cuda else None
        first = first or out["tokens"]
        differing = sum(out["tokens"].get(rid) != tokens for rid, tokens in first.items()) + out["errors"]
        # every query token is a prompt token computed, but the decode steps' (one a generated token, the last
        # excepted); a request preempted and recomputed computes its context again
        computed = counted.query_tokens - sum(max(0, len(t) - 1) for t in out["tokens"].values())
        gpu_blocks = counted.matched // chats.page_size + hits.get("gpu", 0)  # the engine's match, kvtier's up
        table.add(label, out["tok_s"], percentile(out["ttft"], 50), percentile(out["ttft"], 99), out["asked"],
                  computed, computed - chats.new_tokens(), gpu_blocks, hits.get("host", 0), hits.get("nvme", 0),
                  up / MiB, peak, differing)
        if out["series"]:
            for tier in ("host", "nvme"):
                table.series[f"{label}: {tier}"] = [(t, float(s.get(tier, 0))) for t, s in out["series"]]
        if step:
            step()

    def stock() -> tuple[dict[str, Any], dict[str, int], int, int]:
        return _serve(model, chats, cb_config(budget_blocks), timeout, None), {}, 0, 0

    def on_kvtier() -> tuple[dict[str, Any], dict[str, int], int, int]:
        staging = max(64 * MiB, 4 * block_bytes) if cuda else 4 * block_bytes
        host = max(2 * working * block_bytes, 256 * MiB) if cuda else 64 * MiB
        kcfg = Config(device=str(dev), pool_budget=budget + 2 * staging + 64 * MiB, pool_ready=0, host_size=host,
                      host_chunk=64 * MiB if cuda else 4 * MiB, nvme_size=256 * MiB,
                      page_size=None if cuda else 64 << 10)
        with TierManager(kcfg) as mgr, kvtier_engine(model, mgr, name="bench", capacity_bytes=budget,
                                                     staging_bytes=staging) as engine:
            def sample() -> dict[str, int]:
                return dict(engine.stats()["prefix_tiers"]["hit_blocks_by_tier"])
            out = _serve(model, chats, cb_config(None), timeout, sample)
            stats = engine.stats()
            # up into the spaces (staged hits, restores) and read straight into the engine's blocks (hits)
            up = sum(p["bytes"] for name, p in mgr.stats()["tiers"]["paths"].items()
                     if name.endswith("->gpu") or name.endswith("->read"))
            created = mgr.pool.peak_created * mgr.page_size
        hits = dict(stats["prefix_tiers"]["hit_blocks_by_tier"])
        engine_counts.update({k: stats.get(k, 0) for k in ("prefix_kept_blocks", "prefix_not_kept",
                                                           "prefix_hit_blocks", "prefix_found_below",
                                                           "prefix_short_of_room", "prefix_requeued",
                                                           "preempted_to_tiers", "restored", "soft_resets", "lost")})
        return out, hits, up, created

    engine_counts: dict[str, int] = {}
    for r in range(repeats):
        run_of = f" (run {r + 1})" if repeats > 1 else ""
        measure("engine as shipped" + run_of, stock)
        measure("engine on kvtier" + run_of, on_kvtier)
    if repeats > 1:
        for engine in ("engine as shipped", "engine on kvtier"):
            runs = [row[1:] for row in table.rows if row[0].startswith(engine + " (run")]
            table.add(f"{engine} (median of {repeats})",
                      *[statistics.median(col) if all(v is not None for v in col) else None for col in zip(*runs)])
    table.notes.append("the engine on kvtier: " + ", ".join(f"{k.replace('_', ' ')} {v}"
                                                           for k, v in engine_counts.items()))
    table.notes.append("same chats and KV budget for both (seeded lengths, Poisson starts, think-time gaps); TTFT "
                       "from a turn's arrival to its first token; prompt tokens = the tokens of every turn's prompt; "
                       "computed = prompt tokens the engine ran through the model (those not found on the GPU by its "
                       "own match or below by kvtier's, and preempted requests' recomputed contexts); recomputed = "
                       "those of them computed before (all but the system prompt once, the users' tokens and each "
                       "turn's last answer token); "
                       "hits in blocks (gpu: the engine's own match, and kvtier's pages met on the GPU); outputs "
                       "differing: from "
                       "the first run's; MiB up = every byte read up to the GPU (hits and preempted requests); peak "
                       "GPU = torch's allocator peak plus kvtier's created pages")
    if cuda:
        table.notes.append("decode steps as CUDA graphs, both engines" if graphs else
                           "decode steps without CUDA graphs (--no-cuda-graphs), both engines")
        table.notes.append("bf16 on a GPU rounds differently in batches of different make-up: runs that schedule "
                           "differently may part ways on near-tied tokens (the CPU tests compare exactly, in fp32)")
    else:
        table.notes.append("CPU backend: tiny model, not GPU figures")
    return table
