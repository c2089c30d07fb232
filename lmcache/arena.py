"""Arenas: one contiguous buffer per pool, cut into slots, and the views into it.

:class:`Arena` is the contract every backend fulfils. :class:`HostArena` is the shared implementation
for memory in host RAM (the numpy arena, torch's CPU arena, JAX's CPU arena): its bytes are a numpy
``uint8`` array, so any framework can view them without a copy. Device arenas (CUDA) live in the
adapters.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

import numpy as np

from lmcache.dlpack import DLPackView
from lmcache.dtypes import normalize_dtype
from lmcache.errors import ChunkShapeError, ChunkTypeError
from lmcache.hostmem import allocate_host, check_host_capacity
from lmcache.layout import SlotLayout
from lmcache.registry import load_adapter


class Arena(Protocol):
    """One contiguous buffer of ``num_slots`` slots of ``layout.slot_bytes`` bytes.

    Attributes:
        backend: the framework of the views (``"numpy"``, ``"torch"``, ``"jax"``).
        device: where the memory is (``"cpu"``, ``"cuda:0"``).
        layout: slot geometry.
        num_slots: number of slots.
        base_address: address of slot 0 (aligned to 4096 bytes on the host).
        pinned: whether host memory is page-locked for fast device copies.
        host: the bytes as a numpy ``uint8`` array when they are in host memory, else None.
    """

    backend: str
    device: str
    layout: SlotLayout
    num_slots: int
    base_address: int
    pinned: bool
    host: np.ndarray | None

    def view(self, slot: int, num_tokens: int) -> Any:
        """Return the native ``(L, 2, n, H, D)`` view at the start of ``slot`` (no copy)."""
        ...

    def whole(self) -> Any:
        """Return the whole arena as one native ``(num_slots, slot_elems)`` array (no copy)."""
        ...

    def export(self, slot: int, num_tokens: int, target: str) -> Any:
        """Return a view of a chunk in framework ``target`` (``numpy``, ``torch``, ``jax``), no copy."""
        ...

    def dlpack_producer(self, slot: int, num_tokens: int) -> Any:
        """Return an object with ``__dlpack__`` / ``__dlpack_device__`` for the chunk's memory."""
        ...

    def copy_in(self, slot: int, num_tokens: int, src: Any) -> None:
        """Copy ``src`` (any framework, any device) into the chunk; return when the bytes are there."""
        ...

    def copy_out(self, slot: int, num_tokens: int, dst: Any) -> None:
        """Copy the chunk into the writable array ``dst``; return when the bytes are there."""
        ...

    def close(self) -> None:
        """Release what the arena holds beyond memory (a pinning registration); views stay valid."""
        ...


def framework_of(obj: object) -> str:
    """Name the framework of an array: ``numpy``, ``torch``, ``jax`` or ``dlpack`` (any other producer).

    Raises:
        ChunkTypeError: ``obj`` is not an array at all.
    """
    if isinstance(obj, np.ndarray):
        return "numpy"
    module = type(obj).__module__ or ""
    root = module.partition(".")[0]
    if root == "torch":
        return "torch"
    if root in ("jax", "jaxlib"):
        return "jax"
    if hasattr(obj, "__dlpack__"):
        return "dlpack"
    raise ChunkTypeError(
        f"expected an array (numpy, torch, JAX or any object with __dlpack__), got {type(obj).__name__}"
    )


def check_array(obj: Any, shape: tuple[int, ...], layout: SlotLayout, what: str) -> str:
    """Check that ``obj`` is an array of exactly ``shape`` and the layout's dtype; return its framework."""
    framework = framework_of(obj)
    got = getattr(obj, "shape", None)
    if got is None or tuple(got) != shape:
        raise ChunkShapeError(f"{what} has shape {None if got is None else tuple(got)}, expected {shape}")
    dtype = getattr(obj, "dtype", None)
    if dtype is not None:
        spec = normalize_dtype(dtype)
        if spec is not layout.dtype:
            raise ChunkShapeError(
                f"{what} has dtype {spec.name}, expected {layout.dtype.name}; convert it first "
                f"(for example .to(torch.{layout.dtype.name}) or .astype(jnp.{layout.dtype.name}))"
            )
    return framework


def host_array_of(src: Any, framework: str) -> np.ndarray:
    """Return a numpy array with ``src``'s values, without a copy where the source is host memory.

    JAX arrays are waited for (``np.asarray`` blocks until they are computed) and, on a GPU, copied to
    the host. Generic DLPack producers go through ``np.from_dlpack``; numpy cannot import bfloat16 or
    float8 that way, which is reported with the fix.
    """
    if framework == "numpy":
        return cast(np.ndarray, src)
    if framework == "jax":
        return np.asarray(src)
    try:
        array: np.ndarray = np.from_dlpack(src)
        return array
    except (BufferError, TypeError, RuntimeError) as exc:
        raise ChunkTypeError(
            f"cannot read a {type(src).__name__} through DLPack into host memory ({exc}); "
            "pass a numpy, torch or JAX array instead"
        ) from exc


