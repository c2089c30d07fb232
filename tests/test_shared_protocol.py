"""The shared cache's wire format, and a server that trusts no message.

Messages round-trip; every parser refuses what is not exactly a message; a frame reader refuses
oversized and unfinished frames. Against a running server: random bytes, random frames, truncated and
oversized frames, and ids a connection was never given (another connection's included) close that
connection only. The server keeps serving every other client, and nothing a bad connection took stays
pinned or reserved.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachetest import CHUNK, prefix_kv
from kvtest import wait_until
from lmcache.cache_records import CacheStats, Lease
from lmcache.errors import ProtocolError
from lmcache.shared import CacheServer, SharedChunkCache, connect, protocol
from lmcache.shared.protocol import HEADER, MAX_BODY, NO_LIMIT, FrameReader, Op, Reply, Welcome
from sharedtest import metadata, socket_dir

SLOTS = 16
PROMPT = list(range(2 * CHUNK + 3))
Good = tuple[SharedChunkCache, Lease]


# -- messages ------------------------------------------------------------------------------------------
def test_every_message_round_trips() -> None:
    keys = [bytes([i]) * 16 for i in range(3)]
    assert protocol.parse_prompt(protocol.prompt_body(40, keys), 16, with_limit=False) == (40, keys, NO_LIMIT)
    assert protocol.parse_prompt(protocol.prompt_body(40, keys, 17), 16, with_limit=True) == (40, keys, 17)
    assert protocol.parse_id(protocol.id_body(9, 2), with_count=True) == (9, 2)
    assert protocol.parse_id(protocol.id_body(9), with_count=False) == (9, 0)
    assert protocol.parse_reserved(protocol.reserved_body(5, 1, [7, 3])) == (5, 1, [7, 3])
    assert protocol.parse_pinned(protocol.pinned_body(6, [(1, 16), (4, 3)])) == (6, [(1, 16), (4, 3)])
    assert protocol.parse_count(protocol.count_body(2**63)) == 2**63
    stats = CacheStats(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13)
    assert CacheStats(**protocol.parse_stats(protocol.stats_body(stats))) == stats
    welcome = Welcome(b"i" * 16, (2, 2, 16, 2, 8), "bfloat16", 256, 2048, 100)
    assert Welcome.decode(welcome.encode()) == welcome


@pytest.mark.parametrize(
    ("parse", "body"),
    [
        (lambda b: protocol.parse_prompt(b, 16, with_limit=False), b"\x01"),
        (lambda b: protocol.parse_prompt(b, 16, with_limit=False), struct.pack("<Q", 40) + b"k" * 40),
        (lambda b: protocol.parse_prompt(b, 16, with_limit=False), struct.pack("<Q", 40) + b"k" * 16),
        (lambda b: protocol.parse_prompt(b, 16, with_limit=False), struct.pack("<Q", 2**64 - 1)),
        (lambda b: protocol.parse_prompt(b, 16, with_limit=True), struct.pack("<Q", 0)),
        (lambda b: protocol.parse_id(b, with_count=True), b"\x00" * 4),
        (lambda b: protocol.parse_id(b, with_count=False), b"\x00" * 5),
        (protocol.parse_empty, b"x"),
        (protocol.parse_reserved, struct.pack("<III", 1, 0, 3) + b"\x00" * 8),
        (protocol.parse_pinned, struct.pack("<I", 1) + b"\x00" * 4),
        (protocol.parse_count, b"\x00" * 7),
        (protocol.parse_stats, b"\x00" * 8),
        (Welcome.decode, b"LMCS"),
        (
            Welcome.decode,
            Welcome(b"i" * 16, (1, 1, 1, 1, 1), "int8", 256, 256, 1).encode().replace(b"LMCS", b"XXXX"),
        ),
        (Welcome.decode, Welcome(b"i" * 16, (1, 1, 1, 1, 1), "int8", 256, 256, 1, version=99).encode()),
    ],
)
def test_parsers_refuse_what_is_not_a_message(parse: object, body: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse(body)  # type: ignore[operator]


def test_frame_reader_refuses_oversized_and_unfinished_frames() -> None:
    left, right = socket.socketpair()
    with left, right:
        reader = FrameReader(left)
        right.sendall(HEADER.pack(MAX_BODY + 1, 1, Op.LOOKUP))
        with pytest.raises(ProtocolError, match="exceeds"):
            reader.read(time.monotonic() + 5)
    left, right = socket.socketpair()
    with left, right:
        reader = FrameReader(left)
        right.sendall(HEADER.pack(10, 1, Op.LOOKUP) + b"abc")
        with pytest.raises(TimeoutError):
            reader.read(time.monotonic() + 0.05)  # the partial frame is kept
        right.sendall(b"defghij")
        assert reader.read(time.monotonic() + 5) == (1, Op.LOOKUP, b"abcdefghij")
        right.sendall(HEADER.pack(10, 2, Op.LOOKUP) + b"abc")
        with pytest.raises(ProtocolError, match="middle of a frame"):
            reader.read(None, frame_timeout=0.05)
    left, right = socket.socketpair()
    with left:
        reader = FrameReader(left)
        right.sendall(HEADER.pack(10, 1, Op.LOOKUP) + b"abc")
        right.close()
        with pytest.raises(ConnectionError):
            reader.read(time.monotonic() + 5)


# -- a server under hostile input ----------------------------------------------------------------------
class _Errors(logging.Handler):
    """Records the server's ERROR log lines: an internal error serving a client (a bug)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


