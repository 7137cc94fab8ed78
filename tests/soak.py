"""A seeded random walk over the public API, several threads at once, on tight tiers: what the soak tests run.

Each thread owns a few sequences in each of two spaces sharing one small pool, small host and NVMe tiers, and
walks: grow (allocate and write the new blocks), rewrite (``mark_written``), offload to a random tier, stage,
prefetch, read into buffers of its own, free. Every block's content is known (a row of a random bank chosen by
the write that made it); whatever the walk reads back -- through ``kv`` once resident, or from ``read``'s
buffers -- is compared with it. Calls the tiers refuse (no pages, no slots) are counted, never failures; any
other exception, a wrong byte or books that do not balance fails the run.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

import kvtier

BANK = 4096  # rows of random block contents
# what a sequence may do next, with weights: on the GPU it grows, is rewritten or goes down; below it comes back
UP = (["grow", "rewrite", "offload", "read", "free"], [4, 1, 6, 1, 1])
DOWN = (["offload", "stage", "prefetch", "read", "free"], [1, 1, 6, 2, 1])


@dataclass
class Counts:
    steps: int = 0
    refused: int = 0
    bytes_verified: int = 0
    mismatches: int = 0  # wrong bytes handed back: must stay 0
    lost: int = 0        # sequences reported lost (under injected faults) and freed
    caught: int = 0      # bad bytes the tiers' checksums caught (under injected faults)
    pages_down: int = 0
    pages_up: int = 0   # pages brought back (prefetch) or read from below: page round trips
    errors: list[str] = field(default_factory=list)

    def add(self, other: "Counts") -> None:
        for name in ("steps", "refused", "bytes_verified", "mismatches", "lost", "caught", "pages_down",
                     "pages_up"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.errors += other.errors


@dataclass
class Seq:
    space: Any
    name: str
    salts: list[int] = field(default_factory=list)  # per block: the write that made its content
    resident: bool = True  # writable and readable through kv(): never offloaded, or prefetched since


class Walker:
    def __init__(self, index: int, spaces: list[Any], bank: torch.Tensor, seed: int, max_blocks: int,
                 faulty: bool = False) -> None:
        self.faulty = faulty  # faults are injected below: TransferError is expected (and must never mean bad bytes)
        self.rng = random.Random(seed * 1000 + index)
        self.bank, self.max_blocks = bank, max_blocks
        self.counts = Counts()
        self.born = 0
        self.seqs = [Seq(s, f"t{index}-{s.name}-{i}") for s in spaces for i in range(2)]
        self.index = index
        self.salt = index << 40
        self.dst = {s.name: [tuple(torch.zeros_like(t) for t in s.kv(layer)) for layer in range(s.num_layers)]
                    for s in spaces}

    # --- content --------------------------------------------------------------------------------------------------
    def _rows(self, seq: Seq, blocks: range, layer: int, kv: int) -> torch.Tensor:
        idx = [(seq.salts[i] * 7919 + i * 104729 + layer * 31 + kv) % BANK for i in blocks]
        return self.bank[torch.tensor(idx, device=self.bank.device)]

    def _write(self, seq: Seq, blocks: range) -> None:
        self.salt += 1
        for i in blocks:
            seq.salts[i] = self.salt
        ids = torch.tensor(seq.space.blocks(seq.name)[blocks.start:blocks.stop], device=self.bank.device)
        for layer in range(seq.space.num_layers):
            for kv, tensor in enumerate(seq.space.kv(layer)):
                tensor[ids] = self._rows(seq, blocks, layer, kv).view(-1, *tensor.shape[1:])

    def _verify(self, seq: Seq, tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        blocks = range(len(seq.salts))
        ids = torch.tensor(seq.space.blocks(seq.name), device=self.bank.device)
        for layer in range(seq.space.num_layers):
            for kv in (0, 1):
                got = tensors[layer][kv][ids]
                if not torch.equal(got.reshape(len(blocks), -1), self._rows(seq, blocks, layer, kv)):
                    self.counts.mismatches += 1
                    self.counts.errors.append(f"{seq.name} layer {layer} kv {kv}: wrong bytes")
                self.counts.bytes_verified += got.numel() * got.element_size()

    # --- the walk ---------------------------------------------------------------------------------------------------
    def step(self) -> None:
        seq = self.rng.choice(self.seqs)
        space = seq.space
        op = self.rng.choices(*(UP if seq.resident else DOWN))[0]
        self.counts.steps += 1
        try:
            if op == "grow" and seq.resident:
                n = len(seq.salts)
                more = self.rng.randint(1, 64)
                if n + more > self.max_blocks:
                    return
                space.allocate(seq.name, (n + more) * space.block_size)
                seq.salts += [0] * more
                self._write(seq, range(n, n + more))
            elif op == "rewrite" and seq.resident and seq.salts:
                self._write(seq, range(len(seq.salts)))
                space.mark_written(seq.name, 0, len(seq.salts) * space.block_size)
            elif op == "offload" and seq.salts:
                seq.resident = False
                space.offload(seq.name, tier=self.rng.choice([None, "host", "nvme"])).result()
            elif op == "stage" and seq.salts and not seq.resident:
                space.stage([seq.name]).result()
            elif op == "prefetch" and seq.salts:
                space.ensure_resident([seq.name])
                seq.resident = True
                self._verify(seq, [space.kv(layer) for layer in range(space.num_layers)])
            elif op == "read" and seq.salts:
                dst = self.dst[space.name]
                handle = space.read(seq.name, dst)
                handle.wait()
                handle.result()
                if dst[0][0].is_cuda:
                    torch.cuda.current_stream(dst[0][0].device).synchronize()
                self._verify(seq, dst)
            elif op == "free" and seq.salts:
                self._forget(seq)
        except (kvtier.OutOfPagesError, kvtier.TierFullError):
            self.counts.refused += 1
        except kvtier.TransferError as failure:
            if not self.faulty:
                raise
            # an injected fault: a failed write left the pages where they were; what was lost is freed, never read
            mine = {s.name: s for s in self.seqs}
            for name in failure.lost:
                if name in mine:
                    self._forget(mine[name])
                    self.counts.lost += 1

    def _forget(self, seq: Seq) -> None:
        """Free ``seq`` (lost, or done with) and start a new one in its place."""
        seq.space.free(seq.name)
        self.born += 1
        seq.name, seq.salts, seq.resident = f"{seq.name.rsplit('#', 1)[0]}#{self.born}", [], True

    def run(self, steps: int) -> None:
        try:
            for _ in range(steps):
                self.step()
        except BaseException as exc:  # noqa: BLE001 - reported by the runner
            self.counts.errors.append(f"thread {self.index}: {type(exc).__name__}: {exc}")


def soak(make: Any, shape: dict, page: int, policy: str, background: bool, threads: int, steps: int, seed: int = 0,
         **config: Any) -> Counts:
    """Run ``threads`` walkers of ``steps`` steps each on a manager made by ``make(**options)``; return the counts
    (its books are checked at the end)."""
    mgr = make(pages=64, policy=policy, background_demotion=background, gpu_low_watermark=0.2,
               gpu_high_watermark=0.4, host_size=96 * page, nvme_size=320 * page, **config)
    spaces = [mgr.create_space(name, max_tokens=(threads * 2 * 96 + 64) * shape["block_size"], priority=p, **shape)
              for name, p in (("a", 0), ("b", 1))]
    block_elems = shape["block_size"] * shape["num_kv_heads"] * shape["head_dim"]
    gen = torch.Generator().manual_seed(seed)
    bank = torch.randn(BANK, block_elems, generator=gen).to(shape["dtype"]).to(mgr.device)
    walkers = [Walker(k, spaces, bank, seed, max_blocks=96, faulty=config.get("files") is not None)
               for k in range(threads)]
    workers = [threading.Thread(target=w.run, args=(steps,)) for w in walkers]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=600)
    counts = Counts()
    for w in walkers:
        counts.add(w.counts)
    if any(t.is_alive() for t in workers):
        counts.errors.append("a walker did not finish: a hang")
        return counts
    mgr.drain()
    mgr.check()
    stats = mgr.stats()["tiers"]
    mgr.close()
    paths = stats["paths"]
    counts.pages_down = sum(v["stripes"] for k, v in paths.items() if k.startswith("gpu->"))
    counts.pages_up = sum(v["stripes"] for k, v in paths.items() if k.endswith("->gpu") or k.endswith("->read"))
    counts.caught = sum(stats[t]["checksums"]["mismatches"] for t in ("host", "nvme")
                        if isinstance(stats[t]["checksums"], dict))
    return counts
