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
