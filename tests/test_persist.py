"""The NVMe tier kept across restarts (``[nvme] persist``): cached blocks that rested on disk when a manager closed
are found again by a manager started later on the same directory, byte for byte -- and whatever is wrong with
what it finds there (torn or foreign journal, a slot file replaced, bytes changed at rest, another layout, an
erased tenant, a directory held by a live process) is ignored or a miss, never served (CPU; CUDA under -m gpu)."""

from __future__ import annotations

import json
import logging
import os

import pytest

import kvtier
from kvtier.tiering.tiers.nvme_journal import JOURNAL_NAME, SLOTS_NAME
from tests.conftest import PAGE, assert_holds, write_seq

SYSTEM_BLOCKS = 36  # whole blocks of the shared prompt: 2.25 pages of 16 blocks


def _kept(make_manager, directory, **overrides):
    return make_manager(nvme_dir=str(directory), nvme_persist=True, **overrides)


def _space(mgr, make_manager, name="m", **shape):
    return mgr.create_space(name, max_tokens=256 * make_manager.shape["block_size"],
                            **{**make_manager.shape, **shape})


def _first_life(make_manager, directory, salt=b""):
    """A manager computes a prompt, publishes its whole blocks, sends them to NVMe and frees them (cached there),
    then closes. Return the prompt's keys."""
    mgr = _kept(make_manager, directory)
    space = _space(mgr, make_manager)
    bs = space.block_size
    space.allocate("r1", SYSTEM_BLOCKS * bs + 10)
    write_seq(space, "r1")
    keys = space.block_keys(list(range(SYSTEM_BLOCKS * bs + 10)), salt=salt)
    assert space.publish("r1", keys, salt=salt) == SYSTEM_BLOCKS
    space.offload("r1", tier="nvme").result()
    space.free("r1")
    assert space.stats()["cached_blocks"] == SYSTEM_BLOCKS
    mgr.check()
    mgr.close()
    return keys


def _records(directory):
    with open(os.path.join(directory, JOURNAL_NAME)) as f:
        return [json.loads(line.split(" ", 1)[1]) for line in f]


def test_cached_blocks_on_nvme_are_found_after_a_restart_byte_for_byte(make_manager, tmp_path):
    keys = _first_life(make_manager, tmp_path)
    # the journal says what the kept file holds: its header, then one record a page (3 pages of the prompt)
    records = _records(tmp_path)
    assert records[0]["kvtier"] == "nvme-journal" and [r["t"] for r in records[1:]] == ["page"] * 3
    assert sum(len(r["blocks"]) for r in records[1:]) == SYSTEM_BLOCKS
    # a new manager on the directory: the space of that name and layout finds the blocks cached in NVMe
    mgr = _kept(make_manager, tmp_path)
    assert mgr.stats()["tiers"]["nvme"]["kept"]
    space = _space(mgr, make_manager)
    assert space.stats()["cached_blocks"] == SYSTEM_BLOCKS and space.stats()["stripes_nvme"] == 3
    mgr.check()
    # a request with the prompt shares them; they come up verified and hold what the first manager wrote
    assert space.share_prefix("q", keys) == SYSTEM_BLOCKS * space.block_size
    space.prefetch(["q"]).result()
    assert_holds(space, "q", "r1", range(SYSTEM_BLOCKS))
    assert mgr.stats()["tiers"]["nvme"]["checksums"]["verified"] > 0
    space.free("q")
    mgr.check()
    mgr.close()
    # they came up and went on being cached on the GPU; their slots below were left as they were: a third life
    # finds them again
    mgr = _kept(make_manager, tmp_path)
    space = _space(mgr, make_manager)
    assert space.share_prefix("q", keys) == SYSTEM_BLOCKS * space.block_size
    space.prefetch(["q"]).result()
    assert_holds(space, "q", "r1", range(SYSTEM_BLOCKS))
    mgr.check()


