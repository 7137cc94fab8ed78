"""A remote cache of whole blocks, shared by the machines that use one store (``[remote]``: Valkey or Mooncake).

An engine offers a sequence's whole blocks under their content keys (``kvtier.prefix``) with :meth:`RemoteCache.
offer`: they are published in the space as usual and, in the background, copied in groups (``kvtier.
remote_objects``) to the store. :meth:`RemoteCache.find` starts a new sequence with the longest prefix of its keys
the space holds (``share_prefix``) and asks the store for the rest: the groups found are read into host staging
memory, checked (layout, keys, digest), copied into fresh blocks of the sequence and published locally; the engine
computes what is left. Any process or machine on the same store finds what another offered.

A cache, never the truth: an error, a deadline passed (``remote_timeout_s``), an absent key or an object that
fails its check is a miss, and the engine recomputes (the line to the store, its threads, deadlines and back-off:
``kvtier.remote_link``). A key found absent is not asked for again for ``remote_negative_ttl_s``. Writes never
wait: one that finds no staging memory free, or a store that is down, is dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections import Counter, OrderedDict
from typing import Any, Callable, Hashable, Sequence

import numpy as np
import torch

from kvtier import remote_objects as obj
from kvtier.config import Config
from kvtier.errors import ConfigError, NotResidentError, TransferError
from kvtier.remote_intake import Intake
from kvtier.remote_link import Miss, StoreLink
from kvtier.space import KVSpace
from kvtier.tiering.tiers.digest import digest_of_rows

log = logging.getLogger(__name__)

KNOWN_KEYS = 1 << 16  # names remembered as stored (not written again, not asked about)...
KNOWN_TTL_S = 60.0    # ...for this long: the store may evict them, and a later offer must write them again
WRITE_CHUNKS = 4  # an offer's groups are put in up to this many calls, each once its copies landed (one call a
#                   group: 0.79 of the store's client on a 512 MiB put from an H200, 7aeb5b9)
READ_CHUNKS = 4  # a lookup's groups are read in up to this many calls: each one checked and copied in while the
#                  next is read (measured on the CPU machine: the copy in was a quarter of a 64 MiB hit)


class RemoteCache:
    """The remote cache of one manager (see the module docstring); ``manager.remote`` where ``[remote]`` is set."""

    def __init__(self, config: Config, device: torch.device) -> None:
        self.config, self.device = config, device
        self.slot_bytes = obj.HEADER + -(-config.remote_object_bytes // obj.ROW) * obj.ROW
        slots = config.remote_buffer // self.slot_bytes
        if slots < 1:
            raise ConfigError(f"remote_buffer {config.remote_buffer} holds no object of remote_object_bytes "
                              f"{config.remote_object_bytes}; raise remote_buffer")
        pinned = device.type == "cuda"
        # zeroed: touched once here, not page by page under the first reads (measured: a first 64 MiB read into
        # untouched staging took 2x the store's own client on the CPU machine)
        self._host = torch.zeros(slots * self.slot_bytes, dtype=torch.uint8, pin_memory=pinned)
        self.buffer = self._host.numpy()
        self._free = list(range(slots))
        self._lock = threading.Lock()
        self._absent: dict[str, float] = {}
        self._known: OrderedDict[str, float] = OrderedDict()  # name -> when it was last known to be stored
        self.counts: Counter[str] = Counter()
        self._too_large: set[str] = set()  # spaces whose one block is larger than an object (said once)
        self.link = StoreLink(config, self.buffer, self._lock, self.counts)

    @property
    def up(self) -> bool:
        """Whether the store is being asked (not disabled, not backing off after a failure)."""
        return self.link.up

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait for the first connection to the store (made in the background from the start; lookups before it
        are misses); whether there is one."""
        return self.link.wait_connected(timeout)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for the writes under way (tests, and before a planned exit); whether all are done."""
        return self.link.flush(timeout)

    def close(self) -> None:
        """Stop: writes under way finish (up to their deadline), then the store is let go."""
        self.link.close()

    def _take(self, n: int) -> list[int]:
        with self._lock:
            taken, self._free = self._free[:n], self._free[n:]
            return taken

    def _give(self, slots: Sequence[int]) -> None:  # with the lock held
        self._free.extend(slots)

    def erase(self, salt: bytes) -> int:
        """Remove every object stored under ``salt`` from the store (a tenant's, written by any machine), waited
        for up to ``remote_put_timeout_s``; return how many went. Raises :class:`~kvtier.errors.TransferError` if
        the store cannot do it now (try again: nothing is half-trusted, a later find of those keys is a miss once
        they are gone). The spaces' own copies go with ``space.erase(salt)``."""
        prefix = _namer(salt)(b"")
        with self._lock:  # not "known to be stored" any more
            for name in [n for n in self._known if n.startswith(prefix)]:
                del self._known[name]
        future = self.link.call_on_writer(lambda store: store.remove_prefix(prefix))
        try:
            return int(future.result(self.config.remote_put_timeout_s))
        except Exception as exc:  # noqa: BLE001 - the client's error, whatever it is, named to the caller
            raise TransferError(f"remote store: erase of tenant {_tenant(salt)} failed or timed out ({exc}); try "
                                "again") from None

    def _count(self, what: str, n: int = 1) -> None:
        with self._lock:  # the write thread counts too
            self.counts[what] += n

    def _span(self, slot: int) -> np.ndarray:
        return self.buffer[slot * self.slot_bytes:(slot + 1) * self.slot_bytes]

    def _payload(self, slot: int) -> torch.Tensor:
        """The slot past its header, as a slice of the (pinned, on CUDA) staging tensor: copies to and from the
        device through it are asynchronous."""
        return self._host[slot * self.slot_bytes + obj.HEADER:(slot + 1) * self.slot_bytes]

    # --- down: offer ------------------------------------------------------------------------------------------------
    def offer(self, space: KVSpace, seq_id: Hashable, keys: Sequence[bytes], salt: bytes = b"",
              stream: Any = None, start: int = 0) -> int:
        """Publish ``seq_id``'s first whole blocks under ``keys`` in ``space`` (``space.publish``) and send them to
        the store (:meth:`send`). ``start``: the chain position of its first block (its keys are blocks ``start..``
        of a chain from the prompt's first token). Return what ``publish`` returns."""
        published = space.publish(seq_id, keys, salt)
        self.send(space, space.blocks(seq_id)[:len(keys)], keys, start, stream, salt)
        return published

    def send(self, space: KVSpace, blocks: Sequence[int], keys: Sequence[bytes], start: int = 0,
             stream: Any = None, salt: bytes = b"") -> int:
        """Send the groups of a chain that ``blocks`` of ``space`` hold -- ``blocks[i]`` holds chain position
        ``start + i``, whose key is ``keys[i]`` -- to the store in the background, those it does not hold yet and
        that lie whole in them (the chain's last group may be short). Their bytes are copied now, on ``stream``
        (default: current) after the engine's writes, from the GPU (blocks not resident are not sent). Never
        waits: groups that find no staging memory free are dropped. ``salt``: the tenant's (the keys were made
        with it; ``erase(salt)`` removes them from the store). Nothing is sent with ``[remote] write = "none"``.
        Return the groups sent."""
        if self.config.remote_write == "none" or not self.up or not self._fits(space):
            return 0
        layout, per = self._layout(space)
        name_of = _namer(salt)
        todo: list[tuple[str, list[bytes], list[int], bool]] = []  # name, keys, blocks, only the group's end
        for first, last in obj.groups(start + len(keys), per, start):
            name = name_of(keys[last - start])
            if self._is_known(name):
                continue
            lo = max(first, start)  # a group begun before ``start``: its end only (the rest went as a shorter chain)
            part = list(blocks[lo - start:last - start + 1])
            try:
                space.check_resident(part)
            except NotResidentError:
                self._count("puts_not_resident")
                continue
            todo.append((name, list(keys[lo - start:last - start + 1]), part, lo > first))
        slots = self._take(len(todo))
        if len(slots) < len(todo):
            self._count("puts_dropped", len(todo) - len(slots))  # never wait: the store is a cache
        todo = todo[:len(slots)]
        # put in up to WRITE_CHUNKS calls, each as soon as its copies landed (a group's end alone: a call of its own)
        ends = [i for i, t in enumerate(todo) if t[3]][:1]
        rest = [i for i in range(len(todo)) if i not in ends]
        step = max(1, -(-len(rest) // WRITE_CHUNKS))
        for batch in [ends] + [rest[i:i + step] for i in range(0, len(rest), step)]:
            if not batch:
                continue
            sealed = []
            for i in batch:
                name, group_keys, part, _ = todo[i]
                sealed.append((name, group_keys, slots[i], self._gather(space, part, slots[i], stream)))
                self._remember(name)
            self._write(space, sealed, self._fence(space, stream), layout, ends_only=todo[batch[0]][3])
        return len(todo)

    def _fence(self, space: KVSpace, stream: Any) -> Any:
        """An event after the copies queued on ``stream`` (None on the CPU, where they are done)."""
        if not space.kv(0)[0].is_cuda:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def _gather(self, space: KVSpace, blocks: Sequence[int], slot: int, stream: Any) -> torch.Tensor | None:
        """Copy ``blocks`` of every region into the payload of ``slot``, queued on ``stream`` (default: current);
        on a GPU, from a run of blocks in whole 4 KiB rows, also their digest, taken there (queued, two words on
        the GPU; else None: the writer takes it in staging)."""
        n, bb, R = len(blocks), space.block_bytes, space.num_regions
        host = self._payload(slot)[:R * n * bb].view(R, n * bb)  # a region's blocks a row
        cuda = space.kv(0)[0].is_cuda
        with torch.cuda.stream(stream) if cuda and stream is not None else contextlib.nullcontext():
            if list(blocks) == list(range(blocks[0], blocks[0] + n)):  # a run: one copy for every region
                rows = space.block_rows(blocks[0], n)
                host.copy_(rows, non_blocking=cuda)
                # the digest on the GPU, not on the write thread (25 ms of a 512 MiB put there, H200, 7aeb5b9), on
                # the caller's stream after the copy (~6 ms of it for 512 MiB at the digest's ~90 GB/s): on a side
                # stream, a free after the offer could unmap the blocks under it (its fence is on this stream)
                return digest_of_rows(rows) if cuda and n * bb % obj.ROW == 0 else None
            idx = torch.as_tensor(list(blocks), dtype=torch.int64, device=space.kv(0)[0].device)
            for r in range(R):
                rows = space.kv(r // 2)[r % 2].index_select(0, idx)
                host[r].copy_(rows.view(torch.uint8).view(-1), non_blocking=cuda)
            return None

    def _write(self, space: KVSpace, batch: list[tuple[str, list[bytes], int, torch.Tensor | None]], copied: Any,
               layout: bytes, ends_only: bool = False) -> None:
        """Seal the objects of ``batch`` (name, keys, slot, their payload's digest if taken on the GPU) once their
        copies have landed and put them in one call, on the write thread; not waited for. ``ends_only``: they
        hold the ends of their groups, and are not put where the store holds the name already (it may be a whole
        group, which every reader can use)."""
        regions, bb = space.num_regions, space.block_bytes
        names, slots = [name for name, _, _, _ in batch], [slot for _, _, slot, _ in batch]

        def put() -> None:
            try:
                if not self.link.up:
                    raise Miss()
                if copied is not None:
                    copied.synchronize()
                sizes = [obj.seal(self._span(slot), keys, regions, bb, layout, _words(value))
                         for _, keys, slot, value in batch]
                store = self.link.connect()
                if store is None:
                    raise Miss()
                if ends_only and all(store.exists(names)):
                    with self._lock:
                        self.counts["puts_ends_not_needed"] += len(names)
                    return
                done = store.put(names, [(slot * self.slot_bytes, n) for slot, n in zip(slots, sizes)])
                with self._lock:
                    self.counts["puts"] += sum(done)
                    self.counts["puts_refused"] += len(done) - sum(done)
                    self.counts["put_bytes"] += sum(n for n, ok in zip(sizes, done) if ok)
                for name, ok in zip(names, done):
                    if not ok:
                        self._forget(name)
                self.link.answered()
            except Exception as exc:  # noqa: BLE001 - a write that fails is dropped, whatever the client raised
                for name in names:
                    self._forget(name)
                self._count("puts_dropped", len(names))
                if not isinstance(exc, Miss):
                    self.link.failed("write", exc)
            finally:
                with self._lock:
                    self._give(slots)
        self.link.write(put)

    # --- up: find ---------------------------------------------------------------------------------------------------
    def find(self, space: KVSpace, seq_id: Hashable, keys: Sequence[bytes], stream: Any = None,
             start: int = 0, salt: bytes = b"") -> int:
        """Start ``seq_id`` with the longest run of ``keys[start:]`` found: in ``space`` first (``share_prefix``),
        then in the store, whose groups are read, checked, copied into fresh blocks of ``seq_id`` (on ``stream``,
        waited for) and published in ``space``. ``keys``: the chain from the prompt's first block; ``start``: the
        block ``seq_id`` starts at (the caller holds those before it); ``salt``: the tenant's, as the keys were made.
        Return the tokens ``seq_id`` holds (0: a miss; it then holds nothing)."""
        local = space.share_prefix(seq_id, list(keys[start:]))
        have = start + local // space.block_size
        if have == len(keys) or not self.up or not self._fits(space):
            return local
        self._count("lookups")  # prompts the store was asked about
        per, name_of = self._layout(space)[1], _namer(salt)
        intake = Intake(self, space, seq_id, keys, start, have, stream, name_of, salt)
        try:
            while True:
                held = intake.total
                groups = obj.groups(len(keys), per, held)
                plan = self._unless_absent(groups, keys, name_of)
                slots = self._take(len(plan))
                if len(slots) < len(plan):
                    self._count("gets_short_of_staging")
                taken, stopped = self._read_in(intake, keys, plan[:len(slots)], slots)
                if stopped == "bad" or taken >= len(groups):
                    break
                # it stopped inside group ``taken``: the part of it a shorter chain stored (or an earlier turn of
                # this one, whose next turn stored only the group's end: then go on past it)
                part = self._part(keys, groups[taken], intake.total, name_of)
                if part is None or self._read_in(intake, keys, [part], self._take(1))[0] != 1 or \
                        stopped != "gap" or intake.total <= held:
                    break
        except Miss:
            self._count("gets_failed")
        except BaseException:
            try:
                intake.abandon()  # an error not of the store's: unchecked blocks and the staging still go back
            except Exception:  # noqa: BLE001 - the first error is the one to raise
                log.exception("remote cache: cleaning up after a failed lookup of %r failed too", seq_id)
            raise
        return intake.finish()

    def _unless_absent(self, groups: list[tuple[int, int]], keys: Sequence[bytes],
                       name_of: Callable[[bytes], str]) -> list[tuple[int, int]]:
        """``groups`` up to the first found absent within ``remote_negative_ttl_s`` (no question first: a group
        absent reads as absent)."""
        now, plan = time.monotonic(), []
        for first, last in groups:
            if self._absent.get(name_of(keys[last]), 0.0) > now:
                break
            plan.append((first, last))
        return plan

    def _read_in(self, intake: Intake, keys: Sequence[bytes], plan: list[tuple[int, int]],
                 slots: list[int]) -> tuple[int, str | None]:
        """Read the groups of ``plan`` into ``slots`` in up to ``READ_CHUNKS`` calls, each taken in while the next
        is read; return how many were taken, and why it stopped short of the plan: "absent", "gap" (an object
        holding only its group's end, past what is held) or "bad" (one failed its check, or there was no room
        for it); None: it did not."""
        if not plan or len(slots) < len(plan):
            with self._lock:
                self._give(slots)
            return 0, None if not plan else "bad"
        step = -(-len(plan) // READ_CHUNKS)
        chunks = [(plan[i:i + step], slots[i:i + step]) for i in range(0, len(plan), step)]

        name_of = intake.name

        def call(part: list[tuple[int, int]], mine: list[int]) -> Any:
            names, spans = [name_of(keys[last]) for _, last in part], [(s * self.slot_bytes, self.slot_bytes)
                                                                    for s in mine]
            return lambda store: store.get(names, spans)

        def giver(mine: list[int]) -> Any:
            return lambda: self._give(mine)
        reads = self.link.stream([call(p, m) for p, m in chunks], [giver(m) for _, m in chunks])
        taken, now = 0, time.monotonic()
        try:
            for (part, mine), sizes in zip(chunks, reads):
                intake.owned += mine
                for (first, last), slot, size in zip(part, mine, sizes):
                    if size < 0:
                        self._count("gets_absent")
                        self._absent[name_of(keys[last])] = now + self.config.remote_negative_ttl_s
                        return taken, "absent"
                    why = intake.take(first, last, slot, size)
                    if why is not None:
                        return taken, why
                    taken += 1
            return taken, None
        finally:
            reads.close()

    def _part(self, keys: Sequence[bytes], group: tuple[int, int], have: int,
              name_of: Callable[[bytes], str]) -> tuple[int, int] | None:
        """The longest stored part of ``group`` (a shorter chain's last object) past ``have``, if any."""
        first, last = group
        inside = [name_of(keys[e]) for e in range(max(first, have), last)]
        try:
            found = self._exists(inside) if inside else set()
        except Miss:
            return None
        ends = [e for e in range(last - 1, max(first, have) - 1, -1) if name_of(keys[e]) in found]
        return (first, ends[0]) if ends else None

    def _exists(self, names: list[str]) -> set[str]:
        """Which of ``names`` the store holds: those known to be there, and those it says it has now (a name it
        says it lacks is not asked for again for ``remote_negative_ttl_s``)."""
        now = time.monotonic()
        ask = [n for n in names if self._absent.get(n, 0.0) <= now and not self._is_known(n)]
        found = self.link.read(lambda store: store.exists(ask)) if ask else []
        for n, f in zip(ask, found):
            if not f:
                self._absent[n] = now + self.config.remote_negative_ttl_s
        if len(self._absent) > KNOWN_KEYS:
            self._absent = {n: t for n, t in self._absent.items() if t > now}
        return {n for n, f in zip(ask, found) if f} | {n for n in names if self._is_known(n)}

    # --- books ------------------------------------------------------------------------------------------------------
    def _fits(self, space: KVSpace) -> bool:
        """Whether one block of ``space`` (every region) fits an object; a space whose blocks do not is not sent
        or looked up (said once)."""
        if space.block_bytes * space.num_regions <= self.slot_bytes - obj.HEADER:
            return True
        if space.name not in self._too_large:
            self._too_large.add(space.name)
            log.warning("remote cache: a block of space %r takes %d bytes, more than [remote] object_bytes (%d); its "
                        "blocks are not sent to the store nor looked up there: raise object_bytes (and buffer)",
                        space.name, space.block_bytes * space.num_regions, self.config.remote_object_bytes)
        self._count("blocks_too_large")
        return False

    def _layout(self, space: KVSpace) -> tuple[bytes, int]:
        return obj.layout_id(space.layout_tag), obj.group_blocks(space.block_bytes, space.num_regions,
                                                                 self.config.remote_object_bytes)

    def _remember(self, name: str) -> None:
        with self._lock:
            self._known[name] = time.monotonic()
            self._known.move_to_end(name)
            if len(self._known) > KNOWN_KEYS:
                self._known.popitem(last=False)

    def _is_known(self, name: str) -> bool:
        return time.monotonic() - self._known.get(name, -KNOWN_TTL_S) < KNOWN_TTL_S

    def _forget(self, name: str) -> None:
        with self._lock:
            self._known.pop(name, None)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"backend": self.config.remote_backend, "up": self.up, "disabled": self.link.disabled,
                    "staging_free": len(self._free), **dict(self.counts)}


def _words(value: torch.Tensor | None) -> tuple[int, int] | None:
    """A digest taken on the GPU (two int64 words, landed: the copies' event was waited for) as :func:`digest`
    gives it."""
    if value is None:
        return None
    a, b = value.cpu().numpy().view(np.uint64).tolist()
    return a, b


def _tenant(salt: bytes) -> str:
    """The part of an object's name that says whose it is: ``erase(salt)`` removes every name under it."""
    return hashlib.blake2b(salt, digest_size=8).hexdigest()


def _namer(salt: bytes) -> Callable[[bytes], str]:
    """Object names under ``salt``: ``kvtier/<tenant>/<the key of the group's last block>``."""
    prefix = f"kvtier/{_tenant(salt)}/"
    return lambda key: prefix + key.hex()
