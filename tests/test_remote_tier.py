"""The remote tier (:class:`lmcache.remote.RedisTier`) against a real redis-server, while it behaves.

Every server is a ``redis-server`` started by the ``redis_server`` fixture on 127.0.0.1; the tests
contact no other address. Faults (a server down, killed, paused, corrupted values) are in
``test_remote_faults.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from kvtest import SMALL_SHAPE, random_bits, require, same_bits, small_pool, to_native
from lmcache import remote
from lmcache.dtypes import KV_DTYPES
from lmcache.errors import ConfigError
from lmcache.remote.stats import Counters
from redis_server import (
    HOST,
    SECRET,
    RedisServer,
    chunk_shape,
    free_port,
    require_client,
    require_redis,
    run_peer,
    tier_for,
)

SHAPE = SMALL_SHAPE


# -- writes, reads and probes --------------------------------------------------------------------------
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


def test_ttl_is_set(redis_server: RedisServer) -> None:
    chunk = random_bits(SHAPE, "float16")
    with tier_for(redis_server.url, ttl=30) as tier:
        assert tier.write(b"ttl", chunk, "float16", SHAPE)
    assert 0 < redis_server.client().pttl(b"ttl") <= 30_000


def test_bad_payload_is_refused_before_queueing(redis_server: RedisServer) -> None:
    with tier_for(redis_server.url) as tier:
        with pytest.raises(ConfigError, match="needs"):
            tier.submit(b"k", np.zeros(10, np.uint8), "float16", SHAPE)
        with pytest.raises(ConfigError, match="needs"):
            tier.write(b"k", np.zeros(10, np.uint8), "float16", SHAPE)
        assert tier.stats().pending == 0
        with pytest.raises(ConfigError, match="shapes"):
            tier.fetch([b"k"], "float16", [])


# -- streams: payloads from the socket straight into slots ---------------------------------------------
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


class RecordingHost:
    """A :class:`~lmcache.remote.StreamHost` that serves stored values and records what a stream reports."""

    redis_errors: tuple[type[BaseException], ...] = (OSError,)
    read_errors: tuple[type[BaseException], ...] = (OSError, ValueError)
    socket_timeout = 1.0

    def __init__(self, values: list[bytes | None]) -> None:
        self.values = values
        self.counted: list[str] = []
        self.reports: list[str] = []

    def ready(self) -> bool:
        return True

    def borrow(self) -> object:
        return types.SimpleNamespace(connect=lambda: None, disconnect=lambda: None)  # no socket

    def give_back(self, conn: object) -> None:
        self.reports.append("give_back")

    def pipelined(self, command: str, keys: list[bytes]) -> list[bytes | None]:
        assert command == "GET"
        return self.values[: len(keys)]

    def count(self, name: str) -> None:
        self.counted.append(name)

    def succeeded(self) -> None:
        self.reports.append("succeeded")

    def failed(self, operation: str, exc: BaseException) -> None:
        self.reports.append(f"failed {operation}")

    def protocol_error(self, message: str) -> Exception:
        return ValueError(message)


def test_a_stream_reports_to_its_host_only_through_the_protocol() -> None:
    require_client()
    chunks = [random_bits(chunk_shape(n), "float16", seed=n) for n in (4, 9)]
    good = [
        remote.encode_header(b"k%d" % i, remote.byte_view(c), "float16", c.shape) + c.tobytes()
        for i, c in enumerate(chunks)
    ]
    damaged = bytearray(good[1])
    damaged[-1] ^= 1
    host = RecordingHost([good[0], bytes(damaged), None])
    keys, shapes = [b"k0", b"k1", b"k2"], [chunks[0].shape, chunks[1].shape, SHAPE]
    with remote.FetchStream(host, keys, "float16", [tuple(s) for s in shapes]) as stream:
        out = np.empty_like(chunks[0])
        assert stream.hit(0)
        assert stream.read_into(out)
        assert same_bits(out, chunks[0])
        assert stream.hit(1)  # the header is fine; the checksum over the payload is not
        assert not stream.read_into(np.empty_like(chunks[1]))
        assert not stream.hit(2)  # the stream ended at the rejected value
    assert host.counted == ["hits", "corrupt"]
    assert host.reports == ["give_back", "succeeded"]  # a rejected value is no server fault


def test_counters_refuse_an_unknown_name() -> None:
    counters = Counters()
    counters.add("hits", 2)
    with pytest.raises(ConfigError, match="no remote counter 'hit'"):
        counters.add("hit")
    stats = counters.snapshot(pending=1, connected=True)
    assert (stats.hits, stats.misses, stats.pending, stats.connected) == (2, 0, 1, True)


# -- credentials and options ---------------------------------------------------------------------------
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


# -- two processes share chunks ------------------------------------------------------------------------
@pytest.mark.parametrize(("writer", "reader"), [("torch", "jax"), ("numpy", "numpy")])
def test_two_processes_share_chunks_bit_exactly(redis_server: RedisServer, writer: str, reader: str) -> None:
    require(writer)
    require(reader)
    run_peer("tier", "write", writer, redis_server.url, "bfloat16")
    assert run_peer("tier", "read", reader, redis_server.url, "bfloat16").strip() == "ok 3"


# -- a model of the tier -------------------------------------------------------------------------------
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
        self.flipped: dict[bytes, set[int]] = {}  # key -> offsets whose byte is flipped now
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
        for key in self.queued:
            self.flipped.pop(key, None)
        self.queued.clear()

    @rule(key=st.sampled_from(KEYS), offset=st.integers(0, remote.HEADER.size + 127))
    def overwrite_a_byte(self, key: bytes, offset: int) -> None:
        self.flush()
        if key in self.model:
            chunk, _ = self.model[key]
            old = self.raw.getrange(key, offset, offset)
            self.raw.setrange(key, offset, bytes([old[0] ^ 0x40]))
            flipped = self.flipped.setdefault(key, set())
            flipped ^= {offset}  # flipping a byte twice restores it
            self.model[key] = (chunk, bool(flipped))

    @rule(key=st.sampled_from(KEYS))
    def delete(self, key: bytes) -> None:
        self.flush()
        self.raw.delete(key)
        self.model.pop(key, None)
        self.flipped.pop(key, None)

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


# -- isolation and the benchmark section ---------------------------------------------------------------
def test_importing_the_module_imports_no_client_library() -> None:
    code = (
        "import sys, lmcache.remote, lmcache.bench.remote, lmcache.chunk_cache; "
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
    from lmcache.bench.remote import bench_remote

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


def test_passwords_with_at_signs_and_bad_urls_never_leak(caplog: pytest.LogCaptureFixture) -> None:
    """redis-py splits user info at the LAST '@': so must the redaction (found by review: ':p@ssw0rd@'
    printed as '***@ssw0rd@'). A malformed URL is a ConfigError, not urlsplit's ValueError."""
    require_redis()
    secret = "p@ssw0rd"
    url = f"redis://:{secret}@{HOST}:{free_port()}/0"
    tier = remote.RedisTier(url, socket_timeout=0.2, connect_timeout=0.2)
    try:
        assert "ssw0rd" not in repr(tier)
        assert remote.redact_url(url) == f"redis://***@{HOST}:{url.rsplit(':', 1)[1]}"
        tier.probe([b"k"], "float16", [(1, 1, 1, 1, 1)])  # a closed port: logged, counted, never raised
        assert "ssw0rd" not in caplog.text
    finally:
        tier.close()
    with pytest.raises(ConfigError) as info:
        remote.RedisTier(f"redis://:{secret}@[::1/0")
    assert "ssw0rd" not in str(info.value)
