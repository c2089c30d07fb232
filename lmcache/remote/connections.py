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
from lmcache.remote.replies import (
    WRONG_TYPE,
    ReplyReader,
    ServerError,
    connect_within,
    pack_commands,
    raw_socket,
)
from lmcache.remote.stats import Counters
from lmcache.tiers.format import EXTRA_HINT

logger = logging.getLogger("lmcache.remote")

_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S*")
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_.-]*")  # a setting's value that may be shown (no separators)
#: Query arguments redis-py reads that are settings, not credentials: their values may be shown.
_SHOWN_QUERY = frozenset(
    (
        "db",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "retry_on_timeout",
        "max_connections",
        "health_check_interval",
        "ssl_check_hostname",
        "timeout",
        "protocol",
    )
)


def _userinfo_end(url: str) -> int:
    """Where the user info of ``url`` ends (the index of its ``@`` after ``://``), or -1 if it has none.

    The last ``@`` of the URL, wherever ``urlsplit`` would end the authority (a password typed unencoded
    may hold ``/``), except for ``unix://`` URLs, whose path starts with ``/``: an ``@`` in the path is
    part of a file name, and user info, if any, comes before the path."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() == "unix":
        return -1 if rest.startswith("/") else rest.find("@/")
    return rest.rfind("@")


def redact_url(url: str) -> str:
    """Return ``url`` as it may be shown: user info and every query value that may be a credential
    replaced by ``***``.

    User info is everything between ``://`` and the LAST ``@`` of the whole URL, wherever redis-py or
    ``urlsplit`` would end it: a password typed unencoded may hold ``@``, ``/``, ``?``, ``#`` or spaces,
    and no part of it may be shown. Query values are redacted except those of known settings (``db``,
    timeouts ...): redis-py reads ``?password=`` and ``?username=`` as credentials.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    at = _userinfo_end(url) if sep else rest.rfind("@")
    if at >= 0:
        rest = "***@" + rest[at + 1 :]
    base, qmark, query = rest.partition("?")
    if qmark:
        shown = []
        for pair in re.split("[&;]", query):
            name, equals, value = pair.partition("=")
            keep = urllib.parse.unquote(name).lower() in _SHOWN_QUERY and _PLAIN_VALUE.fullmatch(value)
            shown.append(pair if keep else f"{name}{equals}***" if equals else "***")
        base = base + "?" + "&".join(shown)
    return f"{scheme}://{base}" if sep else base


def url_secrets(url: str, options: Mapping[str, Any]) -> list[str]:
    """Every credential redis-py would take from ``url`` and ``options``, in each form it may be written.

    The user info as written and its user and password parts, percent-decoded or not; query values
    other than known settings, as written and decoded; and ``password`` / ``username`` of ``options``.
    Longest first, so that redacting one never leaves part of a longer one.
    """
    found: set[str] = set()
    rest = url.partition("://")[2]
    at = _userinfo_end(url)
    if at >= 0:
        userinfo = rest[:at]
        user, _, password = userinfo.partition(":")
        found.update((userinfo, user, password))
    query = rest[at + 1 :].partition("?")[2].partition("#")[0]
    for pair in re.split("[&;]", query):
        name, _, value = pair.partition("=")
        if urllib.parse.unquote(name).lower() not in _SHOWN_QUERY or not _PLAIN_VALUE.fullmatch(value):
            found.add(value)
    for name in ("password", "username"):
        given = options.get(name)
        if isinstance(given, str):
            found.add(given)
    forms = (
        found
        | {urllib.parse.unquote(text) for text in found}
        | {urllib.parse.unquote_plus(text) for text in found}
    )
    return sorted((text for text in forms if text), key=len, reverse=True)


