"""Valkey's wire protocol as kvtier speaks it (``kvtier.valkey_wire``): SETs sent from the staging buffer and MGET
replies received into it, against a real server on 127.0.0.1; and, from a fake server at the edge, replies that
stop in the middle of a value, come in another shape or never come -- each an OSError, the connection closed and
the next call on a new one, never a wrong byte."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from kvtier.remote_store import ValkeyStore
from kvtier.valkey_wire import Connection, WireError
from tests.stores import START

MiB = 1 << 20


@pytest.fixture
def valkey_server():
    server = START["valkey"]()
    yield server
    server.stop()


def test_values_go_out_of_and_come_back_into_the_buffer_byte_for_byte(valkey_server):
    rng = np.random.default_rng(0)
    buffer = np.zeros(16 * MiB, dtype=np.uint8)
    sizes = [0, 1, 65535, 65536, 65537, 3 * MiB + 7]  # empty, around the framing reads, larger than they are
    spans = [(off, n) for off, n in zip([0, MiB, 2 * MiB, 3 * MiB, 4 * MiB, 8 * MiB], sizes)]
    values = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    for (off, n), v in zip(spans, values):
        buffer[off:off + n] = v
    conn = Connection("127.0.0.1", valkey_server.port, 5.0)
    try:
        # 1. six values of every awkward size, pipelined from views of the buffer
        keys = [f"wire/{i}" for i in range(len(sizes))]
        assert conn.set_many(keys, [memoryview(buffer[off:off + n]) for off, n in spans]) == [True] * len(sizes)
        # 2. read back into a clean buffer, between an absent key and one whose span is too small
        back = np.full(16 * MiB, 0xAB, dtype=np.uint8)
        ask = ["wire/absent"] + keys + ["wire/5"]
        room = [(12 * MiB, MiB)] + spans + [(15 * MiB, MiB)]  # the last: 1 MiB of room for a 3 MiB value
        assert conn.mget_into(ask, back, room) == [-1] + sizes + [-1]
        for (off, n), v in zip(spans, values):
            assert np.array_equal(back[off:off + n], v)
        assert (back[15 * MiB:] == 0xAB).all()  # the value too large was read past, not written
        # 3. the connection is still in step: the same read again gives the same; nothing asked, nothing sent
        assert conn.mget_into(keys[:2], back, spans[:2]) == sizes[:2]
        assert conn.mget_into([], back, []) == [] and conn.set_many([], []) == []
        assert conn.mget_into(keys[:1], back, spans[:1]) == sizes[:1]
    finally:
        conn.close()


def test_the_store_keeps_one_connection_a_thread_and_replaces_a_broken_one(valkey_server):
    buffer = np.arange(4 * MiB, dtype=np.uint64).view(np.uint8)[:4 * MiB].copy()
    store = ValkeyStore(f"127.0.0.1:{valkey_server.port}", buffer, 5.0)
    try:
        # 1. each thread's calls use its own connection
        out: dict[int, list[int]] = {}

        def worker(i: int) -> None:
            assert store.put([f"t/{i}"], [(i * MiB, MiB)]) == [True]
            out[i] = store.get([f"t/{i}"], [(i * MiB, MiB)])
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert store.get(["t/1"], [(0, MiB)]) == [MiB] and np.array_equal(buffer[:MiB], buffer[MiB:2 * MiB])
        assert out == {0: [MiB], 1: [MiB], 2: [MiB]} and len(store._conns) == 4  # and this thread's
        # 2. the server drops every connection: the next call fails once, clearly, and the one after reconnects
        valkey_server.restart()
        with pytest.raises(OSError):
            for _ in range(2):  # the first write may still be taken by the kernel's buffers
                store.get(["t/0"], [(0, MiB)])
        assert store.get(["t/0"], [(0, MiB)]) == [-1]  # restarted empty: a miss, on a new connection
    finally:
        store.close()
    assert not store._conns


class _FakeServer:
    """A TCP server at the edge that reads a request and answers ``reply`` bytes, then closes (or, with
    ``reply=None``, says nothing and holds the connection)."""

    def __init__(self, reply: bytes | None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.recv(1 << 16)
            if self.reply is None:
                time.sleep(3)
                return
            conn.sendall(self.reply)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


@pytest.mark.parametrize("reply, why", [
    (b"*2\r\n$100\r\n" + b"x" * 10, "closed the connection in the middle of a value"),  # the server died mid-value
    (b"-ERR unknown command\r\n", "MGET answered"),  # not an array
    (b"*1\r\n$3\r\nabc\r\n", "MGET answered"),  # another number of values
    (b"*2\r\n$3\r\nabc\r\n", "closed the connection"),  # fewer values than it said
    (b"*2\r\n:12\r\n", "came as"),  # a value of another type
    (b"*2\r\n$3\r\nabcdef\r\n", "longer than its length"),  # the value runs past its length
])
def test_a_reply_cut_short_or_of_another_shape_is_an_oserror(reply, why):
    server = _FakeServer(reply)
    conn = Connection("127.0.0.1", server.port, 2.0)
    buffer = np.zeros(1024, dtype=np.uint8)
    try:
        with pytest.raises(WireError, match=why):
            conn.mget_into(["k", "k2"], buffer, [(0, 512), (512, 512)])
    finally:
        conn.close()
        server.close()


def test_a_server_that_never_answers_times_out_at_the_deadline():
    server = _FakeServer(None)
    conn = Connection("127.0.0.1", server.port, 0.5)
    start = time.monotonic()
    try:
        with pytest.raises(OSError):
            conn.mget_into(["k"], np.zeros(16, dtype=np.uint8), [(0, 16)])
        assert time.monotonic() - start < 2.5
    finally:
        conn.close()
        server.close()
