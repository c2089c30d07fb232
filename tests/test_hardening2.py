"""Regression tests for the second hardening round (issue 19): one test (or more) per defect found.

Each test states the misuse, then checks that it is refused with the project's error before anything
changes: no bytes of another owner written, no pins lost, nothing counted. Numbers in the test names
are the issue's.
"""

from __future__ import annotations

import copy
import logging
import pickle
import socket
import threading
import time
from typing import Any

import numpy as np
import pytest

from cachetest import CHUNK, cache_pool, prefix_kv
from kvtest import forge, random_bits, require, same_bits, small_pool, to_host, to_native
from lmcache.chunk_cache import ChunkCache
from lmcache.errors import (
    ChunkTypeError,
    ConfigError,
    ForeignHandleError,
    NotPicklableError,
    OverlapError,
    PoolClosedError,
    StaleHandleError,
)
from lmcache.storage_backend.mem_pool import KVObj
from redis_server import HOST, SECRET, free_port, require_client

HOST_BACKENDS = ("numpy", "torch")  # backends whose views are writable (JAX arrays are immutable)


def _chunk(backend: str, seed: int = 0) -> Any:
    return to_native(random_bits((2, 2, 16, 2, 8), "float16", seed=seed), backend)


# -- 1. the pool's public surface: nothing reaches a slot without its live handle --------------------------
@pytest.mark.parametrize(
    "name", ["chunk_copy_in", "chunk_copy_out", "chunk_view", "chunk_clone", "chunk_producer", "make_handle"]
)
def test_1_slot_access_by_index_is_not_public(backend: str, name: str) -> None:
    pool = small_pool(backend)
    assert not hasattr(pool, name)


def test_1_the_constructor_binds_no_pool(backend: str) -> None:
    """``KVObj(slot, size, data, num_tokens, pool, generation)`` minted a second live handle."""
    pool = small_pool(backend)
    victim = pool.put(_chunk(backend))
    with pytest.raises(TypeError):
        KVObj(victim.chunk_idx, victim.size, None, victim.num_tokens, pool, victim.generation)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        KVObj(victim.chunk_idx, victim.size, pool=pool, generation=victim.generation)  # type: ignore[call-arg]
    hand_built = KVObj(victim.chunk_idx, victim.size, None, victim.num_tokens)
    with pytest.raises(ForeignHandleError):
        pool.free(hand_built)
    with pytest.raises(ForeignHandleError):
        hand_built.copy_from(_chunk(backend, seed=1))
    assert same_bits(victim.data, _chunk(backend))
    assert pool.stats().used == 1


def test_1_handle_methods_check_the_handle_they_are_given(backend: str) -> None:
    """What handles need from the pool takes the handle and checks it: a forged one reaches nothing."""
    pool = small_pool(backend, slots=2)
    victim = pool.put(_chunk(backend))
    forged = forge(pool, victim.chunk_idx, victim.num_tokens, victim.generation + 1)
    for use in (
        lambda: forged.copy_from(_chunk(backend, seed=1)),
        lambda: forged.copy_to(np.empty((2, 2, 16, 2, 8), np.float16)),
        lambda: forged.clone(),
        lambda: forged.as_numpy(),
        lambda: forged.__dlpack__(),
        lambda: pool._copy_into(forged, _chunk(backend, seed=1)),
        lambda: pool._view_of(forged, None),
    ):
        with pytest.raises(StaleHandleError):
            use()
    with pytest.raises(ForeignHandleError):
        pool._copy_into(victim.chunk_idx, _chunk(backend, seed=1))  # type: ignore[arg-type]
    assert same_bits(victim.data, _chunk(backend))


# -- 2-4. credentials never shown -----------------------------------------------------------------------
def test_2_a_password_with_a_slash_is_refused_without_echoing_it() -> None:
    require_client()
    from lmcache.remote import RedisTier

    url = f"redis://:p@ss:w/rd-{SECRET}@{HOST}:6379/0"
    with pytest.raises(ConfigError) as caught:
        RedisTier(url)
    message = str(caught.value)
    for part in ("p@ss", "ss:w", "w/rd", SECRET):
        assert part not in message
    assert "percent-encode" in message


