"""The shared cache's section of ``python -m lmcache bench`` (DESIGN section 13).

Every figure goes through a real ``python -m lmcache serve`` process on a Unix socket in a fresh temp
dir, against a baseline measured in the same run:

* store + ``retrieve(out=)`` of a 16k-token prompt (64 MiB each way) through the server against the same
  through an in-process :class:`~lmcache.chunk_cache.ChunkCache` of the same size: target >= 0.8x;
* ``lookup`` of a 128-chunk prompt given as a list, through the server against in-process: target at
  most the in-process time + 0.5 ms (ratio ``(in-process + 0.5 ms) / shared``, target >= 1);
* memory: four client processes that each read the whole arena; the proportional set size (Pss) of the
  shared mapping, summed over every process that maps it, against the arena's size: target at most
  1.1x (ratio >= 0.9). Four private caches would take 4x; the summed Rss (which counts a shared page
  once per process) is in the note;
* hit rate: the Mooncake conversation trace (:mod:`lmcache.bench.trace`) as four replicas served
  round-robin, through one server of C chunks against four private caches of C / 4, at a few C (no
  target: the shared cache should be well ahead).

:func:`touch` is the memory figure's client process.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from lmcache.bench import common
from lmcache.bench.cache import CACHE_SHAPE, LOOKUP_CHUNKS, LOOKUP_SHAPE, PROMPT_TOKENS
from lmcache.bench.common import Options, Result
from lmcache.bench.trace import BLOCK_TOKENS, find_trace, read_trace, replay
from lmcache.chunk_cache import ChunkCache
from lmcache.errors import BenchmarkError
from lmcache.shared import connect

#: Client processes of the memory figure.
CLIENTS = 4
#: The hit-rate figure's replicas and capacities (chunks of 512 tokens in the shared cache).
REPLICAS = 4
CAPACITIES = (4096, 16384, 40960)
#: One byte per token: the hit-rate replay needs no KV, only which chunks are cached.
TRACE_SHAPE = (1, 1, BLOCK_TOKENS, 1, 1)
_MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ .*memfd:lmcache-shared")
_TOUCH = "import sys; from lmcache.bench.shared import touch; sys.exit(touch(sys.argv[1]))"


@contextlib.contextmanager
def serving(shape: tuple[int, ...], dtype: str, slots: int) -> Iterator[tuple[str, int]]:
    """Run ``python -m lmcache serve`` with an arena of ``slots`` slots; yield its socket and pid."""
    directory = tempfile.mkdtemp(prefix="lmc-bench-")
    path = os.path.join(directory, "bench.sock")
    args = [sys.executable, "-m", "lmcache", "serve", "--socket", path]
    args += ["--kv-shape", ",".join(map(str, shape)), "--dtype", dtype]
    args += ["--size-gib", repr(common.slots_gib(shape, dtype, slots))]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = _first_line(process, 60.0)
        if line != f"ready {path}":
            error = process.stderr.read() if process.poll() is not None and process.stderr else ""
            raise BenchmarkError(f"lmcache serve did not start (it printed {line!r}): {error[-2000:]}")
        yield path, process.pid
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
        shutil.rmtree(directory, ignore_errors=True)


def _first_line(process: subprocess.Popen[str], seconds: float) -> str:
    if process.stdout is None:
        return ""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(seconds):
            return ""
    return process.stdout.readline().strip()


# -- bandwidth and lookup ----------------------------------------------------------------------------
def bench_shared_copy(backend: str, opts: Options) -> list[Result]:
    """store + retrieve(out=) of a 16k-token prompt (4k with ``--quick``), through the server and
    in-process."""
    L, kv_planes, chunk, H, D = CACHE_SHAPE
    prompt_tokens = PROMPT_TOKENS if opts.repeat > 2 else PROMPT_TOKENS // 4
    shape = (L, kv_planes, prompt_tokens, H, D)
    chunks = prompt_tokens // chunk
    tokens = np.arange(prompt_tokens, dtype=np.int64)
    kv_host = common.aligned_copy(common.filled("numpy", shape, opts.dtype))
    kv = kv_host if backend == "numpy" else common.filled(backend, shape, opts.dtype)
    # JAX arrays are immutable: a JAX client retrieves into host memory, as the in-process bench.
    out = common.filled("torch", shape, opts.dtype) if backend == "torch" else common.aligned_copy(kv_host)
    local = ChunkCache(common.slots_pool(backend, CACHE_SHAPE, opts.dtype, chunks))
    with serving(CACHE_SHAPE, opts.dtype, chunks) as (path, _), connect(path, backend=backend) as client:

        def trial(cache: Any) -> Callable[[], float]:
            def run() -> float:
                cache.clear()
                start = time.perf_counter()
                cache.store(tokens, kv)
                _, n = cache.retrieve(tokens, out=out)
                elapsed = time.perf_counter() - start
                if n != prompt_tokens:
                    raise BenchmarkError(f"{type(cache).__name__} retrieved {n} of {prompt_tokens} tokens")
                return elapsed

            return run

        best = common.best({"local": trial(local), "shared": trial(client)}, opts.repeat)
        if client.stats().errors:
            raise BenchmarkError(f"the shared cache failed calls during the benchmark: {client.stats()}")
    moved = 2 * kv_host.nbytes / 1e9
    return [
        Result(
            f"shared cache store+retrieve(out=), {prompt_tokens // 1024}k tokens",
            backend,
            moved / best["shared"],
            "GB/s",
            moved / best["local"],
            "in-process ChunkCache",
            best["local"] / best["shared"],
            0.8,
            f"{kv_host.nbytes >> 20} MiB each way through lmcache serve, {chunks} chunks of {CACHE_SHAPE}",
        )
    ]


def bench_shared_lookup(opts: Options) -> list[Result]:
    """lookup of a 128-chunk prompt (a list) through the server against an in-process cache."""
    rng = np.random.default_rng(0)
    tokens = [int(t) for t in rng.integers(0, 128_000, size=LOOKUP_CHUNKS * LOOKUP_SHAPE[2])]
    kv = common.filled("numpy", (*LOOKUP_SHAPE[:2], len(tokens), *LOOKUP_SHAPE[3:]), opts.dtype)
    local = ChunkCache(common.slots_pool("numpy", LOOKUP_SHAPE, opts.dtype, LOOKUP_CHUNKS))
    with serving(LOOKUP_SHAPE, opts.dtype, LOOKUP_CHUNKS) as (path, _), connect(path) as client:
        if local.store(tokens, kv) != len(tokens) or client.store(tokens, kv) != len(tokens):
            raise BenchmarkError("the lookup benchmark could not store a prompt sized to fill its cache")
        calls = 20
        best = common.best(
            {
                "local": common.timed(lambda: local.lookup(tokens), calls),
                "shared": common.timed(lambda: client.lookup(tokens), calls),
            },
            opts.repeat,
        )
    allowance = 0.5e-3
    return [
        Result(
            f"shared cache lookup, {LOOKUP_CHUNKS} chunks of {LOOKUP_SHAPE[2]} tokens (list)",
            "numpy",
            best["shared"] * 1e3,
            "ms",
            best["local"] * 1e3,
            "in-process ChunkCache",
            (best["local"] + allowance) / best["shared"],
            1.0,
            "target: at most in-process + 0.5 ms; the round trip costs "
            f"{(best['shared'] - best['local']) * 1e3:.3f} ms",
        )
    ]


# -- memory ------------------------------------------------------------------------------------------
def mapping_memory(pid: int) -> tuple[int, int]:
    """``(Rss, Pss)`` in bytes of process ``pid``'s mappings of a shared cache arena (0 if it has none)."""
    rss = pss = 0
    inside = False
    with open(f"/proc/{pid}/smaps", encoding="utf-8", errors="replace") as smaps:
        for line in smaps:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = bool(_MAPPING.match(line))
            elif inside and line.startswith(("Rss:", "Pss:")):
                value = int(line.split()[1]) * 1024
                if line.startswith("Rss:"):
                    rss += value
                else:
                    pss += value
    return rss, pss


