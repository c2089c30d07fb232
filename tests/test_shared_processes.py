"""Processes sharing one cache server: across frameworks, without any framework, and all at once.

The server is ``python -m lmcache serve`` (:class:`sharedtest.ServerProcess`) or an in-process
:class:`~lmcache.shared.CacheServer`; the clients are ``tests/shared_peer.py`` processes.
"""

from __future__ import annotations

import os
import signal

import pytest

from cachetest import prefix_kv
from kvtest import require, wait_until
from lmcache.shared import CacheServer, connect
from sharedtest import Peer, ServerProcess, metadata, run_peer

#: (writer backend, reader backend, dtype): torch -> JAX is the pair no other system serves.
PAIRS = [
    ("numpy", "numpy", "float16"),
    ("torch", "numpy", "bfloat16"),
    ("jax", "numpy", "bfloat16"),
    ("torch", "jax", "bfloat16"),
    ("torch", "jax", "float8_e4m3fn"),
    ("jax", "torch", "bfloat16"),
]


@pytest.mark.parametrize(("writer", "reader", "dtype"), PAIRS, ids=["-".join(p) for p in PAIRS])
def test_one_process_writes_another_reads_zero_copy(
    socket_path: str, writer: str, reader: str, dtype: str
) -> None:
    require(writer)
    require(reader)
    with ServerProcess(socket_path, 16, dtype):
        assert run_peer("write", socket_path, writer, dtype).split() == ["ok", "55"]
        assert run_peer("read", socket_path, reader, dtype).split() == ["ok", "55", "zero-copy"]


def test_a_numpy_only_process_imports_no_framework(socket_path: str) -> None:
    with CacheServer(socket_path, metadata(16)):
        assert run_peer("numpy-only", socket_path).strip() == "ok"


def test_concurrent_clients_store_and_read_overlapping_prompts(socket_path: str) -> None:
    """Four processes store, retrieve, lease and look up prompts that share prefixes, in a cache too
    small for all of them (evicting all the time); every byte any of them reads is the one derived from
    its tokens."""
    with ServerProcess(socket_path, 24):
        workers = [Peer("worker", socket_path, str(seed), "300") for seed in range(4)]
        results = [worker.finish().split() for worker in workers]
        for words in results:
            assert words[0] == "ok"
            assert int(words[1]) > 100
            assert words[2] == "0", f"a worker read wrong bytes: {results}"
        with connect(socket_path) as client:
            assert wait_until(lambda: client.stats().pinned == 0)
            stats = client.stats()
            assert stats.evicted > 0
            assert stats.leased == 0
        for worker in workers:
            worker.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_server_process_stops_cleanly_on_a_signal(socket_path: str, signum: int) -> None:
    server = ServerProcess(socket_path, 8).start()
    tokens = list(range(20))
    with connect(socket_path) as client:
        assert client.store(tokens, prefix_kv(tokens)) == 20
        assert server.signal(signum) == 0
        assert not os.path.exists(socket_path)
        assert client.lookup(tokens) == 0  # a miss, not an error raised
    server.stop()
