"""The page digest: what it sees, and that it is defined for exactly the buffers the tiers hand it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtier.tiering.tiers.digest import ROW, ChecksumMismatch, Digests, digest, digest_of_rows, digests_of


def _page(nbytes=64 << 10, seed=0):
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("change", ["flip", "zero a row", "swap rows", "swap words in a row", "shift"])
def test_every_kind_of_damage_changes_the_digest(change):
    page = _page()
    bad = page.clone()
    rows = bad.view(-1, ROW)
    if change == "flip":
        bad[12345] ^= 1
    elif change == "zero a row":
        rows[3] = 0
    elif change == "swap rows":
        rows[[2, 5]] = rows[[5, 2]]
    elif change == "swap words in a row":
        words = rows[1].view(torch.int64)
        words[[0, 7]] = words[[7, 0]]
    else:
        bad[8:] = page[:-8].clone()
    assert not torch.equal(bad, page) and digest(bad) != digest(page)


@pytest.mark.parametrize("rows", [4, 127, 128, 192, 1024])
def test_the_digest_is_its_definition_in_plain_integers(rows):
    """Row sums weighted by row number, column sums by column number, mod 2^64, computed here word by word with
    numpy: whatever way torch is asked to reduce (the host sums columns in pieces from 128 rows), the value is
    this one (bytes that overflow every sum)."""
    import numpy as np
    page = torch.full((rows * ROW,), 0xFF, dtype=torch.uint8)
    page[::3] = _page(rows * ROW, seed=rows)[::3]
    words = page.numpy().view(np.uint64).reshape(rows, ROW // 8)
    with np.errstate(over="ignore"):
        a = (words.sum(1, dtype=np.uint64) * np.arange(1, rows + 1, dtype=np.uint64)).sum(dtype=np.uint64)
        b = (words.sum(0, dtype=np.uint64) * np.arange(1, ROW // 8 + 1, dtype=np.uint64)).sum(dtype=np.uint64)
    assert digest(page) == (int(a), int(b))
    assert digests_of([page, page.clone()]).values() == [(int(a), int(b))] * 2


def test_books_refuse_a_slot_never_sealed_or_changed_at_rest():
    books = Digests(4)
    page = _page()
    books.seal(1, digest(page))
    assert books.verify(1, page, "test") == digest(page)
    with pytest.raises(ChecksumMismatch, match="never written whole"):
        books.verify(2, page, "test")
    books.open(1)  # about to be rewritten: no digest until sealed again
    with pytest.raises(ChecksumMismatch):
        books.verify(1, page, "test")
    assert books.counts() == {"verified": 1, "verified_bytes": page.numel(), "mismatches": 2}


def test_checking_many_slots_at_once_finds_each_bad_one():
    # three slots sealed, one never: a transfer's check of four copies that landed
    books = Digests(4)
    bufs = [torch.full((ROW,), k, dtype=torch.uint8) for k in range(4)]
    for slot in range(3):
        books.seal(slot, digest(bufs[slot]))
    got = digests_of(bufs).array().copy()
    # slot 1's bytes changed on the way: its digest is not the one sealed
    got[1] = digest(torch.full((ROW,), 9, dtype=torch.uint8))
    bad = books.check_all([0, 1, 2, 3], got, [ROW] * 4, "host")
    # the changed slot and the slot never sealed fail, each saying why; the others count as verified
    assert sorted(bad) == [1, 3]
    assert "changed at rest" in str(bad[1]) and "never written whole" in str(bad[3])
    assert all(isinstance(e, ChecksumMismatch) for e in bad.values())
    assert books.counts() == {"verified": 2, "verified_bytes": 2 * ROW, "mismatches": 2}


def test_a_buffer_that_is_not_whole_rows_is_refused():
    with pytest.raises(ValueError, match="whole rows"):
        digest(_page()[:ROW + 8])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_digests_of_many_buffers_equal_each_ones_digest(device):
    """The copies' path digests a batch at once, runs of equally spaced regions as one strided tensor, folded
    where they are: the values are the ones the host computes, buffer by buffer (bytes that overflow every sum)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    whole = torch.full((12 << 16,), 0xFF, dtype=torch.uint8)
    whole[::7] = torch.randint(0, 256, whole[::7].shape, generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    whole = whole.to(device)
    region = 1 << 16
    bufs = [whole[r * region:r * region + 4 * ROW] for r in range(5)]   # one run: five regions' first rows
    bufs += [whole[6 * region:7 * region]]                              # a whole region: another length
    bufs += [whole[8 * region + ROW:8 * region + 2 * ROW], whole[9 * region:9 * region + ROW]]  # another step
    bufs += [_page(2 * ROW, seed=9).to(device)]                         # another storage
    assert digests_of(bufs).values() == [digest(b.cpu()) for b in bufs]
    # listed out of address order (a read lists each page's regions in turn): each value still where its buffer is
    shuffled = [bufs[i] for i in (3, 0, 8, 5, 1, 7, 2, 6, 4)]
    assert digests_of(shuffled).values() == [digest(b.cpu()) for b in shuffled]
    assert (digests_of(shuffled).array() == np.array([digest(b.cpu()) for b in shuffled], dtype=np.uint64)).all()
    assert digests_of([]).values() == []


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_digest_of_rows_is_the_digest_of_those_rows_one_after_another(device):
    """A remote object's payload is checked in the blocks it was copied into: rows of every region, apart in the
    space; their digest is the one the writer took of the same bytes side by side (bytes that overflow every sum)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    whole = torch.full((6, 8 * ROW), 0xFF, dtype=torch.uint8)
    whole[:, ::5] = torch.randint(0, 256, whole[:, ::5].shape, generator=torch.Generator().manual_seed(4),
                                  dtype=torch.uint8)
    rows = whole.to(device)[:, 2 * ROW:5 * ROW]  # three rows of 4 KiB from each of six regions
    value = digest_of_rows(rows).cpu().numpy().view("uint64").tolist()
    assert tuple(value) == digest(rows.cpu().contiguous().view(-1))
    with pytest.raises(ValueError, match="whole"):
        digest_of_rows(whole[:, :ROW + 8])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_digests_sealed_later_are_the_values_taken_and_a_reopened_slot_keeps_none(device):
    """The copies down seal a batch's slots with values still on their way to the host: asked for, a slot gives
    the value its bytes had; a slot opened again before that (its bytes about to change) gives none; batches
    whose values came are settled by the next seal."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pages = [_page(4 * ROW, seed=s).to(device) for s in range(6)]
    books = Digests(8)
    # 1. two batches taken and read (the pages may change from here on), sealed with their places
    first, second = digests_of(pages[:3]), digests_of(pages[3:])
    first.read(), second.read()
    books.seal_later(first, [(5, 0), (1, 1), (7, 2)])
    books.seal_later(second, [(0, 0), (2, 2)])  # the second batch's middle page failed: not sealed
    # 2. slot 7 is reopened before its value was asked for: it has none, whatever the pending batch says
    books.open(7)
    # 3. the values, asked for: each slot the digest of the bytes it was given
    want = [digest(p.cpu()) for p in pages]
    assert [books.value(s) for s in (5, 1, 0, 2)] == [want[0], want[1], want[3], want[5]]
    assert books.value(7) is None and books.value(3) is None
    # 4. a third batch settles what came before; a slot sealed at once wins over nothing pending
    third = digests_of(pages[:1])
    third.read()
    books.seal_later(third, [(3, 0)])
    books.seal(4, want[4])
    assert books.value(3) == want[0] and books.value(4) == want[4]


@pytest.mark.gpu
def test_the_gpu_writes_the_sums_into_pinned_host_memory_itself():
    """The sums come back through the pinned memory's device address, written by a kernel: a copy of them would
    queue on the copy engine behind the page copies enqueued before it (H200: gpu -> host 0.81 of the pinned
    copy that way, dd0df62). Every H100/H200 machine addresses pinned host memory from the GPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from kvtier.tiering.tiers import digest as digest_module
    pages = [_page(4 * ROW, seed=s).cuda() for s in range(3)]
    pending = digests_of(pages)
    assert pending.values() == [digest(p.cpu()) for p in pages]
    assert digest_module._mapped_ok[pages[0].device] is True
