"""The shared cache's wire format: small ``struct``-packed frames on a Unix socket, never chunk bytes.

Every frame is a 9-byte header, ``<IIB``: the body's length, a sequence number and an opcode, then the
body. A client numbers its requests; the server answers each request (but :data:`Op.RELEASE` and
:data:`Op.ABORT`, which have no answer) with a reply that carries the request's number, in order, so a
client that gave up waiting for a reply (a timeout) recognizes it when it arrives later and gives back
what it granted. Bodies are at most
:data:`MAX_BODY` bytes; a prompt is sent as its chunk keys (16 bytes each, at most :data:`MAX_KEYS`).

Requests (client to server) and their replies:

========================  ===================================  ======================================
request                   body                                 reply
========================  ===================================  ======================================
``LOOKUP``                tokens ``Q``, keys                   ``COUNT`` (tokens hit)
``BEGIN_STORE``           tokens ``Q``, keys                   ``RESERVED`` (id, cached, slots)
``STORE``                 tokens ``Q``, keys                   ``RESERVED``, or ``COUNT`` (tokens
                                                               cached) when there is nothing to fill
``COMMIT``                reservation id ``I``, count ``I``    ``COUNT`` (tokens cached after)
``LEASE``                 tokens ``Q``, keys                   ``PINNED`` (id, (slot, tokens)...)
``PIN``                   tokens ``Q``, limit ``Q``, keys      ``PINNED``, or ``TOO_LONG`` (tokens)
``RELEASE``               lease id ``I``                       none
``ABORT``                 reservation id ``I``                 none
``STATS``                 empty                                ``STATS`` (the counters, ``Q`` each)
``CLEAR``                 empty                                ``COUNT`` (chunks dropped)
========================  ===================================  ======================================

``REFUSED`` (a per-connection limit) and ``FAILED`` (the server could not serve a valid request) carry
a message and answer any request. The server opens every connection with ``WELCOME`` (:class:`Welcome`),
sent with the arena's file descriptor (``SCM_RIGHTS``).

Decoders check every length and count and raise :class:`~lmcache.errors.ProtocolError`; nothing here
trusts a peer. ``msgspec`` was considered (vLLM and LMCache use it) and not taken: it is one more
dependency, and these messages are fixed-layout records that ``struct`` packs in one call.
"""

from __future__ import annotations

import enum
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from lmcache.cache_keys import KEY_BYTES
from lmcache.cache_records import CacheStats
from lmcache.errors import ProtocolError

#: The version of this format; client and server must agree.
PROTOCOL_VERSION = 1
#: First bytes of a welcome: this is an lmcache shared cache server.
MAGIC = b"LMCS"
#: ``(body length, sequence number, opcode)``.
HEADER = struct.Struct("<IIB")
#: The most chunk keys a prompt may have in one request (a 64M-token prompt in chunks of 256).
MAX_KEYS = 1 << 18
#: The longest body either side accepts: a full prompt's keys and its header fields.
MAX_BODY = MAX_KEYS * KEY_BYTES + 64
#: The longest message of a REFUSED or FAILED reply.
MAX_MESSAGE = 1024
#: The ``limit`` of a PIN that has none.
NO_LIMIT = 2**64 - 1


class Op(enum.IntEnum):
    """Requests, client to server."""

    LOOKUP = 1
    BEGIN_STORE = 2
    COMMIT = 3
    LEASE = 4
    PIN = 5
    RELEASE = 6
    STATS = 7
    CLEAR = 8
    ABORT = 9
    STORE = 10


class Reply(enum.IntEnum):
    """Replies, server to client."""

    WELCOME = 0x80
    COUNT = 0x81
    RESERVED = 0x82
    PINNED = 0x83
    TOO_LONG = 0x84
    STATS = 0x85
    REFUSED = 0x86
    FAILED = 0x87