def _closed_port_url(userinfo: str = "", query: str = "") -> str:
    return f"redis://{userinfo}{HOST}:{free_port()}/0{query}"


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        (_closed_port_url(userinfo=f":pa ss {SECRET}@"), f"pa ss {SECRET}"),
        (_closed_port_url(query=f"?password={SECRET}"), SECRET),
        (_closed_port_url(query=f"?username=admin&password={SECRET}%2Fx"), f"{SECRET}/x"),
    ],
    ids=["space in the password", "password in the query", "encoded password in the query"],
)
def test_3_4_passwords_with_spaces_or_in_the_query_never_show(
    url: str, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    require_client()
    from redis_server import tier_for

    caplog.set_level(logging.DEBUG, logger="lmcache.remote")
    with tier_for(url) as tier:
        assert not tier.probe([b"k"], "float16", [(1, 1, 1, 1, 1)])[0]  # a refused connection: logged
        assert tier.fetch([b"k"], "float16", [(1, 1, 1, 1, 1)]) == [None]
        shown = [repr(tier), str(tier.stats())] + [record.getMessage() for record in caplog.records]
    assert caplog.records, "the failures were logged"
    for text in shown:
        assert secret not in text
        assert SECRET not in text
    assert "password=***" in repr(tier) or "***@" in repr(tier)


# -- 5. a server that trickles its replies --------------------------------------------------------------
class TricklingServer:
    """A TCP server on 127.0.0.1 that answers redis-py's handshake at once and every other command with
    a reply sent one byte every ``delay`` seconds (a value the tier would accept, were it complete)."""

    def __init__(self, value_bytes: int, delay: float = 0.02) -> None:
        self._value_bytes = value_bytes
        self._delay = delay
        self._listener = socket.create_server((HOST, 0))
        self.url = f"redis://{HOST}:{self._listener.getsockname()[1]}/0"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self._listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            conn.settimeout(0.1)
            while not self._stop.is_set():
                command, buffer = _next_command(buffer)
                if command is None:
                    try:
                        data = conn.recv(65536)
                    except TimeoutError:
                        continue
                    except OSError:
                        return
                    if not data:
                        return
                    buffer += data
                    continue
                name = command[0].upper()
                if name == b"HELLO":  # RESP3, as redis-py 8 asks
                    conn.sendall(b"%1\r\n$5\r\nproto\r\n:3\r\n")
                elif name not in (b"GET", b"STRLEN"):
                    conn.sendall(b"+OK\r\n")
                elif not self._trickle(conn, name):
                    return

    def _trickle(self, conn: socket.socket, name: bytes) -> bool:
        if name == b"STRLEN":  # a valid length, written with 200 leading zeros
            reply = b":" + b"0" * 200 + b"%d\r\n" % self._value_bytes
        else:
            reply = b"$%d\r\n" % self._value_bytes + bytes(self._value_bytes) + b"\r\n"
        try:
            for byte in reply:
                if self._stop.is_set():
                    return False
                conn.sendall(bytes([byte]))
                time.sleep(self._delay)
        except OSError:
            return False
        return True

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(2)


def _next_command(buffer: bytes) -> tuple[list[bytes] | None, bytes]:
    """Split one RESP command (an array of bulk strings) off ``buffer``; None while it is incomplete."""
    if not buffer.startswith(b"*") or b"\r\n" not in buffer:
        return None, buffer
    head, rest = buffer.split(b"\r\n", 1)
    args = []
    for _ in range(int(head[1:])):
        if b"\r\n" not in rest:
            return None, buffer
        length_line, rest = rest.split(b"\r\n", 1)
        length = int(length_line[1:])
        if len(rest) < length + 2:
            return None, buffer
        args.append(rest[:length])
        rest = rest[length + 2 :]
    return args, rest


def test_5_a_trickling_server_is_bounded_by_the_socket_timeout() -> None:
    """One byte every 20 ms never trips a per-recv timeout; the operation's deadline must."""
    require_client()
    from lmcache.remote import HEADER, RedisTier

    pool = cache_pool("numpy", slots=4)
    chunk_bytes = pool.layout.chunk_bytes
    server = TricklingServer(HEADER.size + chunk_bytes)
    try:
        tier = RedisTier(server.url, socket_timeout=0.5, connect_timeout=0.5, backoff_initial=0.01)
        cache = ChunkCache(pool, remote=tier)
        tokens = list(range(CHUNK))
        for call in (lambda: cache.retrieve(tokens), lambda: cache.lookup(tokens)):
            time.sleep(0.05)  # past the backoff of the last failure: the network is tried again
            started = time.monotonic()
            result = call()
            elapsed = time.monotonic() - started
            assert result in ((None, 0), 0)
            assert elapsed < 2.0, f"held {elapsed:.1f}s with socket_timeout=0.5"
        assert cache.stats().remote_errors >= 2
        tier.close()
    finally:
        server.close()


# -- 6-7. retrieve(out=...) into the pool's own memory, or into memory that overlaps itself ----------------
def _two_leased_prompts(backend: str) -> tuple[ChunkCache, list[int], list[int], Any]:
    cache = ChunkCache(cache_pool(backend, slots=8))
    first, second = list(range(CHUNK)), list(range(100, 100 + CHUNK))
    cache.store(first, to_native(prefix_kv(first), backend))
    cache.store(second, to_native(prefix_kv(second), backend))
    return cache, first, second, cache.lease(second)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_6_out_that_views_the_pool_is_refused(backend: str) -> None:
    require(backend)
    cache, first, second, lease = _two_leased_prompts(backend)
    before = cache.stats()
    victim = lease.chunks[0]
    arena = cache.pool.arena  # writable views of the arena: the victim's slot, and the start of the arena
    elems = int(np.prod((2, 2, CHUNK, 2, 8)))
    slot_view = arena[victim.chunk_idx][:elems].reshape(2, 2, CHUNK, 2, 8)
    whole = arena.reshape(-1)[:elems].reshape(2, 2, CHUNK, 2, 8)
    for out in (slot_view, whole):
        with pytest.raises(OverlapError, match="overlaps the cache's pool"):
            cache.retrieve(first, out=out)
    if backend == "torch":  # a lease's torch view is writable memory of the pool too
        with pytest.raises(OverlapError):
            cache.retrieve(first, out=victim.data)
    else:  # numpy views of a lease are read-only
        with pytest.raises(ChunkTypeError, match="read-only"):
            cache.retrieve(first, out=victim.data)
    assert cache.stats() == before
    assert same_bits(to_host(victim.data), prefix_kv(second))
    _, n = cache.retrieve(second)
    assert n == CHUNK
    lease.release()


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_6_copy_to_another_slot_is_refused(backend: str) -> None:
    """The same class at the pool: ``a.copy_to(b.data)`` wrote into a slot that ``b``'s owner holds."""
    require(backend)
    pool = small_pool(backend, slots=2)
    a, b = pool.put(_chunk(backend, seed=1)), pool.put(_chunk(backend, seed=2))
    with pytest.raises(OverlapError, match="other slots of this pool"):
        a.copy_to(b.data)
    assert same_bits(b.data, _chunk(backend, seed=2))
    a.copy_to(a.data)  # its own slot: allowed (a no-op)
    b.copy_from(a)  # between slots: what to use instead
    assert same_bits(b.data, _chunk(backend, seed=1))


def test_7_an_expanded_torch_out_is_refused() -> None:
    torch = require("torch")
    cache = ChunkCache(cache_pool("torch", slots=4))
    tokens = list(range(CHUNK))
    cache.store(tokens, torch.from_numpy(prefix_kv(tokens)))
    before = cache.stats()
    expanded = torch.zeros(2, 2, 1, 2, 8, dtype=torch.float16).expand(2, 2, CHUNK, 2, 8)
    with pytest.raises(OverlapError, match="share memory"):
        cache.retrieve(tokens, out=expanded)
    obj = cache.pool.put(torch.from_numpy(prefix_kv(tokens)))
    with pytest.raises(OverlapError):
        obj.copy_to(expanded)
    assert cache.stats() == before


def test_7_a_zero_stride_numpy_out_is_refused() -> None:
    cache = ChunkCache(cache_pool("numpy", slots=4))
    tokens = list(range(CHUNK))
    cache.store(tokens, prefix_kv(tokens))
    base = np.zeros((2, 2, 1, 2, 8), np.float16)
    strides = (*base.strides[:2], 0, *base.strides[3:])
    strided = np.lib.stride_tricks.as_strided(base, (2, 2, CHUNK, 2, 8), strides, writeable=True)
    with pytest.raises(OverlapError):
        cache.retrieve(tokens, out=strided)


# -- 8. leases can be neither copied nor pickled ---------------------------------------------------------
def test_8_a_lease_cannot_be_copied_or_pickled() -> None:
    cache = ChunkCache(cache_pool("numpy", slots=2))
    tokens = list(range(2 * CHUNK))
    cache.store(tokens, prefix_kv(tokens))
    lease = cache.lease(tokens)
    before = cache.stats()
    for duplicate in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(NotPicklableError, match="release them a second time"):
            duplicate(lease)
    assert cache.stats() == before
    assert before.leased == 2
    lease.release()
    lease.release()
    after = cache.stats()
    assert (after.leased, after.pinned) == (0, 0)
    other = list(range(500, 500 + 2 * CHUNK))
    assert cache.store(other, prefix_kv(other)) == 2 * CHUNK  # evicts the released chunks
    assert cache.stats().leased == 0


# -- 9. a failing clear() leaves the cache exactly as it was -------------------------------------------
def test_9_clear_after_the_pool_closed_changes_nothing(backend: str) -> None:
    require(backend)
    cache = ChunkCache(cache_pool(backend, slots=4))
    tokens = list(range(2 * CHUNK))
    cache.store(tokens, to_native(prefix_kv(tokens), backend))
    before = cache.stats()
    cache.pool.close()
    with pytest.raises(PoolClosedError):
        cache.clear()
    assert cache.stats() == before
    assert len(cache) == 2
    assert cache.lookup(tokens) == 2 * CHUNK


# -- 12-14. paged transfer: meta tensors, aliased layers, caches inside the pool ---------------------------
def test_12_13_meta_tensors_are_refused_before_anything_is_counted() -> None:
    torch = require("torch")
    cache = ChunkCache(cache_pool("torch", slots=4))
    tokens = list(range(CHUNK))
    cache.store(tokens, torch.from_numpy(prefix_kv(tokens)))
    before = cache.stats()
    meta = [torch.empty(2, 4, 16, 2, 8, dtype=torch.float16, device="meta") for _ in range(2)]
    with pytest.raises(ChunkTypeError, match="meta"):
        cache.store_paged(list(range(50, 50 + CHUNK)), meta, [0], layout="vllm")
    with pytest.raises(ChunkTypeError, match="meta"):
        cache.load_paged(tokens, meta, [0], layout="vllm")
    stacked = torch.empty(2, 2, 4, 16, 2, 8, dtype=torch.float16, device="meta")
    with pytest.raises(ChunkTypeError, match="meta"):
        cache.load_paged(tokens, stacked, [0], layout="stacked")
    assert cache.stats() == before


def test_14_layers_that_alias_one_buffer_are_refused() -> None:
    torch = require("torch")
    cache = ChunkCache(cache_pool("torch", slots=4))
    tokens = list(range(CHUNK))
    cache.store(tokens, torch.from_numpy(prefix_kv(tokens)))
    before = cache.stats()
    layer = torch.zeros(2, 4, 16, 2, 8, dtype=torch.float16)
    halves = torch.zeros(2, 2, 4, 16, 2, 8, dtype=torch.float16).view(4, 4, 16, 2, 8)
    for layers in ([layer, layer.view(layer.shape)], [halves[0:2], halves[1:3]]):
        with pytest.raises(OverlapError, match="share memory"):
            cache.load_paged(tokens, layers, [1], layout="vllm")
    assert not layer.any()
    assert cache.stats() == before


def test_14_a_paged_cache_inside_the_pool_is_refused() -> None:
    torch = require("torch")
    cache = ChunkCache(cache_pool("torch", slots=8))
    tokens = list(range(CHUNK))
    cache.store(tokens, torch.from_numpy(prefix_kv(tokens)))
    before = cache.stats()
    arena = cache.pool.arena.reshape(-1)
    per_layer = 2 * 1 * 16 * 2 * 8
    layers = [arena[i * per_layer : (i + 1) * per_layer].view(2, 1, 16, 2, 8) for i in range(2)]
    with pytest.raises(OverlapError, match="overlaps the cache's pool"):
        cache.load_paged(tokens, layers, [0], layout="vllm")
    assert cache.stats() == before
    _, n = cache.retrieve(tokens)
    assert n == CHUNK


# -- the adversarial pass after the fixes above (issue 19: "a fresh adversarial pass of your own") --------
def test_a_batch_cannot_be_built_by_hand(backend: str) -> None:
    from lmcache.storage_backend.mem_pool import KVBatch

    pool = small_pool(backend, slots=2)
    victim = pool.put(_chunk(backend))
    with pytest.raises(TypeError, match="allocate_batch"):
        KVBatch(pool, [victim.chunk_idx], [victim.num_tokens], victim.generation)
    assert pool.stats().used == 1


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_lease_chunks_are_lent_read_only_and_end_with_the_lease(backend: str) -> None:
    from lmcache.errors import ReadOnlyHandleError

    require(backend)
    cache = ChunkCache(cache_pool(backend, slots=4))
    tokens = list(range(2 * CHUNK))
    cache.store(tokens, to_native(prefix_kv(tokens), backend))
    lease = cache.lease(tokens)
    chunk = lease.chunks[0]
    with pytest.raises(ForeignHandleError):
        cache.pool.free(chunk)
    with pytest.raises(ReadOnlyHandleError):
        chunk.copy_from(_chunk(backend, seed=3))
    assert not chunk.as_numpy().flags.writeable
    assert same_bits(chunk.clone("numpy"), prefix_kv(tokens)[:, :, :CHUNK])
    lease.release()
    with pytest.raises(StaleHandleError):
        chunk.as_numpy()
    out, n = cache.retrieve(tokens)
    assert n == 2 * CHUNK
    assert same_bits(to_host(out), prefix_kv(tokens))


def test_pending_store_slots_are_lent_until_the_commit() -> None:
    cache = ChunkCache(cache_pool("numpy", slots=4))
    tokens = list(range(2 * CHUNK))
    pending = cache.begin_store(cache.keys(tokens), len(tokens))
    with pytest.raises(ForeignHandleError):
        cache.pool.free(pending.slots[0])
    kv = prefix_kv(tokens)
    for index, slot in enumerate(pending.slots):
        slot.copy_from(kv[:, :, index * CHUNK : (index + 1) * CHUNK])
    kept = pending.slots[0]
    for bad in (True, "1", -1):
        with pytest.raises(ConfigError, match="count"):
            pending.commit(bad)  # type: ignore[arg-type]
    pending.commit()
    with pytest.raises(StaleHandleError):
        kept.copy_from(_chunk("numpy", seed=9))
    out, n = cache.retrieve(tokens)
    assert n == 2 * CHUNK
    assert same_bits(out, kv)


def test_keys_that_are_not_one_prompts_chain_are_refused() -> None:
    cache = ChunkCache(cache_pool("numpy", slots=8))
    a, b = list(range(2 * CHUNK)), list(range(500, 500 + 2 * CHUNK))
    cache.store(a, prefix_kv(a))
    cache.store(b, prefix_kv(b))
    ka, kb = cache.keys(a), cache.keys(b)
    before = cache.stats()
    for call in (
        lambda: cache.begin_store([kb[1]], CHUNK),
        lambda: cache.lease_keys([ka[0], kb[1]], 2 * CHUNK),
        lambda: cache.lookup_keys([kb[1]], CHUNK),
        lambda: cache.lease_keys(ka, 2 * CHUNK - 3),  # a's second chunk holds 16 tokens, not 13
    ):
        with pytest.raises(ConfigError):
            call()
    assert cache.stats() == before
    with pytest.raises(ConfigError, match="chunk keys of 16 bytes"):
        cache.lookup_keys(iter([1, 2]), 2 * CHUNK)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="sequence of chunk keys"):
        cache.lookup_keys(5, 2 * CHUNK)  # type: ignore[arg-type]


