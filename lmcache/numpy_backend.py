"""The numpy backend: host arenas whose views are numpy arrays (bf16 / fp8 as ml_dtypes types).

Always available; it is the core's own backend and needs neither torch nor JAX.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lmcache import copy_engine
from lmcache.arena import HostArena
from lmcache.dtypes import DTypeSpec
from lmcache.errors import ConfigError
from lmcache.layout import SlotLayout
from lmcache.memory import MemoryExtent, strided_extent


class NumpyAdapter:
    """Adapter of the numpy backend (host memory only)."""

    name = "numpy"

    def create_arena(
        self,
        layout: SlotLayout,
        num_slots: int,
        *,
        device: str,
        pin_memory: bool | None,
        memory: np.ndarray | None = None,
    ) -> HostArena:
        """Create a host arena (in ``memory`` when given); numpy has no device memory and cannot pin."""
        if device != "cpu":
            raise ConfigError(
                f"the numpy backend has host memory only, not {device!r}; use backend='torch' or "
                "backend='jax' for GPU pools"
            )
        if pin_memory:
            raise ConfigError("the numpy backend cannot pin memory; use backend='torch' or 'jax'")
        return HostArena(layout, num_slots, host=memory)

    def from_host(self, bits: np.ndarray, spec: DTypeSpec) -> np.ndarray:
        """View host bits as ``spec``'s numpy dtype."""
        return bits.view(spec.numpy_dtype)

    def from_dlpack(self, producer: Any) -> np.ndarray:
        """Import with ``np.from_dlpack`` (numpy cannot import bf16 or fp8)."""
        return np.from_dlpack(producer)

    def check_source(self, array: Any) -> None:
        """numpy arrays are plain memory; their dtype (byte order included) was checked already."""

    def copy_to_host(self, dst: np.ndarray, src: Any) -> None:
        """Copy a numpy array into host bits ``dst`` with the copy engine (overlap is copied exactly)."""
        copy_engine.copy(dst.view(src.dtype), src)

    def copy_from_host(self, dst: Any, src: np.ndarray) -> None:
        """Copy host bits into a numpy array with the copy engine."""
        copy_engine.copy(dst, src.view(dst.dtype))

    def wait(self, array: Any) -> None:
        """numpy work is never pending."""

    def concat_tokens(self, arrays: list[Any]) -> np.ndarray:
        """``np.concatenate`` on the token axis."""
        return np.concatenate(arrays, axis=2)

    def to_host(self, array: Any) -> np.ndarray:
        """A numpy array is host memory already."""
        return np.asarray(array)

    def memory_extent(self, array: Any) -> MemoryExtent:
        """The bytes a numpy array's elements occupy (host memory)."""
        return numpy_extent(array)

    def clone(self, array: Any) -> np.ndarray:
        """Return an owning copy."""
        return np.array(array, copy=True)

    def accelerators(self) -> list[str]:
        """numpy sees no accelerator."""
        return []


def numpy_extent(array: np.ndarray) -> MemoryExtent:
    """The bytes a numpy array's elements occupy, from its data pointer and byte strides."""
    return strided_extent("cpu", int(array.ctypes.data), array.shape, array.strides, array.itemsize)


ADAPTER = NumpyAdapter()

__all__ = ["ADAPTER", "NumpyAdapter", "numpy_extent"]
