"""The JAX backend: CPU arenas (``pinned_host`` where JAX offers it) and GPU arenas, with jax.Array views.

Every view aliases its slot: ``kv_obj.data.unsafe_buffer_pointer()`` is the slot's address. A view is
made on first access (a DLPack import costs tens of microseconds) and, for full chunks, kept per slot.

Two JAX facts shape this module:

* numpy cannot export bfloat16 or float8 through DLPack, so host memory is handed to JAX through
  :class:`lmcache.dlpack.DLPackView`, which retypes numpy's own capsule (lifetime stays with numpy).
* JAX arrays are immutable and XLA:CPU updates a bf16 array by converting all of it, so writes into an
  arena are byte copies (numpy on the host, ``cudaMemcpy`` on a GPU), never ``.at[].set``.

JAX dispatches work asynchronously, even on the CPU: wait for computations that read a chunk (their
outputs' ``block_until_ready()``, or ``pool.free(obj, wait_for=outputs)``) before freeing it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
from functools import partial
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from lmcache import copy_engine
from lmcache.arena import HostArena, clone_from_device
from lmcache.dlpack import DLPackView
from lmcache.dtypes import DTypeSpec
from lmcache.errors import (
    ChunkTypeError,
    ConfigError,
    DeviceCopyError,
    DeviceUnavailableError,
    PoolTooLargeError,
)
from lmcache.hostmem import GIB
from lmcache.layout import SlotLayout
from lmcache.memory import MemoryExtent
from lmcache.registry import load_adapter

_DLPACK_CUDA = 2


def jax_dtype(spec: DTypeSpec) -> Any:
    """Return the JAX dtype of a pool dtype (``jnp.bfloat16`` for ``"bfloat16"``)."""
    return jnp.dtype(spec.numpy_dtype)


def _import_host(bits: np.ndarray, spec: DTypeSpec) -> jax.Array:
    # copy=False: JAX aliases only 64-byte aligned memory and would otherwise copy silently.
    array: jax.Array = jax.dlpack.from_dlpack(DLPackView(bits, spec), copy=False)
    return array


#: References to a kept view held by nobody but the arena: its kept tuple, and getrefcount's argument.
_KEPT_ONLY = 2


def _pristine(array: Any) -> bool:
    """Whether a kept view can be handed to a new owner as its own: nobody else holds it (a previous
    owner that kept its view could ``delete()`` or donate it, and the new owner's array would die with
    it), it is not deleted, and no attributes were set on it.

    jax.Arrays are immutable otherwise. Call it on the kept tuple's element directly (no other reference).
    """
    return (
        array is not None
        and sys.getrefcount(array) <= _KEPT_ONLY + 1
        and not array.is_deleted()
        and not vars(array)
    )


class JaxCPUArena(HostArena):
    """A host arena viewed as ``jax.Array`` s on JAX's CPU device (or allocated in ``pinned_host``).

    Importing a view costs tens of microseconds, so the view of each slot's last length is kept and
    handed to the next owner only while :func:`_pristine`; otherwise a new one is made.
    """

    backend = "jax"

    def __init__(self, layout: SlotLayout, num_slots: int, *, host: np.ndarray | None = None) -> None:
        super().__init__(layout, num_slots, host=host)
        self._whole_view: jax.Array | None = None

    def _native(self, bits: np.ndarray) -> jax.Array:
        return _import_host(bits, self.layout.dtype)

    def view(self, slot: int, num_tokens: int) -> jax.Array:
        """Return the jax.Array view of a chunk: the kept one if pristine, else a new one."""
        kept = self._kept[slot]
        if kept is not None and kept[0] == num_tokens and _pristine(kept[1]):  # +1: _pristine's parameter
            return cast(jax.Array, kept[1])
        view = self._native(self.host_view(slot, num_tokens, bits=True))
        self._kept[slot] = (num_tokens, view)
        return view

    def whole(self) -> jax.Array:
        """Return the whole arena as a jax.Array: the kept one if pristine, else a new one."""
        if self._whole_view is None or not _pristine(self._whole_view):
            self._whole_view = self._native(self.bits)
        return self._whole_view

    def close(self) -> None:
        """Drop the kept views; memory lives on while any view of it does."""
        super().close()
        self._whole_view = None


def _gpu_devices() -> list[Any]:
    try:
        return [d for d in jax.devices() if d.platform in ("gpu", "cuda", "rocm")]
    except RuntimeError:
        return []


class _CudaRuntime:
    """The few CUDA runtime calls a JAX-only install needs to write into device memory in place."""

    _lib: Any = None

    @classmethod
    def lib(cls) -> Any:
        if cls._lib is None:
            candidates = ["libcudart.so", "libcudart.so.13", "libcudart.so.12"]
            found = ctypes.util.find_library("cudart")
            if found:
                candidates.insert(0, found)
            for root in {os.path.dirname(os.path.dirname(jax.__file__))}:
                candidates += sorted(glob.glob(os.path.join(root, "nvidia", "cu*", "lib", "libcudart.so*")))
                candidates += sorted(
                    glob.glob(os.path.join(root, "nvidia", "cuda_runtime", "lib", "libcudart.so*"))
                )
            for name in candidates:
                try:
                    lib = ctypes.CDLL(name)
                except OSError:
                    continue
                lib.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                lib.cudaMemcpy.restype = ctypes.c_int
                lib.cudaDeviceSynchronize.restype = ctypes.c_int
                cls._lib = lib
                break
            else:
                raise DeviceUnavailableError(
                    "writing into a JAX GPU pool needs the CUDA runtime (libcudart), which was not found; "
                    "install jax[cuda13] or jax[cuda12]"
                )
        return cls._lib

    @classmethod
    def copy(cls, dst: int, src: int, nbytes: int) -> None:
        lib = cls.lib()
        err = lib.cudaMemcpy(dst, src, nbytes, 4)  # cudaMemcpyDefault: direction from the pointers
        if err == 0:
            err = lib.cudaDeviceSynchronize()  # device-to-device copies return before they finish
        if err != 0:
            raise DeviceCopyError(f"cudaMemcpy of {nbytes} bytes failed with CUDA error {err}")


class JaxGPUArena:
    """An arena in one GPU's memory, owned by a JAX array; slots are given out as DLPack sub-views."""

    backend = "jax"
    pinned = False
    host: np.ndarray | None = None

    def __init__(self, layout: SlotLayout, num_slots: int, device: Any) -> None:
        self.layout = layout
        self.num_slots = num_slots
        self.nbytes = layout.slot_bytes * num_slots
        stats = device.memory_stats() or {}
        limit, in_use = stats.get("bytes_limit"), stats.get("bytes_in_use", 0)
        if limit is not None and self.nbytes > limit - in_use:
            raise PoolTooLargeError(
                f"the GPU arena needs {self.nbytes / GIB:.2f} GiB but JAX can give "
                f"{(limit - in_use) / GIB:.2f} GiB on {device}; lower max_local_cache_size"
            )
        self._jax_device = device
        self.device = f"{device.platform}:{device.id}"
        self._whole = jax.device_put(
            jnp.zeros((num_slots, layout.slot_elems), dtype=jax_dtype(layout.dtype)), device
        ).block_until_ready()
        self.base_address = int(self._whole.unsafe_buffer_pointer())

    def _producer(self, slot: int, num_tokens: int) -> DLPackView:
        return DLPackView(
            self._whole,
            self.layout.dtype,
            shape=self.layout.view_shape(num_tokens),
            byte_offset=slot * self.layout.slot_bytes,
            device=(_DLPACK_CUDA, self._jax_device.local_hardware_id or 0),
        )

    def view(self, slot: int, num_tokens: int) -> jax.Array:
        """Return the jax.Array view of a chunk (a DLPack sub-view of the arena; no copy)."""
        array: jax.Array = jax.dlpack.from_dlpack(self._producer(slot, num_tokens), copy=False)
        return array

    def whole(self) -> jax.Array:
        """Return the arena as a ``(num_slots, slot_elems)`` jax.Array (a new DLPack alias, so that
        deleting it leaves the arena intact)."""
        array: jax.Array = jax.dlpack.from_dlpack(
            DLPackView(
                self._whole,
                self.layout.dtype,
                shape=(self.num_slots, self.layout.slot_elems),
                byte_offset=0,
                device=(_DLPACK_CUDA, self._jax_device.local_hardware_id or 0),
            ),
            copy=False,
        )
        return array

    def export(self, slot: int, num_tokens: int, target: str) -> Any:
        """Return a chunk's view in ``target`` (JAX or torch; numpy cannot see device memory)."""
        if target == "jax":
            return self.view(slot, num_tokens)
        if target == "numpy":
            raise ChunkTypeError(
                f"the chunk is in {self.device} memory, which numpy cannot view; "
                "use kv_obj.clone('numpy') or kv_obj.copy_to(host_array)"
            )
        return load_adapter(target).from_dlpack(self._producer(slot, num_tokens))

    def dlpack_producer(self, slot: int, num_tokens: int) -> Any:
        """Return a DLPack producer of the chunk's device memory."""
        return self._producer(slot, num_tokens)

    def _address(self, slot: int) -> int:
        return self.base_address + slot * self.layout.slot_bytes

    def copy_in(self, slot: int, num_tokens: int, src: Any, framework: str) -> None:
        """Copy ``src`` into the chunk with ``cudaMemcpy`` (torch tensors with torch's own copy)."""
        nbytes = self.layout.num_elems(num_tokens) * self.layout.dtype.itemsize
        if framework == "torch":
            torch_adapter = load_adapter("torch")
            torch_adapter.from_dlpack(self._producer(slot, num_tokens)).copy_(src.detach())
            torch_adapter.wait(src)
            return
        if framework == "jax" and any(d.platform != "cpu" for d in src.devices()):
            src = jnp.array(src, copy=True).block_until_ready()  # a private, compact copy
            _CudaRuntime.copy(self._address(slot), src.unsafe_buffer_pointer(), nbytes)
            return
        host = np.array(np.asarray(src), copy=True, order="C")  # private: src may alias the slot
        _CudaRuntime.copy(self._address(slot), host.ctypes.data, nbytes)

    def copy_out(self, slot: int, num_tokens: int, dst: Any, framework: str) -> None:
        """Copy the chunk into a numpy array or a torch tensor."""
        nbytes = self.layout.num_elems(num_tokens) * self.layout.dtype.itemsize
        if framework == "numpy":
            if not dst.flags.c_contiguous:
                raise ChunkTypeError("copy_to needs a C-contiguous numpy array")
            _CudaRuntime.copy(dst.ctypes.data, self._address(slot), nbytes)
        else:
            torch_adapter = load_adapter("torch")
            dst.detach().copy_(torch_adapter.from_dlpack(self._producer(slot, num_tokens)))
            torch_adapter.wait(dst)

    def clone(self, slot: int, num_tokens: int, framework: str) -> Any:
        """Return an owning copy in ``framework`` (numpy copies to the host)."""
        return clone_from_device(self, slot, num_tokens, framework)

    def close(self) -> None:
        """Nothing to release: the memory goes when the last view does."""


