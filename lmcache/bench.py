"""The pool's benchmark and self-check: ``python -m lmcache bench``.

Every figure is measured in the same run as its baseline and reported as a ratio, so it can be compared
across machines. Timings are the best of ``repeat`` interleaved trials (the least disturbed by other
load on the machine). Frameworks are imported only for the backends that are benchmarked.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import math
import os
import platform
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TextIO

import numpy as np

from lmcache.config import LMCacheMemPoolMetadata
from lmcache.dtypes import KV_DTYPES, normalize_dtype
from lmcache.registry import installed_backends
from lmcache.storage_backend.mem_pool import LocalCPUPool

DEFAULT_SHAPE = (32, 2, 256, 8, 128)  # a Llama-3-8B chunk: 32 MiB in bf16
TINY_SHAPE = (1, 1, 16, 1, 8)  # 256 B chunks, for pool-size scaling
BATCH_SHAPE = (1, 2, 16, 1, 64)  # 4 KiB chunks, for batches of 1024
BIG_POOL_SHAPE = (1, 2, 64, 1, 64)  # 16 KiB chunks: a 16 GiB pool has 1M slots


@dataclass
class Result:
    """One measured figure, with its baseline from the same run where there is one."""

    metric: str
    backend: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    ratio: float | None = None  # value relative to baseline, "higher is better" oriented
    target: float | None = None  # the ratio the design asks for
    note: str = ""

    @property
    def meets_target(self) -> bool | None:
        """Whether the ratio reaches its target (None where there is no target)."""
        if self.target is None or self.ratio is None:
            return None
        return self.ratio >= self.target


@dataclass
class Options:
    """What to benchmark and how long."""

    shape: tuple[int, int, int, int, int] = DEFAULT_SHAPE
    dtype: str = "bfloat16"
    pool_gib: float = 2.0
    backends: Sequence[str] = ()
    repeat: int = 7
    ops: int = 50_000
    big_pool_gib: float = 16.0
    progress: TextIO | None = sys.stderr


# -- helpers -----------------------------------------------------------------------------------------
@dataclass
class _NaiveKVObj:
    """LMCache v0's KVObj, as it is there: a plain dataclass."""

    chunk_idx: int
    size: int
    data: Any


class NaivePool:
    """The baseline: LMCache v0's design. A list of per-chunk arrays, ``list.pop``/``append``, a fresh
    slice per allocate; no checks, no lock, no generations."""

    def __init__(self, chunks: list[Any], size: int) -> None:
        self.mem_pool = chunks
        self.free_pool = list(range(len(chunks)))
        self.size_per_chunk = size

    def allocate(self, kv_chunk: Any) -> _NaiveKVObj | None:
        num_tok = kv_chunk.shape[2]
        if not self.free_pool:
            return None
        chunk_idx = self.free_pool.pop()
        return _NaiveKVObj(chunk_idx, self.size_per_chunk, self.mem_pool[chunk_idx][:, :, 0:num_tok])

    def free(self, kv_obj: _NaiveKVObj) -> None:
        self.free_pool.append(kv_obj.chunk_idx)


def _shape_only(backend: str, shape: tuple[int, ...], dtype: str) -> Any:
    """A chunk with the right shape and dtype and no memory: what allocate reads."""
    if backend == "torch":
        import torch

        return torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
    if backend == "jax":
        import jax

        return jax.ShapeDtypeStruct(shape, getattr(jax.numpy, dtype))  # type: ignore[no-untyped-call]
    zero = np.zeros(1, dtype=KV_DTYPES[dtype].numpy_dtype)
    return np.lib.stride_tricks.as_strided(zero, shape, (0,) * len(shape))


def _filled(backend: str, shape: tuple[int, ...], dtype: str) -> Any:
    spec = KV_DTYPES[dtype]
    host = np.random.default_rng(0).integers(0, 60, size=shape, dtype=np.uint8).astype(spec.numpy_dtype)
    if backend == "torch":
        import torch

        return torch.from_numpy(host.view(spec.bits_dtype)).view(getattr(torch, dtype)).clone()
    if backend == "jax":
        import jax.numpy as jnp

        return jnp.asarray(host).block_until_ready()
    return host