def bench_shared_memory(opts: Options) -> list[Result]:
    """Four client processes that read the whole arena: the arena's memory is used once."""
    if not os.path.exists("/proc/self/smaps"):
        return []
    chunk_tokens = CACHE_SHAPE[2]
    slots = 256 if opts.repeat > 2 else 64  # 1 MiB chunks: a 256 MiB arena (64 MiB with --quick)
    store_chunks = 64 if opts.repeat > 2 else 16
    kv = common.filled("numpy", (*CACHE_SHAPE[:2], store_chunks * chunk_tokens, *CACHE_SHAPE[3:]), opts.dtype)
    arena_bytes = round(common.slots_gib(CACHE_SHAPE, opts.dtype, slots) * 2**30)
    with serving(CACHE_SHAPE, opts.dtype, slots) as (path, server_pid):
        with connect(path) as filler:
            for start in range(0, slots, store_chunks):  # every slot written: every page exists
                tokens = np.arange(
                    start * chunk_tokens, (start + store_chunks) * chunk_tokens, dtype=np.int64
                )
                filler.store(tokens, kv)
            if filler.stats().chunks != slots:
                raise BenchmarkError(f"the memory benchmark filled {filler.stats().chunks} of {slots} slots")
        del filler
        gc.collect()  # this process lets go of its mapping
        readers = [
            subprocess.Popen(
                [sys.executable, "-c", _TOUCH, path],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(CLIENTS)
        ]
        try:
            for reader in readers:
                if not _first_line(reader, 120.0).startswith("touched"):
                    raise BenchmarkError("a client process of the memory benchmark did not read the arena")
            usage = [mapping_memory(pid) for pid in (server_pid, os.getpid(), *(r.pid for r in readers))]
        finally:
            for reader in readers:
                with contextlib.suppress(OSError):
                    reader.communicate("done\n", timeout=30)
    rss = sum(r for r, _ in usage)
    pss = sum(p for _, p in usage)
    return [
        Result(
            f"shared cache memory, {CLIENTS} client processes reading the whole arena (Pss summed)",
            "numpy",
            pss / 2**20,
            "MiB",
            arena_bytes / 2**20,
            "the arena once",
            arena_bytes / pss,
            1 / 1.1,
            f"summed Rss {rss / 2**20:.0f} MiB ({rss / arena_bytes:.1f}x: each process counts every page); "
            f"{CLIENTS} private caches would take {CLIENTS * arena_bytes / 2**20:.0f} MiB",
        )
    ]


# -- hit rate ---------------------------------------------------------------------------------------
def bench_shared_hit_rate(opts: Options) -> list[Result]:
    """Mooncake conversation trace, four replicas round-robin: one shared server vs four private caches."""
    trace = find_trace(opts.trace)
    if trace is None or not trace.is_file():
        if opts.progress is not None:
            print(
                "  hit rate left out: no Mooncake trace (--trace PATH or $LMCACHE_TRACES)", file=opts.progress
            )
        return []
    quick = opts.repeat <= 2
    requests = read_trace(trace, 2000 if quick else None)
    results = []
    for capacity in CAPACITIES[1:2] if quick else CAPACITIES:
        private = [
            ChunkCache(common.slots_pool("numpy", TRACE_SHAPE, "uint8", capacity // REPLICAS))
            for _ in range(REPLICAS)
        ]
        private_hit, total = replay(requests, private)
        with serving(TRACE_SHAPE, "uint8", capacity) as (path, _):
            clients = [connect(path) for _ in range(REPLICAS)]
            try:
                shared_hit, _ = replay(requests, clients)
                errors = sum(client.stats().errors for client in clients)
            finally:
                for client in clients:
                    client.close()
        if errors:
            raise BenchmarkError(f"the shared cache failed {errors} calls during the trace replay")
        shared_rate, private_rate = shared_hit / total, private_hit / total
        results.append(
            Result(
                f"token hit rate, {trace.name}, {REPLICAS} replicas round-robin, {capacity} chunks of 512",
                "numpy",
                shared_rate,
                "",
                private_rate,
                f"{REPLICAS} private caches of {capacity // REPLICAS}",
                shared_rate / private_rate if private_rate else None,
                None,
                f"{len(requests)} requests, {total / 1e6:.1f}M tokens; one server of {capacity} chunks",
            )
        )
    return results


def bench_shared(backends: Sequence[str], opts: Options) -> list[Result]:
    """The shared cache's section of ``python -m lmcache bench``."""
    if not hasattr(os, "memfd_create"):
        if opts.progress is not None:
            print("  shared cache left out: it needs Linux (memfd_create)", file=opts.progress)
        return []
    results = []
    for backend in backends:
        results += bench_shared_copy(backend, opts)
        gc.collect()
    results += bench_shared_lookup(opts)
    results += bench_shared_memory(opts)
    results += bench_shared_hit_rate(opts)
    return results


def touch(path: str) -> int:
    """The memory figure's client process: map the arena, read one byte of every page, wait for stdin."""
    with connect(path) as client:
        pages = np.asarray(client.arena).view(np.uint8).reshape(-1)[::4096]
        print(f"touched {pages.size} pages, checksum {int(pages.sum())}", flush=True)
        sys.stdin.readline()
    return 0


__all__ = [
    "CAPACITIES",
    "CLIENTS",
    "REPLICAS",
    "bench_shared",
    "bench_shared_copy",
    "bench_shared_hit_rate",
    "bench_shared_lookup",
    "bench_shared_memory",
    "mapping_memory",
    "serving",
    "touch",
]
