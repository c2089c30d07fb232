"""The element types a pool can hold, and how each framework spells them.

A dtype is normalized once, to a canonical name such as ``"bfloat16"``; everything after that works on
:class:`DTypeSpec`. The module recognizes torch and JAX dtypes by their type's module name, so it never
imports either framework.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import ml_dtypes
import numpy as np

from lmcache.errors import ConfigError
from lmcache.registry import detect_framework

# DLPack type codes (dlpack.h, DLDataTypeCode).
_DL_INT, _DL_UINT, _DL_FLOAT, _DL_BFLOAT = 0, 1, 2, 4
_DL_FLOAT8_E4M3FN, _DL_FLOAT8_E5M2 = 10, 12


@dataclass(frozen=True)
class DTypeSpec:
    """One supported element type.

    Attributes:
        name: canonical name, the same in torch, JAX and ml_dtypes (``"bfloat16"``).
        itemsize: bytes per element.
        dlpack_code: the DLPack ``DLDataTypeCode`` of the type.
        numpy_dtype: the numpy dtype (an ml_dtypes type for bfloat16 and float8).
        bits_dtype: an unsigned integer numpy dtype of the same size, used to move raw bits through
            libraries that do not know the type (numpy's DLPack export, ``torch.from_numpy``).
    """

    name: str
    itemsize: int
    dlpack_code: int
    numpy_dtype: np.dtype[Any]
    bits_dtype: np.dtype[Any]

    @property
    def numpy_has_dlpack(self) -> bool:
        """Whether numpy can export or import this type through DLPack (not bf16 nor fp8)."""
        return self.dlpack_code in (_DL_INT, _DL_UINT, _DL_FLOAT)


def _spec(name: str, code: int, np_type: Any) -> DTypeSpec:
    dt = np.dtype(np_type)
    return DTypeSpec(name, dt.itemsize, code, dt, np.dtype(f"uint{8 * dt.itemsize}"))


#: Every dtype a pool accepts, by canonical name.
KV_DTYPES: dict[str, DTypeSpec] = {
    spec.name: spec
    for spec in (
        _spec("bfloat16", _DL_BFLOAT, ml_dtypes.bfloat16),
        _spec("float16", _DL_FLOAT, np.float16),
        _spec("float32", _DL_FLOAT, np.float32),
        _spec("float8_e4m3fn", _DL_FLOAT8_E4M3FN, ml_dtypes.float8_e4m3fn),
        _spec("float8_e5m2", _DL_FLOAT8_E5M2, ml_dtypes.float8_e5m2),
        _spec("int8", _DL_INT, np.int8),
        _spec("uint8", _DL_UINT, np.uint8),
    )
}

_ALIASES = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@cache
def _lookup(value: Any) -> DTypeSpec | None:
    if isinstance(value, str):
        name = value.removeprefix("torch.").removeprefix("jnp.").lower()
        return KV_DTYPES.get(_ALIASES.get(name, name))
    if detect_framework(value) == "torch":
        return _lookup(str(value))
    try:
        dtype = np.dtype(value)
    except TypeError:
        return None
    if not dtype.isnative:  # '>f4' is named float32 but its bytes are swapped
        return None
    return KV_DTYPES.get(dtype.name)


def normalize_dtype(value: object) -> DTypeSpec:
    """Return the :class:`DTypeSpec` of a dtype given as a name, torch dtype, numpy/ml_dtypes or JAX type.

    Raises:
        ConfigError: the type is not one the pool supports; the message lists the supported names.
    """
    try:
        spec = _lookup(value)
    except TypeError:  # unhashable
        spec = None
    if spec is None and getattr(value, "isnative", True) is False:
        raise ConfigError(
            f"dtype {value!r} has non-native byte order; convert the array first "
            "(numpy: array.astype(array.dtype.newbyteorder('=')))"
        )
    if spec is None:
        raise ConfigError(
            f"unsupported kv_dtype {value!r} (type {type(value).__name__}); use one of "
            f"{', '.join(KV_DTYPES)}, given as a name, a torch dtype, or a numpy/ml_dtypes/JAX dtype"
        )
    return spec


__all__ = ["KV_DTYPES", "DTypeSpec", "normalize_dtype"]