class _HostMemory:
    """Host memory that a JAX array owns, exposed to numpy with the owner attached.

    numpy keeps this object as the base of every array made from it, so each view of the arena (and
    each DLPack capsule numpy exports from one) keeps the owning JAX array alive.
    """

    def __init__(self, owner: jax.Array, address: int, nbytes: int) -> None:
        self.owner = owner
        self.__array_interface__ = {
            "data": (address, False),
            "shape": (nbytes,),
            "typestr": "|u1",
            "version": 3,
        }


def pinned_host_bytes(device: Any, nbytes: int) -> np.ndarray:
    """``nbytes`` of JAX ``pinned_host`` memory of ``device`` (which must offer that memory kind), as a
    1-D ``uint8`` numpy array whose views keep the owning JAX allocation alive."""
    sharding = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    owner = jax.device_put(np.zeros(nbytes, dtype=np.uint8), sharding).block_until_ready()
    return np.asarray(_HostMemory(owner, owner.unsafe_buffer_pointer(), nbytes))


def _pinned_host_arena(layout: SlotLayout, num_slots: int, device: Any) -> JaxCPUArena | None:
    """A CPU arena whose bytes JAX allocated in ``pinned_host`` memory of ``device``, or None."""
    if "pinned_host" not in {m.kind for m in device.addressable_memories()}:
        return None
    arena = JaxCPUArena(layout, num_slots, host=pinned_host_bytes(device, layout.slot_bytes * num_slots))
    arena.pinned = True
    return arena


