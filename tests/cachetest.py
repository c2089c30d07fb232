"""Helpers for the chunk cache's tests: KV derived from token ids, so any chunk tells where it came from.

The value of token ``t`` depends on every id up to ``t`` (as real KV does), so a chunk stored for one
prefix never matches the bytes expected for another, and a torn or foreign chunk shows up as a mismatch.
Values are small integers, exact in every pool dtype (fp8 and int8 included).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kvtest import SMALL_SHAPE, small_pool
from lmcache.dtypes import KV_DTYPES

_MOD = 2**31 - 1


def prefix_kv(
    tokens: Sequence[int], dtype: str = "float16", shape: tuple[int, ...] = SMALL_SHAPE
) -> np.ndarray:
    """The ``(L, 2, len(tokens), H, D)`` KV of ``tokens`` (numpy, ``dtype``), a function of each prefix."""
    L, kv, _, H, D = shape
    rolling = np.empty(len(tokens), dtype=np.int64)
    state = 0
    for t, token in enumerate(tokens):
        state = (state * 1_000_003 + int(token) + 1) % _MOD
        rolling[t] = state
    grid = (
        np.arange(L)[:, None, None, None, None] * 31
        + np.arange(kv)[None, :, None, None, None] * 17
        + np.arange(H)[None, None, None, :, None] * 13
        + np.arange(D)[None, None, None, None, :] * 7
    )
    values = (rolling[None, None, :, None, None] + grid) % 9
    return values.astype(np.float32).astype(KV_DTYPES[dtype].numpy_dtype)


def cache_pool(backend: str = "numpy", dtype: str = "float16", slots: int = 8, **kwargs: Any) -> Any:
    """A small CPU pool (``SMALL_SHAPE``: chunks of 16 tokens) for a cache."""
    return small_pool(backend, dtype, slots=slots, **kwargs)


CHUNK = SMALL_SHAPE[2]
