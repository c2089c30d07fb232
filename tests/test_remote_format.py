"""The remote tier's value format (:mod:`lmcache.remote.format`): no server.

Round trips are bit-exact and zero-copy; every kind of mismatch, and any single flipped bit, is rejected.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtest import SMALL_SHAPE, random_bits
from lmcache import remote
from lmcache.dtypes import KV_DTYPES
from lmcache.errors import ConfigError
from redis_server import (
    chunk_shape,
    require_client,
)

SHAPE = SMALL_SHAPE


def encoded(key: bytes, payload: np.ndarray, dtype: str) -> bytes:
    view = remote.byte_view(payload)
    return remote.encode_header(key, view, dtype, payload.shape) + view.tobytes()


@pytest.mark.parametrize("dtype", sorted(KV_DTYPES))
def test_format_round_trip_is_exact(dtype: str) -> None:
    require_client()
    payload = random_bits(chunk_shape(5), dtype, seed=3)
    value = encoded(b"k1", payload, dtype)
    assert len(value) == remote.HEADER.size + payload.nbytes
    out = remote.decode_value(b"k1", value, dtype, payload.shape)
    assert bytes(out) == payload.tobytes()
    assert np.frombuffer(out, np.uint8).ctypes.data == np.frombuffer(value, np.uint8).ctypes.data + 64


def test_byte_view_is_the_array_memory() -> None:
    array = random_bits(SHAPE, "bfloat16")
    view = remote.byte_view(array)
    assert view.nbytes == array.nbytes
    assert np.frombuffer(view, np.uint8).ctypes.data == array.ctypes.data
    with pytest.raises(ConfigError, match="C-contiguous"):
        remote.byte_view(array[:, :, ::2])


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("truncated", "payload bytes"),
        ("short", "shorter than"),
        ("magic", "magic"),
        ("version", "version"),
        ("dtype", "holds"),
        ("shape", "shape"),
        ("other key", "checksum"),
        ("flipped bit", "checksum"),
        ("extra bytes", "payload bytes"),
    ],
)
def test_format_rejects_every_mismatch(case: str, reason: str) -> None:
    require_client()
    payload = random_bits(chunk_shape(4), "float16")
    value = bytearray(encoded(b"key", payload, "float16"))
    key, dtype, shape = b"key", "float16", payload.shape
    if case == "truncated":
        value = value[:-1]
    elif case == "short":
        value = value[:10]
    elif case == "magic":
        value[0:4] = b"XXXX"
    elif case == "version":
        value[4] = 2
    elif case == "dtype":
        dtype = "bfloat16"
    elif case == "shape":
        shape = chunk_shape(2)
    elif case == "other key":
        key = b"kez"
    elif case == "flipped bit":
        value[-7] ^= 0x10
    elif case == "extra bytes":
        value += b"\0"
    with pytest.raises(remote.RemoteValueError, match=reason):
        remote.decode_value(key, bytes(value), dtype, shape)


@settings(max_examples=60, deadline=None)
@given(position=st.integers(0, remote.HEADER.size + 2 * 2 * 4 * 2 * 8 * 2 - 1), bit=st.integers(0, 7))
def test_format_rejects_any_single_bit_flip(position: int, bit: int) -> None:
    require_client()
    payload = random_bits(chunk_shape(4), "float16", seed=1)
    value = bytearray(encoded(b"key", payload, "float16"))
    value[position] ^= 1 << bit
    with pytest.raises(remote.RemoteValueError):
        remote.decode_value(b"key", bytes(value), "float16", payload.shape)


def test_encode_checks_its_arguments() -> None:
    require_client()
    view = remote.byte_view(random_bits(chunk_shape(4), "float16"))
    with pytest.raises(ConfigError, match="needs"):
        remote.encode_header(b"k", view, "float16", chunk_shape(3))
    with pytest.raises(ConfigError, match="unknown dtype"):
        remote.encode_header(b"k", view, "complex64", chunk_shape(4))
    with pytest.raises(ConfigError, match="5 dims"):
        remote.encode_header(b"k", view, "float16", (4, 256))
