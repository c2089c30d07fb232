"""The remote tier (:mod:`lmcache.remote`) on its own: the value format, and a real redis-server.

Every server is a ``redis-server`` started by the ``redis_server`` fixture on 127.0.0.1; the tests
contact no other address (URLs of servers that are down use a free 127.0.0.1 port).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from kvtest import SMALL_SHAPE, random_bits, require, same_bits, small_pool, to_native
from lmcache import remote
from lmcache.dtypes import KV_DTYPES
from lmcache.errors import ConfigError
from redis_server import HOST, RedisServer, free_port, require_client, require_redis, run_peer

SHAPE = SMALL_SHAPE


def tier_for(url: str, **kwargs: Any) -> Any:
    """A tier with short timeouts, so fault tests finish in well under a second per fault."""
    require_redis()
    options: dict[str, Any] = {"socket_timeout": 0.5, "connect_timeout": 0.5, "backoff_max": 0.2}
    options.update(kwargs)
    return remote.RedisTier(url, **options)


def chunk_shape(tokens: int) -> tuple[int, int, int, int, int]:
    return (SHAPE[0], SHAPE[1], tokens, SHAPE[3], SHAPE[4])


def wait_until(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# -- the value format (no server) --------------------------------------------------------------------
def encoded(key: bytes, payload: np.ndarray, dtype: str) -> bytes:
    view = remote.byte_view(payload)
    return remote.encode_header(key, view, dtype, payload.shape) + view.tobytes()


@pytest.mark.parametrize("dtype", sorted(KV_DTYPES))
def test_format_round_trip_is_exact(dtype: str) -> None:
    require_client()
    payload = random_bits(chunk_shape(5), dtype, seed=3)
    value = encoded(b"k1", payload, dtype)
    assert len(value) == remote.HEADER.size + payload.nbytes
    out = remote.decode_value(b"k1", value, dtype, payload.shape)
    assert bytes(out) == payload.tobytes()
    assert np.frombuffer(out, np.uint8).ctypes.data == np.frombuffer(value, np.uint8).ctypes.data + 64


def test_byte_view_is_the_array_memory() -> None:
    array = random_bits(SHAPE, "bfloat16")
    view = remote.byte_view(array)
    assert view.nbytes == array.nbytes
    assert np.frombuffer(view, np.uint8).ctypes.data == array.ctypes.data
    with pytest.raises(ConfigError, match="C-contiguous"):
        remote.byte_view(array[:, :, ::2])


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("truncated", "payload bytes"),
        ("short", "shorter than"),
        ("magic", "magic"),
        ("version", "version"),
        ("dtype", "holds"),
        ("shape", "shape"),
        ("other key", "checksum"),
        ("flipped bit", "checksum"),
        ("extra bytes", "payload bytes"),
    ],
)
def test_format_rejects_every_mismatch(case: str, reason: str) -> None:
    require_client()
    payload = random_bits(chunk_shape(4), "float16")
    value = bytearray(encoded(b"key", payload, "float16"))
    key, dtype, shape = b"key", "float16", payload.shape
    if case == "truncated":
        value = value[:-1]
    elif case == "short":
        value = value[:10]
    elif case == "magic":
        value[0:4] = b"XXXX"
    elif case == "version":
        value[4] = 2
    elif case == "dtype":
        dtype = "bfloat16"
    elif case == "shape":
        shape = chunk_shape(2)
    elif case == "other key":
        key = b"kez"
    elif case == "flipped bit":
        value[-7] ^= 0x10
    elif case == "extra bytes":
        value += b"\0"
    with pytest.raises(remote.RemoteValueError, match=reason):
        remote.decode_value(key, bytes(value), dtype, shape)


@settings(max_examples=60, deadline=None)
@given(position=st.integers(0, remote.HEADER.size + 2 * 2 * 4 * 2 * 8 * 2 - 1), bit=st.integers(0, 7))
def test_format_rejects_any_single_bit_flip(position: int, bit: int) -> None:
    require_client()
    payload = random_bits(chunk_shape(4), "float16", seed=1)
    value = bytearray(encoded(b"key", payload, "float16"))
    value[position] ^= 1 << bit
    with pytest.raises(remote.RemoteValueError):
        remote.decode_value(b"key", bytes(value), "float16", payload.shape)


def test_encode_checks_its_arguments() -> None:
    require_client()
    view = remote.byte_view(random_bits(chunk_shape(4), "float16"))
    with pytest.raises(ConfigError, match="needs"):
        remote.encode_header(b"k", view, "float16", chunk_shape(3))
    with pytest.raises(ConfigError, match="unknown dtype"):
        remote.encode_header(b"k", view, "complex64", chunk_shape(4))
    with pytest.raises(ConfigError, match="5 dims"):
        remote.encode_header(b"k", view, "float16", (4, 256))


# -- the tier against a real server ------------------------------------------------------------------
def test_write_and_fetch_bit_exact_from_and_into_slots(redis_server: RedisServer, backend: str) -> None:
    writer_pool = small_pool(backend, "bfloat16")
    reader_pool = small_pool(backend, "bfloat16")
    chunks = [random_bits(chunk_shape(n), "bfloat16", seed=n) for n in (16, 16, 7)]
    objs = [writer_pool.put(to_native(c, backend)) for c in chunks]
    done: list[tuple[int, bool]] = []
    with tier_for(redis_server.url, key_prefix="t1:") as tier:
        keys = [tier.key("ns", bytes([i]) * 16) for i in range(3)]
        assert keys[0] == b"t1:ns:" + (b"00" * 16)
        for i, (key, obj) in enumerate(zip(keys, objs, strict=True)):
            slot = obj.as_numpy()  # the payload is the slot's own memory: nothing is copied first
            assert np.frombuffer(remote.byte_view(slot), np.uint8).ctypes.data == writer_pool.slot_address(
                obj.chunk_idx
            )
            tier.submit(key, slot, "bfloat16", slot.shape, lambda sent, i=i: done.append((i, sent)))
        assert tier.flush(5.0)
        assert sorted(done) == [(0, True), (1, True), (2, True)]
        assert tier.probe([*keys, b"t1:ns:missing"], "bfloat16", [c.shape for c in chunks] + [SHAPE]) == [
            True,
            True,
            True,
            False,
        ]
        payloads = tier.fetch(keys, "bfloat16", [c.shape for c in chunks])
        for chunk, payload in zip(chunks, payloads, strict=True):
            assert payload is not None
            obj = reader_pool.allocate(chunk)
            obj.copy_from(np.frombuffer(payload, KV_DTYPES["bfloat16"].numpy_dtype).reshape(chunk.shape))
            assert same_bits(obj.as_numpy(), chunk)
        stats = tier.stats()
        assert (stats.writes, stats.hits, stats.errors, stats.corrupt, stats.pending) == (3, 3, 0, 0, 0)
        assert stats.connected


def test_probe_checks_the_length(redis_server: RedisServer) -> None:
    with tier_for(redis_server.url) as tier:
        chunk = random_bits(chunk_shape(3), "float16")
        assert tier.write(b"k", chunk, "float16", chunk.shape)
        assert tier.probe([b"k", b"k"], "float16", [chunk.shape, chunk_shape(4)]) == [True, False]
        assert tier.fetch([b"k"], "float16", [chunk_shape(4)]) == [None]
        assert tier.stats().corrupt == 1


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


def test_ttl_is_set(redis_server: RedisServer) -> None:
    chunk = random_bits(SHAPE, "float16")
    with tier_for(redis_server.url, ttl=30) as tier:
        assert tier.write(b"ttl", chunk, "float16", SHAPE)
    assert 0 < redis_server.client().pttl(b"ttl") <= 30_000


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


def test_queue_full_drops_the_oldest_write() -> None:
    url = f"redis://{HOST}:{free_port()}/0"
    chunk = random_bits(SHAPE, "float16")
    done: list[tuple[bytes, bool]] = []
    tier = tier_for(url, queue_size=2, backoff_initial=30.0, backoff_max=30.0)
    try:
        tier.submit(b"first", chunk, "float16", SHAPE, lambda sent: done.append((b"first", sent)))
        assert wait_until(lambda: done == [(b"first", False)])  # failed: the writer now backs off 30 s
        assert tier.stats().errors == 1
        assert tier.flush(0.0)
        for key in (b"a", b"b", b"c"):
            tier.submit(key, chunk, "float16", SHAPE, lambda sent, key=key: done.append((key, sent)))
        assert done == [(b"first", False), (b"a", False)]
        assert tier.stats().dropped == 2
        assert tier.stats().pending == 2
        assert tier.flush(0.05) is False
    finally:
        tier.close(timeout=0.1)
    assert done[2:] == [(b"b", False), (b"c", False)]
    assert tier.stats().dropped == 4
    assert tier.stats().pending == 0
    tier.submit(b"late", chunk, "float16", SHAPE, lambda sent: done.append((b"late", sent)))
    assert done[-1] == (b"late", False)


def test_bad_payload_is_refused_before_queueing(redis_server: RedisServer) -> None:
    with tier_for(redis_server.url) as tier:
        with pytest.raises(ConfigError, match="needs"):
            tier.submit(b"k", np.zeros(10, np.uint8), "float16", SHAPE)
        with pytest.raises(ConfigError, match="needs"):
            tier.write(b"k", np.zeros(10, np.uint8), "float16", SHAPE)
        assert tier.stats().pending == 0
        with pytest.raises(ConfigError, match="shapes"):
            tier.fetch([b"k"], "float16", [])


def test_a_failing_callback_does_not_stop_the_writer(redis_server: RedisServer) -> None:
    chunk = random_bits(SHAPE, "float16")

    def broken(sent: bool) -> None:
        raise RuntimeError("callback bug")

    with tier_for(redis_server.url) as tier:
        tier.submit(b"a", chunk, "float16", SHAPE, broken)
        tier.submit(b"b", chunk, "float16", SHAPE)
        assert tier.flush(5.0)
        assert tier.stats().writes == 2


# -- credentials -------------------------------------------------------------------------------------
SECRET = "s3cret-Pa55word"


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


def test_password_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    server = RedisServer(require_redis(), password=SECRET)
    server.start()
    try:
        monkeypatch.setenv("REDIS_PASSWORD", SECRET)
        chunk = random_bits(SHAPE, "float16")
        with tier_for(server.url) as tier:
            assert tier.write(b"k", chunk, "float16", SHAPE)
            assert tier.fetch([b"k"], "float16", [SHAPE])[0] is not None
            assert SECRET not in repr(tier)
    finally:
        server.close()


def test_config_errors_never_show_the_password() -> None:
    require_redis()
    for kwargs in ({"socket_timeout": 0}, {"queue_size": 0}, {"ttl": -1}, {"key_prefix": 3}):
        with pytest.raises(ConfigError) as info:
            remote.RedisTier(f"redis://user:{SECRET}@{HOST}:1/0", **kwargs)
        assert SECRET not in str(info.value)
    with pytest.raises(ConfigError, match="redis://") as info:
        remote.RedisTier(f"http://user:{SECRET}@{HOST}:1/0")
    assert SECRET not in str(info.value)
    with pytest.raises(ConfigError) as info:
        remote.RedisTier(f"redis://user:{SECRET}@{HOST}:notaport/0")
    assert SECRET not in str(info.value)
    assert remote.redact_url(f"rediss://user:{SECRET}@h:1/0") == "rediss://***@h:1/0"


def test_rediss_passes_tls_to_the_client() -> None:
    require_redis()
    tier = remote.RedisTier(f"rediss://{HOST}:{free_port()}/0", client_options={"ssl_cert_reqs": "none"})
    try:
        assert tier.client.connection_pool.connection_class.__name__ == "SSLConnection"
    finally:
        tier.close()


# -- two processes share chunks ----------------------------------------------------------------------
@pytest.mark.parametrize(("writer", "reader"), [("torch", "jax"), ("numpy", "numpy")])
def test_two_processes_share_chunks_bit_exactly(redis_server: RedisServer, writer: str, reader: str) -> None:
    require(writer)
    require(reader)
    run_peer("tier", "write", writer, redis_server.url, "bfloat16")
    assert run_peer("tier", "read", reader, redis_server.url, "bfloat16").strip() == "ok 3"


# -- a model of the tier -----------------------------------------------------------------------------
class TierModel(RuleBasedStateMachine):
    """Queued writes, flushes, fetches, and values overwritten or deleted by another client.

    The model is what the server should hold after every queued write landed: a chunk, a corrupted
    value, or nothing. Every fetch must return exactly the model's chunk or a miss.
    """

    server: RedisServer
    KEYS = (b"a", b"b", b"c")

    def __init__(self) -> None:
        super().__init__()
        self.raw = self.server.client()
        self.raw.flushall()
        self.tier = tier_for(self.server.url, key_prefix="")
        self.queued: dict[bytes, np.ndarray] = {}
        self.model: dict[bytes, tuple[np.ndarray, bool]] = {}  # key -> (chunk, corrupted)
        self.fetched = self.submitted = 0

    @rule(key=st.sampled_from(KEYS), tokens=st.integers(1, SHAPE[2]), seed=st.integers(0, 2**16))
    def submit(self, key: bytes, tokens: int, seed: int) -> None:
        chunk = random_bits(chunk_shape(tokens), "float16", seed)
        self.tier.submit(key, chunk, "float16", chunk.shape)
        self.queued[key] = chunk
        self.submitted += 1

    @rule()
    def flush(self) -> None:
        assert self.tier.flush(5.0)
        self.model.update((key, (chunk, False)) for key, chunk in self.queued.items())
        self.queued.clear()

    @rule(key=st.sampled_from(KEYS), offset=st.integers(0, remote.HEADER.size + 127))
    def overwrite_a_byte(self, key: bytes, offset: int) -> None:
        self.flush()
        if key in self.model:
            chunk, _ = self.model[key]
            old = self.raw.getrange(key, offset, offset)
            self.raw.setrange(key, offset, bytes([old[0] ^ 0x40]))
            self.model[key] = (chunk, True)

    @rule(key=st.sampled_from(KEYS))
    def delete(self, key: bytes) -> None:
        self.flush()
        self.raw.delete(key)
        self.model.pop(key, None)

    @rule()
    def fetch(self) -> None:
        self.flush()
        shapes = [self.model[k][0].shape if k in self.model else SHAPE for k in self.KEYS]
        corrupt_before = self.tier.stats().corrupt
        got = self.tier.fetch(self.KEYS, "float16", shapes)
        self.fetched += len(self.KEYS)
        for key, payload in zip(self.KEYS, got, strict=True):
            if key in self.model and not self.model[key][1]:
                assert payload is not None
                assert bytes(payload) == self.model[key][0].tobytes()
            else:
                assert payload is None
        corrupted = sum(1 for k in self.KEYS if k in self.model and self.model[k][1])
        assert self.tier.stats().corrupt - corrupt_before == corrupted

    @invariant()
    def counters_add_up(self) -> None:
        stats = self.tier.stats()
        assert stats.hits + stats.misses + stats.corrupt == self.fetched
        assert stats.writes + stats.pending == self.submitted
        assert (stats.errors, stats.dropped) == (0, 0)

    def teardown(self) -> None:
        self.tier.close()
        self.raw.close()


def test_tier_state_machine(redis_server: RedisServer) -> None:
    TierModel.server = redis_server
    run_state_machine_as_test(
        TierModel, settings=settings(max_examples=30, stateful_step_count=20, deadline=None)
    )


# -- isolation and the benchmark section -------------------------------------------------------------
def test_importing_the_module_imports_no_client_library() -> None:
    code = (
        "import sys, lmcache.remote, lmcache.bench_remote, lmcache.chunk_cache; "
        "bad = [m for m in ('redis', 'xxhash', 'torch', 'jax') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "adapters")]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_missing_client_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmcache.errors import BackendUnavailableError

    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(BackendUnavailableError, match=r"pip install 'lmcache-mempool\[redis\]'"):
        remote.RedisTier(f"redis://{HOST}:1/0")


def test_bench_section_measures_against_raw_commands() -> None:
    require_redis()
    from lmcache.bench import Options
    from lmcache.bench_remote import bench_remote

    results = bench_remote(Options(repeat=1, progress=None))
    metrics = [r.metric for r in results]
    assert metrics == [
        "remote put (256 KiB chunk)",
        "remote get (256 KiB chunk)",
        "remote put (32 MiB chunk)",
        "remote get (32 MiB chunk)",
        "remote probe of 128 chunks, one pipelined round trip",
        "ChunkCache.lookup of 128 chunks held only by the server",
    ]
    for result in results[:4]:
        assert result.target == 0.8
        assert result.ratio is not None
        assert result.baseline is not None
        assert result.ratio == pytest.approx(result.value / result.baseline)


# -- streams: payloads from the socket straight into slots -------------------------------------------
def test_stream_reads_payloads_into_slots_skipping_replies(redis_server: RedisServer) -> None:
    chunks = [random_bits(chunk_shape(n), "float16", seed=n) for n in (16, 3, 16, 9)]
    pool = small_pool("numpy", "float16")
    with tier_for(redis_server.url) as tier:
        for i, chunk in enumerate(chunks):
            if i != 1:
                assert tier.write(b"s%d" % i, chunk, "float16", chunk.shape)
        keys = [b"s%d" % i for i in range(4)]
        shapes = [c.shape for c in chunks]
        with tier.stream(keys, "float16", shapes) as replies:
            assert replies.hit(0)  # its payload is never read: hit(2) drops it, and reply 1 (a miss)
            assert replies.hit(2)
            obj = pool.allocate(chunks[2])
            slot = obj.as_numpy()
            assert replies.read_into(slot)  # straight into the slot
            assert same_bits(slot, chunks[2])
            assert replies.hit(3)
            assert replies.read_into(pool.allocate(chunks[3]).as_numpy())
            assert not replies.hit(3)  # indices only go forward
        with tier.stream(keys, "float16", shapes) as replies:
            assert replies.hit(0)
            assert replies.read_into(np.empty_like(chunks[0]))
            assert not replies.hit(1)  # a miss ends the stream
            assert not replies.hit(2)
        stats = tier.stats()
        assert (stats.hits, stats.misses, stats.corrupt, stats.errors) == (3, 1, 0, 0)
        # the connections were left in step: plain reads still answer correctly
        assert bytes(tier.fetch([b"s3"], "float16", [chunks[3].shape])[0]) == chunks[3].tobytes()


def test_stream_closed_early_leaves_no_reply_behind(redis_server: RedisServer) -> None:
    chunk = random_bits(SHAPE, "float16")
    with tier_for(redis_server.url) as tier:
        for key in (b"a", b"b", b"c"):
            assert tier.write(key, chunk, "float16", SHAPE)
        with tier.stream([b"a", b"b", b"c"], "float16", [SHAPE] * 3) as replies:
            assert replies.hit(0)  # closed with most replies unread: the connection must not be reused
        for _ in range(3):
            assert tier.write(b"d", chunk, "float16", SHAPE)
            with tier.stream([b"d"], "float16", [SHAPE]) as replies:
                out = np.empty_like(chunk)
                assert replies.hit(0)
                assert replies.read_into(out)
                assert same_bits(out, chunk)
        assert tier.stats().errors == 0


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


def test_stream_with_the_server_down_misses_and_counts() -> None:
    with tier_for(f"redis://{HOST}:{free_port()}/0") as tier:
        with tier.stream([b"a"], "float16", [SHAPE]) as replies:
            assert not replies.hit(0)
            assert not replies.read_into(np.empty(SHAPE, np.float16))
        assert tier.stats().errors == 1


def test_stream_falls_back_to_redis_py_without_a_socket(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = [random_bits(chunk_shape(n), "float16", seed=n) for n in (16, 5)]
    with tier_for(redis_server.url) as tier:
        for i, chunk in enumerate(chunks):
            assert tier.write(b"f%d" % i, chunk, "float16", chunk.shape)

        class NoSocket:  # what a redis-py without a `_sock` attribute would hand out
            def connect(self) -> None:
                pass

            def disconnect(self) -> None:
                pass

        monkeypatch.setattr(tier, "borrow", NoSocket)
        monkeypatch.setattr(tier, "give_back", lambda conn: None)
        keys, shapes = [b"f0", b"f1", b"f2"], [chunks[0].shape, chunks[1].shape, SHAPE]
        with tier.stream(keys, "float16", shapes) as replies:
            assert replies.hit(1)
            out = np.empty_like(chunks[1])
            assert replies.read_into(out)
            assert same_bits(out, chunks[1])
            assert not replies.hit(2)
        assert (tier.stats().hits, tier.stats().misses) == (1, 1)
        assert tier.probe(keys, "float16", shapes) == [True, True, False]
        assert tier.stats().errors == 0


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
