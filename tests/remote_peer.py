"""One side of the two-process remote test: ``python remote_peer.py write|read BACKEND URL DTYPE``.

The writer puts three chunks (16, 16 and 7 tokens) into a pool of BACKEND and writes them through a
:class:`~lmcache.remote.RedisTier` from their slots; the reader starts with an empty pool, fetches them
into its own slots and checks every byte against the same seeded data, then prints ``ok 3``.
"""

from __future__ import annotations

import sys

import numpy as np

from kvtest import SMALL_SHAPE, random_bits, same_bits, small_pool, to_native
from lmcache.dtypes import KV_DTYPES
from lmcache.remote import RedisTier

TOKENS = (16, 16, 7)


def main(role: str, backend: str, url: str, dtype: str) -> int:
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
        payloads = tier.fetch(keys, dtype, shapes)
        matched = 0
        for payload, chunk in zip(payloads, expected, strict=True):
            if payload is None:
                raise RuntimeError(f"a chunk is missing: {tier.stats()}")
            obj = pool.allocate(chunk)
            if obj is None:
                raise RuntimeError("the pool is full")
            obj.copy_from(np.frombuffer(payload, KV_DTYPES[dtype].numpy_dtype).reshape(chunk.shape))
            native = getattr(obj, f"as_{backend}")()
            matched += same_bits(native, chunk)
        print(f"ok {matched}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
