"""The disk tier's benchmark section of ``python -m lmcache bench`` (DESIGN section 15).

In a directory of the filesystem under test (``--disk-dir``, default a temporary directory), against
baselines taken in the same run on the same filesystem:

- chunk write (:meth:`~lmcache.disk.DiskTier.write` straight from a pool slot: each piece hashed, then
  written to a temporary file; the header; the rename) against a plain write of the same bytes to a
  file there (``os.pwritev``, as the tier writes); target >= 0.8x;
- chunk read (:meth:`~lmcache.disk.DiskTier.stream`: the file read with ``preadv`` straight into a pool
  slot, each piece hashed as it lands, then checked, as ``ChunkCache`` reads through) against a plain
  ``readinto`` of the same bytes into the same slot; target >= 0.8x. Both read the page cache (the
  files were just written), so both run at memory speed and the checksum is what separates them:
  the ``xxh3_64`` row gives its throughput and the bound it sets. For 32 MiB chunks both are also
  measured to and from the device: writes with ``fsync=True`` against a plain write followed by an
  fsync of the file and of its directory (what makes a new file survive a power loss),
  reads with the page cache dropped before each (``posix_fadvise(DONTNEED)``);
- the restart: a new tier's scan of a directory of chunk files, against a bare ``os.walk`` with one
  ``lstat`` per file, at two sizes (the cost per chunk stays flat: linear);
- time to first token of the tiny Llama serving scenario (:mod:`lmcache.bench.serving`) after a restart
  (a new pool, cache and tier on the directory an earlier cache filled, the prefix read from disk),
  against a cold start (no cache: a full prefill); once with the chunk files in the page cache, once
  with them dropped from it (``posix_fadvise(DONTNEED)``: read from the device).

Each chunk figure runs for 256 KiB and 32 MiB chunks; the target is set for 32 MiB (DESIGN section 15),
while the 256 KiB rows show the fixed cost per chunk file. The section returns nothing without
``xxhash``.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import itertools
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmcache.bench import common, serving
from lmcache.bench.common import Options, Result
from lmcache.errors import BenchmarkError

#: The chunk shapes measured (bfloat16): 256 KiB, and a Llama-3-8B chunk of 32 MiB.
SHAPES = {"256 KiB": (1, 2, 256, 2, 128), "32 MiB": (32, 2, 256, 8, 128)}
#: Chunk files in the restart scans (``--quick``: a quarter).
SCAN_CHUNKS = (1000, 4000)
TARGET = 0.8
#: Chunk files the write benchmarks keep (older ones are evicted / removed).
KEEP = 4


def available() -> bool:
    """Whether xxhash (the checksum of every chunk file) is installed."""
    return importlib.util.find_spec("xxhash") is not None


@contextlib.contextmanager
def workspace(parent: str | None) -> Iterator[Path]:
    """A fresh directory under ``parent`` (default: the system's temporary directory), removed after."""
    path = Path(tempfile.mkdtemp(prefix="lmcache-bench-disk-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def bench_disk(backends: Sequence[str], opts: Options) -> list[Result]:
    """Write, read, restart and TTFT through the disk tier against plain file I/O; [] without xxhash."""
    if not available():
        if opts.progress is not None:
            print(
                "  disk tier left out: it needs xxhash (pip install 'lmcache-mempool[disk]')",
                file=opts.progress,
            )
        return []
    results: list[Result] = []
    with workspace(opts.disk_dir) as root:
        for label, shape in SHAPES.items():
            results.extend(_bench_chunk(root / label.replace(" ", ""), label, shape, opts))
        results.extend(_bench_scan(root / "scan", opts))
        results.extend(_bench_restart_ttft(root / "serving", backends, opts))
    return results


# -- chunks ----------------------------------------------------------------------------------------------
def _bench_chunk(
    directory: Path, label: str, shape: tuple[int, int, int, int, int], opts: Options
) -> list[Result]:
    """Write and read chunks through the tier, and the same bytes with plain calls, interleaved.

    Writes go to new files, as a cache's do: the tier writes a new key each time and, bounded to
    :data:`KEEP` chunks, evicts the oldest; the baseline writes a new file and removes the one
    :data:`KEEP` writes back. Reads read one file again and again (from the page cache), and for 32 MiB
    also with its pages dropped before each read (from the device).
    """
    from lmcache.disk import DiskTier
    from lmcache.disk.files import fsync_directory, write_all
    from lmcache.tiers.format import HEADER, byte_view, xxh3

    pool = common.pool("numpy", shape, "bfloat16", 2 * math.prod(shape) * 2 / 2**30 + 0.001)
    dtype = pool.layout.dtype
    chunk = np.random.default_rng(0).integers(0, 60, size=shape, dtype=np.uint8).astype(dtype.numpy_dtype)
    source, target = pool.put(chunk), pool.allocate(chunk)
    slot, landing = source.as_numpy(), target.as_numpy()
    payload, into = byte_view(slot), byte_view(landing)
    directory.mkdir(parents=True)
    bound_gib = (KEEP + 0.5) * (HEADER.size + payload.nbytes) / 2**30
    writes = DiskTier(directory / "writes", size_gib=bound_gib)
    synced = DiskTier(directory / "synced", size_gib=bound_gib, fsync=True)
    reads = DiskTier(directory / "reads", size_gib=1.0)
    key = reads.key("bench", bytes(16))
    raw_path = os.fspath(directory / "read.bin")
    numbers = itertools.count()
    raw_files: collections.deque[str] = collections.deque()
    hasher = xxh3()

    def put(tier: Any = writes) -> None:
        if not tier.write(tier.key("bench", next(numbers).to_bytes(16, "little")), slot, dtype.name, shape):
            raise BenchmarkError(f"a chunk write to {directory} failed: {tier.stats()}")

    def raw_write(fsync: bool = False) -> None:
        path = os.fspath(directory / f"write-{next(numbers)}.bin")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            write_all(fd, payload, 0)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if fsync:  # a new file's name survives a power loss once its directory is synced too
            fsync_directory(os.fspath(directory))
        raw_files.append(path)
        if len(raw_files) > KEEP:
            os.unlink(raw_files.popleft())

    def get() -> None:  # what ChunkCache's read-through does: file into a slot, checked
        with reads.stream([key], dtype.name, [shape]) as stream:
            if not (stream.hit(0) and stream.read_into(landing)):
                raise BenchmarkError(f"a chunk read from {directory} failed: {reads.stats()}")

    def raw_read() -> None:
        fd = os.open(raw_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            done = 0
            while done < into.nbytes:
                done += os.preadv(fd, [into[done:]], done)
        finally:
            os.close(fd)

    def checksum() -> None:
        hasher(payload).intdigest()

    if not reads.write(key, slot, dtype.name, shape):
        raise BenchmarkError(f"a chunk write to {directory} failed: {reads.stats()}")
    with open(raw_path, "wb") as f:
        f.write(payload)
    quick = opts.repeat <= 2
    big = payload.nbytes > 2**24
    ops = (2 if quick else 5) if big else (20 if quick else 200)
    trials = {
        name: common.timed(fn, ops)
        for name, fn in (
            ("write", put),
            ("os.write", raw_write),
            ("read", get),
            ("readinto", raw_read),
            ("xxh3", checksum),
        )
    }
    if big:  # to and from the device: fsync after each write; the page cache dropped before each read
        trials["write, fsync"] = common.timed(lambda: put(synced), ops)
        trials["os.write, fsync"] = common.timed(lambda: raw_write(fsync=True), ops)
        tier_file = reads.file_path(key)
        for path in (tier_file, raw_path):
            _fsync(path)
        trials["read, device"] = _uncached(get, tier_file, ops)
        trials["readinto, device"] = _uncached(raw_read, raw_path, ops)
    best = common.best(trials, opts.repeat)
    get()
    if landing.tobytes() != slot.tobytes():
        raise BenchmarkError("the chunk read back through the disk tier differs from the one written")
    for tier in (writes, synced, reads):
        tier.close()
    pool.close()
    gbps = {name: payload.nbytes / seconds / 1e9 for name, seconds in best.items()}
    bound = 1 / (1 + gbps["readinto"] / gbps["xxh3"])
    rows = [
        ("write", "os.write", "pwritev", "new files, the oldest evicted; hashed as written; no fsync"),
        ("read", "readinto", "readinto", "into a pool slot, every byte checked; page cache"),
    ]
    if big:
        rows.append(("write, fsync", "os.write, fsync", "pwritev, fsync file and directory", "fsync=True"))
        rows.append(("read, device", "readinto, device", "readinto", "page cache dropped before each read"))
    results = [
        Result(
            f"disk {name} ({label} chunk)",
            "numpy",
            gbps[name],
            "GB/s",
            gbps[raw],
            f"plain {plain} of the same bytes, same filesystem",
            gbps[name] / gbps[raw],
            TARGET if big and name != "write, fsync" else None,  # the target is set for plain writes
            note if big else f"{note}; {best[name] * 1e6:.0f} us per chunk, plain {best[raw] * 1e6:.0f} us",
        )
        for name, raw, plain, note in rows
    ]
    results.append(
        Result(
            f"xxh3_64 over a {label} chunk",
            "numpy",
            gbps["xxh3"],
            "GB/s",
            gbps["readinto"],
            "plain readinto (GB/s)",
            note=f"a read that checks every byte is bounded by {bound:.2f}x of a plain read here",
        )
    )
    return results


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _uncached(read: Callable[[], None], path: str, calls: int) -> Callable[[], float]:
    """A trial of ``read`` with ``path``'s pages dropped from the page cache before each call (untimed)."""

    def trial() -> float:
        total = 0.0
        for _ in range(calls):
            _drop_from_page_cache([path])
            start = time.perf_counter()
            read()
            total += time.perf_counter() - start
        return total / calls

    return trial


# -- restart scans ---------------------------------------------------------------------------------------
def _bench_scan(directory: Path, opts: Options) -> list[Result]:
    """A new tier's scan of ``n`` chunk files against a bare walk with one lstat per file."""
    from lmcache.disk import DiskTier

    shape = (1, 2, 16, 1, 8)  # 512-byte chunks: a scan reads names and sizes, never payloads
    chunk = np.zeros(shape, dtype=np.float16)
    results = []
    written = 0
    disk = DiskTier(directory, size_gib=1.0)
    sizes = SCAN_CHUNKS if opts.repeat > 2 else tuple(n // 4 for n in SCAN_CHUNKS)

    def key(i: int) -> bytes:  # two namespaces, prompts of 8 chunks each
        return disk.key(f"bench-{i % 2}", (i // 2).to_bytes(16, "little"))

    for count in sizes:
        for i in range(written, count):
            parent = key(i - 2) if (i // 2) % 8 else None
            if not disk.write(key(i), chunk, "float16", shape, parent=parent):
                raise BenchmarkError(
                    f"writing the scan benchmark's chunks to {directory} failed: {disk.stats()}"
                )
        written = count

        def scan(count: int = count) -> None:
            again = DiskTier(directory, size_gib=1.0)
            found = len(again)
            again.close()
            if found != count:
                raise BenchmarkError(f"the scan found {found} of {count} chunk files in {directory}")

        def walk() -> None:
            for top, _, names in os.walk(directory):
                for name in names:
                    os.lstat(os.path.join(top, name))

        best = common.best({"scan": common.timed(scan), "walk": common.timed(walk)}, opts.repeat)
        results.append(
            Result(
                f"disk restart: scan of {count} chunk files",
                "numpy",
                best["scan"] * 1e3,
                "ms",
                best["walk"] * 1e3,
                "os.walk + lstat of each file (ms)",
                best["walk"] / best["scan"],
                note=f"{best['scan'] / count * 1e6:.1f} us per chunk; no payload read",
            )
        )
    disk.close()
    return results


# -- TTFT after a restart ----------------------------------------------------------------------------
def _bench_restart_ttft(directory: Path, backends: Sequence[str], opts: Options) -> list[Result]:
    """TTFT of the serving scenario after a restart on a warm disk, against a cold start."""
    if not serving.available(backends):
        if opts.progress is not None:
            print("  disk TTFT left out: it needs torch and transformers", file=opts.progress)
        return []
    import torch

    from lmcache.disk import DiskTier
    from lmcache_torch import hf

    num_tokens = serving.SERVING_TOKENS if opts.repeat > 2 else serving.QUICK_TOKENS
    cached = int(num_tokens * serving.CACHED_FRACTION)
    rng = np.random.default_rng(0)
    tokens = [int(t) for t in rng.integers(0, hf.TINY_LLAMA["vocab_size"], num_tokens)]
    model = hf.tiny_llama(torch.float32)
    chunk_tokens = num_tokens // serving.CHUNK_FRACTION
    slots = 2 * serving.CHUNK_FRACTION
    _, full_cache = hf.prefill(model, tokens)
    prefix_kv = hf.cache_to_kv(full_cache)[:, :, :cached].contiguous()

    # An earlier run stored the prefix: written behind to disk (fsynced, so the page cache can drop it).
    earlier = serving.serving_cache(model, "torch", chunk_tokens, slots, disk=DiskTier(directory, fsync=True))
    earlier.store(tokens[:cached], prefix_kv)
    if not earlier.flush(60.0) or earlier.stats().disk_writes != cached // chunk_tokens:
        raise BenchmarkError(f"the serving prefix did not reach the disk: {earlier.stats()}")
    assert earlier.disk is not None
    earlier.disk.close()
    earlier.pool.close()
    files = [os.path.join(top, name) for top, _, names in os.walk(directory) for name in names]
    restarts: list[float] = []

    def after_restart(backend: str, prefill: Callable[[Any], int], drop: bool) -> Callable[[], float]:
        def trial() -> float:
            begin = time.perf_counter()
            cache = serving.serving_cache(model, backend, chunk_tokens, slots, disk=DiskTier(directory))
            restarts.append(time.perf_counter() - begin)
            if drop:
                _drop_from_page_cache(files)
            start = time.perf_counter()
            reused = prefill(cache)
            elapsed = time.perf_counter() - start
            serving.checked(reused, cached)
            assert cache.disk is not None
            cache.disk.close()
            cache.pool.close()
            return elapsed

        return trial

    def torch_prefill(cache: Any) -> int:
        logits, _, reused = hf.prefill_with_cache(model, cache, tokens, store=False)
        int(logits[-1].argmax())
        return int(reused)

    trials: dict[str, Callable[[], float]] = {
        "torch cold": common.timed(lambda: int(hf.prefill(model, tokens)[0][-1].argmax())),
        "torch warm": after_restart("torch", torch_prefill, drop=False),
        "torch device": after_restart("torch", torch_prefill, drop=True),
    }
    if "jax" in backends:
        from lmcache_jax import llama

        spec, params = llama.params_from_torch(model)

        def jax_prefill(cache: Any) -> int:
            logits, _, reused = llama.prefill_with_cache(spec, params, cache, tokens, store=False)
            int(logits[-1].argmax())
            return int(reused)

        llama.forward(spec, params, tokens)[0].block_until_ready()  # compile both shapes first
        after_restart("jax", jax_prefill, drop=False)()
        trials["jax cold"] = common.timed(lambda: int(llama.forward(spec, params, tokens)[0][-1].argmax()))
        trials["jax warm"] = after_restart("jax", jax_prefill, drop=False)
        trials["jax device"] = after_restart("jax", jax_prefill, drop=True)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the serving scenario (see lmcache.bench.serving)
    try:
        best = common.best(trials, opts.repeat)
    finally:
        torch.set_num_threads(threads)
    restart_ms = min(restarts) * 1e3
    results = []
    for backend in ("torch", "jax"):
        if f"{backend} cold" not in best:
            continue
        cold = best[f"{backend} cold"]
        threading = ", 1 thread" if backend == "torch" else ""
        for kind, where in (
            ("warm", "chunk files in the page cache"),
            ("device", "dropped from the page cache"),
        ):
            hit = best[f"{backend} {kind}"]
            results.append(
                Result(
                    f"TTFT after a restart, {num_tokens} tokens, {cached} on disk ({where}; "
                    f"tiny Llama fp32{threading})",
                    backend,
                    hit * 1e3,
                    "ms",
                    cold * 1e3,
                    "cold start: full prefill",
                    cold / hit,
                    note=f"{hit / cold:.2f}x of a cold start; restart (pool, tier scan) {restart_ms:.1f} ms",
                )
            )
    return results


def _drop_from_page_cache(files: list[str]) -> None:
    """Ask the kernel to drop the (clean, fsynced) pages of ``files``: the next read goes to the device."""
    for path in files:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


__all__ = ["KEEP", "SCAN_CHUNKS", "SHAPES", "TARGET", "available", "bench_disk", "workspace"]
