"""The torch backend: CPU arenas (pinned at exact size when CUDA exists) and CUDA arenas.

Views are ordinary tensors (never inference-mode tensors), so ``kv_obj.data.copy_(t)`` works anywhere.
This module imports torch; the core imports it only when a torch pool or view is asked for.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Any

import numpy as np
import torch
from torch.utils.dlpack import from_dlpack

from lmcache import copy_engine
from lmcache.arena import HostArena, clone_from_device
from lmcache.dtypes import DTypeSpec, normalize_dtype
from lmcache.errors import (
    ChunkTypeError,
    ConfigError,
    DeviceUnavailableError,
    PoolTooLargeError,
)
from lmcache.hostmem import GIB
from lmcache.layout import SlotLayout
from lmcache.memory import MemoryExtent, strided_extent
from lmcache.registry import load_adapter

#: The unsigned int of each item size: how a tensor of any dtype is read by numpy (bf16 / fp8 included).
_BITS = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.uint64}
#: Token counts whose view geometry is cached per arena (bounded: no table grows with chunk_size).
_GEOMETRY_CACHE_LIMIT = 4096


def torch_dtype(spec: DTypeSpec) -> torch.dtype:
    """Return the ``torch.dtype`` of a pool dtype (``torch.bfloat16`` for ``"bfloat16"``)."""
    dtype = getattr(torch, spec.name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"torch {torch.__version__} has no dtype {spec.name}; upgrade torch")
    return dtype


class _Views:
    """Makes contiguous ``(L, 2, n, H, D)`` views of slots of a 2-D CUDA arena, one owner at a time.

    One view per slot (for its last token count) is kept and never handed out; each caller gets a
    ``detach()`` of it: a new tensor over the same memory that shares no autograd or metadata state with
    the kept view, the arena or any other owner's view. So an owner's ``copy_`` from a tensor that requires
    grad, ``set_`` or ``unsqueeze_`` stays with its own tensor, and handing out a view costs one
    ``detach`` (about a third of making a view with ``as_strided``).
    """

    def __init__(self, whole: torch.Tensor, layout: SlotLayout, num_slots: int) -> None:
        self._whole = whole
        self._layout = layout
        self._slot_elems = layout.slot_elems
        self._strides: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self._kept: list[tuple[int, torch.Tensor] | None] = [None] * num_slots

    def view(self, slot: int, num_tokens: int) -> torch.Tensor:
        kept = self._kept[slot]
        if kept is None or kept[0] != num_tokens:
            kept = self._kept[slot] = (num_tokens, self._make(slot, num_tokens))
        return kept[1].detach()

    def _make(self, slot: int, num_tokens: int) -> torch.Tensor:
        geometry = self._strides.get(num_tokens)
        if geometry is None:
            shape = self._layout.view_shape(num_tokens)
            strides = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
            geometry = (shape, strides)
            if len(self._strides) < _GEOMETRY_CACHE_LIMIT:
                self._strides[num_tokens] = geometry
        # One as_strided call: slicing a row and then reshaping costs two tensor constructions.
        return torch.as_strided(self._whole.detach(), geometry[0], geometry[1], slot * self._slot_elems)


def _cudart() -> Any:
    return torch.cuda.cudart()  # type: ignore[no-untyped-call]


def _unregister(address: int) -> None:
    # At interpreter shutdown CUDA may be gone already; the process is ending, so nothing leaks.
    with contextlib.suppress(Exception):
        _cudart().cudaHostUnregister(address)


class TorchCPUArena(HostArena):
    """A host arena viewed as torch tensors; optionally page-locked at exactly its size.

    torch's own ``pin_memory=True`` allocator rounds up to a power of two (a 33 GiB pool would pin
    64 GiB); instead the lazily committed host buffer is registered with ``cudaHostRegister``, which pins
    exactly ``nbytes``. The registration is released by :meth:`close` or when the arena is collected.
    """

    backend = "torch"

    def __init__(
        self, layout: SlotLayout, num_slots: int, *, pin_memory: bool, host: np.ndarray | None = None
    ) -> None:
        super().__init__(layout, num_slots, host=host)
        self._dtype = torch_dtype(layout.dtype)
        whole = torch.from_numpy(self.host).view(self._dtype).view(num_slots, layout.slot_elems)
        self._whole = whole
        self._unpin: Any = None
        if pin_memory:
            self._pin()

    def _pin(self) -> None:
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                "pin_memory=True needs a CUDA device, and torch sees none; pass pin_memory=False"
            )
        err = _cudart().cudaHostRegister(self.base_address, self.nbytes, 0)
        if int(err) != 0:
            raise PoolTooLargeError(
                f"pinning the {self.nbytes / GIB:.2f} GiB arena failed (cudaHostRegister error "
                f"{int(err)}); the machine cannot page-lock that much: lower max_local_cache_size "
                "or pass pin_memory=False"
            )
        self.pinned = True
        self._unpin = weakref.finalize(self, _unregister, self.base_address)

    def _native(self, bits: np.ndarray) -> torch.Tensor:
        tensor: torch.Tensor = torch.from_numpy(bits).view(self._dtype)
        return tensor

    def _alias(self, view: Any) -> torch.Tensor:
        """A ``detach()``: a new tensor over the same memory with no autograd or metadata link."""
        return view.detach()  # type: ignore[no-any-return]

    def view(self, slot: int, num_tokens: int) -> torch.Tensor:
        """Return a new tensor view of a chunk: a ``detach()`` of the view kept for the slot
        (:meth:`HostArena.view` with the alias inlined: this runs on every handle's first ``.data``)."""
        kept = self._kept[slot]
        if kept is None or kept[0] != num_tokens:
            return super().view(slot, num_tokens)  # type: ignore[no-any-return]
        return kept[1].detach()  # type: ignore[no-any-return]

    def whole(self) -> torch.Tensor:
        """Return the whole arena as a new ``(num_slots, slot_elems)`` tensor (a detached alias)."""
        return self._whole.detach()

    def close(self) -> None:
        """Unpin the arena (its memory stays valid for outstanding views) and drop the kept views."""
        super().close()
        if self._unpin is not None:
            self._unpin()
            self.pinned = False


class TorchCUDAArena:
    """An arena in one CUDA device's memory, allocated once through torch's caching allocator."""

    backend = "torch"
    pinned = False
    host: np.ndarray | None = None

    def __init__(self, layout: SlotLayout, num_slots: int, device: torch.device) -> None:
        self.layout = layout
        self.num_slots = num_slots
        self.nbytes = layout.slot_bytes * num_slots
        free, _total = torch.cuda.mem_get_info(device)
        if self.nbytes > free:
            raise PoolTooLargeError(
                f"the GPU arena needs {self.nbytes / GIB:.2f} GiB but {device} has "
                f"{free / GIB:.2f} GiB free; lower max_local_cache_size"
            )
        self._device = device
        self.device = str(device)
        self._dtype = torch_dtype(layout.dtype)
        raw = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
        self._whole = raw.view(self._dtype).view(num_slots, layout.slot_elems)
        self.base_address = int(raw.data_ptr())
        self._views = _Views(self._whole, layout, num_slots)

    def view(self, slot: int, num_tokens: int) -> torch.Tensor:
        """Return the CUDA tensor view of a chunk."""
        return self._views.view(slot, num_tokens)

    def whole(self) -> torch.Tensor:
        """Return the whole arena as a new ``(num_slots, slot_elems)`` CUDA tensor (a detached alias)."""
        return self._whole.detach()

    def export(self, slot: int, num_tokens: int, target: str) -> Any:
        """Return a chunk's view in ``target`` (torch or JAX; numpy cannot see device memory)."""
        view = self.view(slot, num_tokens)
        if target == "torch":
            return view
        if target == "numpy":
            raise ChunkTypeError(
                f"the chunk is in {self.device} memory, which numpy cannot view; "
                "use kv_obj.clone('numpy') or kv_obj.copy_to(host_array)"
            )
        torch.cuda.current_stream(self._device).synchronize()
        return load_adapter(target).from_dlpack(view)

    def dlpack_producer(self, slot: int, num_tokens: int) -> Any:
        """The chunk's CUDA tensor is itself a DLPack producer."""
        return self.view(slot, num_tokens)

    def copy_in(self, slot: int, num_tokens: int, src: Any, framework: str) -> None:
        """Copy ``src`` into the chunk on the device; synchronize so the bytes are there on return."""
        dst = self.view(slot, num_tokens)
        source = as_tensor(src, framework)
        with torch.no_grad():
            dst.copy_(_unaliased(source, dst))
        torch.cuda.current_stream(self._device).synchronize()

    def copy_out(self, slot: int, num_tokens: int, dst: Any, framework: str) -> None:
        """Copy the chunk into ``dst`` (a numpy array or a torch tensor on any device)."""
        src = self.view(slot, num_tokens)
        with torch.no_grad():
            if framework == "torch":
                dst.copy_(_unaliased(src, dst))
            else:
                torch.from_numpy(dst.view(self.layout.dtype.bits_dtype)).view(self._dtype).copy_(src)
        torch.cuda.current_stream(self._device).synchronize()

    def clone(self, slot: int, num_tokens: int, framework: str) -> Any:
        """Return an owning copy in ``framework`` (numpy copies to the host)."""
        return clone_from_device(self, slot, num_tokens, framework)

    def close(self) -> None:
        """Nothing to release: the memory goes when the last view does."""


def as_tensor(src: Any, framework: str) -> torch.Tensor:
    """Return ``src`` (a checked torch, numpy or JAX array) as a tensor, without a copy where possible.

    numpy arrays with negative or odd strides are made contiguous first (``torch.from_numpy`` rejects
    negative strides, and ``torch.from_dlpack`` of such a view aborts the process).
    """
    if framework == "torch":
        return src  # type: ignore[no-any-return]
    if framework == "jax" and _jax_on_gpu(src):
        src.block_until_ready()
        return from_dlpack(src)
    host = np.ascontiguousarray(np.asarray(src))  # a JAX array is waited for and read on the host
    bits = host.view(f"u{host.dtype.itemsize}") if host.dtype.itemsize in (1, 2, 4, 8) else host
    return torch.from_numpy(bits).view(torch_dtype(normalize_dtype(host.dtype)))


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """The byte range ``[start, stop)`` a strided tensor's elements occupy."""
    start = tensor.data_ptr()
    if tensor.numel() == 0:
        return start, start
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
    return start, start + (last + 1) * tensor.element_size()


def _unaliased(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Return ``src``, or a copy of it where it shares memory with ``dst`` (torch's ``copy_`` does not
    buffer overlapping copies, so a source straddling the destination would be read half-overwritten)."""
    if src.device != dst.device:
        return src
    src_start, src_stop = _span(src)
    dst_start, dst_stop = _span(dst)
    if src_start < dst_stop and dst_start < src_stop:
        return src.clone()
    return src


def _jax_on_gpu(array: Any) -> bool:
    try:
        return any(d.platform != "cpu" for d in array.devices())
    except AttributeError:
        return False


class TorchAdapter:
    """Adapter of the torch backend."""

    name = "torch"

    def create_arena(
        self,
        layout: SlotLayout,
        num_slots: int,
        *,
        device: str,
        pin_memory: bool | None,
        memory: np.ndarray | None = None,
    ) -> TorchCPUArena | TorchCUDAArena:
        """Create a CPU arena (pinned by default when CUDA exists; in ``memory`` when given, pinned at
        exactly the arena's bytes) or a CUDA arena."""
        if device == "cpu":
            pin = torch.cuda.is_available() if pin_memory is None else pin_memory
            return TorchCPUArena(layout, num_slots, pin_memory=pin, host=memory)
        if pin_memory:
            raise ConfigError("pin_memory applies to CPU pools only")
        if memory is not None:
            raise ConfigError("memory= gives host memory to a CPU pool; a GPU pool allocates its own")
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"a GPU pool was asked for (device={device!r}) but torch sees no CUDA device; "
                "use LocalCPUPool, or install a CUDA build of torch on a machine with a GPU"
            )
        if device == "gpu":
            dev = torch.device("cuda", torch.cuda.current_device())
        else:
            try:
                dev = torch.device(device)
            except RuntimeError as exc:
                raise ConfigError(f"unknown torch device {device!r}: {exc}") from exc
            if dev.type != "cuda":
                raise ConfigError(f"a torch GPU pool needs a CUDA device, got {device!r}")
            if dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
            if dev.index >= torch.cuda.device_count():
                raise DeviceUnavailableError(
                    f"{device} does not exist: torch sees {torch.cuda.device_count()} CUDA device(s)"
                )
        return TorchCUDAArena(layout, num_slots, dev)

    def from_host(self, bits: np.ndarray, spec: DTypeSpec) -> torch.Tensor:
        """Wrap host bits as a tensor of ``spec`` (zero-copy; works for bf16 and fp8)."""
        return torch.from_numpy(bits).view(torch_dtype(spec))

    def from_dlpack(self, producer: Any) -> torch.Tensor:
        """Import a DLPack producer with ``torch.from_dlpack``."""
        return from_dlpack(producer)

    def check_source(self, array: Any) -> None:
        """Refuse tensors that are not plain strided memory: meta, sparse, quantized, nested."""
        if array.is_meta:
            raise ChunkTypeError(
                "a meta tensor has no data to copy; materialize it first (for example torch.empty_like "
                "on a real device, then fill it)"
            )
        if array.layout != torch.strided or array.is_quantized or getattr(array, "is_nested", False):
            raise ChunkTypeError(
                f"a torch tensor with layout {array.layout} (quantized={array.is_quantized}) cannot be "
                "copied as raw memory; convert it to a dense tensor first (.to_dense() or .dequantize())"
            )

    def copy_to_host(self, dst: np.ndarray, src: Any) -> None:
        """Copy a tensor (any device) into host bits ``dst``; exact when ``src`` overlaps ``dst``.

        A CPU tensor is copied through numpy views with the copy engine (not torch's intra-op threads,
        which stall when the machine is busy); a device tensor with torch's own copy.
        """
        if src.device.type == "cpu":
            copy_engine.copy(dst, self.to_host(src).view(dst.dtype))
            return
        target = torch.from_numpy(dst).view(src.dtype)
        with torch.no_grad():  # never put the arena into an autograd graph
            target.copy_(_unaliased(src, target))

    def copy_from_host(self, dst: Any, src: np.ndarray) -> None:
        """Copy host bits ``src`` into tensor ``dst`` (a CPU tensor through the copy engine);
        synchronize when ``dst`` is on a GPU."""
        if dst.device.type == "cpu":
            copy_engine.copy(self.to_host(dst).view(src.dtype), src)
            return
        source = torch.from_numpy(src).view(dst.dtype)
        with torch.no_grad():
            dst.copy_(_unaliased(source, dst))
        torch.cuda.current_stream(dst.device).synchronize()

    def concat_tokens(self, arrays: list[Any]) -> torch.Tensor:
        """``torch.cat`` on the token axis; on a GPU, synchronized so the copy is done on return."""
        result = torch.cat(arrays, dim=2)
        if result.is_cuda:
            torch.cuda.current_stream(result.device).synchronize()
        return result

    def to_host(self, array: Any) -> np.ndarray:
        """A numpy view of a CPU tensor's memory (through its bits, so bf16 / fp8 work), else a host copy."""
        tensor = array.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        spec = normalize_dtype(tensor.dtype)
        return tensor.view(_BITS[spec.itemsize]).numpy().view(spec.numpy_dtype)  # type: ignore[no-any-return]

    def memory_extent(self, array: Any) -> MemoryExtent | None:
        """The bytes a strided tensor's elements occupy; None for tensors without plain storage."""
        if array.is_meta or array.layout != torch.strided:
            return None
        size = array.element_size()
        device = "cpu" if array.device.type == "cpu" else str(array.device)
        strides = [stride * size for stride in array.stride()]
        return strided_extent(device, array.data_ptr(), array.shape, strides, size)

    def wait(self, array: Any) -> None:
        """Wait for all work on a CUDA tensor's device (CPU tensors are never pending)."""
        if array.is_cuda:
            torch.cuda.synchronize(array.device)

    def clone(self, array: Any) -> torch.Tensor:
        """Return an owning copy of a tensor."""
        return array.clone()  # type: ignore[no-any-return]

    def accelerators(self) -> list[str]:
        """CUDA devices torch sees."""
        if not torch.cuda.is_available():
            return []
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]


ADAPTER = TorchAdapter()

__all__ = ["ADAPTER", "TorchAdapter", "TorchCPUArena", "TorchCUDAArena", "as_tensor", "torch_dtype"]
