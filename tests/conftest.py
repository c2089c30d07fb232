"""Fixtures shared by every test module; helpers live in :mod:`kvtest`."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from disktest import close_tiers
from kvtest import BACKENDS, require
from redis_server import RedisServer, require_redis
from sharedtest import socket_dir


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each backend whose framework is installed."""
    require(request.param)
    return str(request.param)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh ``redis-server`` on a free 127.0.0.1 port, stopped after the test (skip if unavailable)."""
    server = RedisServer(require_redis())
    server.start()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _close_disk_tiers() -> Iterator[None]:
    """Close the disk tiers a test made with :func:`disktest.tier` (their writer threads end)."""
    yield
    close_tiers()


@pytest.fixture
def socket_path() -> Iterator[str]:
    """A path for a shared cache server's socket, in a fresh private directory removed afterwards."""
    with socket_dir() as directory:
        yield os.path.join(directory, "cache.sock")
