"""Adversarial use of the pool: forged and edited handles, view state that must not leak between owners,
sources that fail late, and numbers at the edge. Each test names the defect it pins (issue 11)."""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from typing import Any

import numpy as np
import pytest

from kvtest import SMALL_SHAPE, forge, live_kvobjs, random_bits, require, same_bits, small_pool, to_native
from lmcache.config import LMCacheMemPoolMetadata
from lmcache.errors import (
    ChunkShapeError,
    ChunkTypeError,
    ConfigError,
    InvalidHandleError,
    PoolClosedError,
    StaleHandleError,
)
from lmcache.storage_backend.mem_pool import KVObj, LocalCPUBufferPool, LocalCPUPool


def _chunk(backend: str, tokens: int = 16, seed: int = 0, dtype: str = "float16") -> Any:
    return to_native(random_bits((2, 2, tokens, 2, 8), dtype, seed=seed), backend)


# -- 1. generations the allocator never issued -----------------------------------------------------------
def test_hand_built_handle_with_generation_zero_frees_nothing(backend: str) -> None:
    pool = small_pool(backend, slots=4)
    before = pool.stats()
    forged = forge(pool, 2, 16, 0)  # generation 0: never issued
    assert not forged.is_live
    with pytest.raises(StaleHandleError, match="never issued"):
        pool.free(forged)
    with pytest.raises(StaleHandleError):
        forged.data  # noqa: B018
    assert pool.stats() == before
    assert pool.stats().used == 0
    objs = [pool.allocate(_chunk(backend)) for _ in range(4)]
    assert sorted(o.chunk_idx for o in objs if o is not None) == [0, 1, 2, 3]  # no slot twice


def test_edited_generation_frees_nothing(backend: str) -> None:
    pool = small_pool(backend, slots=4)
    obj = pool.put(_chunk(backend))
    assert obj is not None
    ticket = obj.generation
    before = pool.stats()
    for forged_generation in (0, -ticket, ticket + 1):
        obj._generation = forged_generation  # what an adversarial user can still do to a private slot
        with pytest.raises(InvalidHandleError):
            pool.free(obj)
        assert pool.stats() == before
    obj._generation = ticket
    pool.free(obj)
    assert pool.stats().used == 0


# -- 2. each owner's view object is its own --------------------------------------------------------------
def _reuse(pool: Any, backend: str) -> tuple[Any, Any]:
    first = pool.allocate(_chunk(backend))
    return first, first.data


def test_numpy_view_state_does_not_reach_the_next_owner() -> None:
    pool = small_pool("numpy", slots=1)
    first, view = _reuse(pool, "numpy")
    view.flags.writeable = False
    view.shape = (view.size,)
    pool.free(first)
    second = pool.allocate(_chunk("numpy"))
    assert second.chunk_idx == first.chunk_idx
    assert second.data.shape == (2, 2, 16, 2, 8)
    assert second.data.flags.writeable
    second.data[...] = 3
    assert float(second.as_numpy().sum()) == 3 * second.data.size


def test_torch_view_state_does_not_reach_the_next_owner() -> None:
    torch = require("torch")
    pool = small_pool("torch", slots=1)
    first, view = _reuse(pool, "torch")
    view.unsqueeze_(0)
    pool.free(first)
    second, view = _reuse(pool, "torch")
    assert tuple(view.shape) == (2, 2, 16, 2, 8)
    view.set_(torch.zeros(3, dtype=view.dtype))  # the owner's own tensor now points elsewhere
    pool.free(second)
    third, view = _reuse(pool, "torch")
    view.fill_(5)
    assert float(third.as_numpy().astype(np.float32).sum()) == 5 * view.numel()  # writes reach the slot
    grad_source = torch.ones(view.shape, dtype=view.dtype, requires_grad=True)
    view.copy_(grad_source)  # puts this owner's view into an autograd graph, not the arena
    pool.free(third)
    for _ in range(3):
        fourth, view = _reuse(pool, "torch")
        assert not view.requires_grad
        assert view.grad_fn is None
        assert view.numpy().shape == (2, 2, 16, 2, 8)
        assert not pool.arena.requires_grad
        pool.free(fourth)


