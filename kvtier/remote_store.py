"""The stores a remote cache speaks to: Valkey (or Redis) and Mooncake Store, behind one small protocol.

A store holds byte values under string keys for several processes and machines; kvtier uses it as a cache, never
as the truth (see :mod:`kvtier.remote`). Calls block on the network: :class:`~kvtier.remote.RemoteCache` makes
them from its own threads, with a deadline, and treats every error as a miss.

Values move between the store and kvtier's host staging buffer in place: Mooncake's client reads and writes it
(registered once, ``batch_put_from``/``batch_get_into``); for Valkey, :mod:`kvtier.valkey_wire` sends SETs from it
and receives MGET replies into it (pipelined; the client library would go through Python bytes).

Each backend's package is imported when it is opened: ``pip install valkey`` (any Valkey or Redis server), or
``mooncake-transfer-engine-non-cuda`` (the CUDA builds where they fit) with its master, ``mooncake_master``.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import Any, Protocol, Sequence

import numpy as np

from kvtier.errors import ConfigError
from kvtier.valkey_wire import Connection

log = logging.getLogger(__name__)


class RemoteStore(Protocol):
    """Bytes under keys, shared. ``buffer`` is the host staging memory (a uint8 numpy array) every view passed to
    ``put``/``get`` lies in, as ``(offset, nbytes)``. Every call raises ``OSError`` when the store cannot be asked.

    - ``put(keys, spans) -> list[bool]``: store each span under its key (a key stored already is fine).
    - ``get(keys, spans) -> list[int]``: read each value into the start of its span; the value's size, or -1
      (absent, or larger than the span).
    - ``exists(keys) -> list[bool]``.
    - ``remove_prefix(prefix) -> int``: remove every key that starts with ``prefix`` (read leases too); how many.
    - ``close()``: let go of the connection (and the buffer's registration).
    """

    def put(self, keys: Sequence[str], spans: Sequence[tuple[int, int]]) -> list[bool]: ...

    def get(self, keys: Sequence[str], spans: Sequence[tuple[int, int]]) -> list[int]: ...

    def exists(self, keys: Sequence[str]) -> list[bool]: ...

    def remove_prefix(self, prefix: str) -> int: ...

    def close(self) -> None: ...


def _host_port(address: str, default_port: int) -> tuple[str, int]:
    host, _, port = address.rpartition(":") if ":" in address else (address, "", str(default_port))
    try:
        return host, int(port)
    except ValueError:
        raise ConfigError(f"remote address {address!r}: expected host:port") from None


class ValkeyStore:
    """A Valkey or Redis server: pipelined SET and MGET on a connection of each calling thread's own (values
    straight from and into the staging buffer), the rest through the client; socket timeouts at the deadline."""

    def __init__(self, address: str, buffer: np.ndarray, timeout_s: float) -> None:
        try:
            import valkey
        except ImportError:
            raise ConfigError("remote_backend = valkey needs the valkey client: pip install valkey") from None
        host, port = _host_port(address, 6379)
        self.buffer = buffer
        self._client = valkey.Valkey(host=host, port=port, socket_timeout=timeout_s,
                                     socket_connect_timeout=timeout_s)
        self._errors: tuple[type[BaseException], ...] = (valkey.exceptions.ValkeyError,)
        self._address, self._timeout_s = (host, port), timeout_s
        self._local = threading.local()  # .conn: this thread's Connection
        self._lock = threading.Lock()
        self._conns: set[Connection] = set()  # every one open, for close()

    def _wire(self, fn: Any) -> Any:
        """``fn(connection)`` on this thread's connection (opened on first use); a call that fails closes it."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = Connection(*self._address, self._timeout_s)
            self._local.conn = conn
            with self._lock:
                self._conns.add(conn)
        try:
            return fn(conn)
        except (OSError, ValueError) as exc:  # timeouts, a reset, a reply not of the shape asked for
            self._local.conn = None
            with self._lock:
                self._conns.discard(conn)
            conn.close()
            raise OSError(f"valkey: {exc}") from exc

    def _call(self, fn: Any) -> Any:
        try:
            return fn()
        except self._errors as exc:  # connection refused, timeouts, server errors (OOM under maxmemory...)
            raise OSError(f"valkey: {exc}") from exc

    def put(self, keys: Sequence[str], spans: Sequence[tuple[int, int]]) -> list[bool]:
        views = [self.buffer[off:off + n].data for off, n in spans]
        return list(self._wire(lambda conn: conn.set_many(keys, views)))

    def get(self, keys: Sequence[str], spans: Sequence[tuple[int, int]]) -> list[int]:
        return list(self._wire(lambda conn: conn.mget_into(keys, self.buffer, spans)))

    def exists(self, keys: Sequence[str]) -> list[bool]:
        def go() -> list[bool]:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(key)
            return [r == 1 for r in pipe.execute(raise_on_error=False)]
        return self._call(go)

    def remove_prefix(self, prefix: str) -> int:
        def go() -> int:
            removed, batch = 0, []
            for key in self._client.scan_iter(match=prefix.replace("*", "\\*") + "*", count=1000):
                batch.append(key)
                if len(batch) == 1000:
                    removed += int(self._client.delete(*batch))  # type: ignore[arg-type]  # sync client
                    batch = []
            return removed + (int(self._client.delete(*batch)) if batch else 0)  # type: ignore[arg-type]
        return int(self._call(go))

    def close(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            conn.close()
        self._client.close()


class MooncakeStore:
    """A Mooncake Store client (``MooncakeDistributedStore``) over TCP, its master's address given: the staging
    buffer is registered once and values move in place."""

    def __init__(self, address: str, master: str, buffer: np.ndarray, segment_bytes: int) -> None:
        os.environ.setdefault("GLOG_minloglevel", "2")  # its native logging is loud at INFO
        try:
            from mooncake.store import MooncakeDistributedStore
        except ImportError as exc:
            raise ConfigError("remote_backend = mooncake needs Mooncake's client: pip install "
                              f"mooncake-transfer-engine-non-cuda (or a CUDA build); {exc}") from None
        self.buffer = buffer
        self._store = MooncakeDistributedStore()
        rc = self._store.setup(address, "P2PHANDSHAKE", segment_bytes, 16 << 20, "tcp", "", master)
        if rc != 0:
            raise OSError(f"mooncake: setup with the master at {master} failed (code {rc}); is mooncake_master "
                          "running there?")
        self._base = buffer.ctypes.data
        rc = self._store.register_buffer(self._base, buffer.nbytes)
        if rc != 0:
            self._store.close()
            raise OSError(f"mooncake: registering the staging buffer failed (code {rc})")

    def put(self, keys: Sequence[str], spans: Sequence[tuple[int, int]]) -> list[bool]:
        codes = self._store.batch_put_from(list(keys), [self._base + o for o, _ in spans], [n for _, n in spans])
        return [c == 0 for c in codes]

    def get(self, keys: Sequence[str], spans: Sequence[tuple[int, int]]) -> list[int]:
        got = self._store.batch_get_into(list(keys), [self._base + o for o, _ in spans], [n for _, n in spans])
        return [int(g) if g >= 0 else -1 for g in got]

    def exists(self, keys: Sequence[str]) -> list[bool]:
        return [c == 1 for c in self._store.batch_is_exist(list(keys))]

    def remove_prefix(self, prefix: str) -> int:
        # force: a key read in the last lease period (10 s by default) is removed too (it answers -706 otherwise)
        removed = self._store.remove_by_regex("^" + re.escape(prefix), True)
        if removed < 0:
            raise OSError(f"mooncake: remove_by_regex failed (code {removed})")
        return int(removed)

    def close(self) -> None:
        self._store.unregister_buffer(self._base)
        self._store.close()


def open_store(config: Any, buffer: np.ndarray) -> RemoteStore:
    """The store ``config.remote_backend`` names, connected (raises OSError where it cannot be reached)."""
    if config.remote_backend == "valkey":
        return ValkeyStore(config.remote_address, buffer, config.remote_timeout_s)
    if config.remote_backend == "mooncake":
        return MooncakeStore(config.remote_address, config.remote_master, buffer, config.remote_segment)
    raise ConfigError(f"remote_backend {config.remote_backend!r}: expected valkey or mooncake")