_U64 = struct.Struct("<Q")
_U64_PAIR = struct.Struct("<QQ")
_U32 = struct.Struct("<I")
_U32_PAIR = struct.Struct("<II")
_RESERVED = struct.Struct("<III")
_WELCOME = struct.Struct("<4sH16s5IIQQI")
_STATS_FIELDS = [name for name in CacheStats.__dataclass_fields__]
_STATS = struct.Struct(f"<{len(_STATS_FIELDS)}Q")


def frame(seq: int, op: int, body: bytes = b"") -> bytes:
    """One frame: the header, then ``body``."""
    return HEADER.pack(len(body), seq, op) + body


# -- requests ------------------------------------------------------------------------------------------
def prompt_body(num_tokens: int, keys: Sequence[bytes], limit: int | None = None) -> bytes:
    """The body of LOOKUP, BEGIN_STORE, STORE and LEASE (``limit`` None), or of PIN (``limit``: tokens an
    ``out`` can take; :data:`NO_LIMIT` for none)."""
    head = _U64.pack(num_tokens) if limit is None else _U64_PAIR.pack(num_tokens, limit)
    return head + b"".join(keys)


def parse_prompt(body: bytes, chunk_size: int, *, with_limit: bool) -> tuple[int, list[bytes], int]:
    """Read a prompt request's body: ``(num_tokens, keys, limit)`` (limit :data:`NO_LIMIT` without one).

    Raises:
        ProtocolError: the body is not a token count (and limit) followed by exactly the keys of that
            many tokens in chunks of ``chunk_size``.
    """
    head = _U64_PAIR if with_limit else _U64
    if len(body) < head.size or (len(body) - head.size) % KEY_BYTES:
        raise ProtocolError(f"a prompt request of {len(body)} bytes is not a header and whole keys")
    if with_limit:
        num_tokens, limit = _U64_PAIR.unpack_from(body)
    else:
        (num_tokens,), limit = _U64.unpack_from(body), NO_LIMIT
    count = (len(body) - head.size) // KEY_BYTES
    if count > MAX_KEYS or count != -(-num_tokens // chunk_size):
        raise ProtocolError(f"{count} keys do not fit {num_tokens} tokens in chunks of {chunk_size}")
    keys = [body[offset : offset + KEY_BYTES] for offset in range(head.size, len(body), KEY_BYTES)]
    return num_tokens, keys, limit


def id_body(ident: int, count: int | None = None) -> bytes:
    """The body of RELEASE or ABORT (an id) or COMMIT (a reservation id and a count)."""
    return _U32.pack(ident) if count is None else _U32_PAIR.pack(ident, count)


def parse_id(body: bytes, *, with_count: bool) -> tuple[int, int]:
    """Read the body of RELEASE or ABORT (``with_count`` False: count 0) or COMMIT: ``(id, count)``.

    Raises:
        ProtocolError: the body has the wrong length.
    """
    layout = _U32_PAIR if with_count else _U32
    if len(body) != layout.size:
        raise ProtocolError(f"an id request has {len(body)} bytes, not {layout.size}")
    if with_count:
        ident, count = _U32_PAIR.unpack(body)
        return int(ident), int(count)
    return int(_U32.unpack(body)[0]), 0


def parse_empty(body: bytes) -> None:
    """Check that STATS's or CLEAR's body is empty.

    Raises:
        ProtocolError: it is not.
    """
    if body:
        raise ProtocolError(f"this request has no body, got {len(body)} bytes")


# -- replies --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Welcome:
    """What a server tells each client first: who it is and the geometry of its arena."""

    server_id: bytes
    kv_shape: tuple[int, int, int, int, int]
    dtype: str
    slot_alignment: int
    slot_bytes: int
    num_slots: int
    max_keys: int = MAX_KEYS
    version: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        """The WELCOME reply's body."""
        return _WELCOME.pack(
            MAGIC,
            self.version,
            self.server_id,
            *self.kv_shape,
            self.slot_alignment,
            self.slot_bytes,
            self.num_slots,
            self.max_keys,
        ) + self.dtype.encode("ascii")

    @classmethod
    def decode(cls, body: bytes) -> Welcome:
        """Read a WELCOME reply's body.

        Raises:
            ProtocolError: not a welcome of this protocol version.
        """
        if len(body) < _WELCOME.size or len(body) > _WELCOME.size + 64:
            raise ProtocolError(f"a welcome of {len(body)} bytes is not one of this protocol")
        magic, version, server_id, *rest = _WELCOME.unpack_from(body)
        if magic != MAGIC or version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"the server speaks {magic!r} version {version}, this client {MAGIC!r} version "
                f"{PROTOCOL_VERSION}: run the same lmcache-mempool version on both sides"
            )
        shape, (alignment, slot_bytes, num_slots, max_keys) = tuple(rest[:5]), rest[5:]
        try:
            dtype = body[_WELCOME.size :].decode("ascii")
        except UnicodeDecodeError as exc:
            raise ProtocolError("the welcome's dtype name is not ASCII") from exc
        return cls(server_id, shape, dtype, alignment, slot_bytes, num_slots, max_keys, version)