class JaxAdapter:
    """Adapter of the JAX backend."""

    name = "jax"

    def create_arena(
        self,
        layout: SlotLayout,
        num_slots: int,
        *,
        device: str,
        pin_memory: bool | None,
        memory: np.ndarray | None = None,
    ) -> JaxCPUArena | JaxGPUArena:
        """Create a CPU arena (in ``pinned_host`` memory when a GPU exists; in ``memory`` when given,
        which JAX cannot pin) or a GPU arena."""
        gpus = _gpu_devices()
        if device == "cpu":
            if pin_memory and not gpus:
                raise DeviceUnavailableError(
                    "pin_memory=True needs a GPU, and JAX sees none; pass pin_memory=False"
                )
            if memory is not None:
                if pin_memory:
                    raise ConfigError(
                        "JAX cannot pin memory it did not allocate (memory=); pass pin_memory=None or "
                        "False, and move chunks to the device with jax.device_put"
                    )
                return JaxCPUArena(layout, num_slots, host=memory)
            if gpus and pin_memory is not False:
                arena = _pinned_host_arena(layout, num_slots, gpus[0])
                if arena is not None:
                    return arena
            return JaxCPUArena(layout, num_slots)
        if pin_memory:
            raise ConfigError("pin_memory applies to CPU pools only")
        if memory is not None:
            raise ConfigError("memory= gives host memory to a CPU pool; a GPU pool allocates its own")
        if not gpus:
            raise DeviceUnavailableError(
                f"a GPU pool was asked for (device={device!r}) but JAX sees no GPU; use LocalCPUPool, "
                "or install jax[cuda13] on a machine with a GPU"
            )
        index = 0
        if device not in ("gpu", "cuda"):
            platform, _, number = device.partition(":")
            if platform not in ("gpu", "cuda") or not number.isdigit():
                raise ConfigError(f"a JAX GPU pool takes device 'gpu' or 'gpu:N', got {device!r}")
            index = int(number)
            if index >= len(gpus):
                raise DeviceUnavailableError(f"{device} does not exist: JAX sees {len(gpus)} GPU(s)")
        return JaxGPUArena(layout, num_slots, gpus[index])

    def from_host(self, bits: np.ndarray, spec: DTypeSpec) -> jax.Array:
        """Alias host bits as a jax.Array of ``spec`` (works for bf16 and fp8)."""
        return _import_host(bits, spec)

    def from_dlpack(self, producer: Any) -> jax.Array:
        """Import a DLPack producer without a copy."""
        array: jax.Array = jax.dlpack.from_dlpack(producer, copy=False)
        return array

    def check_source(self, array: Any) -> None:
        """Refuse tracers (values inside ``jit``) and deleted (or donated) arrays."""
        if isinstance(array, jax.core.Tracer):
            raise ChunkTypeError(
                "a JAX tracer has no value yet: copy into the pool outside jit, from the jitted function's "
                "result"
            )
        if array.is_deleted():
            raise ChunkTypeError(
                "the JAX array was deleted (or donated to a jitted function); pass a live array"
            )

    def copy_to_host(self, dst: np.ndarray, src: Any) -> None:
        """Copy a jax.Array into host bits (waits for it; copies from a GPU; numpy buffers overlap)."""
        host = np.asarray(src)
        copy_engine.copy(dst.view(host.dtype), host)

    def copy_from_host(self, dst: Any, src: np.ndarray) -> None:
        """JAX arrays are immutable; refuse with the fix."""
        raise ChunkTypeError("JAX arrays are immutable; read chunks with as_jax() or clone('jax')")

    def memory_extent(self, array: Any) -> MemoryExtent | None:
        """The bytes of a single-device array's buffer (row-major); None where JAX gives no pointer
        (tracers, sharded or deleted arrays)."""
        try:
            address = int(array.unsafe_buffer_pointer())
            (device,) = array.devices()
        except (AttributeError, ValueError, TypeError, RuntimeError):
            return None
        name = "cpu" if device.platform == "cpu" else f"{device.platform}:{device.id}"
        nbytes = int(array.size) * int(array.dtype.itemsize)
        return MemoryExtent(name, address, address + nbytes, False)

    def wait(self, array: Any) -> None:
        """Block until the array is computed (a deleted array has nothing left to wait for)."""
        if not array.is_deleted():
            array.block_until_ready()

    def concat_tokens(self, arrays: list[Any]) -> jax.Array:
        """``jnp.concatenate`` on the token axis, waited for."""
        result: jax.Array = jnp.concatenate(arrays, axis=2).block_until_ready()
        return result

    def to_host(self, array: Any) -> np.ndarray:
        """``np.asarray``: waits, aliases CPU arrays, copies GPU arrays to the host."""
        return np.asarray(array)

    def clone(self, array: Any) -> jax.Array:
        """Return an owning copy, computed (``jnp.array(copy=True)``; DLPack ``copy=True`` may alias)."""
        copy: jax.Array = jnp.array(array, copy=True).block_until_ready()
        return copy

    def accelerators(self) -> list[str]:
        """GPUs JAX sees."""
        return [f"{d.platform}:{d.id}" for d in _gpu_devices()]


@partial(jax.jit, static_argnames=("shape",))
def gather_chunks(arena: jax.Array, chunk_idx: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Gather full chunks from ``pool.arena`` inside ``jit``: returns ``(len(chunk_idx), *shape)``.

    ``shape`` is ``pool.layout.kv_shape`` (static). Pass the arena as an argument, not in a closure: a
    jitted function that captures an array keeps its value as of tracing.

    Example:
        ``gather_chunks(pool.arena, jnp.array([obj.chunk_idx]), pool.layout.kv_shape)`` returns the
        chunk of ``obj`` as a ``(1, L, 2, chunk_size, H, D)`` array (see the JAX quickstart).
    """
    elems = 1
    for dim in shape:
        elems *= dim
    rows = jnp.take(arena, chunk_idx, axis=0)[:, :elems]
    return rows.reshape((chunk_idx.shape[0], *shape))


ADAPTER = JaxAdapter()

__all__ = [
    "ADAPTER",
    "JaxAdapter",
    "JaxCPUArena",
    "JaxGPUArena",
    "gather_chunks",
    "jax_dtype",
    "pinned_host_bytes",
]
