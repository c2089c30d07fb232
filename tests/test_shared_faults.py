"""Faults of real processes, killed or stopped by signals: clients that die holding leases and half-done
stores, a server that dies, restarts or hangs.

A client that dies loses what it held (the server releases it when the connection closes): nothing stays
pinned, its slots return, and no half-copied chunk is ever visible. A server that dies makes every call
of its clients answer as a miss within their timeout, never raise, and be counted; a new server on the
same path is picked up within seconds.
"""

from __future__ import annotations

import itertools
import random
import signal
import time

import numpy as np
import pytest

from cachetest import CHUNK, prefix_kv
from kvtest import wait_until
from lmcache.errors import StaleHandleError
from lmcache.shared import connect
from shared_peer import PROMPT, loop_prompts
from sharedtest import Peer, ServerProcess

SLOTS = 8


def _fill(slots: int, base: int) -> list[int]:
    """A prompt of ``slots`` full chunks nobody stored before."""
    return [base + i for i in range(slots * CHUNK)]


def test_a_client_killed_holding_a_lease_releases_it(socket_path: str) -> None:
    with ServerProcess(socket_path, SLOTS), connect(socket_path) as client:
        peer = Peer("hold-lease", socket_path)
        assert peer.line() == "held"
        assert client.stats().leased == 4
        peer.kill()
        assert wait_until(lambda: client.stats().pinned == 0, 10)
        assert client.stats().leased == 0
        assert client.lookup(PROMPT) == len(PROMPT)  # the chunks stay cached, just not pinned
        whole = _fill(SLOTS, 50_000)
        assert client.store(whole, prefix_kv(whole)) == len(whole)  # every slot can be had again


def test_a_client_killed_mid_store_leaves_nothing_visible_and_its_slots_return(socket_path: str) -> None:
    with ServerProcess(socket_path, SLOTS), connect(socket_path) as client:
        peer = Peer("hold-store", socket_path, str(SLOTS))
        assert peer.line() == f"reserved {SLOTS}"  # every slot reserved, one chunk half-written
        whole = _fill(SLOTS, 60_000)
        assert client.store(whole, prefix_kv(whole)) == 0  # no slot to be had while it holds them
        assert client.stats().chunks == 0
        peer.kill()
        assert wait_until(lambda: client.store(whole, prefix_kv(whole)) == len(whole), 10)
        assert client.lookup([900_000 + i for i in range(SLOTS * CHUNK)]) == 0
        out, n = client.retrieve(whole)
        assert n == len(whole)
        assert out.tobytes() == prefix_kv(whole).tobytes()


def test_clients_killed_at_random_while_storing_leave_only_whole_chunks(socket_path: str) -> None:
    rng = random.Random(7)
    with ServerProcess(socket_path, 32), connect(socket_path) as client:
        for seed in range(4):
            peer = Peer("store-loop", socket_path, str(seed))
            assert peer.line() == "storing"
            time.sleep(rng.uniform(0.05, 0.4))
            peer.kill()
        assert wait_until(lambda: client.stats().pinned == 0, 10)
        checked = 0
        for seed in range(4):  # every prompt a peer may have stored: hits must hold the derived bytes
            for tokens in itertools.islice(loop_prompts(seed), 400):
                out, n = client.retrieve(tokens)
                if n:
                    checked += 1
                    assert out.tobytes() == prefix_kv(tokens[:n]).tobytes()
        assert checked > 0
        whole = _fill(32, 70_000)
        assert client.store(whole, prefix_kv(whole)) == len(whole)  # no slot leaked or left pinned


def test_a_dead_server_gives_misses_within_the_timeout(socket_path: str) -> None:
    server = ServerProcess(socket_path, SLOTS).start()
    try:
        client = connect(socket_path, timeout=2.0)
        kv = prefix_kv(PROMPT)
        assert client.store(PROMPT, kv) == len(PROMPT)
        lease = client.lease(PROMPT)
        kept = lease.chunks[0]
        server.signal(signal.SIGKILL)
        start = time.monotonic()
        assert client.lookup(PROMPT) == 0
        assert client.store(PROMPT, kv) == 0
        out = np.full((2, 2, len(PROMPT), 2, 8), 3, dtype=np.float16)
        assert client.retrieve(PROMPT, out=out) == (None, 0)
        assert (out == 3).all()
        assert client.retrieve(PROMPT) == (None, 0)
        assert client.lease(PROMPT).num_tokens == 0
        assert client.clear() == 0
        stats = client.stats()
        assert time.monotonic() - start < 2.0  # a dead server refuses at once: no call waits
        assert stats.errors >= 6
        assert not stats.connected
        assert stats.chunks == 0
        assert lease.released  # the connection is gone, and with it the lease
        with pytest.raises(StaleHandleError):
            kept.as_numpy()
        client.close()
    finally:
        server.stop()


def test_a_restarted_server_is_picked_up_within_seconds(socket_path: str) -> None:
    first = ServerProcess(socket_path, SLOTS).start()
    client = connect(socket_path, timeout=2.0)
    try:
        old_id = client.server_id
        first.signal(signal.SIGKILL)  # its socket file stays behind, stale
        assert client.lookup(PROMPT) == 0
        with ServerProcess(socket_path, SLOTS):
            start = time.monotonic()
            assert wait_until(lambda: client.store(PROMPT, prefix_kv(PROMPT)) == len(PROMPT), 10)
            assert time.monotonic() - start < 3.0  # the backoff is capped at one second
            assert client.server_id != old_id
            assert client.stats().reconnects >= 1
            assert client.stats().connected
            out, n = client.retrieve(PROMPT)
            assert n == len(PROMPT)
            assert out.tobytes() == prefix_kv(PROMPT).tobytes()
    finally:
        client.close()
        first.stop()


def test_a_stalled_server_times_out_and_what_it_granted_late_is_given_back(socket_path: str) -> None:
    with ServerProcess(socket_path, SLOTS) as server, connect(socket_path, timeout=0.5) as client:
        kv = prefix_kv(PROMPT)
        assert client.store(PROMPT, kv) == len(PROMPT)
        server.signal(signal.SIGSTOP)
        start = time.monotonic()
        assert client.lease(PROMPT).num_tokens == 0  # the server pins, but too late: an empty lease
        assert time.monotonic() - start < 1.5
        assert client.lookup(PROMPT) == 0  # in the backoff: answered at once
        server.signal(signal.SIGCONT)
        fresh = [80_000 + i for i in range(3 * CHUNK)]
        assert wait_until(lambda: client.store(fresh, prefix_kv(fresh)) == len(fresh), 10)
        stats = client.stats()
        assert (stats.leased, stats.pinned) == (0, 0)  # the late lease was released on arrival
        assert stats.errors >= 2
        assert client.lookup(PROMPT) == len(PROMPT)