def count_body(value: int) -> bytes:
    """The body of a COUNT or TOO_LONG reply."""
    return _U64.pack(value)


def parse_count(body: bytes) -> int:
    """Read a COUNT or TOO_LONG reply.

    Raises:
        ProtocolError: wrong length.
    """
    if len(body) != _U64.size:
        raise ProtocolError(f"a count reply has {len(body)} bytes, not {_U64.size}")
    return int(_U64.unpack(body)[0])


def reserved_body(ident: int, cached: int, slots: Sequence[int]) -> bytes:
    """The body of a RESERVED reply: the reservation's id, the chunks cached already, the slots."""
    return _RESERVED.pack(ident, cached, len(slots)) + struct.pack(f"<{len(slots)}I", *slots)


def parse_reserved(body: bytes) -> tuple[int, int, list[int]]:
    """Read a RESERVED reply: ``(id, cached, slots)``.

    Raises:
        ProtocolError: the count does not match the length.
    """
    if len(body) < _RESERVED.size:
        raise ProtocolError(f"a reserved reply of {len(body)} bytes is too short")
    ident, cached, count = _RESERVED.unpack_from(body)
    if len(body) != _RESERVED.size + 4 * count:
        raise ProtocolError(f"a reserved reply says {count} slots in {len(body)} bytes")
    return int(ident), int(cached), list(struct.unpack_from(f"<{count}I", body, _RESERVED.size))


def pinned_body(ident: int, chunks: Sequence[tuple[int, int]]) -> bytes:
    """The body of a PINNED reply: the lease's id and each chunk's ``(slot, tokens)``."""
    flat = [value for chunk in chunks for value in chunk]
    return _U32.pack(ident) + struct.pack(f"<{len(flat)}I", *flat)


def parse_pinned(body: bytes) -> tuple[int, list[tuple[int, int]]]:
    """Read a PINNED reply: ``(id, [(slot, tokens), ...])``.

    Raises:
        ProtocolError: the length is not an id and whole pairs.
    """
    if len(body) < _U32.size or (len(body) - _U32.size) % _U32_PAIR.size:
        raise ProtocolError(f"a pinned reply of {len(body)} bytes is not an id and whole pairs")
    (ident,) = _U32.unpack_from(body)
    flat = struct.unpack_from(f"<{(len(body) - _U32.size) // 4}I", body, _U32.size)
    return int(ident), list(zip(flat[::2], flat[1::2], strict=True))


def stats_body(stats: CacheStats) -> bytes:
    """The body of a STATS reply: every counter of :class:`CacheStats`, in field order."""
    return _STATS.pack(*(getattr(stats, name) for name in _STATS_FIELDS))


def parse_stats(body: bytes) -> dict[str, int]:
    """Read a STATS reply into the fields of :class:`CacheStats`.

    Raises:
        ProtocolError: wrong length.
    """
    if len(body) != _STATS.size:
        raise ProtocolError(f"a stats reply has {len(body)} bytes, not {_STATS.size}")
    return dict(zip(_STATS_FIELDS, _STATS.unpack(body), strict=True))


