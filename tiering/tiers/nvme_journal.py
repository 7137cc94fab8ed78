"""What the NVMe tier's slots hold, kept on disk so that cached blocks survive a restart (``[nvme] persist``).

Beside the slot file (``kvtier-cache.slots`` in ``nvme_dir``) lies its journal, ``kvtier-cache.journal``: one
line a record, ``<check> <json>``, where the check is a 64-bit blake2b of the JSON. The first record is the header:
the format's version, the slot size, and the slot file's device and inode (a journal beside another file is not
its journal). Then:

- ``page``: a space's page landed in the tier: the space's name and layout, its slots (one a region), the bytes
  each holds and their digest, and the indexed whole blocks on the page (index within the page, key, salt);
- ``erase``: a tenant's salt was erased in a space: the earlier records forget its blocks;
- ``void``: slots whose bytes are known bad (a read failed its digest).

A record naming a slot supersedes every earlier record naming it. Replay stops at the first line that fails its
check (a torn tail) and ignores a journal whose header does not match. Nothing here is trusted with bytes: a
restored slot keeps the recorded digest and is verified when first read, like any other (a mismatch is a miss).

The journal is appended under the manager's lock as pages land (no fsync: after a power loss the torn pages fail
their digest), and rewritten with only the records still true at start, at close, and when it has grown to many
times that.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, TextIO

log = logging.getLogger(__name__)

VERSION = 1
SLOTS_NAME, JOURNAL_NAME = "kvtier-cache.slots", "kvtier-cache.journal"
COMPACT_MIN_BYTES = 1 << 20  # the journal is rewritten once its stale lines pass this and twice its live ones


@dataclass
class PageRecord:
    """One page of a space, as it landed in the NVMe tier."""

    space: str
    layout: list[Any]            # the space's layers, KV heads, head dim, dtype, block size and page size
    slots: list[int]             # one a region, in region order
    held: list[int]              # bytes each slot holds
    digests: list[list[int]]     # each slot's digest (kvtier.tiering.tiers.digest)
    blocks: list[list[Any]] = field(default_factory=list)  # [index within the page, key hex, salt hex]


def _line(record: dict[str, Any]) -> str:
    text = json.dumps(record, separators=(",", ":"))
    return f"{hashlib.blake2b(text.encode(), digest_size=8).hexdigest()} {text}\n"


def _records(path: str) -> Iterator[dict[str, Any]]:
    """The journal's records, up to the first line that fails its check."""
    try:
        with open(path, "rb") as f:
            for raw in f:
                check, _, text = raw.rstrip(b"\n").partition(b" ")
                if not raw.endswith(b"\n") or hashlib.blake2b(text, digest_size=8).hexdigest().encode() != check:
                    log.warning("nvme journal %s: a torn or changed line; the records after it are ignored", path)
                    return
                yield json.loads(text)
    except FileNotFoundError:
        return


def _well_formed(r: PageRecord, units: int, span: Callable[[int], int]) -> bool:
    try:
        return isinstance(r.space, str) and len(r.held) == len(r.digests) == len(r.slots) == len(set(r.slots)) > 0 and \
            all(isinstance(h, int) and 0 < h for h in r.held) and \
            all(isinstance(s, int) and 0 <= s and s % span(h) == 0 and s + span(h) <= units
                for s, h in zip(r.slots, r.held)) and \
            all(len(d) == 2 and all(isinstance(x, int) and 0 <= x < 2**64 for x in d) for d in r.digests) and \
            all(len(b) == 3 and isinstance(b[0], int) and len(bytes.fromhex(b[1])) == 16 and
                isinstance(bytes.fromhex(b[2]), bytes) for b in r.blocks)
    except (TypeError, ValueError):
        return False


