"""Arenas: one contiguous buffer per pool, cut into slots, and the views into it.

:class:`Arena` is the contract every backend fulfils. :class:`HostArena` is the shared implementation
for memory in host RAM (the numpy arena, torch's CPU arena, JAX's CPU arena): its bytes are a numpy
``uint8`` array, so any framework can view them without a copy. Device arenas (CUDA) live in the
adapters.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from lmcache.dlpack import DLPackView
from lmcache.errors import ConfigError
from lmcache.hostmem import allocate_host, check_host_capacity
from lmcache.layout import SlotLayout
from lmcache.registry import load_adapter

#: The alignment adopted host memory needs: JAX aliases only memory at multiples of 64 bytes.
ADOPTED_ALIGNMENT = 64


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
        """Return the native ``(L, 2, n, H, D)`` view at the start of ``slot`` (no copy), whose object
        state is the caller's alone: a new view, or a cached one verified pristine."""
        ...

    def whole(self) -> Any:
        """Return the whole arena as one native ``(num_slots, slot_elems)`` array (no copy), likewise."""
        ...

    def export(self, slot: int, num_tokens: int, target: str) -> Any:
        """Return a new view of a chunk in framework ``target`` (``numpy``, ``torch``, ``jax``), no copy."""
        ...

    def dlpack_producer(self, slot: int, num_tokens: int) -> Any:
        """Return an object with ``__dlpack__`` / ``__dlpack_device__`` for the chunk's memory."""
        ...

    def copy_in(self, slot: int, num_tokens: int, src: Any, framework: str) -> None:
        """Copy ``src`` (an array of ``framework``, any device, checked) into the chunk; exact even where
        ``src`` overlaps the chunk; return when the bytes are there."""
        ...

    def copy_out(self, slot: int, num_tokens: int, dst: Any, framework: str) -> None:
        """Copy the chunk into the writable array ``dst`` (checked); return when the bytes are there."""
        ...

    def clone(self, slot: int, num_tokens: int, framework: str) -> Any:
        """Return an owning copy of the chunk as an array of ``framework``, ready to use."""
        ...

    def close(self) -> None:
        """Release what the arena holds beyond memory (a pinning registration); views stay valid."""
        ...


def host_array_of(array: Any, framework: str) -> np.ndarray:
    """Return an array's values as a numpy array: a view where the array is in host memory (numpy,
    torch CPU, JAX CPU, bf16 / fp8 as ml_dtypes types), else a copy on the host. JAX arrays are waited
    for first."""
    return load_adapter(framework).to_host(array)


def clone_from_device(arena: Arena, slot: int, num_tokens: int, framework: str) -> Any:
    """An owning copy of a chunk in device memory: numpy through a copy to the host, other frameworks
    through their own copy of an exported view. For device arenas' ``clone``."""
    if framework == "numpy":
        layout = arena.layout
        out = np.empty(layout.view_shape(num_tokens), dtype=layout.dtype.numpy_dtype)
        arena.copy_out(slot, num_tokens, out, "numpy")
        return out
    return load_adapter(framework).clone(arena.export(slot, num_tokens, framework))


def adopted_memory(memory: Any, nbytes: int) -> np.ndarray:
    """Check host memory that an arena of ``nbytes`` adopts and return its first ``nbytes`` bytes.

    Adopted memory (``LocalPool(..., memory=...)``: a mapping shared between processes, JAX's pinned
    host memory) must be a writable, C-contiguous, 1-D ``uint8`` numpy array whose base is aligned to
    :data:`ADOPTED_ALIGNMENT` bytes (JAX aliases only 64-byte aligned memory; an ``mmap`` is page
    aligned) and that holds at least ``nbytes`` bytes.

    Raises:
        ConfigError: any of these does not hold; the message says which.
    """
    if not isinstance(memory, np.ndarray) or memory.dtype != np.uint8 or memory.ndim != 1:
        described = (
            f"a {memory.dtype} array of shape {memory.shape}"
            if isinstance(memory, np.ndarray)
            else f"a {type(memory).__name__}"
        )
        raise ConfigError(
            f"memory must be a 1-D numpy uint8 array (for example np.frombuffer(mapping, np.uint8)), got "
            f"{described}"
        )
    if not memory.flags.c_contiguous or not memory.flags.writeable:
        raise ConfigError("memory must be C-contiguous and writable (map it with PROT_READ | PROT_WRITE)")
    if memory.ctypes.data % ADOPTED_ALIGNMENT:
        raise ConfigError(
            f"memory must start at an address aligned to {ADOPTED_ALIGNMENT} bytes (an mmap is), got "
            f"{memory.ctypes.data:#x}"
        )
    if memory.nbytes < nbytes:
        raise ConfigError(
            f"memory holds {memory.nbytes} bytes but the arena needs {nbytes}; map more, or lower "
            "max_local_cache_size"
        )
    return memory[:nbytes]


