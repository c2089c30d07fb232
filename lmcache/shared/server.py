"""The shared cache's server: one :class:`~lmcache.chunk_cache.ChunkCache` in shared memory, served to
every process of a machine over a Unix socket.

:class:`CacheServer` owns the arena (a memfd, :class:`~lmcache.shared.memory.SharedArena`), a numpy
:class:`~lmcache.storage_backend.mem_pool.LocalPool` that adopts it, the cache over that pool (the
allocator, the prefix index, eviction, leases: all the in-process cache's own code), and the socket.
Each connection gets a thread and a :class:`~lmcache.shared.session.Session`; the server never reads
or writes chunk bytes itself (a remote tier does, from the slots).

A client's message that is malformed, truncated, oversized or names an id it was not given closes that
client's connection only; so does any error while serving it. A connection that ends, for any reason,
gives back everything it held.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import selectors
import socket
import threading
from typing import Any

from lmcache.chunk_cache import ChunkCache
from lmcache.config import LMCacheMemPoolMetadata
from lmcache.disk import DiskTier
from lmcache.errors import ConfigError, MemPoolError, ProtocolError
from lmcache.layout import MIN_SLOT_ALIGNMENT, SlotLayout
from lmcache.policies import EvictionPolicy
from lmcache.remote import RedisTier
from lmcache.shared import access, protocol
from lmcache.shared.memory import SharedArena
from lmcache.shared.protocol import FrameReader, Reply, Welcome
from lmcache.shared.session import Session
from lmcache.storage_backend.mem_pool.local_pool import LocalPool

logger = logging.getLogger("lmcache.shared")

#: Seconds a client may take to finish a frame it began, or to take a reply: past it, it is closed.
FRAME_TIMEOUT = 10.0


class CacheServer:
    """A chunk cache in shared memory, served on a Unix socket to every process of this machine.

    Args:
        socket_path: where to listen (at most 107 bytes). A stale socket there (its server died) is
            replaced; a path where a server answers is refused.
        metadata: the chunk shape, dtype and memory budget of the arena (as for a pool).
        policy: the cache's eviction policy (see :class:`~lmcache.chunk_cache.ChunkCache`).
        remote: the cache's remote tier: a URL or a :class:`~lmcache.remote.RedisTier`.
        disk: the cache's disk tier: a directory or a :class:`~lmcache.disk.DiskTier` (chunks written
            there survive the server; a new server on the same directory finds them again).
        group: a group name or id whose members may use the cache too (socket and memory mode 0660);
            None: only this process's user (mode 0600).
        max_clients: connections served at once; more are closed at once.
        slot_alignment: the arena's slot stride multiple (see :class:`~lmcache.layout.SlotLayout`).

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. Clients are
    :func:`lmcache.shared.connect`; ``python -m lmcache serve`` runs one as a process.

    Raises:
        ConfigError: a bad argument (at construction), or a server answering at the path (at
            :meth:`start`).

    Example:
        >>> import tempfile, os
        >>> from lmcache.config import LMCacheMemPoolMetadata
        >>> from lmcache.shared import CacheServer
        >>> path = os.path.join(tempfile.mkdtemp(), "cache.sock")
        >>> with CacheServer(path, LMCacheMemPoolMetadata((2, 2, 16, 2, 8), "float16", 0.01)) as server:
        ...     server.cache.pool.max_chunk_num, oct(os.stat(path).st_mode & 0o777)
        (5242, '0o600')
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        metadata: LMCacheMemPoolMetadata,
        *,
        policy: str | EvictionPolicy | None = None,
        remote: str | RedisTier | None = None,
        disk: str | os.PathLike[str] | DiskTier | None = None,
        group: str | int | None = None,
        max_clients: int = 256,
        slot_alignment: int = MIN_SLOT_ALIGNMENT,
    ) -> None:
        if not isinstance(metadata, LMCacheMemPoolMetadata):
            raise ConfigError(f"metadata must be an LMCacheMemPoolMetadata, got {type(metadata).__name__}")
        if isinstance(max_clients, bool) or not isinstance(max_clients, int) or max_clients < 1:
            raise ConfigError(f"max_clients must be an int >= 1, got {max_clients!r}")
        #: The socket's path.
        self.socket_path = access.socket_path(socket_path)
        #: The arena's chunk shape, dtype and budget.
        self.metadata = metadata
        self._layout = SlotLayout.from_metadata(metadata, slot_alignment)
        self._gid = access.resolve_group(group)
        self._cache_options: dict[str, Any] = {"policy": policy, "remote": remote, "disk": disk}
        self._max_clients = max_clients
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._arena: SharedArena | None = None
        self._cache: ChunkCache | None = None
        self._listener: socket.socket | None = None
        self._identity = (0, 0)
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._acceptor: threading.Thread | None = None
        self._stopping = False
        #: A new random id each start: clients tell a restarted server from the one they knew.
        self.server_id = b""

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> CacheServer:
        """Create the shared arena, the cache and the socket, and start accepting clients; return self.

        Raises:
            ConfigError: already started, a server answers at the path, or the budget holds no slot.
            PoolTooLargeError: the machine has not that much memory available.
        """
        if self._acceptor is not None:
            raise ConfigError("this CacheServer was started already; build a new one to serve again")
        slot_bytes = self._layout.slot_bytes
        slots = max(1, self.metadata.budget_bytes // slot_bytes)  # the pool says why 0 slots fail
        arena = SharedArena(slots * slot_bytes, gid=self._gid)
        try:
            pool = LocalPool(
                self.metadata,
                backend="numpy",
                memory=arena.array,
                slot_alignment=self._layout.slot_alignment,
            )
            cache = ChunkCache(pool, **self._cache_options)
            try:
                self._listener, self._identity = access.listen(self.socket_path, gid=self._gid)
            except BaseException:
                cache.close()
                raise
        except BaseException:
            arena.close()
            raise
        self._arena, self._cache = arena, cache
        self.server_id = secrets.token_bytes(16)
        self._welcome = Welcome(
            self.server_id,
            self._layout.kv_shape,
            self._layout.dtype.name,
            self._layout.slot_alignment,
            slot_bytes,
            pool.max_chunk_num,
        ).encode()
        self._wake = socket.socketpair()
        self._acceptor = threading.Thread(target=self._accept_loop, name="lmcache-serve-accept", daemon=True)
        self._acceptor.start()
        logger.info(
            "serving %s chunks of %s at %s", pool.max_chunk_num, self._layout.kv_shape, self.socket_path
        )
        return self

    def stop(self) -> None:
        """Stop accepting, close every connection (releasing what each held), remove the socket file,
        and release the cache and the shared memory. Calling it again does nothing."""
        if self._acceptor is None or self._stopping:
            return
        self._stopping = True
        if self._wake is not None:
            with contextlib.suppress(OSError):
                self._wake[1].send(b"x")
        self._acceptor.join()
        if self._listener is not None:
            self._listener.close()
        access.remove_socket(self.socket_path, self._identity)
        with self._lock:
            connections = list(self._connections.items())
        for conn, _ in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for _, thread in connections:
            thread.join(FRAME_TIMEOUT)
        if self._wake is not None:
            for end in self._wake:
                end.close()
        if self._cache is not None:
            self._cache.close()
            self._cache.pool.close()
        if self._arena is not None:
            self._arena.close()
        logger.info("stopped serving at %s", self.socket_path)

    def __enter__(self) -> CacheServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what embedders and tests read ------------------------------------------------------------------
    @property
    def cache(self) -> ChunkCache:
        """The cache every client shares (its ``stats()`` and ``index`` are the server-wide truth).

        Raises:
            ConfigError: the server was not started.
        """
        if self._cache is None:
            raise ConfigError("the CacheServer has not been started; call start() or use it in a with block")
        return self._cache

    @property
    def clients(self) -> int:
        """Connections being served now."""
        with self._lock:
            return len(self._connections)

    def __repr__(self) -> str:
        state = "serving" if self._acceptor is not None and not self._stopping else "stopped"
        return f"CacheServer({self.socket_path!r}, {state}, {self.clients} clients)"

    # -- connections ------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        listener, wake = self._listener, self._wake
        if listener is None or wake is None:
            return
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(wake[0], selectors.EVENT_READ)
            while not self._stopping:
                for key, _ in selector.select():
                    if key.fileobj is wake[0]:
                        return
                    try:
                        conn, _ = listener.accept()
                    except OSError as exc:  # out of descriptors, a peer gone before accept: keep serving
                        logger.warning("accept failed: %s", exc)
                        continue
                    self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        with self._lock:
            if len(self._connections) >= self._max_clients or self._stopping:
                logger.warning("refused a client: %s are connected already", len(self._connections))
                conn.close()
                return
            thread = threading.Thread(
                target=self._serve_connection, args=(conn,), name="lmcache-serve-client", daemon=True
            )
            self._connections[conn] = thread
        thread.start()

    def _serve_connection(self, conn: socket.socket) -> None:
        cache, arena = self._cache, self._arena
        if cache is None or arena is None:
            return
        session = Session(cache)
        try:
            pid, uid, gid = access.peer_credentials(conn)
            if not access.peer_allowed(pid, uid, gid, owner_uid=os.geteuid(), group=self._gid):
                logger.warning(
                    "refused a client of uid %s (pid %s): not this server's user or group", uid, pid
                )
                return
            hello = protocol.frame(0, Reply.WELCOME, self._welcome)
            conn.settimeout(FRAME_TIMEOUT)
            if socket.send_fds(conn, [hello], [arena.fd]) != len(hello):
                return
            reader = FrameReader(conn)
            while True:
                seq, op, body = reader.read(None, frame_timeout=FRAME_TIMEOUT)
                try:
                    answer = session.serve(op, body)
                except ProtocolError:
                    raise
                except MemPoolError as exc:  # a valid request the cache could not serve
                    answer = Reply.FAILED, protocol.message_body(f"{type(exc).__name__}: {exc}")
                if answer is not None:
                    conn.settimeout(FRAME_TIMEOUT)
                    conn.sendall(protocol.frame(seq, *answer))
        except ProtocolError as exc:
            logger.warning("closed a client that sent a bad message: %s", exc)
        except OSError:
            pass  # the client went away (or stop() shut the connection)
        except Exception:  # a bug serving one client closes that client, never the server
            logger.exception("closed a client after an internal error")
        finally:
            session.close()
            conn.close()
            with self._lock:
                self._connections.pop(conn, None)


__all__ = ["FRAME_TIMEOUT", "CacheServer"]