def test_jax_deleted_or_donated_view_does_not_break_the_slot() -> None:
    jax = require("jax")
    pool = small_pool("jax", slots=1)
    first, view = _reuse(pool, "jax")
    view.delete()
    pool.free(first)
    second, view = _reuse(pool, "jax")
    assert not view.is_deleted()
    assert view.unsafe_buffer_pointer() == pool.slot_address(second.chunk_idx)
    jax.jit(lambda x: x * 2, donate_argnums=0)(view).block_until_ready()
    pool.free(second)
    third, view = _reuse(pool, "jax")
    assert not view.is_deleted()
    view.tag = "mine"  # an attribute is object state too
    pool.free(third)
    fourth, view = _reuse(pool, "jax")
    assert not hasattr(view, "tag")
    chunk = _chunk("jax", seed=4)
    fourth.copy_from(chunk)
    assert same_bits(fourth.data, chunk)


# -- 3. data after free ----------------------------------------------------------------------------------
def test_data_of_a_freed_handle_raises_even_if_never_read(backend: str) -> None:
    pool = small_pool(backend, slots=1)
    obj = pool.allocate(_chunk(backend))
    pool.free(obj)
    pool.put(_chunk(backend, seed=2))  # the slot's new owner
    with pytest.raises(StaleHandleError):
        obj.data  # noqa: B018
    pool.close()
    with pytest.raises(PoolClosedError):
        obj.data  # noqa: B018


# -- 4, 5, 6. identities that cannot be edited -----------------------------------------------------------
def test_batch_identity_is_immutable(backend: str) -> None:
    pool = small_pool(backend, slots=4)
    batch = pool.allocate_batch([_chunk(backend)] * 2)
    other = pool.put(_chunk(backend))
    assert batch is not None
    assert other is not None
    with pytest.raises(AttributeError):
        batch.chunk_idx.append(other.chunk_idx)  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        batch.num_tokens.pop()  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        batch.chunk_idx = [other.chunk_idx]  # type: ignore[misc]
    pool.free_batch(batch)
    assert other.is_live
    assert pool.stats().used == 1


def test_numpy_int_chunk_idx_is_refused(backend: str) -> None:
    pool = small_pool(backend, slots=2)
    obj = pool.put(_chunk(backend))
    twin = forge(pool, np.int64(obj.chunk_idx), obj.num_tokens, obj.generation)
    before = pool.stats()
    with pytest.raises(StaleHandleError, match="not an int"):
        pool.free(twin)
    with pytest.raises(StaleHandleError, match="not an int"):
        pool.free_batch([twin])
    assert pool.stats() == before
    pool.free(obj)
    again = pool.put(_chunk(backend, seed=3))
    assert type(again.chunk_idx) is int
    assert same_bits(again.data, _chunk(backend, seed=3))


def test_num_tokens_and_chunk_idx_are_read_only(backend: str) -> None:
    pool = small_pool(backend, slots=2)
    obj = pool.allocate(_chunk(backend, tokens=4))
    with pytest.raises(AttributeError):
        obj.num_tokens = 16  # type: ignore[misc]
    with pytest.raises(AttributeError):
        obj.chunk_idx = 1  # type: ignore[misc]
    assert tuple(obj.data.shape) == (2, 2, 4, 2, 8)


