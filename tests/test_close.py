"""``TierManager.close()`` while other threads use the manager: they get a clear ClosedError (never a KeyError or
a hang), every handle they hold completes, nothing is left running, and a new manager starts beside it."""

from __future__ import annotations

import threading
import time

import pytest

import kvtier
from kvtier.errors import ClosedError, TransferError
from tests.conftest import write_seq


def _busy(space, seq: str, handles: list, outcome: list) -> None:
    """Offload and bring back one sequence for ever, keeping every handle: until the manager closes under it (no
    tensor is touched here: writing through a closed manager's tensors is the caller's error, as documented)."""
    try:
        while True:
            handles.append(space.offload(seq, tier="host"))
            handles.append(space.prefetch([seq]))
            handles[-1].result()
            space.allocate(f"{seq}-tmp", 2 * 16)
            space.free(f"{seq}-tmp")
    except ClosedError:
        outcome.append("closed")
    except BaseException as exc:  # noqa: BLE001 - the test says what it was
        outcome.append(exc)


@pytest.mark.parametrize("delay", [0.0, 0.001, 0.005, 0.02, 0.05])
def test_close_while_other_threads_move_pages(make_manager, delay):
    mgr = make_manager(pages=64, background_demotion=True)
    space = mgr.create_space("s", **make_manager.shape)
    # three threads move pages up and down; the main thread closes the manager under them
    for i in range(3):
        space.allocate(f"q{i}", 3 * 16)
        write_seq(space, f"q{i}")
    handles: list = []
    outcomes: list = []
    threads = [threading.Thread(target=_busy, args=(space, f"q{i}", handles, outcomes)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(delay)
    mgr.close()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive(), "a thread hangs after close"
    # each thread stopped on a ClosedError, nothing else
    assert outcomes == ["closed"] * 3, outcomes
    # every handle they hold is complete: it says done, or its result is an error naming why
    for h in handles:
        try:
            h.result(timeout=10)
        except (TransferError, ClosedError):
            pass
        assert h.done() or h.error is not None
    # a second close is a no-op, later calls are refused clearly, and a new manager starts beside it
    mgr.close()
    with pytest.raises(ClosedError):
        space.allocate("later", 16)
    with pytest.raises(ClosedError):
        mgr.create_space("t", **make_manager.shape)
    other = make_manager(pages=8)
    other.create_space("t", **make_manager.shape).allocate("x", 16)
    other.check()
