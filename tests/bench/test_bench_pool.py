"""pytest-benchmark suite for the hot paths (``nox -s bench``; not part of the default test run).

Each pool benchmark has its naive baseline (LMCache 0.3.11's LocalCPUPool, reproduced) in the same group, so
``pytest-benchmark compare`` and the printed table show the ratio from one run.
"""

from __future__ import annotations

from typing import Any

import pytest

from kvtest import BACKENDS, require
from lmcache import bench
from lmcache.bench import common

SHAPE = bench.DEFAULT_SHAPE
PARTIAL = (SHAPE[0], SHAPE[1], SHAPE[2] // 2, SHAPE[3], SHAPE[4])


def _cycle(pool: Any, chunk: Any) -> None:
    obj = pool.allocate(chunk)
    obj.data  # noqa: B018 - touching the view is part of what is measured
    pool.free(obj)


@pytest.mark.parametrize("thread_safe", [True, False], ids=["locked", "single-owner"])
@pytest.mark.parametrize("shape", [SHAPE, PARTIAL], ids=["full", "partial"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_allocate_free(benchmark: Any, backend: str, shape: tuple[int, ...], thread_safe: bool) -> None:
    require(backend)
    benchmark.group = f"allocate+data+free {backend} {'full' if shape == SHAPE else 'partial'}"
    pool = common.pool(backend, SHAPE, "bfloat16", 1, thread_safe=thread_safe)
    chunk = common.shape_only(backend, shape, "bfloat16")
    benchmark(_cycle, pool, chunk)


@pytest.mark.parametrize("shape", [SHAPE, PARTIAL], ids=["full", "partial"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_naive_baseline(benchmark: Any, backend: str, shape: tuple[int, ...]) -> None:
    require(backend)
    benchmark.group = f"allocate+data+free {backend} {'full' if shape == SHAPE else 'partial'}"
    arena = common.pool(backend, SHAPE, "bfloat16", 1)
    full = common.shape_only(backend, SHAPE, "bfloat16")
    naive = bench.NaivePool([arena.allocate(full).data for _ in range(arena.max_chunk_num)], 1)
    benchmark(_cycle, naive, common.shape_only(backend, shape, "bfloat16"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_of_1024(benchmark: Any, backend: str) -> None:
    require(backend)
    benchmark.group = "batch of 1024"
    pool = common.pool(backend, bench.BATCH_SHAPE, "bfloat16", 2048 * 4096 / 2**30)
    chunks = [common.shape_only(backend, bench.BATCH_SHAPE, "bfloat16")] * 1024
    benchmark(lambda: pool.free_batch(pool.allocate_batch(chunks)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_copy_from_32mib(benchmark: Any, backend: str) -> None:
    require(backend)
    benchmark.group = "copy 32 MiB"
    pool = common.pool(backend, SHAPE, "bfloat16", 0.1)
    src = common.filled(backend, SHAPE, "bfloat16")
    obj = pool.put(src)
    benchmark(obj.copy_from, src)


def test_numpy_copyto_32mib(benchmark: Any) -> None:
    import numpy as np

    benchmark.group = "copy 32 MiB"
    src = common.filled("numpy", SHAPE, "bfloat16")
    dst = np.empty_like(src)
    benchmark(np.copyto, dst, src)


# -- the rows themselves (plain tests: they run with --benchmark-disable too) ------------------------
def test_bookkeeping_rows_orient_the_bound_as_higher_is_better() -> None:
    from lmcache.bench.pool import BOOKKEEPING_TARGET, bench_construction

    opts = bench.Options(big_pool_gib=1 / 16, progress=None)  # 4096 slots of 16 KiB, 2 of 32 MiB
    rows = {r.metric: r for r in bench_construction("numpy", opts)}
    small = rows["bookkeeping per slot, 0.0625 GiB pool, 16 KiB chunks"]
    default = rows["bookkeeping per slot, 0.0625 GiB pool, default chunks"]
    assert small.unit == "B/slot"
    assert small.value > 0
    assert small.ratio == BOOKKEEPING_TARGET / small.value
    assert small.target == 1.0
    assert small.meets_target == (small.value <= BOOKKEEPING_TARGET)
    assert default.target is None
    assert default.meets_target is None
    assert "no target" in default.note


def test_copy_rows_include_copy_to_against_copyto() -> None:
    from lmcache.bench.pool import bench_copy

    rows = bench_copy("numpy", bench.Options(repeat=1, pool_gib=0.1, progress=None))
    assert [r.metric.split()[0] for r in rows] == ["copy_from", "put", "copy_to"]
    assert all(r.baseline_name == "numpy.copyto" and r.target == 0.9 for r in rows)


def test_benchmark_error_is_a_pool_error_and_a_runtime_error() -> None:
    from lmcache.errors import BenchmarkError, MemPoolError

    assert issubclass(BenchmarkError, MemPoolError)
    assert issubclass(BenchmarkError, RuntimeError)
