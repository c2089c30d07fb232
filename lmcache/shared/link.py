"""A client's connection to the cache server: the socket, the mapped arena, and round trips with a
deadline.

:class:`Link` sends a request and reads frames until the reply with its sequence number arrives. A
request whose reply did not come in time is remembered: when its reply arrives later, whatever it
granted is given back at once (a reservation aborted, a pin released), so a slow server never leaves
pins behind. The connection survives a timeout; it ends (and every handle of its
:class:`~lmcache.shared.slots.MappedSlots` is revoked) when the socket fails, the server closes it, or
a reply is malformed.

Copies into and out of slots run outside the client's lock, inside :meth:`Link.in_use`: :meth:`close`
waits for them, so this process never gives slots back to the server while it is still copying.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator

from lmcache.config import LMCacheMemPoolMetadata
from lmcache.errors import ConfigError, ProtocolError
from lmcache.layout import SlotLayout
from lmcache.registry import resolve_backend
from lmcache.shared import access, protocol
from lmcache.shared.memory import map_arena
from lmcache.shared.protocol import FrameReader, Op, Reply, Welcome
from lmcache.shared.slots import MappedSlots

#: Requests whose replies a link waits to undo; past this many the server counts as unresponsive.
MAX_ABANDONED = 64
_UNDO_OPS = {Op.BEGIN_STORE: Op.ABORT, Op.STORE: Op.ABORT, Op.LEASE: Op.RELEASE, Op.PIN: Op.RELEASE}


class Link:
    """One connection to a cache server and its arena's mapping.

    Build it with :meth:`open`. Not thread-safe: the client serializes its calls (copies run inside
    :meth:`in_use`, which is).
    """

    def __init__(
        self, sock: socket.socket, reader: FrameReader, welcome: Welcome, slots: MappedSlots
    ) -> None:
        self._sock = sock
        self._reader = reader
        #: What the server said about itself and its arena.
        self.welcome = welcome
        #: The mapping and the handles of what this connection holds.
        self.slots = slots
        self._seq = 0
        self._abandoned: dict[int, int] = {}  # seq -> op of requests whose replies came too late
        self._copies = 0
        self._idle = threading.Condition()
        self._closing = False

    @classmethod
    def open(
        cls,
        path: str,
        *,
        backend: str | None,
        pin_memory: bool | None,
        timeout: float,
        server_uid: int | None,
    ) -> Link:
        """Connect, check the server's credentials, read its welcome and map its arena.

        Raises:
            OSError: nothing accepts connections at ``path`` (or it failed), or no welcome in time.
            ProtocolError: the peer is not a cache server of this protocol, or runs as another user.
            ConfigError, BackendUnavailableError: ``backend`` is not a usable backend.
        """
        deadline = time.monotonic() + timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            _, uid, _ = access.peer_credentials(sock)
            allowed = {os.geteuid(), 0} if server_uid is None else {server_uid}
            if uid not in allowed:
                raise ProtocolError(
                    f"the server at {path} runs as uid {uid}, not as this user or root; pass "
                    "server_uid= to trust it"
                )
            reader = FrameReader(sock, accept_fds=True)
            _, op, body = reader.read(deadline)
            fds = reader.take_fds()
            try:
                if op != Reply.WELCOME or len(fds) != 1:
                    raise ProtocolError(f"the server opened with opcode {op} and {len(fds)} descriptors")
                welcome = Welcome.decode(body)
                layout, meta = _layout(welcome)
                memory = map_arena(fds.pop(), welcome.num_slots * welcome.slot_bytes)
            finally:
                for fd in fds:
                    os.close(fd)
            slots = MappedSlots(layout, welcome.num_slots, memory, resolve_backend(backend, meta), pin_memory)
        except BaseException:
            sock.close()
            raise
        return cls(sock, reader, welcome, slots)

    # -- round trips -------------------------------------------------------------------------------------
    def call(self, op: Op, body: bytes, deadline: float) -> tuple[int, bytes]:
        """Send a request and return its reply's ``(opcode, body)``.

        Raises:
            TimeoutError: no reply by ``deadline``; the connection stays (the late reply is undone).
            OSError, ProtocolError: the connection failed; :meth:`close` it.
        """
        seq = self._send(op, body, deadline)
        try:
            while True:
                reply_seq, reply, reply_body = self._reader.read(deadline)
                if reply_seq == seq:
                    return reply, reply_body
                self._undo(reply_seq, reply, reply_body)
        except TimeoutError:
            self._abandoned[seq] = op
            if len(self._abandoned) > MAX_ABANDONED:
                raise ProtocolError(f"{len(self._abandoned)} replies are overdue") from None
            raise

    def send(self, op: Op, body: bytes) -> None:
        """Send a request that has no reply (RELEASE, ABORT).

        Raises:
            OSError: the connection failed; :meth:`close` it.
        """
        self._send(op, body, time.monotonic() + 1.0)

    def _send(self, op: Op, body: bytes, deadline: float) -> int:
        self._seq = self._seq % 0xFFFFFFFF + 1
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no time left to send")
        self._sock.settimeout(remaining)
        try:
            self._sock.sendall(protocol.frame(self._seq, op, body))
        except TimeoutError:  # part of a frame may be out: the stream is unusable
            raise ConnectionError("a request could not be sent in time") from None
        return self._seq

    def _undo(self, seq: int, reply: int, body: bytes) -> None:
        """Handle the late reply of an abandoned request: give back what it granted."""
        op = self._abandoned.pop(seq, None)
        if op is None:
            raise ProtocolError(f"a reply to request {seq}, which is not pending")
        undo = _UNDO_OPS.get(Op(op))
        if undo is Op.ABORT and reply == Reply.RESERVED:
            ident, _, _ = protocol.parse_reserved(body)
            self.send(undo, protocol.id_body(ident))
        elif undo is Op.RELEASE and reply == Reply.PINNED:
            ident, _ = protocol.parse_pinned(body)
            if ident:
                self.send(undo, protocol.id_body(ident))

    # -- copies and the end ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def in_use(self) -> Iterator[bool]:
        """Mark a copy into or out of slots in progress; yields whether the connection still stands
        (if not, the handles are revoked: do not copy). :meth:`close` waits for running copies."""
        with self._idle:
            usable = not self._closing
            self._copies += usable
        if not usable:
            yield False
            return
        try:
            yield True
        finally:
            with self._idle:
                self._copies -= 1
                if not self._copies:
                    self._idle.notify_all()

    @property
    def closed(self) -> bool:
        """Whether the connection is closing or closed (its handles are revoked, or about to be)."""
        return self._closing

    def close(self) -> None:
        """Wait for running copies, then close the connection (the server releases everything it held)
        and revoke every handle. Calling it again does nothing."""
        with self._idle:
            if self._closing:
                return
            self._closing = True  # no copy starts from now on
            self._idle.wait_for(lambda: not self._copies)
        self.slots.close()  # revokes the handles and unpins the mapping
        self._sock.close()

    def abandon(self) -> None:
        """Let go without waiting or unpinning: a forked child leaving its parent's connection (the
        parent's copy of the socket stays open, so the server releases nothing)."""
        self._closing = True
        self.slots.revoke()
        self._sock.close()


def _layout(welcome: Welcome) -> tuple[SlotLayout, LMCacheMemPoolMetadata]:
    """The slot layout a welcome describes, checked against its own figures.

    Raises:
        ProtocolError: the welcome is inconsistent (or describes no valid pool).
    """
    try:
        meta = LMCacheMemPoolMetadata(
            welcome.kv_shape, welcome.dtype, max(welcome.num_slots, 1) * max(welcome.slot_bytes, 1) / 2**30
        )
        layout = SlotLayout.from_metadata(meta, welcome.slot_alignment)
    except ConfigError as exc:
        raise ProtocolError(f"the server describes an arena this client cannot use: {exc}") from exc
    if layout.slot_bytes != welcome.slot_bytes or welcome.num_slots < 1:
        raise ProtocolError(
            f"the server's slots of {welcome.slot_bytes} bytes (x{welcome.num_slots}) do not match its "
            f"layout ({layout.slot_bytes} bytes)"
        )
    return layout, meta


__all__ = ["MAX_ABANDONED", "Link"]
