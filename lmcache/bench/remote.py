"""The remote tier's benchmark section of ``python -m lmcache bench`` (DESIGN section 11).

It starts its own ``redis-server`` on a free 127.0.0.1 port with persistence off, and measures, against
baselines taken in the same run with the same redis-py client and server:

- chunk put (:meth:`~lmcache.remote.RedisTier.write` straight from a pool slot: header, checksum, send)
  against a raw ``SET`` of the same bytes; target >= 0.8x;
- chunk get (:meth:`~lmcache.remote.RedisTier.stream`: the payload read from the socket straight into
  a pool slot, then checked, as ``ChunkCache`` reads through) against a raw ``GET`` of the same bytes;
  target >= 0.8x;
- a pipelined probe of 128 chunks (:meth:`~lmcache.remote.RedisTier.probe`: one round trip), against one
  ``PING`` round trip, for scale; and ``ChunkCache.lookup`` of a 128-chunk prompt that only the server
  holds, against the same lookup with the chunks local.

Each runs for 256 KiB and 32 MiB chunks. The section returns nothing where redis-py, xxhash or
``redis-server`` is missing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from lmcache.bench import common
from lmcache.bench.common import Options, Result
from lmcache.errors import BenchmarkError

#: The chunk shapes measured (bfloat16): 256 KiB, and a Llama-3-8B chunk of 32 MiB.
SHAPES = {"256 KiB": (1, 2, 256, 2, 128), "32 MiB": (32, 2, 256, 8, 128)}
PROBE_CHUNKS = 128


def available() -> bool:
    """Whether redis-py, xxhash and a ``redis-server`` executable are all present."""
    have_modules = all(importlib.util.find_spec(m) is not None for m in ("redis", "xxhash"))
    return have_modules and shutil.which("redis-server") is not None


@contextlib.contextmanager
def loopback_server() -> Iterator[str]:
    """Run a ``redis-server`` on a free 127.0.0.1 port (no persistence) and yield its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="lmcache-bench-redis-")
    executable = shutil.which("redis-server") or "redis-server"
    args = [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--dir", workdir, "--daemonize", "no", "--loglevel", "warning"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise BenchmarkError(
                        f"redis-server did not start on 127.0.0.1:{port} within 10 s: run `{executable} "
                        f"--port {port}` by hand to see why"
                    ) from None
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def bench_remote(opts: Options) -> list[Result]:
    """Put, get and probe through the tier against raw ``SET`` / ``GET`` / ``PING``; [] without redis."""
    if not available():
        return []
    from lmcache.remote import RedisTier

    results: list[Result] = []
    with (
        loopback_server() as url,
        RedisTier(url, key_prefix="bench:", socket_timeout=30.0, queue_size=1024) as tier,
    ):
        for label, shape in SHAPES.items():
            results.extend(_bench_chunk(tier, label, shape, opts))
        results.append(_bench_probe(tier, opts))
        results.append(_bench_cache_lookup(tier, opts))
    return results


def _bench_cache_lookup(tier: Any, opts: Options) -> Result:
    """``ChunkCache.lookup`` of a 128-chunk prompt held only by the server, against the same lookup in
    the cache that holds it locally (hashing and dict walk, no network)."""
    from lmcache.chunk_cache import ChunkCache

    shape = (1, 2, 256, 1, 8)  # 8 KiB chunks: a lookup reads lengths, not payloads
    tokens = list(range(PROBE_CHUNKS * shape[2]))
    slots_gib = (PROBE_CHUNKS + 1) * math.prod(shape) * 2 / 2**30
    local = ChunkCache(
        common.pool("numpy", shape, "bfloat16", slots_gib), namespace="bench-lookup", remote=tier
    )
    remote_only = ChunkCache(
        common.pool("numpy", shape, "bfloat16", slots_gib), namespace="bench-lookup", remote=tier
    )
    kv = np.zeros((*shape[:2], len(tokens), *shape[3:]), dtype=local.pool.layout.dtype.numpy_dtype)
    if local.store(tokens, kv) != len(tokens) or not local.flush(30.0):
        raise BenchmarkError(
            f"the remote lookup benchmark could not store and flush its prompt to the server: {local.stats()}"
        )
    if remote_only.lookup(tokens) != len(tokens):
        raise BenchmarkError(
            f"the server does not hold the prompt just flushed to it (is it evicting?): {remote_only.stats()}"
        )
    best = common.best(
        {
            "remote": common.timed(lambda: remote_only.lookup(tokens), 20),
            "local": common.timed(lambda: local.lookup(tokens), 20),
        },
        opts.repeat,
    )
    tier.client.delete(*(tier.key("bench-lookup", key) for key in local.keys(tokens)))
    return Result(
        f"ChunkCache.lookup of {PROBE_CHUNKS} chunks held only by the server",
        "numpy",
        best["remote"] * 1e3,
        "ms",
        best["local"] * 1e3,
        "the same lookup, chunks local (ms)",
        note="keys hashed, then one pipelined STRLEN round trip",
    )