def test_only_a_space_of_the_same_name_and_layout_takes_them(make_manager, tmp_path):
    keys = _first_life(make_manager, tmp_path)
    mgr = _kept(make_manager, tmp_path)
    other = _space(mgr, make_manager, name="other")
    wider = _space(mgr, make_manager, name="m", head_dim=2 * make_manager.shape["head_dim"])
    assert other.stats()["cached_blocks"] == 0 and wider.stats()["cached_blocks"] == 0
    assert wider.share_prefix("q", keys) == 0
    mgr.check()
    mgr.close()
    # the records no space took are dropped at close: their slots are free for the next life's pages
    assert [r["t"] for r in _records(tmp_path)[1:]] == []


def test_bytes_changed_at_rest_are_a_miss_and_not_restored_again(make_manager, tmp_path):
    if make_manager.name != "cpu":
        pytest.skip("writes into the slot file behind the tier's back: the CPU case says it")
    keys = _first_life(make_manager, tmp_path)
    header, first_page = _records(tmp_path)[:2]
    with open(tmp_path / SLOTS_NAME, "r+b") as f:  # one byte of the prompt's first page, in its first region
        f.seek(first_page["slots"][0] * PAGE["cpu"] // header["pieces"] + 100)  # a slot is named by its first unit
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    mgr = _kept(make_manager, tmp_path)
    space = _space(mgr, make_manager)
    assert space.share_prefix("q", keys) == SYSTEM_BLOCKS * space.block_size  # not read yet: found
    with pytest.raises(kvtier.TransferError):
        space.prefetch(["q"]).result()  # verified on the way up: the page fails its digest, and is lost
    assert mgr.stats()["tiers"]["nvme"]["checksums"]["mismatches"] == 1
    space.free("q")
    assert space.share_prefix("q2", keys) == 0  # the chain's first page is gone: nothing after it is served
    mgr.check()
    mgr.close()
    # the journal voided the bad page: the next life restores the other two and never reads the bad one again
    mgr = _kept(make_manager, tmp_path)
    space = _space(mgr, make_manager)
    assert space.stats()["cached_blocks"] == SYSTEM_BLOCKS - 16 and space.share_prefix("q", keys) == 0
    mgr.check()


@pytest.mark.parametrize("damage", ["torn tail", "garbage", "foreign records", "slot file replaced"])
def test_a_damaged_or_foreign_journal_is_ignored_never_served(make_manager, tmp_path, damage, caplog):
    keys = _first_life(make_manager, tmp_path)
    journal = tmp_path / JOURNAL_NAME
    if damage == "torn tail":  # a line cut short by a crash: the records before it still hold
        with open(journal, "a") as f:
            f.write('0123456789abcdef {"t":"page","space":"m","lay')
    elif damage == "garbage":
        journal.write_bytes(os.urandom(3000))
    elif damage == "foreign records":  # well-checked lines of a form kvtier never writes
        import hashlib
        lines = journal.read_text().splitlines()[:1]
        for text in ('{"t":"page","space":"m","slots":"x"}', '{"t":"page","space":"m","layout":[],"slots":[0,0],'
                     '"held":[1,1],"digests":[[0,0],[0,0]],"blocks":[[0,"zz","00"]]}'):
            lines.append(f"{hashlib.blake2b(text.encode(), digest_size=8).hexdigest()} {text}")
        journal.write_text("\n".join(lines) + "\n")
    else:  # another file of that name (a restore from backup, someone's copy): the journal is not its journal
        os.rename(tmp_path / SLOTS_NAME, tmp_path / "old")
        (tmp_path / SLOTS_NAME).write_bytes(bytes(os.path.getsize(tmp_path / "old")))
    caplog.set_level(logging.WARNING, logger="kvtier")
    mgr = _kept(make_manager, tmp_path)
    space = _space(mgr, make_manager)
    expect = SYSTEM_BLOCKS if damage == "torn tail" else 0
    assert space.stats()["cached_blocks"] == expect
    assert space.share_prefix("q", keys) == expect * space.block_size
    if expect:
        space.prefetch(["q"]).result()
        assert_holds(space, "q", "r1", range(SYSTEM_BLOCKS))
    if damage != "garbage":
        assert any("nvme journal" in r.getMessage() for r in caplog.records)
    # the manager works as usual on what it found: a sequence goes down to NVMe and back
    space.allocate("new", 40 * space.block_size)
    write_seq(space, "new", salt=5)
    space.offload("new", tier="nvme").result()
    space.prefetch(["new"]).result()
    mgr.check()


def test_an_erased_tenant_is_not_restored(make_manager, tmp_path):
    keys = _first_life(make_manager, tmp_path, salt=b"tenant-a")
    mgr = _kept(make_manager, tmp_path)
    space = _space(mgr, make_manager)
    assert space.stats()["cached_blocks"] == SYSTEM_BLOCKS
    assert space.erase(b"tenant-a") == SYSTEM_BLOCKS and space.stats()["cached_blocks"] == 0
    mgr.check()
    mgr.close()
    mgr = _kept(make_manager, tmp_path)
    space = _space(mgr, make_manager)
    assert space.stats()["cached_blocks"] == 0 and space.share_prefix("q", keys) == 0
    mgr.check()


def test_a_directory_held_by_a_live_manager_gives_the_next_one_a_file_of_its_own(make_manager, tmp_path, caplog):
    keys = _first_life(make_manager, tmp_path)
    first = _kept(make_manager, tmp_path)
    caplog.set_level(logging.WARNING, logger="kvtier")
    second = _kept(make_manager, tmp_path)  # the kept file is locked by the first: this one's is its own
    assert first.stats()["tiers"]["nvme"]["kept"] and not second.stats()["tiers"]["nvme"]["kept"]
    assert any("in use by another live process" in r.getMessage() for r in caplog.records)
    assert _space(second, make_manager).share_prefix("q", keys) == 0
    assert _space(first, make_manager).share_prefix("q", keys) == SYSTEM_BLOCKS * make_manager.shape["block_size"]
    second.close()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".slots") and n != SLOTS_NAME]  # its file is gone
    first.check()