def test_begin_store_on_a_closed_pool_leaves_no_pin() -> None:
    cache = ChunkCache(cache_pool("numpy", slots=4))
    tokens = list(range(2 * CHUNK))
    cache.store(tokens[:CHUNK], prefix_kv(tokens[:CHUNK]))
    cache.pool.close()
    with pytest.raises(PoolClosedError):
        cache.begin_store(cache.keys(tokens), len(tokens))
    assert cache.stats().pinned == 0


def test_a_dropped_lease_or_pending_store_gives_its_pins_back() -> None:
    import gc

    cache = ChunkCache(cache_pool("numpy", slots=4))
    tokens = list(range(2 * CHUNK))
    cache.store(tokens, prefix_kv(tokens))
    cache.lease(tokens)  # dropped at once
    cache.begin_store(cache.keys(list(range(900, 900 + CHUNK))), CHUNK)  # dropped unfinished
    gc.collect()
    stats = cache.stats()
    assert (stats.pinned, stats.leased) == (0, 0)
    assert cache.pool.stats().used == 2


def test_a_policy_object_serves_one_cache() -> None:
    from lmcache.policies import LRUPolicy

    policy = LRUPolicy(4)
    first = ChunkCache(cache_pool("numpy", slots=4), policy=policy)
    with pytest.raises(ConfigError, match="already serves another cache"):
        ChunkCache(cache_pool("numpy", slots=4), policy=policy)
    assert first.policy is policy


