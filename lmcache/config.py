"""Pool metadata: the shape and type of one KV chunk and the memory budget."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from lmcache.dtypes import DTypeSpec, normalize_dtype
from lmcache.errors import ConfigError

#: The largest budget accepted, in GiB (1 PiB): larger values are a unit mistake, not a machine.
MAX_BUDGET_GIB = 2**20


@dataclass(frozen=True)
class LMCacheMemPoolMetadata:
    """What a pool stores and how much memory it may use.

    Args:
        kv_shape: ``(num_layers, 2 or 1, chunk_size, num_kv_heads, head_size)``: the shape of one full
            chunk; axis 2 is the token axis (``1`` instead of ``2`` for MLA models).
        kv_dtype: the element type, as a torch dtype, a numpy / ml_dtypes / JAX dtype, or a name such as
            ``"bfloat16"``. It is normalized once (see :attr:`dtype`).
        max_local_cache_size: the memory budget in GiB (a float is allowed). The pool never exceeds it.

    Raises:
        ConfigError: a field is out of range; the message names the field and the value.

    Example:
        >>> from lmcache.config import LMCacheMemPoolMetadata
        >>> meta = LMCacheMemPoolMetadata((32, 2, 256, 8, 128), "bfloat16", 1)
        >>> meta.dtype.name, meta.chunk_size
        ('bfloat16', 256)
    """

    kv_shape: tuple[int, int, int, int, int]
    kv_dtype: Any
    max_local_cache_size: float
    #: The normalized dtype, computed once from ``kv_dtype``.
    dtype: DTypeSpec = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        shape = self.kv_shape
        if isinstance(shape, (str, bytes)) or not hasattr(shape, "__len__"):
            raise ConfigError(f"kv_shape must be a sequence of 5 ints, got {shape!r}")
        if len(shape) != 5:
            raise ConfigError(
                "kv_shape must have 5 dims (num_layers, 2 or 1, chunk_size, num_kv_heads, head_size), "
                f"got {len(shape)}: {tuple(shape)!r}"
            )
        dims: list[int] = []
        for axis, dim in enumerate(shape):
            if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim <= 0:
                raise ConfigError(f"kv_shape[{axis}] must be a positive int, got {dim!r}")
            dims.append(int(dim))
        if dims[1] not in (1, 2):
            raise ConfigError(f"kv_shape[1] must be 2 (K and V) or 1 (MLA), got {dims[1]}")
        object.__setattr__(self, "kv_shape", tuple(dims))
        object.__setattr__(self, "dtype", normalize_dtype(self.kv_dtype))
        size = self.max_local_cache_size
        if isinstance(size, bool) or not isinstance(size, numbers.Real):
            raise ConfigError(f"max_local_cache_size must be a number of GiB, got {size!r}")
        try:
            finite = math.isfinite(size)
        except OverflowError:  # an int beyond any float
            finite = False
        if not finite or size <= 0:
            raise ConfigError(f"max_local_cache_size must be a positive, finite number of GiB, got {size!r}")
        if size > MAX_BUDGET_GIB:
            raise ConfigError(
                f"max_local_cache_size={size!r} GiB is more than any machine has (the limit is "
                f"{MAX_BUDGET_GIB} GiB); give the budget in GiB, for example 16 or 0.5"
            )

    @property
    def chunk_size(self) -> int:
        """Tokens in one full chunk (``kv_shape[2]``)."""
        return self.kv_shape[2]

    @property
    def budget_bytes(self) -> int:
        """The budget in bytes, ``floor(max_local_cache_size * 2**30)``."""
        return int(self.max_local_cache_size * 2**30)


__all__ = ["LMCacheMemPoolMetadata"]
