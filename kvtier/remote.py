"""A remote cache of whole blocks, shared by the machines that use one store (``[remote]``: Valkey or Mooncake).

An engine offers a sequence's whole blocks under their content keys (``kvtier.prefix``) with :meth:`RemoteCache.
offer`: they are published in the space as usual and, in the background, copied in groups (``kvtier.
remote_objects``) to the store. :meth:`RemoteCache.find` starts a new sequence with the longest prefix of its keys
the space holds (``share_prefix``) and asks the store for the rest: the groups found are read into host staging
memory, checked (layout, keys, digest), copied into fresh blocks of the sequence and published locally; the engine
computes what is left. Any process or machine on the same store finds what another offered.

A cache, never the truth: an error, a deadline passed (``remote_timeout_s``), an absent key or an object that
fails its check is a miss, and the engine recomputes. A store that fails is left alone for a while (doubling, up
to ``MAX_BACKOFF_S``), said once in the log, counted, and tried again; a key found absent is not asked for again
for ``remote_negative_ttl_s``. Writes never wait: one that finds no staging memory free, or a store that is down,
is dropped. Staging memory lent to a call past its deadline comes back only when that call returns.

Threads: one for the store's reads and one for its writes (the store's client is called from both), so that a
lookup never queues behind a write; a call still running past its deadline keeps its thread, and later calls on
it fail at once until it returns.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from typing import Any, Callable, Hashable, Sequence

import numpy as np
import torch

from kvtier import remote_objects as obj
from kvtier.config import Config
from kvtier.errors import ConfigError, KVTierError, NotResidentError
from kvtier.remote_store import RemoteStore, open_store
from kvtier.space import KVSpace

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0
KNOWN_KEYS = 1 << 16  # keys remembered as stored (not written again)


class _Miss(Exception):
    """The store cannot answer now (down, busy past a deadline, an error): a miss."""


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
        self._store: RemoteStore | None = None
        self._disabled: str | None = None  # a problem no retry mends (the client package is missing)
        self._down_until = 0.0
        self._backoff = 0.0
        self._busy = False  # a read under way (perhaps past its deadline): the next one is a miss, not a wait
        self._reads, self._writer = _Worker("kvtier-remote-read"), _Worker("kvtier-remote-write")
        self._absent: dict[str, float] = {}
        self._known: OrderedDict[str, None] = OrderedDict()
        self.counts: Counter[str] = Counter()
        self._writes: list[cf.Future[Any]] = []
        self._connecting = self._writer.submit(self._connect)  # in the background: no lookup waits for it

    # --- the store, behind deadlines -------------------------------------------------------------------------------
    def _connect(self) -> RemoteStore | None:
        """The store's client, made on the write thread (Mooncake's setup retries for tens of seconds against a
        master that is down); a failure backs off like any other."""
        if self._store is None and not self._disabled and time.monotonic() >= self._down_until:
            try:
                self._store = open_store(self.config, self.buffer)
                self._answered()
            except Exception as exc:  # noqa: BLE001 - a store not there yet is a miss, whatever its client raised
                self._failed("connection", exc)
        return self._store

    def _connected(self) -> RemoteStore:
        """The store's client for a read: one made already, or a miss now (never a wait for a connection)."""
        store = self._store
        if store is None:
            self._writer.submit(self._connect)
            raise OSError("not connected yet")
        return store

    def _call(self, fn: Callable[[RemoteStore], Any], slots: Sequence[int]) -> Any:
        """``fn(store)`` on the read thread, waited for at most ``remote_timeout_s``; raises :class:`_Miss`. The
        caller owns ``slots`` after a result; on a miss they go back (after a deadline: once the call returns)."""
        with self._lock:
            if self._disabled or time.monotonic() < self._down_until or self._busy or self._store is None:
                self.counts["reads_skipped"] += 1
                self._give(slots)
                if self._store is None and not self._disabled:
                    self._writer.submit(self._connect)  # not connected (yet, or again): a miss, and a try
                raise _Miss()
            self._busy = True
        state = {"returned": False, "abandoned": False}

        def run() -> Any:
            try:
                return fn(self._connected())
            finally:
                with self._lock:
                    self._busy = False
                    state["returned"] = True
                    if state["abandoned"]:
                        self._give(slots)
        future = self._reads.submit(run)
        try:
            result = future.result(self.config.remote_timeout_s)
        except cf.TimeoutError:
            with self._lock:
                state["abandoned"] = True
                if state["returned"]:
                    self._give(slots)
            self._failed("read", f"no answer within {self.config.remote_timeout_s:g} s")
            raise _Miss() from None
        except Exception as exc:  # noqa: BLE001 - whatever the client raises is a miss
            with self._lock:
                self._give(slots)
            self._failed("read", exc)
            raise _Miss() from None
        self._answered()
        return result

    def _answered(self) -> None:
        with self._lock:
            if self._backoff:
                log.warning("remote store answers again; the remote cache is back")
            self._backoff = 0.0

    def _failed(self, kind: str, exc: BaseException | str) -> None:
        if isinstance(exc, ConfigError):  # the client package is missing: no retry mends that
            self._disabled = str(exc)
            log.error("remote cache off: %s", exc)
            return
        with self._lock:
            self.counts["errors"] += 1
            if not self._backoff:
                log.warning("remote store (%s) failed a %s: %s; kvtier goes on without it and tries again",
                            self.config.remote_backend, kind, exc)
            self._backoff = min(max(2 * self._backoff, 0.25), MAX_BACKOFF_S)
            self._down_until = time.monotonic() + self._backoff

    def _take(self, n: int) -> list[int]:
        with self._lock:
            taken, self._free = self._free[:n], self._free[n:]
            return taken

    def _give(self, slots: Sequence[int]) -> None:  # with the lock held
        self._free.extend(slots)

    def _span(self, slot: int) -> np.ndarray:
        return self.buffer[slot * self.slot_bytes:(slot + 1) * self.slot_bytes]

    @property
    def up(self) -> bool:
        """Whether the store is being asked (not disabled, not backing off after a failure)."""
        return self._disabled is None and time.monotonic() >= self._down_until

    # --- down: offer ------------------------------------------------------------------------------------------------
    def offer(self, space: KVSpace, seq_id: Hashable, keys: Sequence[bytes], salt: bytes = b"",
              stream: Any = None, start: int = 0) -> int:
        """Publish ``seq_id``'s first whole blocks under ``keys`` in ``space`` (``space.publish``) and send them to
        the store (:meth:`send`). ``start``: the chain position of its first block (its keys are blocks ``start..``
        of a chain from the prompt's first token). Return what ``publish`` returns."""
        published = space.publish(seq_id, keys, salt)
        self.send(space, space.blocks(seq_id)[:len(keys)], keys, start, stream)
        return published

    def send(self, space: KVSpace, blocks: Sequence[int], keys: Sequence[bytes], start: int = 0,
             stream: Any = None) -> int:
        """Send the groups of a chain that ``blocks`` of ``space`` hold -- ``blocks[i]`` holds chain position
        ``start + i``, whose key is ``keys[i]`` -- to the store in the background, those it does not hold yet and
        that lie whole in them (the chain's last group may be short). Their bytes are copied now, on ``stream``
        (default: current) after the engine's writes, from the GPU (blocks not resident are not sent). Never
        waits: a group that finds no staging memory free is dropped. Return the groups sent."""
        if not self.up:
            return 0
        layout, per = self._layout(space)
        sent = 0
        for first, last in obj.groups(start + len(keys), per, start):
            name = _name(keys[last - start])
            if first < start or name in self._known:
                continue
            part = list(blocks[first - start:last - start + 1])
            try:
                space.check_resident(part)
            except NotResidentError:
                self.counts["puts_not_resident"] += 1
                continue
            slot = self._take(1)
            if not slot:
                self.counts["puts_dropped"] += 1  # never wait: the store is a cache
                break
            self._gather(space, part, self._span(slot[0]), stream)
            self._remember(name)
            # each object is put as soon as it is copied: its put overlaps the next one's copy
            self._write(space, [(name, list(keys[first - start:last - start + 1]), slot[0])],
                        self._fence(space, stream), layout)
            sent += 1
        return sent

    def _fence(self, space: KVSpace, stream: Any) -> Any:
        """An event after the copies queued on ``stream`` (None on the CPU, where they are done)."""
        if not space.kv(0)[0].is_cuda:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def _gather(self, space: KVSpace, blocks: Sequence[int], span: np.ndarray, stream: Any) -> None:
        """Copy ``blocks`` of every region into the payload of ``span``, queued on ``stream`` (default: current)."""
        host = torch.from_numpy(span[obj.HEADER:])
        n, bb = len(blocks), space.block_bytes
        cuda = space.kv(0)[0].is_cuda
        with torch.cuda.stream(stream) if cuda and stream is not None else _nothing():
            idx = torch.as_tensor(list(blocks), dtype=torch.int64, device=space.kv(0)[0].device)
            for layer in range(space.num_layers):
                for kv, tensor in enumerate(space.kv(layer)):
                    r = 2 * layer + kv
                    host[r * n * bb:(r + 1) * n * bb].copy_(tensor.index_select(0, idx).view(torch.uint8).view(-1),
                                                            non_blocking=cuda)

    def _write(self, space: KVSpace, batch: list[tuple[str, list[bytes], int]], copied: Any, layout: bytes) -> None:
        """Seal the objects of ``batch`` (name, keys, slot) once their copies have landed and put them in one call,
        on the write thread; not waited for."""
        regions, bb = space.num_regions, space.block_bytes
        names, slots = [name for name, _, _ in batch], [slot for _, _, slot in batch]

        def put() -> None:
            try:
                if self._disabled or time.monotonic() < self._down_until:
                    raise _Miss()
                if copied is not None:
                    copied.synchronize()
                sizes = [obj.seal(self._span(slot), keys, regions, bb, layout) for _, keys, slot in batch]
                store = self._connect()
                if store is None:
                    raise _Miss()
                done = store.put(names, [(slot * self.slot_bytes, n) for slot, n in zip(slots, sizes)])
                with self._lock:
                    self.counts["puts"] += sum(done)
                    self.counts["puts_refused"] += len(done) - sum(done)
                    self.counts["put_bytes"] += sum(n for n, ok in zip(sizes, done) if ok)
                for name, ok in zip(names, done):
                    if not ok:
                        self._forget(name)
                self._answered()
            except Exception as exc:  # noqa: BLE001 - a write that fails is dropped, whatever the client raised
                for name in names:
                    self._forget(name)
                self.counts["puts_dropped"] += len(names)
                if not isinstance(exc, _Miss):
                    self._failed("write", exc)
            finally:
                with self._lock:
                    self._give(slots)
        self._writes = [f for f in self._writes if not f.done()] + [self._writer.submit(put)]

    # --- up: find ---------------------------------------------------------------------------------------------------
    def find(self, space: KVSpace, seq_id: Hashable, keys: Sequence[bytes], stream: Any = None,
             start: int = 0) -> int:
        """Start ``seq_id`` with the longest run of ``keys[start:]`` found: in ``space`` first (``share_prefix``),
        then in the store, whose groups are read, checked, copied into fresh blocks of ``seq_id`` (on ``stream``,
        waited for) and published in ``space``. ``keys``: the chain from the prompt's first block; ``start``: the
        block ``seq_id`` starts at (the caller holds those before it). Return the tokens ``seq_id`` holds (0: a
        miss; it then holds nothing)."""
        local = space.share_prefix(seq_id, list(keys[start:]))
        have = start + local // space.block_size
        if have == len(keys) or not self.up:
            return local
        layout, per = self._layout(space)
        now = time.monotonic()
        groups = obj.groups(len(keys), per, have)
        plan = []
        for first, last in groups:  # no question first: groups absent read as absent
            if self._absent.get(_name(keys[last]), 0.0) > now:
                break
            plan.append((first, last))
        got = self._read(keys, plan) if plan else ([], [], [])
        if got is None:
            return local
        plan, slots, sizes = got
        owned = list(slots)
        try:
            whole = next((i for i, n in enumerate(sizes) if n < 0), len(sizes))
            self.counts["gets_absent"] += len(plan) - whole
            for _, last in plan[whole:]:
                self._absent[_name(keys[last])] = now + self.config.remote_negative_ttl_s
            plan, slots, sizes = plan[:whole], slots[:whole], sizes[:whole]
            part = self._part(keys, groups[whole], have) if whole < len(groups) else None
            more = self._read(keys, [part]) if part is not None else None
            if more is not None:  # the chain goes on into the first group missing: its longest part stored
                owned += more[1]
                plan, slots, sizes = plan + more[0], slots + more[1], sizes + more[2]
            if not plan:
                return local
            return self._bring_in(space, seq_id, keys, start, have, plan, slots, sizes, layout, stream)
        finally:
            with self._lock:
                self._give(owned)

    def _read(self, keys: Sequence[bytes], plan: list[tuple[int, int]]) \
            -> tuple[list[tuple[int, int]], list[int], list[int]] | None:
        """Read the groups of ``plan`` (as many as staging slots are free) in one call: (groups, their slots --
        the caller's to give back --, the sizes read, -1 for an absent one); None on a miss."""
        slots = self._take(len(plan))
        if not slots:
            self.counts["gets_no_buffer"] += 1
            return None
        plan = plan[:len(slots)]
        names = [_name(keys[last]) for _, last in plan]
        spans = [(s * self.slot_bytes, self.slot_bytes) for s in slots]
        try:
            sizes = self._call(lambda store: store.get(names, spans), slots)
        except _Miss:
            self.counts["gets_failed"] += 1
            return None
        self.counts["lookups"] += 1
        return plan, slots, sizes

    def _part(self, keys: Sequence[bytes], group: tuple[int, int], have: int) -> tuple[int, int] | None:
        """The longest stored part of ``group`` (a shorter chain's last object) past ``have``, if any."""
        first, last = group
        inside = [_name(keys[e]) for e in range(max(first, have), last)]
        try:
            found = self._exists(inside) if inside else set()
        except _Miss:
            return None
        ends = [e for e in range(last - 1, max(first, have) - 1, -1) if _name(keys[e]) in found]
        return (first, ends[0]) if ends else None

    def _exists(self, names: list[str]) -> set[str]:
        """Which of ``names`` the store holds: those known to be there, and those it says it has now (a name it
        says it lacks is not asked for again for ``remote_negative_ttl_s``)."""
        now = time.monotonic()
        ask = [n for n in names if self._absent.get(n, 0.0) <= now and n not in self._known]
        found = self._call(lambda store: store.exists(ask), ()) if ask else []
        for n, f in zip(ask, found):
            if not f:
                self._absent[n] = now + self.config.remote_negative_ttl_s
        if len(self._absent) > KNOWN_KEYS:
            self._absent = {n: t for n, t in self._absent.items() if t > now}
        return {n for n, f in zip(ask, found) if f} | {n for n in names if n in self._known}

    def _bring_in(self, space: KVSpace, seq_id: Hashable, keys: Sequence[bytes], start: int, have: int,
                  plan: list[tuple[int, int]], slots: list[int], sizes: list[int], layout: bytes,
                  stream: Any) -> int:
        regions, bb, bs = space.num_regions, space.block_bytes, space.block_size
        good = []
        for (first, last), slot, size in zip(plan, slots, sizes):
            why = "absent" if size < 0 else obj.check(self._span(slot), size, list(keys[first:last + 1]), regions,
                                                       bb, layout)
            if why is not None:
                self.counts["gets_absent" if size < 0 else "gets_bad"] += 1
                if size >= 0:
                    log.warning("remote object for blocks %d..%d is not served: %s", first, last, why)
                break
            good.append((first, last, slot))
        if not good:
            return (have - start) * bs
        total = good[-1][1] + 1
        try:
            blocks = space.allocate(seq_id, (total - start) * bs)[have - start:]
        except KVTierError as exc:  # no room for them now: the engine computes them
            self.counts["gets_no_room"] += 1
            log.info("remote hit of %d blocks not taken: %s", total - have, exc)
            return (have - start) * bs
        self._scatter(space, blocks, have, good, stream)
        space.publish(seq_id, list(keys[start:total]))
        with self._lock:
            self.counts["hit_blocks"] += total - have
            self.counts["hit_bytes"] += (total - have) * bb * regions
        for _, last, _ in good:
            self._remember(_name(keys[last]))
        return (total - start) * bs

    def _scatter(self, space: KVSpace, blocks: list[int], have: int, good: list[tuple[int, int, int]],
                 stream: Any) -> None:
        """Copy the checked groups' blocks from ``have`` on into ``blocks``, every region; waited for."""
        bb, dev = space.block_bytes, space.kv(0)[0].device
        cuda = dev.type == "cuda"
        with torch.cuda.stream(stream) if cuda and stream is not None else _nothing():
            at = 0
            for start, last, slot in good:
                n, skip = last - start + 1, max(0, have - start)
                host = torch.from_numpy(self._span(slot)[obj.HEADER:])
                mine = blocks[at:at + n - skip]
                run = mine[-1] - mine[0] == len(mine) - 1  # consecutive (as fresh blocks mostly are): one copy
                idx = torch.as_tensor(mine, dtype=torch.int64, device=dev)
                for layer in range(space.num_layers):
                    for kv, tensor in enumerate(space.kv(layer)):
                        r = 2 * layer + kv
                        src = host[(r * n + skip) * bb:(r + 1) * n * bb].view(tensor.dtype)
                        src = src.view(n - skip, *tensor.shape[1:])
                        if run:
                            tensor[mine[0]:mine[-1] + 1].copy_(src, non_blocking=cuda)
                        else:
                            tensor.index_copy_(0, idx, src.to(dev, non_blocking=cuda))
                at += n - skip
            if cuda:
                torch.cuda.current_stream(dev).synchronize()  # the staging memory goes back after this

    # --- books ------------------------------------------------------------------------------------------------------
    def _layout(self, space: KVSpace) -> tuple[bytes, int]:
        return obj.layout_id(space.layout_tag), obj.group_blocks(space.block_bytes, space.num_regions,
                                                                 self.config.remote_object_bytes)

    def _remember(self, name: str) -> None:
        with self._lock:
            self._known[name] = None
            self._known.move_to_end(name)
            if len(self._known) > KNOWN_KEYS:
                self._known.popitem(last=False)

    def _forget(self, name: str) -> None:
        with self._lock:
            self._known.pop(name, None)

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait for the first connection to the store (made in the background from the start; lookups before it
        are misses); whether there is one."""
        try:
            self._connecting.result(timeout)
        except cf.TimeoutError:
            pass
        return self._store is not None

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for the writes under way (tests, and before a planned exit); whether all are done."""
        done, pending = cf.wait(list(self._writes), timeout)
        return not pending

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"backend": self.config.remote_backend, "up": self.up, "disabled": self._disabled,
                    "staging_free": len(self._free), **dict(self.counts)}

    def close(self) -> None:
        """Stop: writes under way finish (waited for up to ``remote_put_timeout_s``), then the store is let go. A
        call stuck in the store's client past that keeps its thread (a daemon) and the client is left open."""
        stuck = not self.flush(self.config.remote_put_timeout_s)
        for worker in (self._writer, self._reads):
            stuck |= not worker.stop(0 if stuck else self.config.remote_timeout_s)
        if stuck:
            log.warning("remote store: a call is still under way at close; its client is left open")
        elif self._store is not None:
            try:
                self._store.close()
            except Exception as exc:  # noqa: BLE001 - a store gone away must not fail the manager's close
                log.warning("remote store: close failed: %s", exc)
            self._store = None


def _name(key: bytes) -> str:
    return "kvtier/" + key.hex()


class _Worker:
    """One daemon thread running submitted calls in order (a call stuck in a store's client must not hold up the
    interpreter's exit, as an executor's thread would)."""

    def __init__(self, name: str) -> None:
        self._queue: queue.Queue[tuple[Callable[[], Any], cf.Future[Any]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any]) -> cf.Future[Any]:
        future: cf.Future[Any] = cf.Future()
        self._queue.put((fn, future))
        return future

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                    future.set_exception(exc)

    def stop(self, timeout: float) -> bool:
        """Ask the thread to end after what is queued; whether it did within ``timeout`` seconds."""
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