ERRORS = _Errors()


@pytest.fixture(scope="module")
def server() -> Iterator[CacheServer]:
    logger = logging.getLogger("lmcache.shared")
    logger.addHandler(ERRORS)
    try:
        with (
            socket_dir() as directory,
            CacheServer(os.path.join(directory, "s.sock"), metadata(SLOTS)) as running,
        ):
            yield running
    finally:
        logger.removeHandler(ERRORS)


@pytest.fixture(scope="module")
def good(server: CacheServer) -> Iterator[tuple[SharedChunkCache, Lease]]:
    """A well-behaved client, and a lease it holds through every hostile test."""
    with connect(server.socket_path) as client:
        assert client.store(PROMPT, prefix_kv(PROMPT)) == len(PROMPT)
        with client.lease(PROMPT) as lease:
            yield client, lease


def _raw(server: CacheServer) -> tuple[socket.socket, FrameReader]:
    """A connection that has read the welcome (its descriptor closed)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(server.socket_path)
    reader = FrameReader(sock, accept_fds=True)
    _, op, _ = reader.read(time.monotonic() + 5)
    assert op == Reply.WELCOME
    for fd in reader.take_fds():
        os.close(fd)
    return sock, reader


def _closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closes ``sock`` (without a reply) within 5 seconds."""
    sock.settimeout(5)
    try:
        return sock.recv(1 << 16) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _still_serving(server: CacheServer, good: Good) -> None:
    """Every bad connection is gone, nothing it took is held, and the good client is served as before."""
    client, lease = good
    assert wait_until(lambda: server.clients == 1, 10)
    assert not ERRORS.lines, "the server hit an internal error serving a client"
    stats = client.stats()
    assert (stats.pinned, stats.leased, stats.errors) == (3, 3, 0)  # only the good client's lease
    assert server.cache.pool.stats().used == stats.chunks  # no slot reserved by anyone
    assert all(obj.is_live for obj in lease.chunks)
    assert client.lookup(PROMPT) == len(PROMPT)


def _prompt_frame(op: int, num_tokens: int, count: int) -> bytes:
    return protocol.frame(1, op, struct.pack("<Q", num_tokens) + os.urandom(16 * count))


INVALID = {
    "unknown opcode": protocol.frame(1, 0x42, b""),
    "reply opcode": protocol.frame(1, Reply.COUNT, b"\x00" * 8),
    "oversized": HEADER.pack(MAX_BODY + 1, 1, Op.LOOKUP),
    "huge length": HEADER.pack(2**32 - 1, 1, Op.LOOKUP),
    "half a key": protocol.frame(1, Op.LOOKUP, struct.pack("<Q", 16) + b"k" * 8),
    "keys do not fit the tokens": _prompt_frame(Op.LEASE, 100, 2),
    "no keys for the tokens": _prompt_frame(Op.BEGIN_STORE, 5, 0),
    "a pin without its limit": protocol.frame(1, Op.PIN, struct.pack("<Q", 16) + b"k" * 16),
    "stats with a body": protocol.frame(1, Op.STATS, b"x"),
    "commit of a reservation never given": protocol.frame(1, Op.COMMIT, protocol.id_body(1, 0)),
    "release of a lease never given": protocol.frame(1, Op.RELEASE, protocol.id_body(7)),
    "abort of a reservation never given": protocol.frame(1, Op.ABORT, protocol.id_body(3)),
    "release of id 0": protocol.frame(1, Op.RELEASE, protocol.id_body(0)),
}


