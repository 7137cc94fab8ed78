"""An example engine loop in the shape vLLM- and SGLang-style engines have, over one kvtier space.

A toy decoder (random weights; attention layers only) keeps each sequence's KV in the space's paged tensors and
decodes with paged attention in torch: gather the sequence's blocks through its block table, attend. Sequences
go idle (``offload``) and come back; before each step the engine prefetches the sequences it will run and makes
the step's stream wait on the handle -- no host synchronisation on the decode path.

Run it: ``python -m kvtier.integrations.paged_loop`` (CPU) -- or read ``run()`` as the integration recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from kvtier.config import Config
from kvtier.errors import TransferError
from kvtier.manager import TierManager


@dataclass
class ToyModel:
    """L attention layers of width ``heads * dim`` with GQA, a token embedding and an output head."""

    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    dim: int = 32
    vocab: int = 256
    seed: int = 0
    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        width = self.heads * self.dim

        def w(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen) / math.sqrt(shape[0])

        self.weights = {"embed": w(self.vocab, width), "head": w(width, self.vocab)}
        for layer in range(self.layers):
            self.weights.update({f"q{layer}": w(width, width), f"k{layer}": w(width, self.kv_heads * self.dim),
                                 f"v{layer}": w(width, self.kv_heads * self.dim), f"o{layer}": w(width, width)})

    def to(self, device: torch.device) -> "ToyModel":
        self.weights = {k: v.to(device) for k, v in self.weights.items()}
        return self


def decode_step(model: ToyModel, space: Any, tokens: torch.Tensor, positions: list[int],
                tables: list[list[int]]) -> torch.Tensor:
    """One step for a batch: write each sequence's new K/V at ``positions`` through its block table, attend over
    its blocks (paged attention: gather + SDPA), return the next token of each. Sequences of any length."""
    w, bs = model.weights, space.block_size
    x = w["embed"][tokens]                                             # [B, width]
    for layer in range(model.layers):
        k_cache, v_cache = space.kv(layer)                             # [blocks, block_size, kv_heads, dim]
        q = (x @ w[f"q{layer}"]).view(-1, model.heads, model.dim)
        k = (x @ w[f"k{layer}"]).view(-1, model.kv_heads, model.dim)
        v = (x @ w[f"v{layer}"]).view(-1, model.kv_heads, model.dim)
        out = torch.empty_like(q)
        for b, (pos, table) in enumerate(zip(positions, tables)):
            block, slot = table[pos // bs], pos % bs
            k_cache[block, slot], v_cache[block, slot] = k[b], v[b]
            ids = torch.tensor(table[: pos // bs + 1], device=x.device)
            keys = k_cache[ids].reshape(-1, model.kv_heads, model.dim)[: pos + 1].transpose(0, 1)
            vals = v_cache[ids].reshape(-1, model.kv_heads, model.dim)[: pos + 1].transpose(0, 1)
            out[b] = F.scaled_dot_product_attention(q[b].unsqueeze(1), keys, vals, enable_gqa=True).squeeze(1)
        x = x + out.reshape(x.shape[0], -1) @ w[f"o{layer}"]
    return (x @ w["head"]).argmax(-1)


def run(config: Config, prompts: dict[str, list[int]], steps: int, idle_every: int = 3,
        files: Any = None) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """Serve ``prompts`` for ``steps`` decode steps. Every ``idle_every`` steps half of the sequences go idle
    (``offload``) and the other half come back (``prefetch`` before the step, ``wait`` on the step's stream).
    A sequence whose pages were lost below (a failed read, bytes that failed their checksum) is freed and
    recomputed from its tokens, as an engine recomputes a preempted request. Returns every sequence's generated
    tokens, and the manager's stats at the end (``recomputed``: how many sequences were). ``files``: the NVMe
    tier's file layer (tests)."""
    with TierManager(config, files=files) as mgr:
        model = ToyModel().to(mgr.device)
        space = mgr.create_space("toy", num_layers=model.layers, num_kv_heads=model.kv_heads, head_dim=model.dim,
                                 dtype=torch.float32, block_size=16, max_tokens=8192)
        stream = torch.cuda.current_stream(mgr.device) if mgr.device.type == "cuda" else None
        names = list(prompts)
        history = {s: list(p) for s, p in prompts.items()}
        generated: dict[str, list[int]] = {s: [] for s in names}
        active, idle = set(names), set()  # type: tuple[set[str], set[str]]
        recomputed = 0

        def prefill(s: str) -> None:  # one token at a time (a real engine batches this)
            space.allocate(s, len(history[s]))
            for pos in range(len(history[s]) - 1):
                decode_step(model, space, torch.tensor([history[s][pos]], device=mgr.device), [pos],
                            [space.blocks(s)])

        for s in names:
            prefill(s)
        for step in range(steps):
            if step and step % idle_every == 0:  # turn-taking: half go idle, the idle ones come back
                leaving = sorted(active)[: len(active) // 2]
                for s in leaving:
                    space.offload(s, stream=stream)     # the policy moves it down when memory is short
                returning = sorted(idle)
                pending = returning
                while pending:
                    try:
                        space.prefetch(pending).wait(stream)  # before the step; the stream waits, not the host
                        break
                    except TransferError as failure:  # lost below: recompute those, bring up the rest
                        if not failure.lost:
                            raise  # nothing lost, nothing to recompute: not a failure this loop knows
                        for s in failure.lost:
                            space.free(s)
                            prefill(s)
                            recomputed += 1
                        pending = [s for s in pending if s not in failure.lost]
                active, idle = (active - set(leaving)) | set(returning), (idle - set(returning)) | set(leaving)
            batch = sorted(active)
            positions = [len(history[s]) - 1 for s in batch]
            tables = [space.allocate(s, len(history[s]) + 1) for s in batch]  # room for the next token too
            if config.debug_checks:
                space.check_resident([b for t in tables for b in t])
            tokens = torch.tensor([history[s][-1] for s in batch], device=mgr.device)
            for s, token in zip(batch, decode_step(model, space, tokens, positions, tables).tolist()):
                history[s].append(token)
                generated[s].append(token)
        return generated, dict(mgr.stats(), recomputed=recomputed)


if __name__ == "__main__":  # pragma: no cover
    page = 64 << 10
    tight = Config(device="cpu", page_size=page, pool_budget=48 * page, host_size=64 * page, nvme_size=256 * page)
    out, _ = run(tight, {f"s{i}": [i + 1, i + 2, i + 3] * 40 for i in range(6)}, steps=24)
    for seq, toks in out.items():
        print(seq, toks)
