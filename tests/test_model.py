"""Model-based test: random allocate / write / offload / prefetch / free over two spaces sharing a tiny pool and
tiny host and NVMe tiers, so every path is forced. After every step, every byte written must read back from
every resident sequence, failed calls must change nothing, and the books must balance."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

import kvtier
from tests.conftest import PAGE, SHAPE, pattern

SEQS = st.sampled_from(["s0", "s1", "s2", "s3"])


def _machine(backend: str) -> type[RuleBasedStateMachine]:
    class SpaceMachine(RuleBasedStateMachine):
        @initialize(reserve=st.integers(0, 2))
        def setup(self, reserve: int) -> None:
            page = PAGE[backend]
            shape = dict(SHAPE[backend], num_layers=1)
            # 6 pages of a one-layer space (2 handles each): small enough that every limit is hit
            self.mgr = kvtier.TierManager(kvtier.Config(device=backend, page_size=page, pool_budget=12 * page,
                                                        pool_ready=4 * page, space_reserve_pages=reserve,
                                                        debug_checks=True, host_size=6 * page,
                                                        host_chunk=2 * page, nvme_size=40 * page,
                                                        background_demotion=False))
            self.mgr.tiering.wait_ready()
            self.offloaded: set[tuple[str, str]] = set()
            self.spaces = {
                "a": self.mgr.create_space("a", max_tokens=160 * shape["block_size"], **shape),
                "b": self.mgr.create_space("b", max_tokens=96 * shape["block_size"],
                                           quota_bytes=4 * 2 * page, **shape),
            }
            self.model: dict[tuple[str, str], tuple[int, int]] = {}  # -> (salt, blocks written)
            self.salt = 0

        def teardown(self) -> None:
            if hasattr(self, "mgr"):
                self.mgr.close()

        def _books(self):
            """What the engine sees: each sequence's blocks, and where the active ones live."""
            return {name: {q: (s.blocks(q), None if (name, q) in self.offloaded else s.residency(q))
                           for q in s.sequences()} for name, s in self.spaces.items()}

        @rule(space=st.sampled_from(["a", "b"]), seq=SEQS, blocks=st.integers(0, 70))
        def allocate(self, space: str, seq: str, blocks: int) -> None:
            sp = self.spaces[space]
            if (space, seq) in self.offloaded:
                with pytest.raises(kvtier.InvalidArgumentError):
                    sp.allocate(seq, blocks * sp.block_size)
                return
            before = self._books()
            try:
                got = sp.allocate(seq, blocks * sp.block_size)
            except kvtier.OutOfPagesError:
                assert self._books() == before  # a failed call changes nothing
                return
            assert len(got) >= blocks
            self.model.setdefault((space, seq), (-1, 0))

        @rule(space=st.sampled_from(["a", "b"]), seq=SEQS, tier=st.sampled_from([None, "host", "nvme"]))
        def offload(self, space: str, seq: str, tier: str | None) -> None:
            if (space, seq) not in self.model:
                return
            self.spaces[space].offload(seq, tier=tier).result()
            self.offloaded.add((space, seq))

        @rule(space=st.sampled_from(["a", "b"]), seq=SEQS)
        def prefetch(self, space: str, seq: str) -> None:
            if (space, seq) not in self.model:
                return
            try:
                self.spaces[space].ensure_resident([seq])
            except kvtier.OutOfPagesError:
                return  # the active sequences hold every page: it stays where it is
            self.offloaded.discard((space, seq))

        @rule(space=st.sampled_from(["a", "b"]), seq=SEQS)
        def write(self, space: str, seq: str) -> None:
            sp = self.spaces[space]
            if (space, seq) not in self.model or (space, seq) in self.offloaded:
                return
            self.salt += 1
            k, v = sp.kv(0)
            blocks = sp.blocks(seq)
            for i, b in enumerate(blocks):
                k[b] = pattern(sp, seq, self.salt, i, 0, 0).to(k.device)
                v[b] = pattern(sp, seq, self.salt, i, 0, 1).to(v.device)
            self.model[(space, seq)] = (self.salt, len(blocks))

        @rule(space=st.sampled_from(["a", "b"]), seq=SEQS)
        def free(self, space: str, seq: str) -> None:
            sp = self.spaces[space]
            if (space, seq) not in self.model:
                with pytest.raises(kvtier.UnknownSequenceError):
                    sp.free(seq)
                return
            sp.free(seq)
            del self.model[(space, seq)]
            self.offloaded.discard((space, seq))

        @invariant()
        def data_and_books(self) -> None:
            if not hasattr(self, "mgr"):
                return
            self.mgr.check()
            for (space, seq), (salt, written) in self.model.items():
                if (space, seq) in self.offloaded:
                    continue  # not resident: read back after its prefetch
                sp = self.spaces[space]
                k, v = sp.kv(0)
                blocks = sp.blocks(seq)
                for i in range(written):
                    assert torch.equal(k[blocks[i]].cpu(), pattern(sp, seq, salt, i, 0, 0))
                    assert torch.equal(v[blocks[i]].cpu(), pattern(sp, seq, salt, i, 0, 1))

    return SpaceMachine


def test_random_operations_keep_every_byte(backend_name: str) -> None:
    run_state_machine_as_test(_machine(backend_name), settings=settings(
        max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)))
