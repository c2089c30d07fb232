"""The remote tier under injected faults: nothing raises into the caller, every fault is counted.

A server that is down from the start, killed and restarted, paused (slow or hung), refusing the
password; values corrupted by another client; a redis-py without a raw socket; a failing callback; a
full queue. Servers are ``redis-server`` processes on 127.0.0.1 (the ``redis_server`` fixture); URLs of
servers that are down use a free 127.0.0.1 port.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from kvtest import SMALL_SHAPE, random_bits, same_bits, wait_until
from lmcache import remote
from lmcache.remote import connections, replies
from redis_server import (
    HOST,
    SECRET,
    RedisServer,
    chunk_shape,
    free_port,
    require_redis,
    tier_for,
)

SHAPE = SMALL_SHAPE


# -- a server that is down, dies, or hangs -------------------------------------------------------------
def test_server_down_at_start_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis://{HOST}:{free_port()}/0"  # nothing listens there
    chunk = random_bits(SHAPE, "float16")
    done: list[bool] = []
    tier = tier_for(url)
    tier.submit(b"a", chunk, "float16", SHAPE, done.append)
    start = time.monotonic()
    assert tier.flush(5.0)
    assert tier.fetch([b"a", b"b"], "float16", [SHAPE, SHAPE]) == [None, None]
    assert tier.probe([b"a"], "float16", [SHAPE]) == [False]
    assert not tier.write(b"a", chunk, "float16", SHAPE)
    tier.close()
    assert time.monotonic() - start < 3
    assert done == [False]
    stats = tier.stats()
    assert stats.errors >= 1
    assert stats.dropped == 1
    assert stats.writes == 0
    assert not stats.connected


def test_kill_and_restart_resumes_writes(redis_server: RedisServer) -> None:
    chunk = random_bits(SHAPE, "float16")
    with tier_for(redis_server.url) as tier:
        tier.submit(b"before", chunk, "float16", SHAPE)
        assert tier.flush(5.0)
        redis_server.kill()
        for i in range(5):  # everything fails soft while the server is gone
            tier.submit(b"during%d" % i, chunk, "float16", SHAPE)
            assert tier.fetch([b"before"], "float16", [SHAPE]) == [None]
        assert tier.flush(5.0)
        errors = tier.stats().errors
        assert errors >= 1
        redis_server.start()  # empty: persistence is off

        def write_lands() -> bool:
            tier.submit(b"after", chunk, "float16", SHAPE)
            tier.flush(5.0)
            return tier.fetch([b"after"], "float16", [SHAPE])[0] is not None

        start = time.monotonic()
        assert wait_until(write_lands, 10)
        assert time.monotonic() - start < 5  # the backoff is capped: writes resume within seconds
        stats = tier.stats()
        assert stats.connected
        assert stats.corrupt == 0
        assert bytes(tier.fetch([b"after"], "float16", [SHAPE])[0]) == chunk.tobytes()


def test_backoff_limits_attempts_while_down() -> None:
    url = f"redis://{HOST}:{free_port()}/0"
    with tier_for(url, backoff_initial=0.1, backoff_max=0.4) as tier:
        start = time.monotonic()
        while time.monotonic() - start < 1.0:
            tier.fetch([b"x"], "float16", [SHAPE])
            time.sleep(0.001)
        # ~1000 calls in one second; without the backoff each would be an attempt. With it: a few.
        assert 1 <= tier.stats().errors <= 12


def test_slow_server_times_out_and_close_is_prompt(redis_server: RedisServer) -> None:
    chunk = random_bits(SHAPE, "float16")
    tier = tier_for(redis_server.url, socket_timeout=0.3)
    try:
        assert tier.write(b"k", chunk, "float16", SHAPE)
        redis_server.pause()
        start = time.monotonic()
        assert tier.fetch([b"k"], "float16", [SHAPE]) == [None]
        tier.submit(b"k2", chunk, "float16", SHAPE)
        tier.close(timeout=0.5)
        assert time.monotonic() - start < 3
        assert tier.stats().errors >= 1
    finally:
        redis_server.resume()


def test_close_cuts_off_a_write_stuck_on_a_hung_server(redis_server: RedisServer) -> None:
    big = np.zeros(64 << 20, np.uint8)  # far more than the socket buffers: the send blocks
    shape = (64, 2, 256, 8, 256)
    done: list[bool] = []
    tier = tier_for(redis_server.url, socket_timeout=30.0)  # a send would wait 30 s on its own
    try:
        assert tier.write(b"warm", big[:4096], "uint8", (1, 2, 16, 8, 16))
        redis_server.pause()
        tier.submit(b"big", big, "uint8", shape, done.append)
        assert wait_until(lambda: tier.stats().pending == 1 and not tier.flush(0.01), 5)
        start = time.monotonic()
        tier.close(timeout=0.2)
        assert time.monotonic() - start < 1.5
        assert wait_until(lambda: done == [False], 5)
        assert tier.stats().dropped == 1
    finally:
        redis_server.resume()


def test_stream_with_the_server_down_misses_and_counts() -> None:
    with tier_for(f"redis://{HOST}:{free_port()}/0") as tier:
        with tier.stream([b"a"], "float16", [SHAPE]) as replies:
            assert not replies.hit(0)
            assert not replies.read_into(np.empty(SHAPE, np.float16))
        assert tier.stats().errors == 1


# -- writes that cannot all be sent --------------------------------------------------------------------
def test_queue_full_drops_the_oldest_write(redis_server: RedisServer) -> None:
    """A paused server holds the first write in flight; the queue of 2 then drops its oldest write. When
    the send fails, what is queued is dropped too (it would wait out the backoff with its chunks pinned),
    and a write submitted during the backoff is dropped at once."""
    chunk = random_bits(SHAPE, "float16")
    done: list[tuple[bytes, bool]] = []
    tier = tier_for(
        redis_server.url, queue_size=2, socket_timeout=3.0, backoff_initial=30.0, backoff_max=30.0
    )
    redis_server.pause()
    try:
        tier.submit(b"first", chunk, "float16", SHAPE, lambda sent: done.append((b"first", sent)))
        time.sleep(0.3)  # the writer takes it and hangs on the paused server
        for key in (b"a", b"b", b"c"):
            tier.submit(key, chunk, "float16", SHAPE, lambda sent, key=key: done.append((key, sent)))
        assert done == [(b"a", False)]
        assert tier.stats().dropped == 1
        assert tier.stats().pending == 3  # first in flight, b and c queued
        assert tier.flush(0.05) is False
        assert wait_until(lambda: len(done) == 4)  # the send timed out: everything is dropped
        assert sorted(done[1:]) == [(b"b", False), (b"c", False), (b"first", False)]
        assert tier.stats().dropped == 4
        assert tier.stats().pending == 0
        tier.submit(b"late", chunk, "float16", SHAPE, lambda sent: done.append((b"late", sent)))
        assert done[-1] == (b"late", False)  # in the backoff: dropped at once, nothing stays pinned
        assert tier.stats().dropped == 5
    finally:
        redis_server.resume()
        tier.close(timeout=0.1)


def test_a_failing_callback_does_not_stop_the_writer(redis_server: RedisServer) -> None:
    chunk = random_bits(SHAPE, "float16")

    def broken(sent: bool) -> None:
        raise RuntimeError("callback bug")

    with tier_for(redis_server.url) as tier:
        tier.submit(b"a", chunk, "float16", SHAPE, broken)
        tier.submit(b"b", chunk, "float16", SHAPE)
        assert tier.flush(5.0)
        assert tier.stats().writes == 2


# -- values damaged by another client ------------------------------------------------------------------
def test_values_corrupted_by_another_client_are_rejected_and_counted(redis_server: RedisServer) -> None:
    chunk = random_bits(SHAPE, "float16")
    raw = redis_server.client()
    with tier_for(redis_server.url) as tier:
        keys = [b"flip", b"truncate", b"foreign", b"list", b"dtype", b"good"]
        for key in keys:
            assert tier.write(key, chunk, "float16", SHAPE)
        raw.setrange(b"flip", 200, b"\xff\x00")
        raw.set(b"truncate", raw.get(b"truncate")[:-100])
        raw.set(b"foreign", b"some other application's value")
        raw.delete(b"list")
        raw.rpush(b"list", b"a", b"b")
        assert tier.write(b"dtype", chunk.view(np.int8), "int8", (*SHAPE[:4], 16))
        got = tier.fetch(keys, "float16", [SHAPE] * len(keys))
        assert got[:5] == [None] * 5
        assert got[5] is not None
        assert bytes(got[5]) == chunk.tobytes()
        stats = tier.stats()
        assert (stats.corrupt, stats.hits, stats.errors) == (5, 1, 0)
        assert tier.probe([b"list"], "float16", [SHAPE]) == [False]


@pytest.mark.parametrize("damage", ["payload", "header", "short", "list"])
def test_stream_rejects_damaged_values(redis_server: RedisServer, damage: str) -> None:
    chunk = random_bits(SHAPE, "float16")
    raw = redis_server.client()
    with tier_for(redis_server.url) as tier:
        assert tier.write(b"v", chunk, "float16", SHAPE)
        assert tier.write(b"w", chunk, "float16", SHAPE)
        if damage == "payload":
            raw.setrange(b"v", remote.HEADER.size + 5, b"\x01")
        elif damage == "header":
            raw.setrange(b"v", 30, b"\x01")  # the dtype name
        elif damage == "short":
            raw.set(b"v", b"tiny")
        else:
            raw.delete(b"v")
            raw.rpush(b"v", b"x")
        out = np.zeros_like(chunk)
        with tier.stream([b"v", b"w"], "float16", [SHAPE, SHAPE]) as replies:
            assert not (replies.hit(0) and replies.read_into(out))
            assert not replies.hit(1)  # the stream ended at the rejected value
        assert tier.stats().corrupt == 1
        assert bytes(tier.fetch([b"w"], "float16", [SHAPE])[0]) == chunk.tobytes()


# -- credentials refused -------------------------------------------------------------------------------
def test_wrong_password_never_raises_and_never_leaks(caplog: pytest.LogCaptureFixture) -> None:
    server = RedisServer(require_redis(), password="the-real-one")
    server.start()
    caplog.set_level(logging.DEBUG, logger="lmcache")
    try:
        url = f"redis://:{SECRET}@{HOST}:{server.port}/0"
        tier = tier_for(url)
        chunk = random_bits(SHAPE, "float16")
        tier.submit(b"k", chunk, "float16", SHAPE)
        assert tier.flush(5.0)
        assert tier.fetch([b"k"], "float16", [SHAPE]) == [None]
        assert tier.write(b"k", chunk, "float16", SHAPE) is False
        tier.close()
        stats = tier.stats()
        assert stats.errors >= 1
        assert stats.writes == 0
        assert SECRET not in repr(tier)
        assert "***@" in repr(tier)
        assert SECRET not in str(stats)
        assert caplog.records, "failures are logged"
        assert all(SECRET not in record.getMessage() for record in caplog.records)
    finally:
        server.close()


# -- a redis-py without a raw socket -------------------------------------------------------------------
def test_stream_and_probe_fall_back_to_redis_py_without_a_socket(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = [random_bits(chunk_shape(n), "float16", seed=n) for n in (16, 5)]
    asked: list[object] = []

    def no_socket(conn: object) -> None:  # what a redis-py without a `_sock` attribute would give
        asked.append(conn)

    with tier_for(redis_server.url) as tier:
        for i, chunk in enumerate(chunks):
            assert tier.write(b"f%d" % i, chunk, "float16", chunk.shape)
        monkeypatch.setattr(replies, "raw_socket", no_socket)
        monkeypatch.setattr(connections, "raw_socket", no_socket)
        keys, shapes = [b"f0", b"f1", b"f2"], [chunks[0].shape, chunks[1].shape, SHAPE]
        with tier.stream(keys, "float16", shapes) as stream:
            assert asked  # the stream found no socket: redis-py read the replies
            looked = len(asked)
            assert stream.hit(1)
            out = np.empty_like(chunks[1])
            assert stream.read_into(out)
            assert same_bits(out, chunks[1])
            assert not stream.hit(2)
        assert (tier.stats().hits, tier.stats().misses) == (1, 1)
        assert tier.probe(keys, "float16", shapes) == [True, True, False]
        assert len(asked) > looked  # so did the probe
        assert tier.stats().errors == 0