def test_persist_needs_a_directory():
    with pytest.raises(kvtier.ConfigError, match=r"nvme.*persist.*set \[nvme\] dir"):
        kvtier.Config(nvme_persist=True)


def test_a_journal_that_cannot_be_written_is_removed_and_the_tier_goes_on(make_manager, tmp_path, caplog):
    mgr = _kept(make_manager, tmp_path)
    journal = mgr.tiering.tier("nvme").journal
    journal._file = open(tmp_path / JOURNAL_NAME)  # the edge: every write now fails (read-only), as on a full disk
    caplog.set_level(logging.ERROR, logger="kvtier")
    space = _space(mgr, make_manager)
    space.allocate("r1", 40 * space.block_size)
    write_seq(space, "r1")
    space.publish("r1", space.block_keys(list(range(40 * space.block_size))))
    space.offload("r1", tier="nvme").result()  # lands; the journal's append fails: it goes, the data stays good
    assert any("cannot be written" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / JOURNAL_NAME).exists() and not mgr.stats()["tiers"]["nvme"]["kept"]
    space.prefetch(["r1"]).result()
    assert_holds(space, "r1", "r1", range(40))
    mgr.check()
    mgr.close()
    # nothing is restored from a journal that could not say everything
    mgr = _kept(make_manager, tmp_path)
    assert _space(mgr, make_manager).stats()["cached_blocks"] == 0
    mgr.check()


def test_the_journal_stays_small_under_traffic_that_restores_nothing(make_manager, tmp_path, monkeypatch):
    from kvtier.tiering.tiers import nvme_journal
    monkeypatch.setattr(nvme_journal, "COMPACT_MIN_BYTES", 4096)  # rewrite early, to see it happen in a test
    mgr = _kept(make_manager, tmp_path)
    space = _space(mgr, make_manager)
    space.allocate("live", 40 * space.block_size)  # never published: its pages restore nothing
    write_seq(space, "live")
    for _ in range(60):  # down to NVMe and back, 3 pages a time: 180 records that only void what was there
        space.offload("live", tier="nvme").result()
        space.prefetch(["live"]).result()
    assert len(_records(tmp_path)) < 60  # rewritten along the way (the header and what is still true)
    mgr.check()


