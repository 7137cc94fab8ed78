"""Model-based test of shared blocks: random allocate / write (copy on write first) / fork / publish / share a
prefix / offload / prefetch / read_blocks / free over one space with a tiny pool and tiny tiers. The model knows
what every block of every sequence holds; after every step every resident sequence reads exactly that, a prefix
found by its keys holds exactly the content the keys name, and the books balance."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

import kvtier
from tests.conftest import PAGE, SHAPE, pattern

SEQS = st.sampled_from(["s0", "s1", "s2", "s3", "s4"])
Content = tuple[str, int, int]  # (writer, salt, block index): what pattern() wrote into a block


def _machine(backend: str, wide: float = 0) -> type[RuleBasedStateMachine]:
    """``wide``: blocks of that many pages each (an engine block of a large model as one token): 2.5, so that a
    block's middle page is its alone and pages are shared by neighbouring blocks at both ends; 2, so that every
    page is one block's (what ``read_blocks`` takes)."""
    class SharingMachine(RuleBasedStateMachine):
        @initialize()
        def setup(self) -> None:
            page = PAGE[backend]
            shape = dict(SHAPE[backend], num_layers=1)
            if wide:
                shape["head_dim"] *= int(16 * wide)  # 16: one page a block
            pages = 60 if wide else 12
            self.mgr = kvtier.TierManager(kvtier.Config(device=backend, page_size=page, pool_budget=pages * page,
                                                        pool_ready=4 * page, debug_checks=True,
                                                        host_size=pages // 3 * page, host_chunk=2 * page,
                                                        nvme_size=2 * pages // 3 * page, background_demotion=False))
            self.mgr.tiering.wait_ready()
            # 80 blocks (5 pages; wide: 16 blocks, 40 pages): full soon, so cached blocks give way to live ones
            self.space = self.mgr.create_space("m", max_tokens=(16 if wide else 80) * shape["block_size"], **shape)
            self.model: dict[str, list[Content | None]] = {}  # per sequence, what each of its blocks holds
            self.offloaded: set[str] = set()
            self.published: list[list[Content]] = []  # every chain published: its blocks may stay cached
            self.salt = 0

        def teardown(self) -> None:
            if hasattr(self, "mgr"):
                self.mgr.close()

        def _keys(self, contents: list[Content | None]) -> list[bytes]:
            """Keys naming the contents (a block's tokens stand for what was written into it)."""
            known = []
            for c in contents:
                if c is None:
                    break
                known.append(c)
            tokens = [hash(c) & 0xFFFFFF for c in known for _ in range(self.space.block_size)]
            return self.space.block_keys(tokens)

        @rule(seq=SEQS, blocks=st.integers(1, 40))
        def allocate(self, seq: str, blocks: int) -> None:
            if seq in self.offloaded:
                return
            blocks = 1 + blocks % 6 if wide else blocks
            try:
                got = self.space.allocate(seq, blocks * self.space.block_size)
            except kvtier.OutOfPagesError:
                return
            have = self.model.setdefault(seq, [])
            have += [None] * (len(got) - len(have))

        @rule(seq=SEQS)
        def write(self, seq: str) -> None:
            if seq not in self.model or seq in self.offloaded:
                return
            sp = self.space
            tokens = sp.num_tokens(seq)
            try:
                blocks = sp.own(seq, 0, tokens)  # copies of the blocks it shares first: the others keep theirs
            except kvtier.OutOfPagesError:
                return
            self.salt += 1
            k, v = sp.kv(0)
            for i, b in enumerate(blocks):
                k[b] = pattern(sp, seq, self.salt, i, 0, 0).to(k.device)
                v[b] = pattern(sp, seq, self.salt, i, 0, 1).to(v.device)
            sp.mark_written(seq, 0, tokens)
            self.model[seq] = [(seq, self.salt, i) for i in range(len(blocks))]
            sp.publish(seq, self._keys(self.model[seq]))  # as an engine does after a prefill
            self.published.append(list(self.model[seq]))

        @rule(parent=SEQS, child=SEQS)
        def fork(self, parent: str, child: str) -> None:
            if parent not in self.model or child in self.model:
                return
            try:
                self.space.fork(parent, child)
            except (kvtier.OutOfPagesError, kvtier.NotResidentError):
                assert child not in self.space.sequences()
                return
            self.model[child] = list(self.model[parent])
            if parent in self.offloaded:
                self.offloaded.add(child)  # its blocks rest where the parent's do: read back after a prefetch

        @rule(seq=SEQS)
        def publish(self, seq: str) -> None:
            if seq not in self.model:
                return
            self.space.publish(seq, self._keys(self.model[seq]))

        @rule(source=SEQS, seq=SEQS)
        def share_prefix(self, source: str, seq: str) -> None:
            if source not in self.model or seq in self.model:
                return
            want = self._keys(self.model[source])
            tokens = self.space.share_prefix(seq, want)
            if tokens:
                n = tokens // self.space.block_size
                self.model[seq] = list(self.model[source][:n])  # the content its keys name
                self.offloaded.add(seq)  # may rest below: read back after its prefetch

        @rule(pick=st.integers(0, 1000), seq=SEQS)
        def share_published(self, pick: int, seq: str) -> None:
            """A prefix published earlier, its holders maybe gone: found in the cache (or dropped, then shorter)."""
            if not self.published or seq in self.model:
                return
            chain = self.published[pick % len(self.published)]
            tokens = self.space.share_prefix(seq, self._keys(chain))
            if tokens:
                self.model[seq] = list(chain[:tokens // self.space.block_size])
                self.offloaded.add(seq)

        @rule(seq=SEQS, retain=st.sampled_from([True, True, True, False]))
        def free(self, seq: str, retain: bool) -> None:
            if seq in self.model:
                self.space.free(seq, retain=retain)
                del self.model[seq]
                self.offloaded.discard(seq)

        @rule(seq=SEQS, tier=st.sampled_from([None, "host", "nvme"]))
        def offload(self, seq: str, tier: str | None) -> None:
            if seq in self.model:
                self.space.offload(seq, tier=tier).result()
                self.offloaded.add(seq)

        @rule(seq=SEQS)
        def prefetch(self, seq: str) -> None:
            if seq not in self.model:
                return
            try:
                self.space.ensure_resident([seq])
            except kvtier.OutOfPagesError:
                return
            self.offloaded.discard(seq)

        @rule(seq=SEQS)
        def read_blocks(self, seq: str) -> None:
            # every block read from wherever it rests into rows of an engine's own, reversed: what the model says
            if seq not in self.model:
                return
            sp = self.space
            if sp.block_bytes % sp.page_size:
                with pytest.raises(kvtier.InvalidArgumentError):
                    sp.read_blocks(seq, lambda region, i: torch.empty(0))
                return
            contents = self.model[seq]
            rows = torch.zeros(len(contents), 2, sp.block_bytes, dtype=torch.uint8, device=sp.kv(0)[0].device)
            last = len(contents) - 1
            sp.read_blocks(seq, lambda region, i: rows[last - i, region]).result()
            if rows.is_cuda:
                torch.cuda.synchronize()
            for i, content in enumerate(contents):
                if content is not None:
                    writer, salt, block = content
                    for kv in (0, 1):
                        want = pattern(sp, writer, salt, block, 0, kv).view(torch.uint8).view(-1)
                        assert torch.equal(rows[last - i, kv].cpu(), want), (seq, i, content)

        @invariant()
        def every_resident_byte_is_the_models(self) -> None:
            if not hasattr(self, "mgr"):
                return
            self.mgr.check()
            sp = self.space
            k, v = sp.kv(0)
            for seq, contents in self.model.items():
                if seq in self.offloaded:
                    continue
                blocks = sp.blocks(seq)
                for b, content in zip(blocks, contents):
                    if content is not None:
                        writer, salt, i = content
                        assert torch.equal(k[b].cpu(), pattern(sp, writer, salt, i, 0, 0)), (seq, content)
                        assert torch.equal(v[b].cpu(), pattern(sp, writer, salt, i, 0, 1)), (seq, content)

    return SharingMachine


@pytest.mark.parametrize("wide", [0, 2.5, 2], ids=["blocks within pages", "blocks of 2.5 pages", "blocks of 2 pages"])
def test_random_sharing_keeps_every_byte(backend_name: str, wide: float) -> None:
    run_state_machine_as_test(_machine(backend_name, wide), settings=settings(
        max_examples=60 if wide else 200, stateful_step_count=60, deadline=None,
        suppress_health_check=list(HealthCheck)))