def check_userinfo(url: str) -> None:
    """Refuse a URL whose user info ``urlsplit`` (and so redis-py) would cut short.

    A password typed with an unencoded ``/``, ``?`` or ``#`` ends the URL's authority early: redis-py
    would take part of the password as the host name and connect elsewhere.

    Raises:
        ConfigError: the user info holds such a character (the message shows none of it).
    """
    rest = url.partition("://")[2]
    at = _userinfo_end(url)
    if at >= 0 and any(mark in rest[:at] for mark in "/?#"):
        raise ConfigError(
            f"the user info of url {redact_url(url)!r} holds '/', '?' or '#', which end a URL's host part: "
            "percent-encode the password (urllib.parse.quote(password, safe='')) or pass it in "
            "REDIS_PASSWORD"
        )


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
        self._pipeline_errors: tuple[type[BaseException], ...] = (*self._read_errors, ServerError)
        options: dict[str, Any] = {
            "socket_timeout": float(socket_timeout),
            "socket_connect_timeout": float(connect_timeout),
            # redis-py retries failed commands with a growing sleep by default: the tier has its own
            # backoff and must never block a caller on retries.
            "retry": redis.retry.Retry(redis.backoff.NoBackoff(), 0),
        }
        check_userinfo(url)
        # Every credential, as written and as sent: none may appear in a message.
        self._secrets = url_secrets(url, client_options or {})
        try:
            parsed = urllib.parse.urlsplit(url)
            parsed.port  # noqa: B018 - a bad port raises here, not later in redis-py
        except ValueError as exc:
            raise ConfigError(
                f"not a valid server URL ({redact_url(url)}): {self.redact(str(exc))}"
            ) from None
        query = urllib.parse.parse_qs(parsed.query)
        if parsed.password is None and "password" not in query and os.environ.get("REDIS_PASSWORD"):
            options["password"] = os.environ["REDIS_PASSWORD"]
            if parsed.username is None and "username" not in query and os.environ.get("REDIS_USERNAME"):
                options["username"] = os.environ["REDIS_USERNAME"]
        options.update(client_options or {})
        self._secrets = url_secrets(url, options)
        if parsed.scheme.startswith("valkey"):
            url = "redis" + url[len("valkey") :]
        try:
            self._client = redis.Redis.from_url(url, **options)
            # A connection object checks every option (query arguments, client_options, TLS settings)
            # when it is made, without connecting: an unusable one fails here, not at the first read.
            self._client.connection_pool.make_connection()
        except (ValueError, TypeError, redis.RedisError) as exc:
            raise ConfigError(f"cannot use url {self.url!r}: {self.redact(str(exc))}") from None
        self._counters = counters
        self._socket_timeout = float(socket_timeout)
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
        """Return ``text`` (a message) with every URL in it redacted and every credential replaced by
        ``***``."""
        text = _URL_IN_TEXT.sub(lambda match: redact_url(match.group()), text)
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

        The commands are packed and their replies read here, on a borrowed connection, within one
        ``socket_timeout`` for the whole round trip (a server that trickles its replies fails it; redis-py
        would wait ``socket_timeout`` per ``recv``, and redis-py's pipeline costs about 10 us per command,
        ten times a loopback round trip for 128 chunks). A reply for a key of another Redis type
        (``WRONGTYPE``) is :data:`~lmcache.remote.replies.WRONG_TYPE`.
        """
        if not self.ready():
            return [None] * len(keys)
        if not keys:
            return []
        conn = self.borrow()
        reader = None
        try:
            connect_within(conn, self._socket_timeout)
            sock = raw_socket(conn)
            if sock is None:
                self.give_back(conn)
                conn = None
                return self._pipelined_by_redis_py(command, keys)
            reader = ReplyReader(sock, self._socket_timeout)
            reader.send(pack_commands(command.encode("ascii"), list(keys)))
            replies = [reader.reply() for _ in keys]
            if reader.buffered:
                raise self._protocol_error(f"more replies than commands to {command}")
        except self._pipeline_errors as exc:
            if conn is not None:
                conn.disconnect()
            self.failed(command, exc)
            return [None] * len(keys)
        finally:
            if reader is not None:
                reader.finish()
            if conn is not None:
                self.give_back(conn)
        self.succeeded()
        return replies

    def _pipelined_by_redis_py(self, command: str, keys: Sequence[bytes]) -> list[Any]:
        """:meth:`pipelined` through redis-py, where it exposes no socket (each ``recv`` then has its own
        ``socket_timeout``)."""
        try:
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
        """``STRLEN`` of every key in one round trip (Nones when that fails)."""
        return self.pipelined("STRLEN", keys)

    @property
    def socket_timeout(self) -> float:
        """Seconds one whole network operation may take."""
        return self._socket_timeout

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


__all__ = ["Connections", "check_userinfo", "redact_url", "url_secrets"]
