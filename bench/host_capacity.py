"""How many short sequences one host tier holds: slots of whole pages against slots split into pieces
(``[host] pieces``), the same ``host_size``, every sequence checked byte for byte when it comes back."""

from __future__ import annotations

from typing import Any

import torch

from kvtier import Config, TierManager
from kvtier.bench.common import Table
from kvtier.bench.vmm import LLAMA8B

MiB = 1 << 20


def _held(device: str, pieces: int, tokens: int, host_size: int, most: int) -> tuple[int, int, bool]:
    """Sequences of ``tokens`` offloaded one after another into a host tier of ``host_size`` (no tier below)
    until one stays on the GPU: (how many went down, host bytes they take, every one came back equal)."""
    shape = dict(LLAMA8B)
    per_seq = tokens * 2 * shape["num_layers"] * shape["num_kv_heads"] * shape["head_dim"] * 2
    config = Config(device=device, page_size=8 * MiB, pool_budget=4 * per_seq + 512 * MiB, host_size=host_size,
                    host_chunk=64 * MiB,
                    host_pieces=pieces, tiers=["host"], background_demotion=False, space_reserve_pages=0)
    with TierManager(config) as mgr:
        mgr.tiering.wait_ready()
        space = mgr.create_space("capacity", max_tokens=(most + 2) * max(tokens, 8192), **shape)
        probes: dict[int, torch.Tensor] = {}
        down = 0
        for i in range(most):
            blocks = torch.tensor(space.allocate(i, tokens), device=mgr.device)
            k = space.kv(space.num_layers - 1)[0]
            k[blocks] = torch.randn(k[blocks].shape, device=mgr.device, dtype=k.dtype)
            probes[i] = k[blocks].cpu()
            space.offload(i, tier="host").result()
            if space.residency(i)["gpu"]:
                space.free(i)
                del probes[i]
                break
            down += 1
        used = mgr.stats()["tiers"]["host"]["slots_used"] * mgr.stats()["tiers"]["host"]["slot_bytes"]
        equal = True
        for i, probe in probes.items():
            space.ensure_resident([i])
            blocks = torch.tensor(space.blocks(i), device=mgr.device)
            equal &= bool(torch.equal(space.kv(space.num_layers - 1)[0][blocks].cpu(), probe))
            space.free(i)
    return down, used, equal


def run(device: str = "auto", quick: bool = False) -> Table:
    tokens = 1024
    host_size = (512 if quick else 1024) * MiB
    per_seq = tokens * 2 * LLAMA8B["num_layers"] * LLAMA8B["num_kv_heads"] * LLAMA8B["head_dim"] * 2
    table = Table(f"Host capacity for {tokens}-token Llama-3-8B sequences ({per_seq // MiB} MiB of KV each), "
                  f"host_size {host_size // MiB} MiB",
                  ["pieces", "sequences held", "host MiB each", "x whole pages", "bytes equal", "target", "met"])
    whole: Any = None
    for pieces in (1, 2, 4, 8):
        held, used, equal = _held(device, pieces, tokens, host_size, most=4 * host_size // per_seq + 2)
        whole = whole or held
        ratio = held / whole if whole else 0.0
        target = ">= 4x" if pieces == 4 else ""
        table.add(pieces, held, used / max(held, 1) / MiB, ratio, equal, target, ratio >= 4 if target else None)
    table.notes.append("a page moves only its live blocks' bytes; with pieces it takes slots of a half, a quarter "
                       "... of a page to match (the default page is 8 MiB on CUDA: a 1024-token sequence of this "
                       "shape holds 2 MiB per region)")
    return table
