"""What a chunk argument may be: the shape and dtype ``allocate`` reads, and whole arrays for copies.

Every check here runs before a pool takes a slot or writes a byte, so a bad argument leaves the pool
exactly as it was. Errors are :class:`~lmcache.errors.ChunkTypeError` (not an array, or an array that
cannot be read as plain memory) and :class:`~lmcache.errors.ChunkShapeError` (wrong shape, tokens or
dtype), each with the fix in its message.
"""

from __future__ import annotations

import contextlib
import importlib.util
import operator
from typing import Any

import numpy as np

from lmcache.dtypes import normalize_dtype
from lmcache.errors import ChunkShapeError, ChunkTypeError, ConfigError, OverlapError
from lmcache.layout import SlotLayout
from lmcache.registry import framework_of, load_adapter

#: Token counts whose view shape is cached: bounded, so no table grows with ``chunk_size``.
_SHAPE_CACHE_LIMIT = 4096


class ChunkChecker:
    """Checks chunk arguments against one pool's layout.

    Fields are written only by this class: the cache of view shapes by token count (bounded) and the
    dtype objects already found to be the pool's (so the hot path compares identities).
    """

    def __init__(self, layout: SlotLayout, backend: str) -> None:
        self.layout = layout
        self.backend = backend
        #: View shape by token count, for the token counts seen (at most _SHAPE_CACHE_LIMIT).
        self.shapes: dict[int, tuple[int, ...]] = {}
        #: The first dtype object found to be the pool's: ``allocate``'s fast path compares identity.
        self.fast_dtype: Any = None
        self._ok_dtypes: set[Any] = set()

    def view_shape(self, num_tokens: int) -> tuple[int, ...]:
        """Return ``(L, 2, num_tokens, H, D)``, cached for the first token counts seen."""
        shape = self.shapes.get(num_tokens)
        if shape is None:
            shape = self.layout.view_shape(num_tokens)
            if len(self.shapes) < _SHAPE_CACHE_LIMIT:
                self.shapes[num_tokens] = shape
        return shape

    def check_chunk(self, kv_chunk: Any) -> int:
        """Check the shape (and dtype, if any) of an array-like and return its token count.

        Raises:
            ChunkTypeError: no ``shape``, or a shape that is not a sequence of ints.
            ChunkShapeError: a dim, the token count or the dtype does not fit the pool.
        """
        try:
            shape = kv_chunk.shape
        except AttributeError:
            raise ChunkTypeError(
                f"allocate() needs an array-like with .shape and .dtype, got {type(kv_chunk).__name__}"
            ) from None
        try:
            dims = tuple(operator.index(dim) for dim in shape)
            if any(isinstance(dim, (bool, np.bool_)) for dim in shape):
                raise TypeError("a bool is not a dimension")
        except TypeError:
            raise ChunkTypeError(
                f"kv_chunk.shape must be a sequence of ints, got {shape!r}; pass an array of the chunk"
            ) from None
        num_tokens = self.layout.tokens_of(dims)
        dtype = getattr(kv_chunk, "dtype", None)
        if dtype is not None:
            self.check_dtype(dtype, "kv_chunk")
        self.view_shape(num_tokens)  # warm the fast path for this token count
        return num_tokens

    def check_dtype(self, dtype: Any, what: str) -> None:
        """Raise :class:`ChunkShapeError` unless ``dtype`` is the pool's dtype."""
        try:
            if dtype in self._ok_dtypes:
                return
        except TypeError:  # unhashable dtype objects are checked every time
            pass
        try:
            spec = normalize_dtype(dtype)
        except ConfigError as exc:
            raise ChunkShapeError(
                f"{what} has dtype {dtype!r}, the pool holds {self.layout.dtype.name}: {exc}"
            ) from exc
        if spec is not self.layout.dtype:
            raise ChunkShapeError(
                f"{what} has dtype {spec.name}, the pool holds {self.layout.dtype.name}; convert it first "
                f"(for example .to(torch.{self.layout.dtype.name}) or .astype(jnp.{self.layout.dtype.name}))"
            )
        with contextlib.suppress(TypeError):
            self._ok_dtypes.add(dtype)
        if self.fast_dtype is None:
            self.fast_dtype = dtype

    def source(self, src: Any, num_tokens: int | None, what: str) -> tuple[str, Any, int]:
        """Check a copy's source completely; return ``(framework, array, num_tokens)`` ready to copy.

        ``num_tokens`` None takes the token count from the source's shape (``put``). DLPack producers
        (a KVObj, or any object with ``__dlpack__``) are imported first, without a copy where the
        importing framework allows.
        """
        framework = framework_of(src)
        if framework == "dlpack":
            src = self._import_producer(src, what)
            framework = framework_of(src)
        if num_tokens is None:
            num_tokens = self.check_chunk(src)
        self._check_shape_dtype(src, num_tokens, what)
        load_adapter(framework).check_source(src)
        return framework, src, num_tokens

    def destination(self, dst: Any, num_tokens: int) -> str:
        """Check a copy's destination (a writable numpy array or torch tensor); return its framework."""
        what = "copy_to destination"
        framework = framework_of(dst)
        if framework not in ("numpy", "torch"):
            raise ChunkTypeError(
                f"cannot copy into a {type(dst).__name__}: JAX arrays are immutable and other producers "
                "may be read-only; pass a numpy array or a torch tensor, or use clone('jax') / as_jax()"
            )
        self._check_shape_dtype(dst, num_tokens, what)
        if framework == "numpy" and not dst.flags.writeable:
            raise ChunkTypeError(f"{what} is a read-only numpy array; pass a writable one")
        check_writable(dst, framework, what)
        return framework

    def _check_shape_dtype(self, array: Any, num_tokens: int, what: str) -> None:
        _check_shape(array, self.view_shape(num_tokens), what)
        dtype = getattr(array, "dtype", None)
        if dtype is None:
            raise ChunkTypeError(f"{what} has no dtype; pass a numpy, torch or JAX array")
        self.check_dtype(dtype, what)

    def _import_producer(self, src: Any, what: str) -> Any:
        from lmcache.storage_backend.mem_pool.base_pool import KVObj

        if isinstance(src, KVObj):
            return src.data  # checks that the source handle still owns its slot
        # The pool's own framework first; numpy cannot import bf16 / fp8, torch and JAX can.
        errors = []
        for name in dict.fromkeys((self.backend, "torch", "jax", "numpy")):
            if importlib.util.find_spec(name) is None:
                continue
            try:
                return load_adapter(name).from_dlpack(src)
            except (BufferError, TypeError, RuntimeError, ValueError) as exc:
                errors.append(f"{name}: {exc}")
        raise ChunkTypeError(
            f"{what}: could not import the {type(src).__name__} through DLPack ({'; '.join(errors)}); "
            "pass a numpy, torch or JAX array"
        )


