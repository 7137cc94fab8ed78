"""The page digest: what it sees, and that it is defined for exactly the buffers the tiers hand it."""

from __future__ import annotations

import pytest
import torch

from kvtier.tiering.tiers.digest import ROW, ChecksumMismatch, Digests, digest, digests_of


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
    assert digests_of([]).values() == []