# -- 7. JAX pinned_host arenas keep their owner alive ----------------------------------------------------
def test_jax_pinned_host_views_outlive_the_pool() -> None:
    require("jax")
    code = textwrap.dedent(
        """
        import gc, jax, numpy as np
        from lmcache.config import LMCacheMemPoolMetadata
        from lmcache.layout import SlotLayout
        from lmcache_jax import _pinned_host_arena
        layout = SlotLayout.from_metadata(LMCacheMemPoolMetadata((2, 2, 16, 2, 8), "float16", 0.001))
        arena = _pinned_host_arena(layout, 64, jax.devices("cpu")[0])
        assert arena is not None and arena.pinned
        arena.host[:] = 7
        view = arena.view(3, 16)
        numpy_view = arena.host_view(3, 16)
        del arena
        for _ in range(3):
            gc.collect()
            np.zeros(1 << 24, dtype=np.uint8).fill(1)  # reuse freed memory, if it was freed
        assert int(np.asarray(view).view(np.uint16)[0, 0, 0, 0, 0]) == 0x0707
        assert int(numpy_view.view(np.uint16).ravel()[0]) == 0x0707
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


# -- 8. unbounded waits ----------------------------------------------------------------------------------
@pytest.mark.parametrize("timeout", [None, float("inf"), 1e10])
def test_buffer_pool_waits_without_bound(timeout: float | None) -> None:
    pool = LocalCPUBufferPool(LMCacheMemPoolMetadata(SMALL_SHAPE, "float16", 0.001), backend="numpy")
    chunk = random_bits((2, 2, 16, 2, 8), "float16")
    held = [pool.allocate(chunk) for _ in range(pool.max_chunk_num)]
    assert all(held)
    threading.Timer(0.2, pool.free, args=(held[0],)).start()
    obj = pool.allocate(chunk, timeout=timeout)
    assert obj is not None
    assert obj.chunk_idx == held[0].chunk_idx
    assert pool.stats().failed_allocations == 0


# -- 9. fork while another thread holds the lock ---------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_does_not_deadlock_on_an_inherited_lock() -> None:
    """Fork while another thread allocates and frees in a loop, so that the allocator's lock is held at
    many of the forks: every child must still allocate (fresh locks after fork), and see its bytes."""
    pool = LocalCPUBufferPool(LMCacheMemPoolMetadata(SMALL_SHAPE, "float16", 0.001), backend="numpy")
    chunk = random_bits((2, 2, 16, 2, 8), "float16", seed=5)
    obj = pool.put(chunk)
    stop = threading.Event()

    def churn() -> None:  # holds the pool's locks most of the time
        while not stop.is_set():
            taken = pool.allocate(chunk)
            if taken is not None:
                pool.free(taken)

    worker = threading.Thread(target=churn, daemon=True)
    worker.start()
    children = []
    try:
        for _ in range(40):
            time.sleep(0.002)
            pid = os.fork()
            if pid == 0:  # child: must get fresh locks
                import signal

                signal.alarm(10)
                status = 1
                try:
                    other = pool.allocate(chunk, timeout=1.0)
                    pool.free(other)
                    status = 0 if np.array_equal(obj.clone("numpy"), chunk) else 2
                finally:
                    os._exit(status)
            children.append(pid)
    finally:
        stop.set()
        worker.join()
    deadline = time.monotonic() + 30
    for pid in children:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                for other in children:
                    with contextlib.suppress(ProcessLookupError, ChildProcessError):
                        os.kill(other, 9)
                pytest.fail("a forked child deadlocked")
            time.sleep(0.01)
        assert os.waitstatus_to_exitcode(status) == 0


# -- 10. overlapping sources -----------------------------------------------------------------------------
def test_torch_source_straddling_two_slots_copies_exactly() -> None:
    require("torch")
    pool = small_pool("torch", slots=4)
    a = pool.put(_chunk("torch", seed=1))
    b = pool.put(_chunk("torch", seed=2))
    assert (a.chunk_idx, b.chunk_idx) == (0, 1)
    flat = pool.arena.reshape(-1)
    per_token = 2 * 2 * 8  # a chunk's elements per token-row set is L*2*H*D over all dims; use an offset
    start = pool.layout.slot_elems // 2 + per_token
    src = flat[start : start + a.data.numel()].view(a.data.shape)  # half in slot 0, half in slot 1
    expected = src.clone()
    b.copy_from(src)
    assert same_bits(b.data, expected)
    numpy_pool = small_pool("numpy", slots=4)
    c = numpy_pool.put(_chunk("numpy", seed=1))
    d = numpy_pool.put(_chunk("numpy", seed=2))
    nflat = numpy_pool.arena.reshape(-1)
    nsrc = nflat[start : start + c.data.size].reshape(c.data.shape)
    nexpected = nsrc.copy()
    d.copy_from(nsrc)
    assert same_bits(d.data, nexpected)


# -- 11. sources that would fail during the copy ---------------------------------------------------------
def _refused(pool: Any, src: Any, error: type[Exception], match: str) -> None:
    before = pool.stats()
    with pytest.raises(error, match=match):
        pool.put(src)
    assert pool.stats() == before


def test_late_failing_torch_sources_are_refused_before_a_slot_is_taken() -> None:
    torch = require("torch")
    for backend in ("numpy", "torch"):
        pool = small_pool(backend)
        _refused(
            pool, torch.empty((2, 2, 16, 2, 8), dtype=torch.float16, device="meta"), ChunkTypeError, "meta"
        )
        sparse = torch.zeros((2, 2, 16, 2, 8), dtype=torch.float32).to_sparse()
        pool32 = small_pool(backend, dtype="float32")
        _refused(pool32, sparse, ChunkTypeError, "layout")


def test_byte_swapped_numpy_is_refused(backend: str) -> None:
    pool = small_pool(backend, dtype="float32")
    swapped = random_bits((2, 2, 16, 2, 8), "float32").astype(">f4")
    _refused(pool, swapped, ChunkShapeError, "byte order")
    with pytest.raises(ChunkShapeError, match="byte order"):
        pool.allocate(swapped)


def test_jax_tracer_is_refused() -> None:
    jax = require("jax")
    pool = small_pool("numpy")
    before = pool.stats()
    errors: list[Exception] = []

    def inside(x: Any) -> Any:
        try:
            pool.put(x)
        except ChunkTypeError as exc:
            errors.append(exc)
        return x

    jax.jit(inside)(_chunk("jax")).block_until_ready()
    assert len(errors) == 1
    assert "tracer" in str(errors[0])
    assert pool.stats() == before


# -- 12. pickling and copying handles --------------------------------------------------------------------
@pytest.mark.parametrize("thread_safe", [True, False])
def test_handles_and_pools_refuse_pickling(backend: str, thread_safe: bool) -> None:
    meta = LMCacheMemPoolMetadata(SMALL_SHAPE, "float16", 0.001)
    pool = LocalCPUPool(meta, backend=backend, thread_safe=thread_safe)
    obj = pool.put(_chunk(backend))
    batch = pool.allocate_batch([_chunk(backend)])
    for target in (obj, batch, pool):
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(target)
    with pytest.raises(TypeError, match="cannot be pickled or copied"):
        copy.copy(obj)
    hand_built = pickle.loads(pickle.dumps(KVObj(3, 64, np.arange(4.0).reshape(1, 1, 4, 1, 1))))
    assert (hand_built.chunk_idx, hand_built.size, hand_built.num_tokens) == (3, 64, 4)
    assert pickle.loads(pickle.dumps(meta)) == meta


# -- 13. DLPack producers as sources ---------------------------------------------------------------------
class _OnlyDLPack:
    """An object with nothing but the DLPack protocol."""

    def __init__(self, array: Any) -> None:
        self._array = array

    def __dlpack__(self, **kwargs: Any) -> Any:
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> Any:
        return self._array.__dlpack_device__()


def test_kvobj_and_bare_dlpack_producers_are_accepted(backend: str) -> None:
    pool = small_pool(backend, slots=4)
    source = pool.put(_chunk(backend, seed=6))
    target = pool.allocate(_chunk(backend))
    target.copy_from(source)  # a KVObj
    assert same_bits(target.data, _chunk(backend, seed=6))
    copied = pool.put(source)
    assert copied is not None
    assert same_bits(copied.data, _chunk(backend, seed=6))
    bare = _OnlyDLPack(random_bits((2, 2, 16, 2, 8), "float16", seed=7))
    from_bare = pool.put(bare)
    assert from_bare is not None
    assert same_bits(from_bare.data, random_bits((2, 2, 16, 2, 8), "float16", 7))
    pool.free(source)
    with pytest.raises(StaleHandleError):
        target.copy_from(source)  # a freed KVObj is no source


# -- 14. numbers at the edge, and messages ---------------------------------------------------------------
@pytest.mark.parametrize("size", [1e300, 10**400, 2**21])
def test_absurd_budgets_are_config_errors(size: float) -> None:
    with pytest.raises(ConfigError, match="max_local_cache_size"):
        LMCacheMemPoolMetadata(SMALL_SHAPE, "float16", size)


class _FakeChunk:
    def __init__(self, shape: Any, dtype: Any = "float16") -> None:
        self.shape = shape
        self.dtype = dtype


@pytest.mark.parametrize(
    ("fake", "error", "match"),
    [
        (_FakeChunk((2, 2, 7.5, 2, 8)), ChunkTypeError, "sequence of ints"),
        (_FakeChunk((2, 2, 7.0, 2, 8)), ChunkTypeError, "sequence of ints"),
        (_FakeChunk(np.array([2, 2, 99, 2, 8])), ChunkShapeError, "1..16 tokens"),
        (_FakeChunk((2, 2, 8, 2, 8), dtype={"not": "hashable"}), ChunkShapeError, "dtype"),
        (_FakeChunk(5), ChunkTypeError, "sequence of ints"),
    ],
)
def test_fake_chunks_get_project_errors(backend: str, fake: Any, error: type[Exception], match: str) -> None:
    pool = small_pool(backend)
    before = pool.stats()
    with pytest.raises(error, match=match):
        pool.allocate(fake)
    assert pool.stats() == before


def test_ndarray_shape_of_the_right_values_is_read(backend: str) -> None:
    pool = small_pool(backend)
    obj = pool.allocate(_FakeChunk(np.array([2, 2, 8, 2, 8])))
    assert obj is not None
    assert obj.num_tokens == 8
    assert type(obj.num_tokens) is int


def test_unhashable_chunk_idx_in_free_batch(backend: str) -> None:
    pool = small_pool(backend)
    obj = pool.put(_chunk(backend))
    forged = forge(pool, [obj.chunk_idx], 16, obj.generation)
    before = pool.stats()
    with pytest.raises(StaleHandleError, match="not an int"):
        pool.free_batch([obj, forged])
    assert pool.stats() == before


def test_cpu_device_names_mean_host_memory() -> None:
    require("torch")
    meta = LMCacheMemPoolMetadata(SMALL_SHAPE, "float16", 0.001)
    from lmcache.storage_backend.mem_pool import LocalPool

    pool = LocalPool(meta, backend="torch", device="cpu:0")
    assert pool.device == "cpu"


def test_huge_slot_alignment_names_the_alignment() -> None:
    meta = LMCacheMemPoolMetadata(SMALL_SHAPE, "float16", 0.001)
    with pytest.raises(ConfigError, match="slot_alignment"):
        LocalCPUPool(meta, backend="numpy", slot_alignment=2**40)


def test_long_chunks_build_no_per_token_tables(backend: str) -> None:
    require(backend)
    meta = LMCacheMemPoolMetadata((1, 1, 2**21, 1, 1), "int8", 0.01)  # 2M-token chunks of 2 MiB
    tracemalloc.start()
    try:
        pool = LocalCPUPool(meta, backend=backend)
        obj = pool.allocate(_FakeChunk((1, 1, 12345, 1, 1), dtype="int8"))
        assert obj is not None
        assert tuple(obj.data.shape) == (1, 1, 12345, 1, 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"{peak} bytes of Python objects for one pool"


# -- 15. buffer pool batches -----------------------------------------------------------------------------
def test_buffer_pool_free_batch_takes_the_batch_path() -> None:
    pool = LocalCPUBufferPool(LMCacheMemPoolMetadata(SMALL_SHAPE, "float16", 0.001), backend="numpy")
    chunks = [random_bits((2, 2, 16, 2, 8), "float16")] * 8
    before = live_kvobjs()
    batch = pool.allocate_batch(chunks)
    assert batch is not None
    pool.free_batch(batch)
    assert live_kvobjs() == before  # no KVObj was built to free it
    assert pool.stats().used == 0
    gc.collect()