class SlotJournal:
    """The journal of one persistent slot file (see the module docstring). ``pending`` holds the restored pages
    no space has taken yet (their slots are not free); the manager's lock serialises every call."""

    def __init__(self, directory: str, slot_fd: int, slot_size: int, slots: int, pieces: int = 1) -> None:
        """``slots`` frames of ``slot_size`` bytes, each of ``pieces`` units: a slot is named by its first unit
        and spans as many as the bytes it holds need (see ``SlotBooks``)."""
        self.path = os.path.join(directory, JOURNAL_NAME)
        st = os.fstat(slot_fd)
        self.header = {"kvtier": "nvme-journal", "version": VERSION, "slot_size": slot_size, "pieces": pieces,
                       "dev": st.st_dev, "ino": st.st_ino}
        self.unit, self.pieces = slot_size // pieces, pieces
        self._live: dict[int, PageRecord] = {}   # record id -> a page that may still be read back
        self._owner: dict[int, int] = {}         # unit -> the live record whose slots cover it
        self._stale = 0                          # lines that no longer restore anything (counted by _void too)
        self._file: TextIO | None = None
        self.pending = self._replay(slots * pieces)
        self._rewrite()

    def span(self, held: int) -> int:
        """The units a slot holding ``held`` bytes spans."""
        size = 1
        while size < self.pieces and size * self.unit < held:
            size *= 2
        return size

    def _units(self, record: PageRecord) -> list[int]:
        return [u for s, h in zip(record.slots, record.held) for u in range(s, s + self.span(h))]

    def _replay(self, units: int) -> list[PageRecord]:
        records = _records(self.path)
        header = next(records, None)
        if header is None:
            return []
        if header != self.header:
            log.warning("nvme journal %s belongs to another slot file or layout (%s); starting empty", self.path,
                        {k: header.get(k) for k in ("version", "slot_size", "pieces")} if isinstance(header, dict)
                        else header)
            return []
        try:
            for record in records:
                kind = record.pop("t")
                if kind == "page":
                    self._add(PageRecord(**record))
                elif kind == "erase":
                    self._erase(record["space"], record["salt"])
                elif kind == "void":
                    self._void(record["slots"])
        except (KeyError, TypeError, ValueError) as exc:  # checked lines of another program's making
            log.warning("nvme journal %s: a record of an unknown form (%s); the records after it are ignored",
                        self.path, exc)
        pages = [r for r in self._live.values() if _well_formed(r, units, self.span)]
        self._live = {id(r): r for r in pages}
        self._owner = {u: id(r) for r in pages for u in self._units(r)}
        return pages

    # --- records -------------------------------------------------------------------------------------------------
    def _add(self, record: PageRecord) -> None:
        try:
            units = self._units(record)
        except TypeError:  # a malformed record: it restores nothing (_replay drops it)
            units = []
        self._void(units)
        if record.blocks:
            self._live[id(record)] = record
            for u in units:
                self._owner[u] = id(record)

    def _void(self, units: list[int]) -> None:
        """The records whose slots cover any of ``units`` (the first units of slots, or every unit of some)."""
        for u in units:
            rid = self._owner.get(u)
            if rid is not None:
                for t in self._units(self._live.pop(rid)):
                    self._owner.pop(t, None)
                self._stale += 1

    def _erase(self, space: str, salt: str) -> None:
        for record in [r for r in self._live.values() if r.space == space]:
            record.blocks = [b for b in record.blocks if b[2] != salt]
            if not record.blocks:
                self._void(record.slots)

    def landed(self, record: PageRecord) -> None:
        """A page landed in ``record.slots`` (with no indexed block, it only voids what they held before)."""
        self._add(record)
        self._append({"t": "page", **asdict(record)})

    def void(self, slots: list[int]) -> None:
        """``slots`` hold bytes that failed their digest: nothing there is restored again."""
        if any(s in self._owner for s in slots):
            self._void(slots)
            self._append({"t": "void", "slots": slots})

    def erased(self, space: str, salt: bytes) -> None:
        """Every block published under ``salt`` in ``space`` was erased: none is restored again."""
        self._erase(space, salt.hex())
        for record in self.pending:
            if record.space == space:
                record.blocks = [b for b in record.blocks if b[2] != salt.hex()]
        self._append({"t": "erase", "space": space, "salt": salt.hex()})

    def take(self, space: str, layout: list[Any]) -> list[PageRecord]:
        """The restored pages of ``space`` in ``layout``, for it to adopt (they leave ``pending``)."""
        mine = [r for r in self.pending if r.space == space and r.layout == layout]
        self.pending = [r for r in self.pending if not (r.space == space and r.layout == layout)]
        return mine

    # --- the file ----------------------------------------------------------------------------------------------------
    def _append(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        try:
            self._file.write(_line(record))
            self._file.flush()
            self._stale += record["t"] != "page" or not record["blocks"]  # lines that restore nothing
            if self._stale * 2 > len(self._live) and self._file.tell() > COMPACT_MIN_BYTES:
                self._rewrite()
        except OSError as exc:
            self._give_up(exc)

    def _give_up(self, exc: OSError) -> None:
        """The journal cannot be written (a full disk...): it is removed, so that no later start trusts what it
        says without what it could not say (an erase above all); the tier goes on, not kept."""
        log.error("nvme journal %s cannot be written (%s); it is removed and this NVMe tier is not kept across "
                  "restarts any more (free room on that disk)", self.path, exc)
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    @property
    def kept(self) -> bool:
        """Whether the journal is being written (it stops for good on a write that fails)."""
        return self._file is not None

    def _rewrite(self, keep_pending: bool = True) -> None:
        """The journal anew: the header and the records still true (written aside, then renamed over it)."""
        if self._file is not None:
            self._file.close()
        pending = {id(r) for r in self.pending}
        records = [r for r in self._live.values() if keep_pending or id(r) not in pending]
        tmp = self.path + ".new"
        with open(tmp, "w") as f:
            f.write(_line(self.header))
            for r in records:
                f.write(_line({"t": "page", **asdict(r)}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._stale = 0
        self._file = open(self.path, "a")

    def close(self) -> None:
        """Rewrite the journal with what is true now, less the restored pages no space took."""
        if self._file is None:
            return
        try:
            self._rewrite(keep_pending=False)
        except OSError as exc:
            self._give_up(exc)
            return
        if self._file is not None:
            self._file.close()
            self._file = None
