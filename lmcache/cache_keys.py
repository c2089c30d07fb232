"""Chunk keys: which token ids a prompt holds, and the key that names each chunk's whole prefix.

``key_i = blake2b(ids of chunk i as little-endian int64, key=key_{i-1}, digest_size=16)`` with
``key_{-1} = blake2b(domain + namespace)``. Keys are the same in every process, on every machine, under
any ``PYTHONHASHSEED`` and for every array type holding the same ids (Python's ``hash`` is none of these;
LMCache issues #1139 and #2979).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from hashlib import blake2b
from typing import Any

import numpy as np

from lmcache.errors import ConfigError, TokensTypeError, TokensValueError
from lmcache.registry import detect_framework

#: Bytes of a chunk key (a 128-bit blake2b digest).
KEY_BYTES = 16
_KEY_DOMAIN = b"lmcache-mempool/chunk-cache/v1\x00"
_INT64_MAX = np.iinfo(np.int64).max
_INT64_LE = np.dtype("<i8")


def root_key(namespace: str) -> bytes:
    """The key before a prompt's first chunk: a digest of the namespace (models, dtypes, TP ranks)."""
    return blake2b(_KEY_DOMAIN + namespace.encode("utf-8"), digest_size=KEY_BYTES).digest()


def token_ids(tokens: Any) -> np.ndarray:
    """Return ``tokens`` as a contiguous little-endian int64 numpy array, checking that they are ids.

    Accepts a list, tuple or ``range`` of ints, or a 1-D integer numpy, torch (any device) or JAX array.

    Raises:
        TokensTypeError: not a sequence of integers (floats, bools, strings, ``None``, a scalar); a
            bool anywhere in a list is refused too (numpy would read ``True`` as 1).
        TokensValueError: nested or ragged, or an id outside the int64 range (Python ints included).
    """
    if tokens is None or isinstance(
        tokens, (str, bytes, bytearray, memoryview, int, float, complex, np.generic)
    ):
        raise TokensTypeError(
            f"tokens must be a 1-D sequence of integer token ids (list, tuple, numpy, torch or JAX "
            f"array), got a {type(tokens).__name__}"
        )
    if detect_framework(tokens) == "torch":
        try:
            tokens = tokens.detach().cpu().numpy()
        except (TypeError, RuntimeError) as exc:  # bf16 and friends have no numpy type
            raise TokensTypeError(f"tokens must be integer ids, got a tensor of {tokens.dtype}") from exc
    try:
        ids = np.asarray(tokens)
    except (ValueError, TypeError, OverflowError) as exc:  # ragged nesting and the like
        raise TokensValueError(
            f"tokens must be a flat sequence of integer ids; numpy could not read it ({exc})"
        ) from exc
    kind = ids.dtype.kind
    if ids.shape == (0,):  # an empty list reads as float64: no ids is a valid (empty) prompt
        return np.empty(0, dtype=_INT64_LE)
    # Python ints that numpy could not hold as int64 come out as objects (or as floats, mixed with
    # negative ones); an object array of small ints is fine. Either way: range-check the ints themselves.
    from_python = kind == "f" and not hasattr(tokens, "dtype")
    if ids.ndim == 1 and (kind == "O" or from_python):
        values = ids.tolist() if kind == "O" else list(tokens)
        if all(map(_is_int, values)):  # Python ints numpy could not hold as int64, or mixed
            if min(values) < -(2**63) or max(values) > _INT64_MAX:
                raise TokensValueError(
                    f"token ids must fit in int64 (-2**63 .. 2**63 - 1); got ids from {min(values)} to "
                    f"{max(values)}"
                )
            ids = np.asarray(values, dtype=np.int64)
            kind = "i"
    if kind not in "iu":
        raise TokensTypeError(
            f"tokens must be integer ids, got dtype {ids.dtype} (from a {type(tokens).__name__}); "
            "floats, bools, strings, None and ids beyond int64 are not token ids"
        )
    if ids.ndim != 1:
        raise TokensValueError(
            f"tokens must be 1-D, got shape {ids.shape}; pass one prompt's ids (flatten a batch first)"
        )
    if kind == "u" and ids.dtype.itemsize == 8 and ids.size and int(ids.max()) > _INT64_MAX:
        raise TokensValueError("token ids must fit in int64; got a uint64 id above 2**63 - 1")
    if not hasattr(tokens, "dtype") and hasattr(tokens, "__getitem__"):
        # numpy reads True as 1 and False as 0 among ints (Python, numpy or torch bools, 0-d arrays):
        # look at the items that became 0 or 1
        for index in np.flatnonzero((ids >= 0) & (ids <= 1)).tolist():
            item = tokens[index]
            if isinstance(item, (bool, np.bool_)) or str(getattr(item, "dtype", "")) in (
                "bool",
                "torch.bool",
            ):
                raise TokensTypeError(
                    f"tokens[{index}] is {item!r}, a bool: a bool is not a token id; pass ints"
                )
    return np.ascontiguousarray(ids, dtype=_INT64_LE)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def chunk_keys(ids: np.ndarray, chunk_size: int, root: bytes) -> Iterator[bytes]:
    """Yield the key of each chunk of ``chunk_size`` tokens of ``ids`` (from :func:`token_ids`), chained
    from ``root`` (:func:`root_key`), lazily: a caller that stops at a miss hashes no further.

    Every cache, in-process or shared, hashes through this function, so their keys agree.
    """
    data = id_bytes(ids)
    step = chunk_size * 8
    key = root
    for offset in range(0, len(data), step):
        key = blake2b(data[offset : offset + step], digest_size=KEY_BYTES, key=key).digest()
        yield key


def chunk_tokens(num_tokens: int, chunk_size: int) -> list[int]:
    """The token count of each chunk of a prompt of ``num_tokens`` tokens (the last may be partial)."""
    return [min(chunk_size, num_tokens - start) for start in range(0, num_tokens, chunk_size)]


def check_keys(keys: Sequence[bytes], num_tokens: int, chunk_size: int) -> list[bytes]:
    """Return ``keys`` as a list, checked to be able to be the chunk keys of a prompt of ``num_tokens``
    tokens (one :data:`KEY_BYTES`-byte key per chunk of ``chunk_size``), for the key-level calls.

    Raises:
        ConfigError: they cannot.
    """
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise ConfigError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
    if isinstance(keys, (bytes, bytearray, str)):
        raise ConfigError("keys must be a sequence of chunk keys (cache.keys(tokens)), not one key")
    try:
        listed = list(keys)
    except TypeError:
        raise ConfigError(f"keys must be a sequence of chunk keys, got a {type(keys).__name__}") from None
    expected = -(-num_tokens // chunk_size)
    if len(listed) != expected or any(not isinstance(k, bytes) or len(k) != KEY_BYTES for k in listed):
        raise ConfigError(
            f"a prompt of {num_tokens} tokens has {expected} chunk keys of {KEY_BYTES} bytes "
            f"(cache.keys(tokens)), got {len(listed)}"
        )
    return listed


def id_bytes(ids: np.ndarray) -> memoryview:
    """The bytes of a contiguous little-endian int64 array, without a copy where the host allows."""
    try:
        return ids.data.cast("B")
    except (TypeError, ValueError):  # a non-native byte order (big-endian host): copy the bytes out
        return memoryview(ids.tobytes())


__all__ = [
    "KEY_BYTES",
    "TokensTypeError",
    "TokensValueError",
    "check_keys",
    "chunk_keys",
    "chunk_tokens",
    "id_bytes",
    "root_key",
    "token_ids",
]