@pytest.mark.parametrize("frame", list(INVALID.values()), ids=list(INVALID))
def test_an_invalid_frame_closes_that_connection_only(server: CacheServer, good: Good, frame: bytes) -> None:
    sock, _ = _raw(server)
    with sock:
        sock.sendall(frame)
        assert _closed_by_server(sock)
    _still_serving(server, good)


def test_a_valid_request_then_garbage_gives_back_what_was_granted(server: CacheServer, good: Good) -> None:
    sock, reader = _raw(server)
    keys = good[0].keys(PROMPT + [1] * CHUNK)
    with sock:
        sock.sendall(protocol.frame(1, Op.BEGIN_STORE, protocol.prompt_body(len(PROMPT) + CHUNK, keys)))
        _, op, body = reader.read(time.monotonic() + 5)
        assert op == Reply.RESERVED
        _, cached, slots = protocol.parse_reserved(body)
        assert (cached, len(slots)) == (2, 2)
        sock.sendall(protocol.frame(2, Op.LEASE, protocol.prompt_body(len(PROMPT), keys[:3])))
        _, op, body = reader.read(time.monotonic() + 5)
        assert op == Reply.PINNED
        assert len(protocol.parse_pinned(body)[1]) == 2  # the two chunks both prompts share
        assert server.cache.pool.stats().used == 5  # three cached, two reserved
        sock.sendall(b"\xff" * 64)
        assert _closed_by_server(sock)
    _still_serving(server, good)


def test_another_connections_ids_are_refused(server: CacheServer, good: Good) -> None:
    owner, owner_reader = _raw(server)
    thief, _ = _raw(server)
    tokens = [31_000 + i for i in range(CHUNK)]
    keys = good[0].keys(tokens)
    with owner, thief:
        owner.sendall(protocol.frame(1, Op.BEGIN_STORE, protocol.prompt_body(CHUNK, keys)))
        _, op, body = owner_reader.read(time.monotonic() + 5)
        assert op == Reply.RESERVED
        ident, _, _ = protocol.parse_reserved(body)
        thief.sendall(protocol.frame(1, Op.COMMIT, protocol.id_body(ident, 1)))
        assert _closed_by_server(thief)
        owner.sendall(protocol.frame(2, Op.COMMIT, protocol.id_body(ident, 1)))  # still the owner's
        _, op, body = owner_reader.read(time.monotonic() + 5)
        assert (op, protocol.parse_count(body)) == (Reply.COUNT, CHUNK)
    assert good[0].lookup(tokens) == CHUNK
    _still_serving(server, good)


frames = st.one_of(
    st.binary(max_size=256),  # anything at all
    st.builds(  # a well-formed header around any opcode and body
        lambda op, body: protocol.frame(1, op, body), st.integers(0, 255), st.binary(max_size=200)
    ),
    st.builds(  # a header promising more than it sends (the connection then ends)
        lambda op, length, body: HEADER.pack(length, 1, op) + body,
        st.sampled_from(list(Op)),
        st.integers(1, 4096),
        st.binary(max_size=64),
    ),
    st.builds(  # ids this connection was never given
        lambda op, ident, count: protocol.frame(
            1, op, protocol.id_body(ident, count if op == Op.COMMIT else None)
        ),
        st.sampled_from([Op.COMMIT, Op.RELEASE, Op.ABORT]),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
    ),
)


@settings(max_examples=150, deadline=None)
@given(chunks=st.lists(frames, min_size=1, max_size=4))
def test_fuzzed_frames_never_hurt_the_server(server: CacheServer, good: Good, chunks: list[bytes]) -> None:
    sock, _ = _raw(server)
    with sock:
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):  # closed on an earlier one: as it should
                break
    _still_serving(server, good)
