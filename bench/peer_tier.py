"""``kvtier bench tiers``' peer rows: a whole sequence to another GPU's memory and back through the peer tier,
against a peer copy of the same bytes in the same run (``torch`` copying between the two devices), and a
sequence's fault-back from the peer against the same from host memory, at 4k and 32k tokens.

On the CPU backend the peer is the stand-in ``cpu:1`` (a second mapping of host memory): the rows then exercise
the path and check the bytes, and their figures are a memcpy's, not a GPU's. Where there is no peer (one GPU,
no peer access) the table says why and has no rows.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from kvtier.bench.common import Table
from kvtier.bench.vmm import LLAMA8B
from kvtier.config import Config, MiB
from kvtier.manager import TierManager
from kvtier.tiering.tiers.peer import PeerSettings, find_peer
from kvtier.vmm import resolve_device

PER_TOKEN = 2 * LLAMA8B["num_layers"] * LLAMA8B["num_kv_heads"] * LLAMA8B["head_dim"] * 2


def _timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def peer_ceilings(device: torch.device, peer: torch.device, nbytes: int, rounds: int = 3) -> dict[str, float]:
    """Seconds for one copy of ``nbytes`` from ``device`` to ``peer`` and back (torch's peer copy; on CPU a
    memcpy): the median of ``rounds`` after a warm-up."""
    here = torch.empty(nbytes, dtype=torch.uint8, device=device)
    there = torch.empty(nbytes, dtype=torch.uint8, device=peer)
    here.fill_(1)
    sync = (lambda: (torch.cuda.synchronize(device), torch.cuda.synchronize(peer))) if device.type == "cuda" \
        else (lambda: None)
    out: dict[str, list[float]] = {"down": [], "up": []}
    for _ in range(1 + rounds):
        out["down"].append(_timed(lambda: there.copy_(here, non_blocking=True), sync))
        out["up"].append(_timed(lambda: here.copy_(there, non_blocking=True), sync))
    return {k: statistics.median(v[1:]) for k, v in out.items()}


def run(device: str = "auto", quick: bool = False) -> Table:
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    settings = PeerSettings(device="auto" if cuda else "cpu:1")
    peer, why = find_peer(settings, dev)
    title = "Peer tier: another GPU's memory, against a peer copy of the same bytes"
    table = Table(title, ["path", "tokens", "kvtier GB/s", "ceiling GB/s", "ratio", "ceiling", "target", "met"])
    if peer is None:
        table.notes.append(f"not measured: {why}")
        return table
    # at least a page's worth of tokens (4096 here), so the sequence owns its pages and moves whole
    sizes = [4096] if quick or not cuda else [4096, 32768]
    largest = max(sizes) * PER_TOKEN
    config = Config(device=device, pool_budget=2 * largest + 512 * MiB, pool_ready=largest + 256 * MiB,
                    host_size=largest + 256 * MiB, host_chunk=256 * MiB, nvme_size=64 * MiB,
                    background_demotion=False, space_reserve_pages=0, tiers=["peer", "host", "nvme"],
                    tier_settings={"peer": {"device": str(peer), "size": largest + 256 * MiB}})
    with TierManager(config) as mgr:
        mgr.tiering.wait_ready()
        sync = mgr.backend.synchronize
        space = mgr.create_space("bench", max_tokens=max(sizes) + 8192, **LLAMA8B)
        for tokens in sizes:
            nbytes, gb = tokens * PER_TOKEN, tokens * PER_TOKEN / 1e9
            ids = torch.tensor(space.allocate("a", tokens), device=mgr.device)
            for layer in range(space.num_layers):
                for t in space.kv(layer):
                    t[ids] = torch.randn(t[ids].shape, device=mgr.device, dtype=t.dtype)
            probe = space.kv(space.num_layers - 1)[1][ids].clone()
            space.offload("a", tier="peer").result()  # a round trip first: views made, slots touched
            space.ensure_resident(["a"])
            ceiling = peer_ceilings(mgr.device, peer, nbytes)
            times: dict[str, list[float]] = {"down": [], "up": [], "host up": []}
            for _ in range(1 if quick else 3):
                space.mark_written("a", 0, tokens)  # as if rewritten: no kept copy, every byte goes down
                times["down"].append(_timed(lambda: space.offload("a", tier="peer").result(), sync))
                _where(space, "a", "peer", nbytes)
                times["up"].append(_timed(lambda: space.ensure_resident(["a"]), sync))
                space.mark_written("a", 0, tokens)
                space.offload("a", tier="host").result()
                _where(space, "a", "host", nbytes)
                times["host up"].append(_timed(lambda: space.ensure_resident(["a"]), sync))
            if not torch.equal(space.kv(space.num_layers - 1)[1][ids], probe):
                raise AssertionError("peer tier: data changed on its way through the peer")
            down, up, host_up = (statistics.median(times[k]) for k in ("down", "up", "host up"))
            table.add("gpu -> peer", tokens, gb / down, gb / ceiling["down"], ceiling["down"] / down, "peer copy",
                      ">= 0.85", ceiling["down"] / down >= 0.85)
            table.add("peer -> gpu (fault-back)", tokens, gb / up, gb / ceiling["up"], ceiling["up"] / up,
                      "peer copy", ">= 0.85", ceiling["up"] / up >= 0.85)
            table.add("host -> gpu (fault-back)", tokens, gb / host_up, gb / up, up / host_up, "peer fault-back",
                      "(comparison)", None)
            space.free("a")
        mgr.check()
    table.notes.append(f"peer: {peer}; a whole sequence of the Llama-3-8B shape; medians of "
                       f"{1 if quick else 3} rounds; the host row's ratio is the peer fault-back's time over the "
                       "host's (below 1: the peer is faster)")
    if not cuda:
        table.notes.append("CPU backend: cpu:1 stands in for a second GPU (a memcpy between two mappings)")
    return table


def _where(space: Any, seq: str, tier: str, nbytes: int) -> None:
    if space.residency(seq).get(tier, 0) != nbytes:  # a benchmark that moved nothing must fail
        raise AssertionError(f"{seq} is not wholly in {tier}: {space.residency(seq)}")
