"""A real ``redis-server`` for the remote tier's tests, on a free 127.0.0.1 port, persistence off, and
the helpers those tests share (:func:`tier_for`, :func:`chunk_shape`; ``wait_until`` is kvtest's).

:func:`require_redis` (and :func:`require_client`, for tests that need no server) are the suite's one
way to skip these tests, in the style of :func:`kvtest.require`: where ``LMCACHE_REQUIRE_BACKENDS`` names
``redis`` (the nox ``remote`` session), a missing redis-py, xxhash or ``redis-server`` fails the test
instead of skipping it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from kvtest import REQUIRED, SMALL_SHAPE

if TYPE_CHECKING:
    from lmcache.remote import RedisTier

HOST = "127.0.0.1"  # the only address these tests ever contact
PEER = Path(__file__).with_name("remote_peer.py")
SECRET = "s3cret-Pa55word"  # a password that must never show in a repr, a log line or an error


def tier_for(url: str, **kwargs: Any) -> RedisTier:
    """A tier with short timeouts, so fault tests finish in well under a second per fault."""
    from lmcache.remote import RedisTier

    require_redis()
    options: dict[str, Any] = {"socket_timeout": 0.5, "connect_timeout": 0.5, "backoff_max": 0.2}
    options.update(kwargs)
    return RedisTier(url, **options)


def chunk_shape(tokens: int) -> tuple[int, int, int, int, int]:
    """:data:`kvtest.SMALL_SHAPE` with ``tokens`` tokens."""
    return (SMALL_SHAPE[0], SMALL_SHAPE[1], tokens, SMALL_SHAPE[3], SMALL_SHAPE[4])


def require_redis() -> str:
    """Check for redis-py and xxhash and find ``redis-server``; return its path (skip or fail if absent)."""
    require_client()
    path = os.environ.get("LMCACHE_REDIS_SERVER") or shutil.which("redis-server")
    if path is None:
        if "redis" in REQUIRED:
            pytest.fail("redis-server is required in this session (LMCACHE_REQUIRE_BACKENDS) but missing")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    return path


def require_client() -> None:
    """Check for redis-py and xxhash (the ``redis`` extra): skip if absent, fail where required."""
    for module in ("redis", "xxhash"):
        if importlib.util.find_spec(module) is None:
            if "redis" in REQUIRED:
                pytest.fail(f"{module} is required in this session (LMCACHE_REQUIRE_BACKENDS) but missing")
            pytest.skip(f"{module} is not installed (pip install 'lmcache-mempool[redis]')")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1:port``; it can be stopped, killed, paused, restarted.

    Persistence is off (``--save "" --appendonly no``): a restart comes back empty, as after a crash of
    a cache server.
    """

    def __init__(self, executable: str, *, password: str | None = None) -> None:
        self.executable = executable
        self.password = password
        self.port = free_port()
        self.workdir = tempfile.mkdtemp(prefix="lmcache-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The server's URL, without credentials."""
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        """Start the server (on the same port as before) and wait until it answers PING."""
        args = [self.executable, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no"]
        args += [
            "--dir",
            self.workdir,
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--loglevel",
            "warning",
        ]
        if self.password is not None:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode} on port {self.port}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    reply = conn.recv(64)
                    if reply.startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port} within 10 s")

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def stop(self) -> None:
        """Stop the server (SIGTERM; SIGKILL if it hangs)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
            self.process = None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open and nothing is answered."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo :meth:`pause`."""
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def client(self) -> Any:
        """A plain redis-py client of this server (for tests that poke at stored values)."""
        import redis

        return redis.Redis(host=HOST, port=self.port, password=self.password, socket_timeout=5)

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def run_peer(*args: str) -> str:
    """Run ``tests/remote_peer.py`` with ``args`` in a new process; return what it printed."""
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(root), str(root / "adapters"), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(PEER), *args],
        env=dict(os.environ, PYTHONPATH=path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"remote_peer.py {' '.join(args[:3])} failed:\n{done.stderr}")
    return done.stdout