def _pool(backend: str, shape: tuple[int, ...], dtype: str, gib: float, **kw: Any) -> Any:
    """A CPU pool, typed Any: the benchmark loops call it without None checks (pools are sized to fit)."""
    meta = LMCacheMemPoolMetadata(shape, dtype, gib)  # type: ignore[arg-type]
    return LocalCPUPool(meta, backend=backend, pin_memory=False, **kw)


def _best(trials: dict[str, Callable[[], float]], repeat: int) -> dict[str, float]:
    """Run the trials interleaved ``repeat`` times; the best (lowest) time of each.

    The garbage collector is off while a trial runs, as in ``timeit``: a collection's cost depends on
    every object the process holds, not on the code measured.
    """
    best = {name: math.inf for name in trials}
    enabled = gc.isenabled()
    try:
        for _ in range(repeat):
            for name, trial in trials.items():
                gc.collect()
                gc.disable()
                best[name] = min(best[name], trial())
                gc.enable()
    finally:
        if enabled:
            gc.enable()
        else:
            gc.disable()
    return best


def _cycle(pool: Any, chunk: Any, ops: int, touch: bool) -> Callable[[], float]:
    allocate, free = pool.allocate, pool.free

    def run() -> float:
        start = time.perf_counter()
        if touch:
            for _ in range(ops):
                obj = allocate(chunk)
                obj.data  # noqa: B018 - touching the view is part of what is measured
                free(obj)
        else:
            for _ in range(ops):
                free(allocate(chunk))
        return (time.perf_counter() - start) / ops

    return run


