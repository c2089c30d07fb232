"""A small DLPack producer: export memory with a dtype or a shape its owner cannot export.

numpy cannot export ``bfloat16`` or ``float8`` through DLPack, and a framework exports only whole arrays.
The pool needs both: a JAX-only install must give JAX a bf16 view of numpy-owned host memory, and a GPU
arena owned by JAX must give out one slot without a copy. :class:`DLPackView` asks the memory's owner for
an ordinary capsule of a same-sized integer array, then rewrites the capsule's type code (and, for a
sub-view, its data pointer, shape and strides) before handing it to the consumer.

Lifetime stays with the owner: the capsule's ``manager_ctx`` and ``deleter`` are the owner's own, so the
consumer keeps the owner alive and releases it through the owner's C deleter, with no Python callback
that could be freed before the consumer lets go (which crashed at interpreter exit in earlier attempts).
Shape and stride arrays written here are kept by the :class:`DLPackView` and by a module-level cache of
shapes; consumers copy them while importing.
"""

from __future__ import annotations

import ctypes
from typing import Any, cast

from lmcache.dtypes import DTypeSpec


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


class _DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class _DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [
        ("version", _DLPackVersion),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", _DLTensor),
    ]


_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsule_name = ctypes.pythonapi.PyCapsule_GetName
_capsule_name.restype = ctypes.c_char_p
_capsule_name.argtypes = [ctypes.py_object]

#: ``(shape, strides)`` ctypes arrays by shape: kept for the life of the process, bounded by the
#: number of distinct view shapes (at most ``chunk_size`` per pool layout).
_SHAPES: dict[tuple[int, ...], tuple[Any, Any]] = {}


def _shape_arrays(shape: tuple[int, ...]) -> tuple[Any, Any]:
    arrays = _SHAPES.get(shape)
    if arrays is None:
        strides = []
        step = 1
        for dim in reversed(shape):
            strides.append(step)
            step *= dim
        arr_t = ctypes.c_int64 * len(shape)
        arrays = (arr_t(*shape), arr_t(*reversed(strides)))
        _SHAPES[shape] = arrays
    return arrays


def _dl_tensor(capsule: Any) -> _DLTensor:
    name = _capsule_name(capsule)
    if name == b"dltensor_versioned":
        versioned: _DLManagedTensorVersioned = _DLManagedTensorVersioned.from_address(
            _capsule_pointer(capsule, name)
        )
        return cast(_DLTensor, versioned.dl_tensor)
    if name == b"dltensor":
        legacy: _DLManagedTensor = _DLManagedTensor.from_address(_capsule_pointer(capsule, name))
        return cast(_DLTensor, legacy.dl_tensor)
    raise BufferError(f"expected a fresh DLPack capsule, got one named {name!r}")


def export(
    producer: Any,
    *,
    stream: Any = None,
    max_version: tuple[int, int] | None = None,
    dl_device: tuple[int, int] | None = None,
    copy: bool | None = None,
) -> Any:
    """Call ``producer.__dlpack__`` with the protocol keywords that were given.

    Keywords left at None are not passed, and a producer that predates the DLPack 2023 keywords
    (``max_version``, ``dl_device``, ``copy``) is asked again with ``stream`` alone.
    """
    kwargs: dict[str, Any] = {
        name: value
        for name, value in (
            ("stream", stream),
            ("max_version", max_version),
            ("dl_device", dl_device),
            ("copy", copy),
        )
        if value is not None
    }
    try:
        return producer.__dlpack__(**kwargs)
    except TypeError:
        if dl_device is not None or copy is not None:
            raise  # those requests cannot be dropped silently
        return producer.__dlpack__(stream=stream) if stream is not None else producer.__dlpack__()


class DLPackView:
    """A DLPack producer for a typed, compact view of memory exported by another producer.

    Args:
        owner: an object with ``__dlpack__`` whose memory holds the view (a numpy array of unsigned
            ints of the same item size, a framework's whole arena).
        spec: the element type the consumer sees.
        shape: the consumer's shape; ``None`` keeps the owner's shape and strides (only the type changes).
        byte_offset: where the view starts, in bytes from the owner's data pointer (with ``shape``).
        device: the owner's ``__dlpack_device__()``.

    Every ``__dlpack__`` call exports a new capsule from ``owner``, so the protocol's ``max_version``,
    ``stream``, ``dl_device`` and ``copy`` are honoured by the owner itself.
    """

    __slots__ = ("_byte_offset", "_device", "_owner", "_shape", "_spec")

    def __init__(
        self,
        owner: Any,
        spec: DTypeSpec,
        shape: tuple[int, ...] | None = None,
        byte_offset: int = 0,
        device: tuple[int, int] = (1, 0),
    ) -> None:
        self._owner = owner
        self._spec = spec
        self._shape = shape
        self._byte_offset = byte_offset
        self._device = device

    def __dlpack_device__(self) -> tuple[int, int]:
        """Return the ``(device_type, device_id)`` of the memory (``(1, 0)`` for host memory)."""
        return self._device

    def __dlpack__(
        self,
        *,
        stream: Any = None,
        max_version: tuple[int, int] | None = None,
        dl_device: tuple[int, int] | None = None,
        copy: bool | None = None,
    ) -> Any:
        """Export a capsule (versioned when ``max_version >= (1, 0)``), retyped and reshaped."""
        if dl_device is not None and tuple(dl_device) != tuple(self._device):
            raise BufferError(
                f"this view lives on DLPack device {self._device}, not {tuple(dl_device)}; "
                "copy it with kv_obj.clone() or the framework's own transfer"
            )
        if copy and self._shape is not None:
            raise BufferError("a sub-view cannot be exported as a copy; use kv_obj.clone() instead")
        # The owner exports on its own device, so dl_device is not passed on (checked above).
        capsule = export(self._owner, stream=stream, max_version=max_version, copy=copy)
        tensor = _dl_tensor(capsule)
        tensor.dtype.code = self._spec.dlpack_code
        tensor.dtype.bits = 8 * self._spec.itemsize
        tensor.dtype.lanes = 1
        if self._shape is not None:
            shape_arr, strides_arr = _shape_arrays(self._shape)
            # Move the data pointer rather than byte_offset: not every consumer honours byte_offset.
            tensor.data = (tensor.data or 0) + tensor.byte_offset + self._byte_offset
            tensor.byte_offset = 0
            tensor.ndim = len(self._shape)
            tensor.shape = shape_arr
            tensor.strides = strides_arr
        return capsule


__all__ = ["DLPackView", "export"]