def test_more_token_shapes_that_are_not_ids() -> None:
    import collections

    from lmcache.cache_keys import token_ids
    from lmcache.errors import TokensTypeError, TokensValueError

    for tokens in ([5, np.array(True), 7], collections.deque([1, True]), memoryview(b"ab")):
        with pytest.raises(TokensTypeError):
            token_ids(tokens)
    with pytest.raises(TokensValueError, match="fit in int64"):
        token_ids([-1, 2**63])
    assert token_ids(np.array([1, 2], dtype=object)).tolist() == [1, 2]


def test_a_meta_block_table_and_a_bad_thread_safe_are_project_errors() -> None:
    torch = require("torch")
    cache = ChunkCache(cache_pool("torch", slots=4))
    tokens = list(range(CHUNK))
    layers = [torch.zeros(2, 2, 16, 2, 8, dtype=torch.float16) for _ in range(2)]
    with pytest.raises(ChunkTypeError, match="meta"):
        cache.store_paged(tokens, layers, torch.empty(1, dtype=torch.int64, device="meta"), layout="vllm")
    with pytest.raises(ConfigError, match="thread_safe"):
        small_pool("numpy", thread_safe="no")


def test_a_jax_owner_never_gets_the_view_object_a_previous_owner_holds() -> None:
    jnp = require("jax").numpy
    pool = small_pool("jax", slots=1)
    first = pool.put(_chunk("jax", seed=1))
    old_view = first.data
    pool.free(first)
    second = pool.put(_chunk("jax", seed=2))
    assert second.data is not old_view
    old_view.delete()
    assert same_bits(np.asarray(second.data), np.asarray(_chunk("jax", seed=2)))
    assert isinstance(second.data, type(jnp.zeros(1)))


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        (f"redis://{HOST}:6390/0?db=0;password={SECRET}", SECRET),
        (f"redis://{HOST}:6390/0?db=0&password={SECRET}&foo=1", SECRET),
    ],
)
def test_query_forms_never_show_and_unknown_options_fail_at_once(url: str, fragment: str) -> None:
    require_client()
    from lmcache.remote import RedisTier

    with pytest.raises(ConfigError) as caught:
        RedisTier(url)
    assert fragment not in str(caught.value)