class HostArena:
    """An arena in host memory, shared by every backend's CPU pools.

    The bytes are one page-aligned ``uint8`` numpy array, committed lazily. ``typed`` and ``bits`` are
    ``(num_slots, slot_elems)`` views of it as the element type (ml_dtypes for bf16 / fp8) and as an
    unsigned int of the same size. Subclasses only say how to turn host memory into their framework's
    array (:meth:`_native`); views of full chunks are made once per slot and cached.
    """

    backend = "numpy"
    device = "cpu"

    def __init__(
        self, layout: SlotLayout, num_slots: int, *, host: np.ndarray | None = None, keepalive: Any = None
    ) -> None:
        """Allocate the arena, or adopt ``host`` (``uint8``, page-aligned) owned by ``keepalive``."""
        nbytes = layout.slot_bytes * num_slots
        if host is None:
            check_host_capacity(nbytes, f"{self.backend} CPU arena")
            host = allocate_host(nbytes)
        self.layout = layout
        self.num_slots = num_slots
        self.nbytes = nbytes
        self.pinned = False
        self.host: np.ndarray = host
        self._keepalive = keepalive
        self.base_address = int(self.host.ctypes.data)
        spec = layout.dtype
        self.typed = self.host.view(spec.numpy_dtype).reshape(num_slots, layout.slot_elems)
        self.bits = self.host.view(spec.bits_dtype).reshape(num_slots, layout.slot_elems)
        self._token_elems = layout.token_elems
        self._chunk_size = layout.chunk_size
        self._whole: Any = None

    # -- views -------------------------------------------------------------------------------------
    def host_view(self, slot: int, num_tokens: int, bits: bool = False) -> np.ndarray:
        """Return the chunk as a numpy array, typed or (``bits=True``) as unsigned ints."""
        rows = self.bits if bits else self.typed
        return rows[slot, : num_tokens * self._token_elems].reshape(self.layout.view_shape(num_tokens))

    def view(self, slot: int, num_tokens: int) -> Any:
        """Return the native view of a chunk (numpy here; subclasses convert)."""
        return self._native(self.host_view(slot, num_tokens, bits=True))

    def _native(self, bits: np.ndarray) -> Any:
        return bits.view(self.layout.dtype.numpy_dtype)

    def whole(self) -> Any:
        """Return the whole arena as one native ``(num_slots, slot_elems)`` array, made once."""
        if self._whole is None:
            self._whole = self._native(self.bits)
        return self._whole

    def export(self, slot: int, num_tokens: int, target: str) -> Any:
        """Return a chunk's view in ``target``'s framework, aliasing this arena."""
        if target == "numpy":
            return self.host_view(slot, num_tokens)
        return load_adapter(target).from_host(self.host_view(slot, num_tokens, bits=True), self.layout.dtype)

    def dlpack_producer(self, slot: int, num_tokens: int) -> Any:
        """Return a DLPack producer of the chunk, for every dtype (bf16 / fp8 too)."""
        return DLPackView(self.host_view(slot, num_tokens, bits=True), self.layout.dtype)

    # -- copies ------------------------------------------------------------------------------------
    def copy_in(self, slot: int, num_tokens: int, src: Any) -> None:
        """Copy ``src`` into the chunk: torch tensors (any device) with ``copy_``, the rest with numpy.

        ``dst_bits`` handed to torch is the chunk as unsigned ints, which torch views as the tensor's own
        dtype: torch cannot wrap a bf16 numpy array, but it can wrap its bits.
        """
        framework = framework_of(src)
        if framework == "torch":
            load_adapter("torch").copy_to_host(self.host_view(slot, num_tokens, bits=True), src)
            return
        np.copyto(self.host_view(slot, num_tokens), host_array_of(src, framework), casting="no")

    def copy_out(self, slot: int, num_tokens: int, dst: Any) -> None:
        """Copy the chunk into ``dst`` (a numpy array or a torch tensor on any device)."""
        framework = framework_of(dst)
        if framework == "numpy":
            np.copyto(dst, self.host_view(slot, num_tokens), casting="no")
        elif framework == "torch":
            load_adapter("torch").copy_from_host(dst, self.host_view(slot, num_tokens, bits=True))
        else:
            raise ChunkTypeError(
                f"cannot copy into a {type(dst).__name__}: JAX arrays are immutable and other "
                "producers may be read-only; use kv_obj.clone('jax') or as_jax() instead"
            )

    def close(self) -> None:
        """Drop the cached whole-arena view; memory lives on while any view of it does."""
        self._whole = None


__all__ = ["Arena", "HostArena", "check_array", "framework_of", "host_array_of"]