def _check_shape(array: Any, want: tuple[int, ...], what: str) -> None:
    got = getattr(array, "shape", None)
    try:
        same = got is not None and tuple(operator.index(dim) for dim in got) == want
    except TypeError:
        same = False
    if not same:
        raise ChunkShapeError(f"{what} has shape {got!r}, expected {want}")


def check_writable(array: Any, framework: str, what: str) -> None:
    """Check that an array can take distinct values: plain memory whose elements do not share bytes.

    Raises:
        ChunkTypeError: not plain memory (meta, sparse ... tensors; see the adapters' ``check_source``).
        OverlapError: two of its elements share memory (a torch ``expand``, a zero-stride numpy view):
            written, it would read back as garbage.
    """
    adapter = load_adapter(framework)
    adapter.check_source(array)
    extent = adapter.memory_extent(array)
    if extent is not None and extent.self_overlapping:
        raise OverlapError(
            f"{what} has elements that share memory (an expanded or zero-stride view), so it cannot hold "
            "distinct values; pass a tensor with memory of its own (.contiguous() or .clone())"
        )


def check_array(array: Any, shape: tuple[int, ...], layout: SlotLayout, what: str) -> str:
    """Check a numpy, torch or JAX array completely: exactly ``shape``, the layout's dtype, and readable
    as plain memory (see the adapters' ``check_source``). Return its framework.

    For layers built on a pool (the chunk cache) that copy whole prompts rather than one chunk.

    Raises:
        ChunkTypeError: not a numpy, torch or JAX array, or one that is not plain memory.
        ChunkShapeError: another shape or dtype; the message says which and how to convert.
    """
    framework = framework_of(array)
    if framework == "dlpack":
        raise ChunkTypeError(f"{what} must be a numpy, torch or JAX array, got a {type(array).__name__}")
    _check_shape(array, shape, what)
    checker = ChunkChecker(layout, framework)
    checker.check_dtype(getattr(array, "dtype", None), what)
    load_adapter(framework).check_source(array)
    return framework


__all__ = ["ChunkChecker", "check_array", "check_writable"]