KILLED_WRITER = """
import sys
import kvtier
from tests.conftest import PAGE, SHAPE
page = PAGE["cpu"]
mgr = kvtier.TierManager(kvtier.Config(device="cpu", page_size=page, pool_budget=64 * page, pool_ready=0,
                                       host_size=16 * page, host_chunk=4 * page, nvme_size=128 * page,
                                       nvme_dir=sys.argv[1], nvme_persist=True, background_demotion=False))
space = mgr.create_space("m", max_tokens=256 * 16, **SHAPE["cpu"])
tokens = list(range(36 * 16))
keys = space.block_keys(tokens)
space.allocate("r1", len(tokens))
for layer in range(space.num_layers):  # content a reader can rebuild (write_seq's depends on this process's hash)
    for kv, tensor in enumerate(space.kv(layer)):
        for i, block in enumerate(space.blocks("r1")):
            tensor[block] = 4 * i + 2 * layer + kv
space.publish("r1", keys)
print("ready", flush=True)
while True:  # down to NVMe and back for ever: killed in the middle of some write or journal line
    space.offload("r1", tier="nvme").result()
    space.prefetch(["r1"]).result()
"""


def test_a_process_killed_mid_write_leaves_nothing_that_is_served_wrong(make_manager, tmp_path):
    import signal
    import subprocess
    import sys
    import time
    if make_manager.name != "cpu":
        pytest.skip("the writer runs on the CPU backend")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    restored = 0
    for delay in (0.05, 0.2, 0.5):
        # a kept tier is written to when its process is SIGKILLed, at some point of a page's write or record
        proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], cwd=root,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # the next manager on the directory: what it restores is either the prompt's bytes or a miss
        mgr = _kept(make_manager, tmp_path)
        space = _space(mgr, make_manager)
        keys = space.block_keys(list(range(36 * 16)))
        found = space.share_prefix("q", keys)
        restored += found
        if found:
            try:
                space.prefetch(["q"]).result()
                for layer in range(space.num_layers):
                    for kv, tensor in enumerate(space.kv(layer)):
                        for i, block in enumerate(space.blocks("q")):
                            assert (tensor[block] == 4 * i + 2 * layer + kv).all(), (delay, i, layer, kv)
            except kvtier.TransferError:
                pass  # torn below: lost, a miss
            space.free("q", retain=False)
        mgr.check()
        mgr.close()
    assert restored  # the journal did bring pages back after a kill (not only misses)


def test_a_slot_landing_inside_a_larger_one_voids_that_ones_record(tmp_path):
    """Slots of a quarter, a half... of a page (``[nvme] pieces``) are named by their first unit: a page landing
    in part of the units another page's record names voids that record, whichever units they share."""
    from kvtier.tiering.tiers.nvme_journal import PageRecord, SlotJournal
    fd = os.open(tmp_path / SLOTS_NAME, os.O_RDWR | os.O_CREAT)
    try:
        journal = SlotJournal(str(tmp_path), fd, 4 << 20, 2, pieces=4)  # two frames of four 1 MiB units
        block = [[0, "00" * 16, ""]]
        whole = PageRecord("m", [1], [0, 4], [4 << 20, 3 << 20], [[1, 2], [3, 4]], block)  # units 0..3 and 4..7
        journal.landed(whole)
        assert journal.span(3 << 20) == 4 and journal.span(1 << 20) == 1 and journal.span((1 << 20) + 4096) == 2
        # a quarter landing at unit 5 (inside the second slot of the first page): that page is not restored
        journal.landed(PageRecord("m", [1], [2, 5], [1 << 20, 1 << 20], [[5, 6], [7, 8]], block))
        journal.close()
        again = SlotJournal(str(tmp_path), fd, 4 << 20, 2, pieces=4)
        assert [r.slots for r in again.pending] == [[2, 5]]
        again.close()
        # read with other pieces, the journal is another layout's: nothing is restored
        assert SlotJournal(str(tmp_path), fd, 4 << 20, 2, pieces=1).pending == []
    finally:
        os.close(fd)
