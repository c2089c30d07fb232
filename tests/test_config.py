"""Metadata validation, dtype normalization and slot geometry."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from kvtest import require
from lmcache.config import LMCacheMemPoolMetadata
from lmcache.dtypes import KV_DTYPES, normalize_dtype
from lmcache.errors import ConfigError
from lmcache.layout import SlotLayout
from lmcache.storage_backend.mem_pool import LocalCPUPool


@pytest.mark.parametrize(
    ("given", "name"),
    [
        ("bfloat16", "bfloat16"),
        ("float16", "float16"),
        ("fp16", "float16"),
        ("float32", "float32"),
        ("float8_e4m3fn", "float8_e4m3fn"),
        ("float8_e5m2", "float8_e5m2"),
        ("int8", "int8"),
        ("uint8", "uint8"),
        (np.float16, "float16"),
        (np.dtype("float32"), "float32"),
        (ml_dtypes.bfloat16, "bfloat16"),
        (np.dtype(ml_dtypes.float8_e4m3fn), "float8_e4m3fn"),
    ],
)
def test_dtype_names_normalize(given: object, name: str) -> None:
    assert normalize_dtype(given).name == name


def test_framework_dtypes_normalize(backend: str) -> None:
    """Every pool dtype, as each framework spells it (numpy: its own types, bf16 / fp8 from ml_dtypes)."""
    if backend == "numpy":
        spelled = {name: np.dtype(getattr(ml_dtypes, name, name)) for name in KV_DTYPES}
    else:
        module = require(backend)
        namespace = module if backend == "torch" else module.numpy
        spelled = {name: getattr(namespace, name) for name in KV_DTYPES}
    assert len(spelled) == len(KV_DTYPES) == 7
    for name, dtype in spelled.items():
        assert normalize_dtype(dtype) is KV_DTYPES[name]


def test_max_chunk_num_is_floor_of_budget() -> None:
    meta = LMCacheMemPoolMetadata((4, 2, 16, 2, 8), "bfloat16", 0.01)
    slot = SlotLayout.from_metadata(meta).slot_bytes
    with LocalCPUPool(meta) as pool:
        assert pool.max_chunk_num == math.floor(0.01 * 2**30 / slot)
        assert pool.max_chunk_num * pool.size_per_chunk <= 0.01 * 2**30
        assert pool.init_max_chunk_num(meta) == pool.max_chunk_num


def test_slot_stride_is_aligned() -> None:
    layout = SlotLayout((1, 1, 3, 1, 5), KV_DTYPES["float16"])  # 30 bytes per chunk
    assert (layout.chunk_bytes, layout.slot_bytes) == (30, 256)
    assert SlotLayout((1, 1, 3, 1, 5), KV_DTYPES["float16"], 4096).slot_bytes == 4096


def test_budget_below_one_slot_names_both_sizes() -> None:
    meta = LMCacheMemPoolMetadata((32, 2, 256, 8, 128), "bfloat16", 0.01)
    with pytest.raises(
        ConfigError, match=r"10737418 bytes\) is smaller than one chunk slot \(33554432 bytes"
    ):
        LocalCPUPool(meta)


def test_metadata_is_frozen_and_normalized_once() -> None:
    meta = LMCacheMemPoolMetadata([2, 2, 16, 2, 8], "bf16", 1)  # type: ignore[arg-type]
    assert meta.kv_shape == (2, 2, 16, 2, 8)
    assert meta.dtype.name == "bfloat16"
    assert meta.chunk_size == 16
    with pytest.raises(AttributeError):
        meta.kv_shape = (1, 1, 1, 1, 1)  # type: ignore[misc]
