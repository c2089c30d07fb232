"""What every benchmark section shares: the result row, the options, and the timing and pool helpers.

A section builds its inputs with :func:`pool`, :func:`filled` and :func:`shape_only`, wraps each thing it
measures (and its baseline) with :func:`timed`, and runs them interleaved with :func:`best`, so that a
ratio compares two figures taken under the same load on the machine.
"""

from __future__ import annotations

import gc
import itertools
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np

from lmcache.config import LMCacheMemPoolMetadata
from lmcache.dtypes import KV_DTYPES
from lmcache.hostmem import allocate_host
from lmcache.layout import SlotLayout
from lmcache.storage_backend.mem_pool import LocalCPUPool

DEFAULT_SHAPE = (32, 2, 256, 8, 128)  # a Llama-3-8B chunk: 32 MiB in bf16


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
    headline: bool = False  # one of the dozen rows the summary shows
    load: float | None = None  # the 1-minute load average when the row's section finished (the driver's)

    @property
    def lower_is_better(self) -> bool:
        """Whether ``value`` is a cost (a time, bytes per slot) rather than a rate."""
        return self.unit.split("/")[0] in ("s", "ms", "us", "ns", "B")

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
    #: The Mooncake trace of the shared cache's hit-rate figure (None: the project's copy, if found).
    trace: str | None = None
    #: The sections to run (empty: all; see ``lmcache.bench.report.SECTIONS``).
    sections: Sequence[str] = ()
    progress: TextIO | None = sys.stderr
    loaded: bool = False  # rerun the headline sections beside busy processes
    load_procs: int = 1
    disk_dir: str | None = None  # where the disk tier's section writes (None: a temporary directory)


def shape_only(backend: str, shape: tuple[int, ...], dtype: str) -> Any:
    """Return a chunk with the right shape and dtype and no memory: all that ``allocate`` reads.

    torch gets a ``meta`` tensor, JAX a ``ShapeDtypeStruct``, numpy a zero-strided view of one element,
    so a benchmark of allocate measures the pool and not the making of its argument.
    """
    if backend == "torch":
        import torch

        return torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
    if backend == "jax":
        import jax

        return jax.ShapeDtypeStruct(shape, getattr(jax.numpy, dtype))  # type: ignore[no-untyped-call]
    zero = np.zeros(1, dtype=KV_DTYPES[dtype].numpy_dtype)
    return np.lib.stride_tricks.as_strided(zero, shape, (0,) * len(shape))


def filled(backend: str, shape: tuple[int, ...], dtype: str) -> Any:
    """Return an array of ``backend`` with small pseudo-random values (seed 0), resident in memory.

    The values are integers below 60, exact in every KV dtype, so round trips can be compared bit for
    bit; the same arguments give the same bytes in every framework.
    """
    spec = KV_DTYPES[dtype]
    host = np.random.default_rng(0).integers(0, 60, size=shape, dtype=np.uint8).astype(spec.numpy_dtype)
    if backend == "torch":
        import torch

        return torch.from_numpy(host.view(spec.bits_dtype)).view(getattr(torch, dtype)).clone()
    if backend == "jax":
        import jax.numpy as jnp

        return jnp.asarray(host).block_until_ready()
    return host


def pool(backend: str, shape: tuple[int, ...], dtype: str, gib: float, **kw: Any) -> Any:
    """Return an unpinned CPU pool of ``gib`` GiB, typed Any: the benchmark loops call it without None
    checks (pools are sized to fit). ``kw`` goes to :class:`LocalCPUPool` (e.g. ``thread_safe``)."""
    meta = LMCacheMemPoolMetadata(shape, dtype, gib)  # type: ignore[arg-type]
    return LocalCPUPool(meta, backend=backend, pin_memory=False, **kw)