class HostArena:
    """An arena in host memory, shared by every backend's CPU pools.

    The bytes are one page-aligned ``uint8`` numpy array, committed lazily. ``typed`` and ``bits`` are
    ``(num_slots, slot_elems)`` views of it as the element type (ml_dtypes for bf16 / fp8) and as an
    unsigned int of the same size. Subclasses only say how to turn host bits into their framework's
    array (:meth:`_native`) and how to alias one (:meth:`_alias`). The arena keeps one view per slot
    (for the slot's last token count), never handed out itself: each caller gets a new alias of it, so
    no owner's changes to its view object reach another owner, and making one costs a fraction of making
    a view. Copies go through the source's or destination's adapter.
    """

    backend = "numpy"
    device = "cpu"

    def __init__(self, layout: SlotLayout, num_slots: int, *, host: np.ndarray | None = None) -> None:
        """Allocate the arena, or adopt ``host``: memory someone else owns (a shared mapping, JAX's
        pinned host memory), checked by :func:`adopted_memory`; its base keeps it alive."""
        nbytes = layout.slot_bytes * num_slots
        if host is None:
            check_host_capacity(nbytes, f"{self.backend} CPU arena")
            host = allocate_host(nbytes)
        else:
            host = adopted_memory(host, nbytes)
        self.layout = layout
        self.num_slots = num_slots
        self.nbytes = nbytes
        self.pinned = False
        self.host: np.ndarray = host
        self.base_address = int(self.host.ctypes.data)
        spec = layout.dtype
        self.typed = self.host.view(spec.numpy_dtype).reshape(num_slots, layout.slot_elems)
        self.bits = self.host.view(spec.bits_dtype).reshape(num_slots, layout.slot_elems)
        self._token_elems = layout.token_elems
        # Per slot: (tokens, native view) kept for aliasing; never handed out.
        self._kept: list[tuple[int, Any] | None] = [None] * num_slots

    # -- views -------------------------------------------------------------------------------------
    def host_view(self, slot: int, num_tokens: int, bits: bool = False) -> np.ndarray:
        """Return the chunk as a new numpy array, typed or (``bits=True``) as unsigned ints."""
        rows = self.bits if bits else self.typed
        return rows[slot, : num_tokens * self._token_elems].reshape(self.layout.view_shape(num_tokens))

    def view(self, slot: int, num_tokens: int) -> Any:
        """Return a new native view of a chunk: an alias of the view kept for the slot."""
        kept = self._kept[slot]
        if kept is None or kept[0] != num_tokens:
            kept = self._kept[slot] = (num_tokens, self._native(self.host_view(slot, num_tokens, bits=True)))
        return self._alias(kept[1])

    def _native(self, bits: np.ndarray) -> Any:
        return bits.view(self.layout.dtype.numpy_dtype)

    def _alias(self, view: Any) -> Any:
        """A new array object over the same memory, sharing no object state with ``view``."""
        return view.view()

    def whole(self) -> Any:
        """Return the whole arena as a new native ``(num_slots, slot_elems)`` array."""
        return self._native(self.bits[:])

    def export(self, slot: int, num_tokens: int, target: str) -> Any:
        """Return a new view of a chunk in ``target``'s framework, aliasing this arena."""
        return load_adapter(target).from_host(self.host_view(slot, num_tokens, bits=True), self.layout.dtype)

    def dlpack_producer(self, slot: int, num_tokens: int) -> Any:
        """Return a DLPack producer of the chunk, for every dtype (bf16 / fp8 too)."""
        return DLPackView(self.host_view(slot, num_tokens, bits=True), self.layout.dtype)

    # -- copies ------------------------------------------------------------------------------------
    def copy_in(self, slot: int, num_tokens: int, src: Any, framework: str) -> None:
        """Copy ``src`` (checked; any device) into the chunk through its framework's adapter."""
        load_adapter(framework).copy_to_host(self.host_view(slot, num_tokens, bits=True), src)

    def copy_out(self, slot: int, num_tokens: int, dst: Any, framework: str) -> None:
        """Copy the chunk into ``dst`` (checked; a numpy array or a torch tensor on any device)."""
        load_adapter(framework).copy_from_host(dst, self.host_view(slot, num_tokens, bits=True))

    def clone(self, slot: int, num_tokens: int, framework: str) -> Any:
        """Return an owning copy of the chunk in ``framework``."""
        return load_adapter(framework).clone(self.export(slot, num_tokens, framework))

    def close(self) -> None:
        """Drop the kept views; memory lives on while any view of it does."""
        self._kept = [None] * self.num_slots


__all__ = ["ADOPTED_ALIGNMENT", "Arena", "HostArena", "adopted_memory", "clone_from_device", "host_array_of"]
