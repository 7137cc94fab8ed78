"""A tier in one file: a second host-memory tier, "spare", written the way docs/architecture.md ("Adding a tier")
says -- a settings model, ``open``, slot books, its routes -- registered, configured in its own TOML section, and
used by every path: explicit offload, the demoter's watermarks (into it and out of it, to NVMe), prefetch, stage.
Nothing outside this file names it."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from pydantic import BaseModel, ConfigDict, Field

import kvtier
from kvtier.cli import main
from kvtier.tiering import IO_ALIGN, PairsFailed, Tier, TierContext, TierStack, Work, register_tier
from kvtier.tiering.state.slots import SlotBooks
from tests.conftest import PAGE, assert_seq, write_seq

BPP = 16  # blocks per page in the suite's shapes


class SpareSettings(BaseModel):
    """``[tiers.spare]``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    size: int = Field(64 << 20, ge=0)
    low_watermark: float = Field(0.5, ge=0, le=1)
    high_watermark: float = Field(0.75, ge=0, le=1)


@register_tier
class SpareTier:
    """Slots in one block of host memory (pinned where there is a GPU). Being host memory (``HostSlots``), the
    NVMe tier reads and writes its slots, and the host tier copies into it: it only serves the GPU itself."""

    name = "spare"
    Settings = SpareSettings
    failed_read_loses = False
    digests = None

    @classmethod
    def open(cls, settings: SpareSettings, context: TierContext) -> "SpareTier":
        return cls(context, settings)

    def __init__(self, context: TierContext, settings: SpareSettings) -> None:
        self.id, self.slot_size, self.backend = 0, context.slot_size, context.backend
        self.watermarks = (settings.low_watermark, settings.high_watermark)
        total = settings.size // self.slot_size
        raw = torch.zeros(total * self.slot_size + IO_ALIGN, dtype=torch.uint8,
                          pin_memory=context.device.type == "cuda")
        skip = -raw.data_ptr() % IO_ALIGN  # slots start on I/O blocks: the disk tier reads and writes them directly
        self.memory = raw[skip:skip + total * self.slot_size]
        self.books = SlotBooks(self.name, total)
        self.books.grow(0, total)
        self._held = [self.slot_size] * total

    # --- slots (HostSlots) ------------------------------------------------------------------------------------------
    def view(self, slot: int) -> torch.Tensor:
        return self.memory[slot * self.slot_size:(slot + 1) * self.slot_size]

    def data(self, slot: int) -> torch.Tensor:
        return self.view(slot)[:self._held[slot]]

    def address(self, slot: int) -> int:
        return self.memory.data_ptr() + slot * self.slot_size

    def held(self, slot: int) -> int:
        return self._held[slot]

    def hold(self, slot: int, nbytes: int) -> None:
        self._held[slot] = nbytes

    # --- routes: GPU <-> its slots, copied by the transfer worker -------------------------------------------------
    def register_routes(self, mover: Any, stack: TierStack) -> None:
        mover.register(Tier.GPU, self.id, self._from_gpu)
        mover.register(self.id, Tier.GPU, self._to_gpu)

    def _from_gpu(self, pairs: list[tuple[Any, Any]], after: Any, tags: Any, *_: Any) -> Work:
        def run() -> None:
            if after is not None:
                after.synchronize()  # the kernels that wrote the pages are done
            for view, slot in pairs:
                self.hold(slot, view.numel())
                self.view(slot)[:view.numel()].copy_(view)
        return Work(io=[run])

    def _to_gpu(self, pairs: list[tuple[Any, Any]], after: Any, tags: Any, *_: Any) -> Work:
        def run() -> None:
            if after is not None:
                after.synchronize()
            failed: dict[Any, BaseException] = {}
            for i, (slot, view) in enumerate(pairs):
                n = min(view.numel(), self.held(slot))
                view[:n].copy_(self.data(slot)[:n])
            if failed:
                raise PairsFailed(failed)
        return Work(io=[run])

    def describe(self) -> dict[str, Any]:
        return {"slots": self.books.total, "slot_bytes": self.slot_size}

    def wait_ready(self, timeout: float | None = None) -> bool:
        return True

    def close(self) -> None:
        self.memory = torch.zeros(0, dtype=torch.uint8)


CONFIG = """
[tiers]
order = ["host", "spare", "nvme"]

[tiers.spare]
size = {size}
low_watermark = 0.5
high_watermark = 0.75
"""


def _stripes(space: kvtier.KVSpace, seq: str, tier: str) -> int:
    return space.stripe_residency(seq)[tier]


