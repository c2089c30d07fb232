"""Helpers for the shared cache's tests: servers in-process and as processes, peers in other processes.

Servers listen on Unix sockets in fresh directories under the system's temp dir (short paths: a socket
path holds at most 107 bytes), started and stopped by the tests. Peers are ``tests/shared_peer.py``
processes (:func:`start_peer`, :func:`run_peer`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pytest

from kvtest import SMALL_SHAPE, wait_until
from lmcache.config import LMCacheMemPoolMetadata
from lmcache.layout import SlotLayout

PEER = Path(__file__).with_name("shared_peer.py")
ROOT = Path(__file__).resolve().parents[1]
STARTUP_SECONDS = 60.0  # a cold interpreter importing numpy on a loaded 2-CPU machine


def metadata(
    slots: int, dtype: str = "float16", shape: tuple[int, ...] = SMALL_SHAPE
) -> LMCacheMemPoolMetadata:
    """Metadata of an arena of exactly ``slots`` slots of ``shape``."""
    slot_bytes = SlotLayout.from_metadata(LMCacheMemPoolMetadata(shape, dtype, 1.0)).slot_bytes  # type: ignore[arg-type]
    return LMCacheMemPoolMetadata(shape, dtype, slots * slot_bytes / 2**30)  # type: ignore[arg-type]


@contextmanager
def socket_dir() -> Iterator[str]:
    """A fresh, private directory with a short path for sockets; removed afterwards."""
    directory = tempfile.mkdtemp(prefix="lmc-")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def environment() -> dict[str, str]:
    """The environment of a child process: this source tree (and the adapters) importable first."""
    path = os.pathsep.join([str(ROOT), str(ROOT / "adapters"), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")


def _read_line(stream: IO[str], process: subprocess.Popen[str], what: str) -> str:
    """The first line ``process`` prints, failing the test if it exits first or takes too long."""
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(STARTUP_SECONDS):
            process.kill()
            pytest.fail(f"{what} printed nothing in {STARTUP_SECONDS} s")
    line = stream.readline()
    if not line:
        process.wait(10)
        error = process.stderr.read() if process.stderr is not None else ""
        pytest.fail(f"{what} exited with {process.returncode} before its first line:\n{error[-3000:]}")
    return line.strip()


class ServerProcess:
    """``python -m lmcache serve`` as a child process, waiting for its ``ready`` line."""

    def __init__(self, socket_path: str, slots: int, dtype: str = "float16", *extra: str) -> None:
        self.socket_path = socket_path
        shape = ",".join(map(str, SMALL_SHAPE))
        gib = repr(metadata(slots, dtype).max_local_cache_size)
        self.args = [sys.executable, "-m", "lmcache", "serve", "--socket", socket_path, "--kv-shape", shape]
        self.args += ["--dtype", dtype, "--size-gib", gib, *extra]
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> ServerProcess:
        """Start it and wait until it accepts connections."""
        self.process = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment()
        )
        assert self.process.stdout is not None
        line = _read_line(self.process.stdout, self.process, "lmcache serve")
        assert line == f"ready {self.socket_path}", line
        return self

    def signal(self, signum: int) -> int:
        """Send ``signum`` and return the exit status (waiting up to 30 s); SIGSTOP and SIGCONT return 0
        once the process is stopped or running."""
        assert self.process is not None
        self.process.send_signal(signum)
        if signum in (signal.SIGSTOP, signal.SIGCONT):
            stopped = signum == signal.SIGSTOP
            assert wait_until(lambda: self._stopped() == stopped, 10)
            return 0
        return self.process.wait(30)

    def _stopped(self) -> bool:
        assert self.process is not None
        with open(f"/proc/{self.process.pid}/stat", encoding="ascii") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "T"

    def stop(self) -> None:
        """Stop it if it runs (SIGTERM; SIGKILL if it does not exit)."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
        self.process = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Peer:
    """A ``shared_peer.py`` process that reports progress one line at a time."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(PEER), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment(),
        )

    def line(self) -> str:
        """The next line it prints."""
        assert self.process.stdout is not None
        return _read_line(self.process.stdout, self.process, f"shared_peer.py {self.process.args!r}")

    def kill(self) -> None:
        """SIGKILL it and reap it."""
        self.process.kill()
        self.process.wait(30)
        self.close()

    def finish(self) -> str:
        """Wait for it to exit successfully; return the rest of its output."""
        out, err = self.process.communicate(timeout=300)
        if self.process.returncode != 0:
            pytest.fail(f"shared_peer.py failed with {self.process.returncode}:\n{err[-3000:]}")
        return out

    def close(self) -> None:
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def run_peer(*args: str) -> str:
    """Run ``shared_peer.py`` with ``args`` to the end; return what it printed."""
    return Peer(*args).finish()


__all__ = [
    "PEER",
    "Peer",
    "ServerProcess",
    "environment",
    "metadata",
    "run_peer",
    "socket_dir",
]