def message_body(text: str) -> bytes:
    """The body of a REFUSED or FAILED reply (at most :data:`MAX_MESSAGE` bytes)."""
    return text.encode("utf-8", "replace")[:MAX_MESSAGE]


# -- reading frames --------------------------------------------------------------------------------
class FrameReader:
    """Reads whole frames from a stream socket, keeping a partial frame between calls.

    Args:
        sock: the connected socket (its timeout is set by each read).
        max_body: the longest body accepted; a longer one is a :class:`ProtocolError`.
        accept_fds: receive file descriptors passed with the data (a client's reader: the welcome
            carries the arena's); :meth:`take_fds` hands them over. A server's reader passes none, so
            the kernel drops any a client sends.
    """

    def __init__(self, sock: socket.socket, max_body: int = MAX_BODY, *, accept_fds: bool = False) -> None:
        self._sock = sock
        self._max_body = max_body
        self._buffer = bytearray()
        self._accept_fds = accept_fds
        self._fds: list[int] = []

    def read(self, deadline: float | None, frame_timeout: float | None = None) -> tuple[int, int, bytes]:
        """Return the next frame's ``(seq, opcode, body)``.

        Args:
            deadline: a ``time.monotonic()`` instant to give up at (:class:`TimeoutError`; a partial
                frame is kept for the next call); None waits as long as it takes.
            frame_timeout: once a frame has begun, the seconds its rest may take (a peer that stops
                half-way through a frame is a :class:`ProtocolError`).

        Raises:
            ProtocolError: an oversized frame, or a frame left unfinished for ``frame_timeout``.
            ConnectionError: the peer closed the connection (``EOFError`` is not an ``OSError``).
            TimeoutError: ``deadline`` passed.
            OSError: the socket failed.
        """
        frame_deadline = None
        while True:
            parsed = self._next_frame()
            if parsed is not None:
                return parsed
            if self._buffer and frame_timeout is not None and frame_deadline is None:
                frame_deadline = time.monotonic() + frame_timeout
            limits = [d for d in (deadline, frame_deadline) if d is not None]
            try:
                self._fill(min(limits) if limits else None)
            except TimeoutError:
                if frame_deadline is not None and (deadline is None or frame_deadline < deadline):
                    raise ProtocolError("the peer stopped in the middle of a frame") from None
                raise

    def _next_frame(self) -> tuple[int, int, bytes] | None:
        buffer = self._buffer
        if len(buffer) < HEADER.size:
            return None
        length, seq, op = HEADER.unpack_from(buffer)
        if length > self._max_body:
            raise ProtocolError(f"a frame of {length} bytes exceeds the limit of {self._max_body}")
        end = HEADER.size + length
        if len(buffer) < end:
            return None
        with memoryview(buffer) as view:
            body = bytes(view[HEADER.size : end])
        del buffer[:end]
        return int(seq), int(op), body

    def take_fds(self) -> list[int]:
        """The file descriptors received so far (the caller owns them from now on)."""
        fds, self._fds = self._fds, []
        return fds

    def _fill(self, deadline: float | None) -> None:
        if deadline is None:
            self._sock.settimeout(None)
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no reply before the deadline")
            self._sock.settimeout(remaining)
        if self._accept_fds:
            data, fds, _, _ = socket.recv_fds(self._sock, 1 << 16, 4)
            self._fds += fds
        else:
            data = self._sock.recv(1 << 16)
        if not data:
            raise ConnectionError("the peer closed the connection")
        self._buffer += data


__all__ = [
    "HEADER",
    "MAGIC",
    "MAX_BODY",
    "MAX_KEYS",
    "MAX_MESSAGE",
    "NO_LIMIT",
    "PROTOCOL_VERSION",
    "FrameReader",
    "Op",
    "Reply",
    "Welcome",
    "count_body",
    "frame",
    "id_body",
    "message_body",
    "parse_count",
    "parse_empty",
    "parse_id",
    "parse_pinned",
    "parse_prompt",
    "parse_reserved",
    "parse_stats",
    "pinned_body",
    "prompt_body",
    "reserved_body",
    "stats_body",
]