# -- measurements ------------------------------------------------------------------------------------
def bench_alloc_free(backend: str, opts: Options) -> list[Result]:
    """allocate + touch .data + free, full and partial chunks, against the naive pool."""
    results = []
    shape, dtype = opts.shape, opts.dtype
    tokens_partial = max(1, shape[2] // 2)
    partial_shape = (shape[0], shape[1], tokens_partial, shape[3], shape[4])
    safe = _pool(backend, shape, dtype, opts.pool_gib)
    single = _pool(backend, shape, dtype, opts.pool_gib, thread_safe=False)
    naive_backend = "numpy" if backend == "jax" else backend  # eager JAX slicing copies: no fair naive JAX
    # The naive pool's memory: every slot of a pool of the same size, held for the whole run.
    arena = _pool(naive_backend, shape, dtype, opts.pool_gib, thread_safe=False)
    full_chunk = _shape_only(naive_backend, shape, dtype)
    naive_chunks = [arena.allocate(full_chunk).data for _ in range(arena.max_chunk_num)]  # type: ignore[union-attr]
    naive = NaivePool(naive_chunks, arena.size_per_chunk)
    # DESIGN.md section 7 sets targets for the torch pool against LMCache 0.3.11's (thread-safe, checks
    # on); single-owner mode and the numpy / JAX rows are reported without a target.
    has_target = backend == "torch"
    for label, chunk_shape, target in (
        ("full", shape, 2.0),
        (f"partial ({tokens_partial} tokens)", partial_shape, 1.5),
    ):
        chunk = _shape_only(backend, chunk_shape, dtype)
        naive_chunk = _shape_only(naive_backend, chunk_shape, dtype)
        for pool in (safe, single):  # JAX keeps pristine views per slot: make each once, as in a long run
            for obj in [pool.allocate(chunk) for _ in range(pool.max_chunk_num)]:
                obj.data  # noqa: B018
                pool.free(obj)
        best = _best(
            {
                "safe": _cycle(safe, chunk, opts.ops, touch=True),
                "single": _cycle(single, chunk, opts.ops, touch=True),
                "naive": _cycle(naive, naive_chunk, opts.ops, touch=True),
            },
            opts.repeat,
        )
        for mode in ("safe", "single"):
            what = "thread-safe" if mode == "safe" else "single-owner"
            results.append(
                Result(
                    f"allocate+.data+free, {label}, {what}",
                    backend,
                    1 / best[mode],
                    "ops/s",
                    1 / best["naive"],
                    f"naive {naive_backend} pool",
                    best["naive"] / best[mode],
                    target if has_target and mode == "safe" else None,
                    "each allocate makes the owner's own view (torch: detached alias)"
                    if backend != "jax"
                    else "a pristine JAX view is reused per slot",
                )
            )
    return results


def bench_backend_parity(backends: Sequence[str], opts: Options) -> list[Result]:
    """allocate+free (no view) of each backend against the numpy backend, and first .data access."""
    results = []
    chunk_np = _shape_only("numpy", opts.shape, opts.dtype)
    numpy_pool = _pool("numpy", opts.shape, opts.dtype, opts.pool_gib)
    for backend in backends:
        if backend == "numpy":
            continue
        pool = _pool(backend, opts.shape, opts.dtype, opts.pool_gib)
        best = _best(
            {
                "backend": _cycle(pool, _shape_only(backend, opts.shape, opts.dtype), opts.ops, touch=False),
                "numpy": _cycle(numpy_pool, chunk_np, opts.ops, touch=False),
            },
            opts.repeat,
        )
        results.append(
            Result(
                "allocate+free (no view) vs numpy backend",
                backend,
                1 / best["backend"],
                "ops/s",
                1 / best["numpy"],
                "numpy pool",
                best["numpy"] / best["backend"],
            )
        )
    for backend in backends:
        for tokens in (opts.shape[2], max(1, opts.shape[2] // 2)):
            pool = _pool(backend, opts.shape, opts.dtype, opts.pool_gib)
            chunk = _shape_only(backend, (*opts.shape[:2], tokens, *opts.shape[3:]), opts.dtype)
            objs = [pool.allocate(chunk) for _ in range(pool.max_chunk_num)]
            start = time.perf_counter()
            for obj in objs:
                obj.data  # noqa: B018
            first = (time.perf_counter() - start) / len(objs)
            start = time.perf_counter()
            for obj in objs:
                obj.data  # noqa: B018
            again = (time.perf_counter() - start) / len(objs)
            results.append(
                Result(
                    f"first .data access, {tokens} tokens",
                    backend,
                    first * 1e6,
                    "us",
                    note=f"the owner's own view; later accesses (ownership checked) {again * 1e6:.3f} us",
                )
            )
    return results


def bench_batch(backend: str, opts: Options) -> list[Result]:
    """allocate_batch(1024) + free_batch per chunk, against 1024 single allocate + free."""
    count = 1024
    pool = _pool(backend, BATCH_SHAPE, opts.dtype, 2 * count * 4096 / 2**30)
    chunk = _shape_only(backend, BATCH_SHAPE, opts.dtype)
    chunks = [chunk] * count

    rounds = 16  # batches per trial: one batch is too short to time reliably

    def batch() -> float:
        start = time.perf_counter()
        for _ in range(rounds):
            pool.free_batch(pool.allocate_batch(chunks))
        return (time.perf_counter() - start) / (rounds * count)

    def batch_touched() -> float:
        start = time.perf_counter()
        for _ in range(rounds):
            objs = pool.allocate_batch(chunks)
            for obj in objs:  # builds every KVObj and reads its view
                obj.data  # noqa: B018
            pool.free_batch(objs)
        return (time.perf_counter() - start) / (rounds * count)

    best = _best(
        {
            "batch": batch,
            "touched": batch_touched,
            "single": _cycle(pool, chunk, rounds * count, touch=False),
        },
        opts.repeat,
    )
    return [
        Result(
            f"allocate_batch(1024)+free_batch per chunk{suffix}",
            backend,
            best[key] * 1e6,
            "us/chunk",
            best["single"] * 1e6,
            "1024 single allocate+free",
            best["single"] / best[key],
            target,
        )
        for key, suffix, target in (
            ("batch", "", 5.0),
            ("touched", ", every KVObj built and .data read", None),
        )
    ]


def bench_copy(backend: str, opts: Options) -> list[Result]:
    """copy_from and put of a full chunk, against numpy.copyto of the same bytes."""
    pool = _pool(backend, opts.shape, opts.dtype, max(opts.pool_gib, 0.1))
    src = _filled(backend, opts.shape, opts.dtype)
    src_np = _filled("numpy", opts.shape, opts.dtype)
    dst_np = np.empty_like(src_np)
    obj = pool.allocate(src)
    nbytes = src_np.nbytes
    if obj is None:
        raise RuntimeError("the benchmark pool is full")
    np.copyto(dst_np, src_np)  # fault the pages in
    obj.copy_from(src)

    def timed(fn: Callable[[], Any]) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start

        return run

    def put_free() -> None:
        pool.free(pool.put(src))  # type: ignore[arg-type]

    best = _best(
        {
            "copy_from": timed(lambda: obj.copy_from(src)),
            "put": timed(put_free),
            "copyto": timed(lambda: np.copyto(dst_np, src_np)),
        },
        opts.repeat,
    )
    gbps = {name: nbytes / t / 1e9 for name, t in best.items()}
    return [
        Result(
            f"{name} bandwidth ({nbytes >> 20} MiB chunk)",
            backend,
            gbps[name],
            "GB/s",
            gbps["copyto"],
            "numpy.copyto",
            gbps[name] / gbps["copyto"],
            0.9,
        )
        for name in ("copy_from", "put")
    ]


def bench_scaling(opts: Options) -> list[Result]:
    """allocate+free cost in a 1M-slot pool against a 1k-slot pool, tiny chunks.

    Each pool is filled, then a random half of its slots is freed, so that the free slots (and the
    generations and views the allocator touches) are spread over the whole pool. Then the same churn
    runs in both: 512 live handles, each step frees a random one and allocates a new one.
    """
    slot = 256
    pools: dict[str, Any] = {}
    churns: dict[str, Callable[[], float]] = {}
    for label, slots in (("1k", 1024), ("1M", 1 << 20)):
        pool = _pool("numpy", TINY_SHAPE, "float16", slots * slot / 2**30)
        chunk = _shape_only("numpy", TINY_SHAPE, "float16")
        filled = pool.allocate_batch([chunk] * slots)  # lazy handles: no million Python objects
        for i in random.Random(1).sample(range(slots), slots // 2):
            pool.free(filled[i])
        live = [pool.allocate(chunk) for _ in range(512)]
        rng = random.Random(0)
        picks = [rng.randrange(len(live)) for _ in range(opts.ops)]
        pools[label] = (pool, filled)
        churns[label] = partial(_churn, pool, chunk, live, picks)
    costs = _best(churns, opts.repeat)
    del pools, churns
    gc.collect()
    return [
        Result(
            "allocate+free cost, 1M-slot pool vs 1k-slot pool",
            "numpy",
            costs["1M"] * 1e6,
            "us/op",
            costs["1k"] * 1e6,
            "1k-slot pool",
            costs["1k"] / costs["1M"],
            1 / 1.15,
            "target: within 1.15x",
        )
    ]


def _churn(pool: Any, chunk: Any, live: list[Any], picks: list[int]) -> float:
    """Free the live object at each pick and allocate a new one in its place; seconds per pair."""
    allocate, free = pool.allocate, pool.free
    start = time.perf_counter()
    for i in picks:
        free(live[i])
        live[i] = allocate(chunk)
    return (time.perf_counter() - start) / len(picks)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def bench_construction(backend: str, opts: Options) -> list[Result]:
    """Construction time, resident memory touched and bookkeeping per slot of a large CPU pool."""
    from lmcache.hostmem import available_host_bytes

    available = available_host_bytes()
    gib = opts.big_pool_gib
    note = ""
    if available is not None and gib * 2**30 > 0.9 * available:
        gib = max(1.0, math.floor(0.9 * available / 2**30))
        note = f"scaled down from {opts.big_pool_gib:g} GiB to fit this machine; "
    results = []
    for label, shape in (("default chunks", opts.shape), ("16 KiB chunks", BIG_POOL_SHAPE)):
        gc.collect()
        rss = _rss_bytes()
        tracemalloc.start()
        start = time.perf_counter()
        pool = _pool(backend, shape, opts.dtype if label == "default chunks" else "float16", gib)
        elapsed = time.perf_counter() - start
        traced, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        touched = _rss_bytes() - rss
        per_slot = traced / pool.max_chunk_num
        results.append(
            Result(
                f"construct {gib:g} GiB pool, {label}",
                backend,
                elapsed * 1e3,
                "ms",
                note=f"{note}{pool.max_chunk_num} slots, {per_slot:.1f} B bookkeeping/slot "
                f"(target <= 64), {touched / 2**20:.1f} MiB resident touched",
            )
        )
        pool.close()
        del pool
    return results


def bench_views(backends: Sequence[str], opts: Options) -> list[Result]:
    """Cost of each cross-framework view: first access (new KVObj) and repeated (same KVObj)."""
    shape, dtype = opts.shape, opts.dtype
    results = []
    for backend in backends:
        pool = _pool(backend, shape, dtype, opts.pool_gib)
        chunk = _shape_only(backend, shape, dtype)
        for target in backends:
            method = f"as_{target}"
            firsts, agains = [], []
            for _ in range(200):
                obj = pool.allocate(chunk)
                convert = getattr(obj, method)
                start = time.perf_counter()
                convert()
                mid = time.perf_counter()
                convert()
                end = time.perf_counter()
                firsts.append(mid - start)
                agains.append(end - mid)
                pool.free(obj)
            results.append(
                Result(
                    f"view {backend} pool -> {target}",
                    backend,
                    statistics.median(firsts) * 1e6,
                    "us first",
                    note=f"repeated {statistics.median(agains) * 1e6:.3f} us (median of 200)",
                )
            )
    return results


# -- self-check --------------------------------------------------------------------------------------
def self_check(backends: Sequence[str]) -> list[str]:
    """Run the pool's contract on each backend; return the failures (empty when all holds)."""
    from lmcache.errors import DoubleFreeError

    failures = []
    for backend in backends:
        try:
            pool = _pool(backend, (2, 2, 16, 2, 8), "bfloat16", 8 * 2048 / 2**30)
            full = _filled(backend, (2, 2, 16, 2, 8), "bfloat16")
            objs = [pool.put(full) for _ in range(8)]
            if any(o is None for o in objs) or len({o.chunk_idx for o in objs}) != 8:  # type: ignore[union-attr]
                failures.append(f"{backend}: 8 slots were not handed out distinctly")
            if pool.allocate(full) is not None:
                failures.append(f"{backend}: a full pool did not return None")
            pool.free(objs[0])  # type: ignore[arg-type]
            try:
                pool.free(objs[0])  # type: ignore[arg-type]
                failures.append(f"{backend}: a double free was accepted")
            except DoubleFreeError:
                pass
            part = pool.put(_filled(backend, (2, 2, 5, 2, 8), "bfloat16"))
            if part is None:
                failures.append(f"{backend}: no slot after a free")
                continue
            address = pool.slot_address(part.chunk_idx)
            for target in backends:
                view = getattr(part, f"as_{target}")()
                pointer = (
                    view.ctypes.data
                    if isinstance(view, np.ndarray)
                    else view.data_ptr()
                    if hasattr(view, "data_ptr")
                    else view.unsafe_buffer_pointer()
                )
                if pointer != address:
                    failures.append(f"{backend} -> {target}: the view is not zero-copy")
            if part.clone("numpy").tobytes() != part.as_numpy().tobytes():
                failures.append(f"{backend}: clone differs from the view")
        except Exception as exc:  # noqa: BLE001 - a self-check reports every failure, then exits non-zero
            failures.append(f"{backend}: {type(exc).__name__}: {exc}")
    return failures


# -- driver ------------------------------------------------------------------------------------------
def environment() -> dict[str, Any]:
    """Versions, machine and accelerators, as ``python -m lmcache info`` prints them."""
    from lmcache import __version__
    from lmcache.registry import load_adapter

    info: dict[str, Any] = {
        "lmcache-mempool": __version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "numpy": np.__version__,
    }
    for backend in installed_backends():
        if backend == "numpy":
            continue
        module = importlib.import_module(backend)
        info[backend] = getattr(module, "__version__", "?")
        try:
            info[f"{backend} accelerators"] = load_adapter(backend).accelerators() or "none"
        except Exception as exc:  # noqa: BLE001 - info reports a broken install instead of failing
            info[f"{backend} accelerators"] = f"error: {exc}"
    return info


def run(opts: Options) -> tuple[list[Result], list[str]]:
    """Run the self-check and every benchmark; return the results and the self-check failures."""
    backends = list(opts.backends) or installed_backends()
    normalize_dtype(opts.dtype)
    steps: list[tuple[str, Callable[[], list[Result]]]] = []
    for backend in backends:
        steps.append((f"{backend}: allocate/free", partial(bench_alloc_free, backend, opts)))
    steps.append(("backend parity and first view", partial(bench_backend_parity, backends, opts)))
    for backend in backends:
        steps.append((f"{backend}: batches", partial(bench_batch, backend, opts)))
        steps.append((f"{backend}: copy bandwidth", partial(bench_copy, backend, opts)))
    steps.append(("pool-size scaling", partial(bench_scaling, opts)))
    for backend in backends:
        steps.append((f"{backend}: construction", partial(bench_construction, backend, opts)))
    steps.append(("cross-framework views", partial(bench_views, backends, opts)))
    from lmcache.bench_cache import bench_chunk_cache  # here: bench_cache imports this module
    from lmcache.bench_paged import bench_paged  # the same

    steps.append(("chunk cache", partial(bench_chunk_cache, backends, opts)))
    steps.append(
        (
            "serving scenario",
            partial(importlib.import_module("lmcache.bench_serving").bench_serving, backends, opts),
        )
    )
    steps.append(
        (
            "remote tier (loopback redis)",
            partial(importlib.import_module("lmcache.bench_remote").bench_remote, opts),
        )
    )
    steps.append(("paged transfer", partial(bench_paged, backends, opts)))

    def say(text: str) -> None:
        if opts.progress is not None:
            print(text, file=opts.progress, flush=True)

    say(f"self-check on {', '.join(backends)} ...")
    failures = self_check(backends)
    say("self-check: " + ("PASS" if not failures else f"FAIL ({len(failures)})"))
    results: list[Result] = []
    for index, (label, step) in enumerate(steps, 1):
        say(f"[{index}/{len(steps)}] {label} ...")
        results.extend(step())
        gc.collect()
    return results, failures


def format_table(results: Sequence[Result]) -> str:
    """Render results as a Markdown table."""
    rows = ["| metric | backend | value | baseline | ratio | target | met |", "|---|---|---|---|---|---|---|"]
    for r in results:
        baseline = f"{r.baseline:,.4g} ({r.baseline_name})" if r.baseline is not None else ""
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
        target = f">= {r.target:.2f}x" if r.target is not None else ""
        met = {None: "", True: "yes", False: "**no**"}[r.meets_target]
        value = f"{r.value:,.4g} {r.unit}"
        if r.note:
            value += f"; {r.note}"
        rows.append(f"| {r.metric} | {r.backend} | {value} | {baseline} | {ratio} | {target} | {met} |")
    return "\n".join(rows)


def to_json(results: Sequence[Result], failures: Sequence[str]) -> str:
    """Render results, self-check and environment as JSON."""
    return json.dumps(
        {
            "environment": environment(),
            "self_check": {"passed": not failures, "failures": list(failures)},
            "results": [dataclasses.asdict(r) | {"meets_target": r.meets_target} for r in results],
        },
        indent=2,
    )


__all__ = ["NaivePool", "Options", "Result", "environment", "format_table", "run", "self_check", "to_json"]