def _bench_chunk(tier: Any, label: str, shape: tuple[int, int, int, int, int], opts: Options) -> list[Result]:
    """Put and get one chunk through the tier, and SET and GET its bytes raw, interleaved."""
    client = tier.client
    pool = common.pool("numpy", shape, "bfloat16", 2 * math.prod(shape) * 2 / 2**30 + 0.001)
    dtype = pool.layout.dtype
    chunk = np.random.default_rng(0).integers(0, 60, size=shape, dtype=np.uint8).astype(dtype.numpy_dtype)
    source, target = pool.put(chunk), pool.allocate(chunk)
    slot, landing = source.as_numpy(), target.as_numpy().reshape(-1).view(np.uint8)
    raw_bytes = slot.tobytes()
    key, raw_key = tier.key("bench", bytes(8)), b"bench:raw"

    def put() -> None:
        if not tier.write(key, slot, dtype.name, shape):
            raise BenchmarkError(f"a chunk write to the benchmark's redis-server failed: {tier.stats()}")

    def get() -> None:  # what ChunkCache's read-through does: from the socket into a slot, then verify
        with tier.stream([key], dtype.name, [shape]) as replies:
            if not (replies.hit(0) and replies.read_into(landing)):
                raise BenchmarkError(f"a chunk read from the benchmark's redis-server failed: {tier.stats()}")

    def raw_set() -> None:
        client.set(raw_key, raw_bytes)

    def raw_get() -> None:
        client.get(raw_key)

    put()
    raw_set()
    quick = opts.repeat <= 2
    ops = (2 if quick else 5) if len(raw_bytes) > 2**24 else (20 if quick else 200)
    trials = {"put": put, "SET": raw_set, "get": get, "GET": raw_get}
    best = common.best({name: common.timed(fn, ops) for name, fn in trials.items()}, opts.repeat)
    if landing.tobytes() != raw_bytes:
        raise BenchmarkError(
            "the chunk read back through the remote tier differs from the one written: the tier or the "
            "server corrupted it"
        )
    client.delete(raw_key, key)
    pool.close()
    gbps = {name: len(raw_bytes) / seconds / 1e9 for name, seconds in best.items()}
    return [
        Result(
            f"remote {name} ({label} chunk)",
            "numpy",
            gbps[name],
            "GB/s",
            gbps[raw],
            f"redis-py {raw} of the same bytes",
            gbps[name] / gbps[raw],
            0.8,
            headline=label == "32 MiB",
        )
        for name, raw in (("put", "SET"), ("get", "GET"))
    ]


def _bench_probe(tier: Any, opts: Options) -> Result:
    """Probe 128 chunk keys in one pipelined round trip (``STRLEN`` each) against one ``PING``."""
    client = tier.client
    shape = SHAPES["32 MiB"]
    keys = [tier.key("bench", i.to_bytes(8, "little")) for i in range(PROBE_CHUNKS)]
    for key in keys:
        client.set(key, b"")  # a probe reads lengths only: the values need not be chunks
    best = common.best(
        {
            "probe": common.timed(lambda: tier.probe(keys, "bfloat16", [shape] * len(keys)), 20),
            "ping": common.timed(client.ping, 20),
        },
        opts.repeat,
    )
    client.delete(*keys)
    return Result(
        f"remote probe of {PROBE_CHUNKS} chunks, one pipelined round trip",
        "numpy",
        best["probe"] * 1e3,
        "ms",
        best["ping"] * 1e3,
        "one PING round trip (ms)",
        note=f"{best['probe'] / best['ping']:.1f} PING round trips",
    )


__all__ = ["SHAPES", "available", "bench_remote", "loopback_server"]
