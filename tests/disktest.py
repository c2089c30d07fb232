"""Helpers for the disk tier's tests (imported as ``disktest``): tiers on temporary directories, reading
a chunk back, listing the files, running a peer process, and faults injected at system calls.

The disk tier needs ``xxhash`` (the ``disk`` extra); :func:`require_disk` is its one way to skip, like
:func:`kvtest.require` (which it calls), so a session that requires xxhash fails instead.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvtest import SMALL_SHAPE, require, require_mounts
from lmcache.dtypes import KV_DTYPES

PEER = Path(__file__).resolve().parent / "disk_peer.py"


def require_disk() -> None:
    """Skip unless ``xxhash`` is installed (fail in a session that requires it)."""
    require("xxhash")


_OPEN: list[Any] = []  # tiers made by tier(), closed after each test (conftest)


def tier(path: Any, **options: Any) -> Any:
    """A :class:`~lmcache.disk.DiskTier` on ``path`` (skip without xxhash), closed after the test."""
    require_disk()
    from lmcache.disk import DiskTier

    made = DiskTier(path, **options)
    _OPEN.append(made)
    return made


def close_tiers() -> None:
    """Close every tier :func:`tier` made (their writer threads end)."""
    while _OPEN:
        _OPEN.pop().close(timeout=0.2)


def shape_of(tokens: int) -> tuple[int, int, int, int, int]:
    """:data:`kvtest.SMALL_SHAPE` with ``tokens`` tokens."""
    return (SMALL_SHAPE[0], SMALL_SHAPE[1], tokens, SMALL_SHAPE[3], SMALL_SHAPE[4])


def read_chunk(disk: Any, key: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """Read one chunk through a stream into a new array; None on a miss or a rejected file."""
    out = np.empty(shape, KV_DTYPES[dtype].numpy_dtype)
    with disk.stream([key], dtype, [shape]) as stream:
        if not (stream.hit(0) and stream.read_into(out)):
            return None
    return out


def chunk_files(root: Any) -> list[Path]:
    """Every path named like a chunk file under ``root`` (files, links, directories alike)."""
    return sorted(p for p in Path(root).rglob("*.kv"))


def temp_files(root: Any) -> list[Path]:
    """Every temporary file under ``root``."""
    return sorted(p for p in Path(root).rglob(".*.tmp"))


def file_of(disk: Any, key: bytes) -> Path:
    """The path of ``key``'s chunk file (it must be indexed)."""
    space, hex_key = disk.layout.split(key)
    directory = Path(disk.layout.directory(space, hex_key))
    [path] = [p for p in directory.iterdir() if p.name.startswith(hex_key + ".") and p.suffix == ".kv"]
    return path


def run_peer(*args: str, timeout: float = 120) -> str:
    """Run ``tests/disk_peer.py`` with ``args`` in a new process; return what it printed."""
    done = subprocess.run(
        [sys.executable, str(PEER), *args], env=peer_env(), capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        pytest.fail(f"disk_peer.py {' '.join(args[:2])} failed:\n{done.stderr}")
    return done.stdout


def start_peer(*args: str) -> subprocess.Popen[str]:
    """Start ``tests/disk_peer.py`` with ``args``; its stdout is a pipe (lines as it prints them)."""
    return subprocess.Popen(
        [sys.executable, str(PEER), *args], env=peer_env(), stdout=subprocess.PIPE, text=True
    )


def peer_env() -> dict[str, str]:
    """The environment of a peer process: this checkout's code first on the path."""
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(root), str(root / "adapters"), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path)


def failing(
    error: int, real: Callable[..., Any], when: Callable[..., bool] | None = None
) -> Callable[..., Any]:
    """A stand-in for the system call ``real`` that raises ``OSError(error)`` (when ``when(*args)``
    says so, or always), as a full disk or a read-only filesystem does."""

    def call(*args: Any, **kwargs: Any) -> Any:
        if when is None or when(*args, **kwargs):
            raise OSError(error, os.strerror(error))
        return real(*args, **kwargs)

    return call


def writes_file(path: Any, flags: int, *args: Any, **kwargs: Any) -> bool:
    """Whether an ``os.open`` call would create or write a file (what a read-only mount refuses)."""
    return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))


def read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every change to any filesystem fail with ``EROFS``, as on a read-only mount: opening for
    writing, making directories, renaming and removing (reads still work).

    Why injected: the tests run as root, for whom ``chmod`` does not stop writes; a read-only bind
    mount needs privileges a CI machine may lack (the test under :func:`require_mounts` uses one).
    """
    for name in ("rename", "replace", "unlink", "mkdir", "rmdir"):
        monkeypatch.setattr(os, name, failing(errno.EROFS, getattr(os, name)))
    monkeypatch.setattr(os, "open", failing(errno.EROFS, os.open, writes_file))


def disk_full(monkeypatch: pytest.MonkeyPatch, free: int = 0) -> list[int]:
    """Make ``os.pwritev`` (the call the tier writes with) behave as on a disk with ``free`` bytes
    left: it writes what still fits (a short write), and once nothing does, fails with ``ENOSPC``.
    Returns a list that gets one item per failed call."""
    real = os.pwritev
    left = [free]
    failures: list[int] = []

    def pwritev(fd: int, buffers: Any, offset: int) -> int:
        if left[0] <= 0:
            failures.append(fd)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        first = memoryview(buffers[0]).cast("B")
        written = int(real(fd, [first[: min(left[0], first.nbytes)]], offset))
        left[0] -= written
        return written

    monkeypatch.setattr(os, "pwritev", pwritev)
    return failures


@contextlib.contextmanager
def mounted(target: Path, *options: str) -> Iterator[Path]:
    """Mount with ``mount *options ... target`` (a tmpfs of a size, a read-only bind) for the duration;
    skips unless this process may mount (:func:`kvtest.require_mounts`)."""
    require_mounts()
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", *options, str(target)], capture_output=True, check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)