def _wait(what: str, ready: Any) -> None:
    deadline = time.monotonic() + 30
    while not ready():
        assert time.monotonic() < deadline, f"the background demoter did not {what}"
        time.sleep(0.01)


def test_a_tier_in_one_file_is_configured_checked_and_used_by_every_path(make_manager, tmp_path):
    page = PAGE[make_manager.name]
    # its TOML section: `config check` validates it with the tier's own settings model
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text(CONFIG.format(size=16 * page))
    bad.write_text(CONFIG.format(size=16 * page) + "sise = 1\n")
    runner = CliRunner()
    result = runner.invoke(main, ["config", "check", "--schema-only", str(good), str(bad)])
    assert result.exit_code == 1
    assert f"ok  {good}" in result.output and "[tiers.spare] sise: unknown key" in result.output
    config = kvtier.Config.from_file(str(good))
    assert config.tiers == ["host", "spare", "nvme"] and config.tier_settings["spare"]["size"] == 16 * page
    # a manager with 4 stripes of host memory (a stripe: 4 regions, 4 slots), 4 of spare, NVMe below
    mgr = make_manager(tiers=config.tiers, tier_settings=config.tier_settings, host_size=16 * page,
                       host_high_watermark=0.9, host_low_watermark=0.8, background_demotion=True)
    assert mgr.stats()["tiers"]["order"] == ["host", "spare", "nvme"]
    space = mgr.create_space("m", max_tokens=256 * make_manager.shape["block_size"], **make_manager.shape)
    for seq, salt in (("a", 1), ("b", 2), ("c", 3)):
        space.allocate(seq, 2 * BPP * space.block_size if seq == "a" else 4 * BPP * space.block_size)
        write_seq(space, seq, salt)

    # explicit: "a" goes to the spare tier, and comes back byte for byte
    space.offload("a", tier="spare").result()
    assert _stripes(space, "a", "spare") == 2 and space.stats()["stripes_spare"] == 2
    assert mgr.stats()["tiers"]["paths"]["gpu->spare"]["stripes"] == 2
    space.prefetch(["a"]).result()
    assert_seq(space, "a", 1)
    mgr.check()

    # watermarks, into it: "b" fills the host tier (4 of 4 stripes, above 0.9); the demoter moves the coldest host
    # stripes on down -- where the policy places them: the nearest tier with room, spare -- until the host is at
    # its low mark (0.8: one stripe goes). Spare is then at 0.75 (that stripe and the copy "a" kept): no further.
    space.offload("b", tier="host").result()
    _wait("cascade from host to spare", lambda: _stripes(space, "b", "spare") >= 1)
    mgr.drain()
    assert _stripes(space, "b", "host") == 3 and _stripes(space, "b", "nvme") == 0

    # and out of it: "c" (4 stripes) sent to spare explicitly -- 3 fit (the copy of "a" is dropped for room), the
    # last spills to NVMe; spare is then full, above 0.75, and cascades to NVMe down to 0.5
    space.offload("c", tier="spare").result()
    assert _stripes(space, "c", "nvme") >= 1
    _wait("cascade from spare to NVMe", lambda: mgr.stats()["tiers"]["paths"].get("spare->nvme", {}).get("stripes"))
    _wait("bring spare down to its low mark", lambda: mgr.stats()["tiers"]["spare"]["slots_used"] <= 0.5 * 16)
    mgr.tiering.demoter.stop()  # what follows is explicit
    mgr.drain()
    mgr.check()

    # stage reads NVMe stripes into the host tier (the nearest host-memory tier above them), then everything
    # comes back up and holds its bytes
    space.offload("a", tier="nvme").result()
    space.stage(["a"]).result()
    assert _stripes(space, "a", "host") + _stripes(space, "a", "nvme") == 2
    for seq, salt in (("a", 1), ("b", 2), ("c", 3)):
        space.prefetch([seq]).result()
        assert_seq(space, seq, salt)
    # freed, every slot of every tier comes back
    for seq in ("a", "b", "c"):
        space.free(seq)
    assert all(mgr.stats()["tiers"][t]["slots_used"] == 0 for t in ("host", "spare", "nvme"))
    mgr.check()


def test_a_tier_that_is_not_configured_is_refused_by_name(make_manager):
    mgr = make_manager()
    space = mgr.create_space("m", max_tokens=64 * make_manager.shape["block_size"], **make_manager.shape)
    space.allocate("a", BPP * space.block_size)
    with pytest.raises(kvtier.InvalidArgumentError, match="'spare' is not a tier to offload to"):
        space.offload("a", tier="spare")
    mgr.check()