def test_remote_ttl_must_be_finite_and_unix_paths_may_hold_at_signs(tmp_path: Any) -> None:
    require_client()
    from lmcache.remote import RedisTier

    for ttl in (float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="ttl"):
            RedisTier(f"redis://{HOST}:6390/0", ttl=ttl)
    tier = RedisTier(f"unix://{tmp_path}/a@b/redis.sock")
    assert "a@b" in repr(tier)
    tier.close(0.1)


def test_a_trickled_handshake_is_bounded_too() -> None:
    """The connection handshake (HELLO, CLIENT SETINFO) counts against socket_timeout as a whole."""
    require_client()
    from lmcache.remote import RedisTier

    class Slow(TricklingServer):
        def _answer(self, conn: socket.socket) -> None:  # every reply trickled, the handshake's too
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)
                    for byte in b"%1\r\n$5\r\nproto\r\n:3\r\n":
                        conn.sendall(bytes([byte]))
                        time.sleep(0.1)
                except OSError:
                    return

    server = Slow(16)
    try:
        tier = RedisTier(server.url, socket_timeout=0.5, connect_timeout=0.5)
        cache = ChunkCache(cache_pool("numpy", slots=2), remote=tier)
        started = time.monotonic()
        assert cache.retrieve(list(range(CHUNK))) == (None, 0)
        assert time.monotonic() - started < 2.0
        assert cache.stats().remote_errors >= 1
        tier.close(0.2)
    finally:
        server.close()
