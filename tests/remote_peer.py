"""One side of the two-process remote tests: ``python remote_peer.py MODE ROLE BACKEND URL DTYPE``.

MODE ``tier``: the writer puts three chunks (16, 16 and 7 tokens) into a pool of BACKEND and writes them
through a :class:`~lmcache.remote.RedisTier` from their slots; the reader starts with an empty pool,
fetches them into its own slots and checks every byte against the same seeded data.

MODE ``cache``: the writer stores a 39-token prompt in a :class:`~lmcache.chunk_cache.ChunkCache` with
``remote=URL`` and flushes; the reader's cache starts empty, must ``lookup`` all 39 tokens through the
server, and ``retrieve`` them bit-exactly as a BACKEND array.

The reader prints ``ok N`` (N: chunks or tokens that matched).
"""

from __future__ import annotations

import sys

import numpy as np

from cachetest import prefix_kv
from kvtest import SMALL_SHAPE, random_bits, same_bits, small_pool, to_native
from lmcache.chunk_cache import ChunkCache
from lmcache.dtypes import KV_DTYPES
from lmcache.registry import framework_of
from lmcache.remote import RedisTier

TOKENS = (16, 16, 7)
PROMPT = [7 * i + 3 for i in range(sum(TOKENS))]


def tier_peer(role: str, backend: str, url: str, dtype: str) -> int:
    shapes = [(*SMALL_SHAPE[:2], n, *SMALL_SHAPE[3:]) for n in TOKENS]
    expected = [random_bits(shape, dtype, seed=10 + i) for i, shape in enumerate(shapes)]
    pool = small_pool(backend, dtype)
    with RedisTier(url, key_prefix="peer:") as tier:
        keys = [tier.key("two-process", bytes([i]) * 8) for i in range(len(shapes))]
        if role == "write":
            for key, chunk in zip(keys, expected, strict=True):
                obj = pool.put(to_native(chunk, backend))
                if obj is None:
                    raise RuntimeError("the pool is full")
                tier.submit(key, obj.as_numpy(), dtype, chunk.shape)
            if not tier.flush(10.0) or tier.stats().writes != len(keys):
                raise RuntimeError(f"writes did not all land: {tier.stats()}")
            return 0
        matched = 0
        for payload, chunk in zip(tier.fetch(keys, dtype, shapes), expected, strict=True):
            if payload is None:
                raise RuntimeError(f"a chunk is missing: {tier.stats()}")
            obj = pool.allocate(chunk)
            if obj is None:
                raise RuntimeError("the pool is full")
            obj.copy_from(np.frombuffer(payload, KV_DTYPES[dtype].numpy_dtype).reshape(chunk.shape))
            matched += same_bits(getattr(obj, f"as_{backend}")(), chunk)
        print(f"ok {matched}")
    return 0


def cache_peer(role: str, backend: str, url: str, dtype: str) -> int:
    cache = ChunkCache(small_pool(backend, dtype), namespace="two-process", remote=url)
    kv = prefix_kv(PROMPT, dtype)
    try:
        if role == "write":
            if cache.store(PROMPT, to_native(kv, backend)) != len(PROMPT) or not cache.flush(10.0):
                raise RuntimeError(f"store or flush failed: {cache.stats()}")
            if cache.stats().remote_writes != len(TOKENS):
                raise RuntimeError(f"writes did not all land: {cache.stats()}")
            return 0
        if cache.lookup(PROMPT) != len(PROMPT) or len(cache) != 0:
            raise RuntimeError(f"lookup did not see the server's chunks: {cache.stats()}")
        out, n = cache.retrieve(PROMPT)
        if n != len(PROMPT) or framework_of(out) != backend:
            raise RuntimeError(f"retrieve returned {n} tokens as {type(out)}: {cache.stats()}")
        print(f"ok {n if same_bits(out, kv) else 0}")
    finally:
        cache.close()
    return 0


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    sys.exit(tier_peer(*args) if mode == "tier" else cache_peer(*args))
