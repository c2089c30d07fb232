"""The remote tier's link to its server: the redis-py client, connections, health and backoff.

:class:`Connections` builds the client (credentials from the URL or from ``REDIS_USERNAME`` /
``REDIS_PASSWORD``, never shown in a repr, a log line or an error message), lends connections for
hand-packed commands, runs pipelined commands that fail soft, and keeps the tier's health: after a
failure no operation touches the network until a capped, jittered backoff has passed. ``redis`` is
imported only when a :class:`Connections` is built.
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from lmcache.errors import BackendUnavailableError, ConfigError
from lmcache.remote.format import EXTRA_HINT
from lmcache.remote.replies import WRONG_TYPE, ReplyReader, raw_socket
from lmcache.remote.stats import Counters

logger = logging.getLogger("lmcache.remote")

# Up to the LAST "@" before the path, as redis-py and urlsplit split user info ("redis://:p@ss@host").
_USERINFO = re.compile(r"(?<=://)[^/\s]*@")


def redact_url(url: str) -> str:
    """Return ``url`` with its user and password replaced by ``***``."""
    return _USERINFO.sub("***@", url)


class Connections:
    """The client of one server, its idle connections, and whether (and when) to try the server again.

    Fields change only here, under ``_lock``: the idle connections, the backoff (``_delay``,
    ``_retry_at``), ``_connected`` and ``_closed``. Failures are counted in the tier's ``counters``.

    Args:
        url: the server's URL (see :class:`~lmcache.remote.RedisTier`), with any credentials.
        socket_timeout, connect_timeout: seconds, for redis-py.
        backoff_initial, backoff_max: the first wait after a failure and the cap of its doubling.
        client_options: further keyword arguments for ``redis.Redis.from_url``.
        counters: where failures are counted.

    Raises:
        ConfigError: redis-py refuses the URL or an option (the message never shows the credentials).
        BackendUnavailableError: ``redis`` is not installed.
    """

    def __init__(
        self,
        url: str,
        *,
        socket_timeout: float,
        connect_timeout: float,
        backoff_initial: float,
        backoff_max: float,
        client_options: Mapping[str, Any] | None,
        counters: Counters,
    ) -> None:
        try:
            import redis
            import redis.backoff
            import redis.retry
        except ImportError as exc:
            raise BackendUnavailableError(f"the remote tier needs redis-py: {EXTRA_HINT}") from exc
        self.url = redact_url(url)  #: the URL without credentials, for messages
        self._redis_errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._response_error: type[BaseException] = redis.ResponseError
        # ValueError: a reply line that is not a number, so the replies are out of step
        self._read_errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError, ValueError)
        self._protocol_error: type[Exception] = redis.exceptions.InvalidResponse
        options: dict[str, Any] = {
            "socket_timeout": float(socket_timeout),
            "socket_connect_timeout": float(connect_timeout),
            # redis-py retries failed commands with a growing sleep by default: the tier has its own
            # backoff and must never block a caller on retries.
            "retry": redis.retry.Retry(redis.backoff.NoBackoff(), 0),
        }
        try:
            parsed = urllib.parse.urlsplit(url)
            parsed.port  # noqa: B018 - a bad port raises here, not later in redis-py
        except ValueError as exc:
            raise ConfigError(f"not a valid server URL ({redact_url(url)}): {exc}") from None
        if parsed.password is None and os.environ.get("REDIS_PASSWORD"):
            options["password"] = os.environ["REDIS_PASSWORD"]
            if parsed.username is None and os.environ.get("REDIS_USERNAME"):
                options["username"] = os.environ["REDIS_USERNAME"]
        options.update(client_options or {})
        # The password as written (percent-encoded) and as sent: neither may appear in a message.
        raw = parsed.password
        self._secrets = [s for s in (raw, raw and urllib.parse.unquote(raw), options.get("password")) if s]
        if parsed.scheme.startswith("valkey"):
            url = "redis" + url[len("valkey") :]
        try:
            self._client = redis.Redis.from_url(url, **options)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"cannot use url {self.url!r}: {self.redact(str(exc))}") from None
        self._counters = counters
        self._backoff_initial = float(backoff_initial)
        self._backoff_max = float(backoff_max)
        self._lock = threading.Lock()
        self._delay = 0.0
        self._retry_at = 0.0
        self._connected = False
        self._closed = False
        self._spare: list[Any] = []  # idle connections for hand-packed commands (not the client's pool)

    @property
    def client(self) -> Any:
        """The ``redis.Redis`` client."""
        return self._client

    @property
    def redis_errors(self) -> tuple[type[BaseException], ...]:
        """Exceptions of a failed network operation (redis-py's errors and ``OSError``)."""
        return self._redis_errors

    @property
    def read_errors(self) -> tuple[type[BaseException], ...]:
        """:attr:`redis_errors` and ``ValueError`` (a reply line that is no number: replies out of step)."""
        return self._read_errors

    def protocol_error(self, message: str) -> Exception:
        """redis-py's ``InvalidResponse`` for a reply that breaks the protocol."""
        return self._protocol_error(message)

    @property
    def connected(self) -> bool:
        """Whether the last operation reached the server."""
        with self._lock:
            return self._connected

    # -- health --------------------------------------------------------------------------------------
    def ready(self) -> bool:
        """Whether an operation may touch the network now (not closed, not backing off)."""
        with self._lock:
            return not self._closed and time.monotonic() >= self._retry_at

    def backoff_left(self) -> float:
        """Seconds until the backoff ends (0.0 when the network may be used now)."""
        with self._lock:
            return max(0.0, self._retry_at - time.monotonic())

    def failed(self, operation: str, exc: BaseException) -> None:
        """Count a failure and back off: the wait doubles from ``backoff_initial`` up to ``backoff_max``."""
        self._counters.add("errors")
        with self._lock:
            was_connected = self._connected
            self._connected = False
            self._delay = min(self._backoff_max, max(self._backoff_initial, self._delay * 2))
            self._retry_at = time.monotonic() + self._delay * random.uniform(0.5, 1.0)
            delay = self._delay
            # idle connections went to the same server: after a restart they are all dead, and each
            # would fail once more; dropped now, they reconnect on their next use
            stale, self._spare = self._spare, []
        for conn in stale:
            conn.disconnect()
        level = logging.WARNING if was_connected or delay == self._backoff_initial else logging.DEBUG
        logger.log(
            level,
            "remote %s at %s failed (%s: %s); retrying in up to %.2fs",
            operation,
            self.url,
            type(exc).__name__,
            self.redact(str(exc)),
            delay,
        )

    def succeeded(self) -> None:
        """Record that an operation reached the server: the backoff ends."""
        with self._lock:
            if not self._connected and self._delay:
                logger.info("remote tier at %s reachable again", self.url)
            self._connected = True
            self._delay = 0.0

    def redact(self, text: str) -> str:
        """Return ``text`` with the URL's credentials and the password replaced by ``***``."""
        text = redact_url(text)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    # -- connections ---------------------------------------------------------------------------------
    def borrow(self) -> Any:
        """Lend an idle connection or a new one (it connects on first use); see :meth:`give_back`."""
        with self._lock:
            if self._spare:
                return self._spare.pop()
        return self._client.connection_pool.make_connection()

    def give_back(self, conn: Any) -> None:
        """Keep ``conn`` for the next :meth:`borrow`; after :meth:`close`, disconnect it instead."""
        with self._lock:
            if not self._closed:
                self._spare.append(conn)
                return
        conn.disconnect()

    # -- pipelined commands --------------------------------------------------------------------------
    def pipelined(self, command: str, keys: Sequence[bytes]) -> list[Any]:
        """Run ``command key`` for every key in one round trip; a list of Nones when that fails.

        A reply for a key of another Redis type (``WRONGTYPE``) is :data:`~lmcache.remote.replies.WRONG_TYPE`.
        """
        if not self.ready():
            return [None] * len(keys)
        try:
            if len(keys) == 1:  # a pipeline object costs tens of microseconds: a visible share of 256 KiB
                try:
                    replies = [self._client.execute_command(command, keys[0])]  # type: ignore[no-untyped-call]
                except self._response_error as exc:
                    replies = [exc]
            else:
                pipe = self._client.pipeline(transaction=False)
                for key in keys:
                    pipe.execute_command(command, key)  # type: ignore[no-untyped-call]
                replies = pipe.execute(raise_on_error=False)
        except self._redis_errors as exc:
            self.failed(command, exc)
            return [None] * len(keys)
        # WRONGTYPE: the key holds a list, hash ... that is someone else's value, not a fault of the server.
        failed = [r for r in replies if isinstance(r, Exception) and not str(r).startswith("WRONGTYPE")]
        if failed:
            self.failed(command, failed[0])
            return [None] * len(keys)
        self.succeeded()
        return [WRONG_TYPE if isinstance(r, Exception) else r for r in replies]

    def strlen(self, keys: Sequence[bytes]) -> list[Any]:
        """``STRLEN`` of every key in one round trip (Nones when that fails), packed and parsed here:
        redis-py's pipeline costs about 10 us per command, ten times a loopback round trip for 128 chunks.
        """
        if not self.ready():
            return [None] * len(keys)
        conn = self.borrow()
        try:
            conn.connect()
            sock = raw_socket(conn)
            if sock is None:
                self.give_back(conn)
                conn = None
                return self.pipelined("STRLEN", keys)
            sock.sendall(b"".join(b"*2\r\n$6\r\nSTRLEN\r\n$%d\r\n%s\r\n" % (len(k), k) for k in keys))
            reader = ReplyReader(sock)
            lengths: list[Any] = []
            for _ in keys:
                line = reader.line()
                if line.startswith(b":"):
                    lengths.append(int(line[1:]))
                elif line.startswith(b"-WRONGTYPE"):
                    lengths.append(WRONG_TYPE)
                else:
                    raise self._protocol_error(f"unexpected reply {line[:40]!r} to STRLEN")
            if reader.buffered:
                raise self._protocol_error("more replies than commands to STRLEN")
        except self._read_errors as exc:
            if conn is not None:
                conn.disconnect()
            self.failed("STRLEN", exc)
            return [None] * len(keys)
        finally:
            if conn is not None:
                self.give_back(conn)
        self.succeeded()
        return lengths

    # -- lifecycle -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop lending: :meth:`ready` is False from now on, and connections given back are disconnected."""
        with self._lock:
            self._closed = True

    def disconnect(self) -> None:
        """Disconnect the idle connections and the client's own (after :meth:`close`); never raises."""
        with self._lock:
            spare, self._spare = self._spare, []
        try:
            for conn in spare:
                conn.disconnect()
            self._client.close()
        except self._redis_errors:
            pass


__all__ = ["Connections", "redact_url"]
