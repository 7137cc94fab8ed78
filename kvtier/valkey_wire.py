"""Valkey's wire protocol (RESP2) for the two calls that move KV: a pipelined SET from the staging buffer and an
MGET read straight into it.

Why by hand: the client library hands every value over as a new Python ``bytes`` (its parser copies it out of
its read buffer), which kvtier then copies again into pinned staging. Here values leave from, and land in, the
staging memory itself: the payload of a SET is sent from a view of it, and the payload of each MGET reply is
received into it with ``recv_into``. Measured on the CPU machine (loopback, 8 objects of 8 MiB): the client's
MGET 61 ms, this one 25 ms, the same bytes. Everything else (EXISTS, SCAN, DEL) stays with the client.

A connection whose reply was not read to its end (a timeout, a server gone mid-value, a reply not of the shape
asked for) is closed, never reused: the next call opens a new one. Every failure is an ``OSError``.
"""

from __future__ import annotations

import socket
from typing import Sequence

import numpy as np

CRLF = b"\r\n"
_RECV = 1 << 16  # what one read of a reply's framing asks for (values past it are received in place)


class WireError(OSError):
    """The server answered something other than what was asked for; the connection is closed."""


class Connection:
    """One TCP connection to a Valkey (or Redis) server, for one thread at a time."""

    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self._sock = socket.create_connection((host, port), timeout=timeout_s)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()  # received, not yet parsed

    def close(self) -> None:
        self._sock.close()

    # --- the two calls ------------------------------------------------------------------------------------------
    def set_many(self, keys: Sequence[str], views: Sequence[memoryview]) -> list[bool]:
        """SET each key to its view's bytes, pipelined; whether each was stored (an error reply, e.g. the server's
        maxmemory refusing it, is False)."""
        for key, view in zip(keys, views):
            k = key.encode()
            self._sock.sendall(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(k), k, len(view)))
            self._sock.sendall(view)
            self._sock.sendall(CRLF)
        return [self._line().startswith(b"+") for _ in keys]

    def mget_into(self, keys: Sequence[str], buffer: np.ndarray, spans: Sequence[tuple[int, int]]) -> list[int]:
        """MGET the keys; each value is received into the start of its span ``(offset, nbytes)`` of ``buffer``.
        The values' sizes, -1 for an absent key or a value larger than its span (read past, not kept)."""
        if not keys:
            return []  # an MGET of nothing is an error reply
        self._sock.sendall(b"*%d\r\n$4\r\nMGET\r\n" % (len(keys) + 1)
                           + b"".join(b"$%d\r\n%s\r\n" % (len(k), k) for k in (key.encode() for key in keys)))
        head = self._line()
        if head != b"*%d" % len(keys):
            raise WireError(f"valkey: MGET answered {head[:80]!r}")
        out = buffer.reshape(-1).view(np.uint8).data
        sizes = []
        for off, n in spans:
            line = self._line()
            if not line.startswith(b"$"):
                raise WireError(f"valkey: a value of MGET came as {line[:80]!r}")
            size = int(line[1:])
            if size < 0:
                sizes.append(-1)
                continue
            self._value_into(out[off:off + size] if size <= n else None, size)
            sizes.append(size if size <= n else -1)
        return sizes

    # --- reading replies ----------------------------------------------------------------------------------------
    def _fill(self) -> None:
        chunk = self._sock.recv(_RECV)
        if not chunk:
            raise WireError("valkey: the server closed the connection")
        self._buf += chunk

    def _line(self) -> bytes:
        while (end := self._buf.find(CRLF)) < 0:
            self._fill()
        line = bytes(self._buf[:end])
        del self._buf[:end + 2]
        return line

    def _value_into(self, dst: memoryview | None, size: int) -> None:
        """The next ``size`` bytes of the reply and their CRLF: into ``dst``, or read past if None."""
        have = min(len(self._buf), size)
        if dst is not None:
            dst[:have] = self._buf[:have]
        del self._buf[:have]
        got = have
        scratch = None if dst is not None else memoryview(bytearray(min(size, 1 << 20)))
        while got < size:
            if dst is not None:
                n = self._sock.recv_into(dst[got:size])
            else:
                assert scratch is not None
                n = self._sock.recv_into(scratch[:size - got])
            if n == 0:
                raise WireError("valkey: the server closed the connection in the middle of a value")
            got += n
        while len(self._buf) < 2:
            self._fill()
        if self._buf[:2] != CRLF:
            raise WireError("valkey: a value longer than its length")
        del self._buf[:2]
