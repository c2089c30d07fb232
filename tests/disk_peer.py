"""The other process of the disk tier's process tests: ``python disk_peer.py MODE DIR [ARG]``.

MODE ``loop``: store :func:`prompt` ``0, 1, 2, ...`` into a :class:`~lmcache.chunk_cache.ChunkCache`
with ``disk=DIR`` (0.1 GiB: it evicts as it goes) forever, written behind to one file per chunk,
printing ``ready`` once the first prompt is on disk; the test kills it with ``SIGKILL`` at a random
moment.

MODE ``stuck``: write chunks straight through a :class:`~lmcache.disk.DiskTier`, the third one through
an ``os.pwritev`` that writes half of it and then hangs, and print ``stuck``: the test kills the process
with a torn temporary file on disk.

MODE ``write``: store prompts ``0 .. ARG - 1``, flush, and print ``done N`` (N: chunk files written).

MODE ``read``: a cache on DIR retrieves prompts ``0 .. ARG - 1`` and prints ``ok N`` (N: tokens that
matched bit for bit; a mismatch exits non-zero).
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading

import numpy as np

from lmcache.chunk_cache import ChunkCache
from lmcache.config import LMCacheMemPoolMetadata
from lmcache.disk import DiskTier
from lmcache.layout import SlotLayout
from lmcache.storage_backend.mem_pool import LocalCPUPool

#: Chunks of 64 tokens of (8, 2, 64, 8, 256) float16: 4 MiB each, so a kill often lands mid-write.
SHAPE = (8, 2, 64, 8, 256)
CHUNK_TOKENS = SHAPE[2]
DTYPE = "float16"
NAMESPACE = "peer"
_BASE = np.random.default_rng(22).integers(0, 2**16, size=SHAPE, dtype=np.uint16).view(np.float16)


def prompt(i: int) -> list[int]:
    """Prompt ``i``: 3 chunks and a partial one; its first chunk is one of 3 shared ones."""
    shared = [(i % 3) * 100_000 + t for t in range(CHUNK_TOKENS)]
    own = [1_000_000 + i * 10_000 + t for t in range(2 * CHUNK_TOKENS + 9)]
    return shared + own


def kv_of(tokens: list[int]) -> np.ndarray:
    """The KV of ``tokens``: each chunk a function of its whole prefix (as real KV is), cheap to make
    (a rotation of one random chunk), so the writer spends its time writing. A prefix of the result is
    the KV of that prefix of ``tokens`` wherever the prefix ends on a chunk boundary."""
    pieces = []
    for start in range(0, len(tokens), CHUNK_TOKENS):
        end = min(start + CHUNK_TOKENS, len(tokens))
        shift = _prefix_shift(tokens[:end])
        pieces.append(np.roll(_BASE.reshape(-1), shift).reshape(SHAPE)[:, :, : end - start])
    return np.concatenate(pieces, axis=2)


def _prefix_shift(tokens: list[int]) -> int:
    """A number of a prefix, the same in every process (unlike ``hash``)."""
    digest = hashlib.blake2b(np.asarray(tokens, np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % _BASE.size


def pool(slots: int = 16) -> LocalCPUPool:
    """A numpy pool of ``slots`` slots of :data:`SHAPE`."""
    slot = SlotLayout.from_metadata(LMCacheMemPoolMetadata(SHAPE, DTYPE, 1.0)).slot_bytes
    return LocalCPUPool(LMCacheMemPoolMetadata(SHAPE, DTYPE, slots * slot / 2**30), backend="numpy")


def cache(directory: str, size_gib: float = 1.0) -> ChunkCache:
    """A cache on :func:`pool` with its disk tier on ``directory``."""
    return ChunkCache(pool(), namespace=NAMESPACE, disk=DiskTier(directory, size_gib=size_gib, queue_size=16))


def loop(directory: str) -> int:
    writer = cache(directory, size_gib=0.1)  # 25 chunks: evicting as it goes
    i = 0
    while True:
        tokens = prompt(i)
        writer.store(tokens, kv_of(tokens))
        if i == 0:
            writer.flush(30.0)
            print("ready", flush=True)
        i += 1


def stuck(directory: str) -> int:
    tier = DiskTier(directory, size_gib=0.1)
    chunks = [kv_of(list(range(k, k + CHUNK_TOKENS))) for k in range(3)]
    keys = [tier.key(NAMESPACE, bytes([k]) * 16) for k in range(3)]
    for key, chunk in zip(keys[:2], chunks[:2], strict=True):
        if not tier.write(key, chunk, DTYPE, chunk.shape):
            raise RuntimeError(f"a write failed: {tier.stats()}")
    real = os.pwritev
    hang = threading.Event()
    written = [0]

    def half_then_hang(fd: int, buffers: list[memoryview], offset: int) -> int:
        if written[0] >= chunks[2].nbytes // 2:
            print("stuck", flush=True)
            hang.wait()  # never set: the test kills the process here
        done = int(real(fd, buffers, offset))
        written[0] += done
        return done

    os.pwritev = half_then_hang  # type: ignore[assignment]
    tier.write(keys[2], chunks[2], DTYPE, chunks[2].shape)
    return 1


def write(directory: str, count: int) -> int:
    writer = cache(directory)
    for i in range(count):
        tokens = prompt(i)
        writer.store(tokens, kv_of(tokens))
        writer.flush(30.0)  # the pool is small: each prompt on disk before the next evicts it
    stats = writer.disk.stats()  # type: ignore[union-attr]
    writer.close()
    print(f"done {stats.writes}", flush=True)
    return 0 if stats.dropped == stats.errors == 0 else 1


def read(directory: str, count: int) -> int:
    reader = cache(directory)
    matched = 0
    for i in range(count):
        tokens = prompt(i)
        out, n = reader.retrieve(tokens)
        if n and out.tobytes() != kv_of(tokens)[:, :, :n].tobytes():
            print(f"prompt {i}: wrong bytes", file=sys.stderr)
            return 1
        matched += n
    print(f"ok {matched}", flush=True)
    return 0


def main(argv: list[str]) -> int:
    mode, directory = argv[1], argv[2]
    if mode == "loop":
        return loop(directory)
    if mode == "stuck":
        return stuck(directory)
    if mode == "write":
        return write(directory, int(argv[3]))
    if mode == "read":
        return read(directory, int(argv[3]))
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