def slots_gib(shape: tuple[int, ...], dtype: str, slots: int) -> float:
    """The budget in GiB of a pool of exactly ``slots`` slots of ``shape`` (a server's ``--size-gib``)."""
    meta = LMCacheMemPoolMetadata(shape, dtype, 1.0)  # type: ignore[arg-type]
    return slots * SlotLayout.from_metadata(meta).slot_bytes / 2**30


def slots_pool(backend: str, shape: tuple[int, ...], dtype: str, slots: int) -> Any:
    """A CPU pool of exactly ``slots`` slots (see :func:`pool`)."""
    return pool(backend, shape, dtype, slots_gib(shape, dtype, slots))


def aligned_copy(array: np.ndarray) -> np.ndarray:
    """A copy of ``array`` at a 4096-byte aligned address.

    numpy puts large arrays at 16 bytes past a page; copying an aligned slot into such an array runs
    at a third of the speed here (measured: 46 ms against 13 ms for 64 MiB of chunk slices), which
    would measure numpy's alignment luck instead of the cache. torch and JAX allocate aligned memory.
    """
    raw = allocate_host(array.nbytes)
    copy = raw.view(array.dtype).reshape(array.shape)
    np.copyto(copy, array)
    return copy


def timed(fn: Callable[[], object], calls: int = 1) -> Callable[[], float]:
    """Return a trial for :func:`best`: it calls ``fn`` ``calls`` times and returns seconds per call.

    Use ``calls > 1`` where one call is too short to time reliably.
    """

    def trial() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls

    return trial


def best(trials: dict[str, Callable[[], float]], repeat: int) -> dict[str, float]:
    """Run the trials interleaved ``repeat`` times; return the best (lowest) time of each.

    The garbage collector is off while a trial runs, as in ``timeit``: a collection's cost depends on
    every object the process holds, not on the code measured.
    """
    lowest = {name: math.inf for name in trials}
    enabled = gc.isenabled()
    try:
        for _ in range(repeat):
            for name, trial in trials.items():
                gc.collect()
                gc.disable()
                lowest[name] = min(lowest[name], trial())
                gc.enable()
    finally:
        if enabled:
            gc.enable()
        else:
            gc.disable()
    return lowest


def copy_baselines(dst: np.ndarray, src: np.ndarray, threads: int) -> dict[str, Callable[[], float]]:
    """Trials of the best copies the machine can do of ``src`` into ``dst`` (same shape, dtype): numpy's
    ``copyto`` (one thread), torch's ``copy_`` with its default threads (where torch is installed), and
    ``threads`` threads each copying a slice with ``copyto`` (a reference written here, apart from the
    library's copy engine)."""
    import concurrent.futures

    trials: dict[str, Callable[[], float]] = {"numpy.copyto": timed(lambda: np.copyto(dst, src))}
    if "torch" in sys.modules:  # benchmarked already: part of what this machine can do
        import torch

        bits = f"u{dst.dtype.itemsize}"
        tdst, tsrc = torch.from_numpy(dst.view(bits)), torch.from_numpy(src.view(bits))
        trials["torch copy_"] = timed(lambda: tdst.copy_(tsrc))
    if threads > 1:
        flat_dst, flat_src = dst.reshape(-1), src.reshape(-1)
        bounds = [len(flat_dst) * i // threads for i in range(threads + 1)]
        executor = concurrent.futures.ThreadPoolExecutor(threads - 1)

        def split() -> None:
            futures = [
                executor.submit(np.copyto, flat_dst[a:b], flat_src[a:b])
                for a, b in itertools.pairwise(bounds[1:])
            ]
            np.copyto(flat_dst[: bounds[1]], flat_src[: bounds[1]])
            for future in futures:
                future.result()

        trials[f"{threads} threads x copyto"] = timed(split)
    return trials


__all__ = [
    "DEFAULT_SHAPE",
    "Options",
    "Result",
    "aligned_copy",
    "best",
    "copy_baselines",
    "filled",
    "pool",
    "shape_only",
    "slots_gib",
    "slots_pool",
    "timed",
]
