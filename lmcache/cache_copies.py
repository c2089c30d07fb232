"""The chunk cache's copies: whole prompts (``(L, 2, T, H, D)`` arrays of any framework) to and from
the slots of its chunks, and chunk bytes to and from a tier's buffers.

:class:`ChunkCopies` checks every array before a slot is touched (so a bad argument changes nothing) and
picks the copy path: on a CPU pool, host copies go through numpy views of the slots (one copy loop for
every framework, independent of torch's thread pool); on a device pool, through the pool's own copies.
It holds no state beyond the pool's geometry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np

from lmcache import copy_engine
from lmcache.arena import host_array_of
from lmcache.checks import check_array, check_writable
from lmcache.errors import ChunkShapeError, ChunkTypeError, ConfigError, OverlapError
from lmcache.layout import SlotLayout
from lmcache.registry import framework_of, load_adapter
from lmcache.storage_backend.mem_pool.base_pool import KVObj

_FRAMEWORKS = ("numpy", "torch", "jax")
_OUTPUT_ALIGNMENT = 256  # JAX aliases host memory only at 64-byte aligned addresses


class SlotMemory(Protocol):
    """What the copies need from the memory the slots live in: a pool, or the shared cache's mapping."""

    #: Slot geometry.
    layout: SlotLayout
    #: Where the slots live (``"cpu"``, ``"cuda:0"``).
    device: str
    #: The framework of the slots' native views (the default framework of a new result).
    backend: str

    def overlaps(self, array: Any) -> bool:
        """Whether ``array`` shares memory with any slot."""
        ...


class _Sized(Protocol):
    @property
    def num_tokens(self) -> int: ...


Sized = TypeVar("Sized", bound=_Sized)


def spans(chain: Iterable[Sized]) -> Iterator[tuple[int, Sized]]:
    """Each chunk of a prefix (a cache entry or a KVObj) with the token offset where it starts."""
    start = 0
    for entry in chain:
        yield start, entry
        start += entry.num_tokens


def out_too_short(limit: int, num_tokens: int) -> ChunkShapeError:
    """The error of a ``retrieve`` whose ``out`` holds ``limit`` tokens when ``num_tokens`` match."""
    return ChunkShapeError(
        f"out holds {limit} tokens (dim 2) but {num_tokens} cached tokens match; pass an out with at "
        f"least {num_tokens} tokens"
    )


class ChunkCopies:
    """Copies between prompts and the chunk slots of one pool (or mapping); checks arrays first.

    Args:
        pool: where the slots live: the cache's pool, or any :class:`SlotMemory`.
    """

    def __init__(self, pool: SlotMemory) -> None:
        self._pool = pool
        self._layout = pool.layout
        #: Whether the slots are in host memory (numpy views of them exist).
        self.host = pool.device == "cpu"

    # -- checks ---------------------------------------------------------------------------------------
    def check_kv(self, kv: Any, num_tokens: int) -> Any:
        """Check a prompt's ``kv`` against the layout; return what to slice chunks from (a numpy view of
        host torch and JAX arrays on a CPU pool).

        Raises:
            ChunkShapeError, ChunkTypeError: not an array of ``(L, 2, num_tokens, H, D)`` and the pool's
                dtype, or not plain memory.
        """
        layout = self._layout
        shape = getattr(kv, "shape", None)
        if shape is not None and len(shape) == 5 and shape[2] != num_tokens:
            raise ChunkShapeError(
                f"kv has {shape[2]} tokens (dim 2 of shape {tuple(shape)}) but tokens has {num_tokens}; "
                "pass the KV of exactly these tokens"
            )
        framework = check_array(kv, layout.view_shape(num_tokens), layout, "kv")
        if framework == "torch" and self.host:
            # Host copies go through numpy: one copy loop for every framework, single-threaded, so the
            # bandwidth does not depend on torch's thread pool (which slows down on a busy machine).
            return host_array_of(kv, framework) if kv.device.type == "cpu" else kv
        if framework == "jax" and self.host:
            return host_array_of(kv, framework)  # JAX on the CPU: a view, not a copy
        return kv

    def check_framework(self, framework: str | None) -> str:
        """Return the framework of a new result array (default: the pool's backend).

        Raises:
            ConfigError: not a backend name.
            BackendUnavailableError: its framework is not installed.
        """
        if framework is None:
            return self._pool.backend
        if framework not in _FRAMEWORKS:
            raise ConfigError(f"framework must be one of {', '.join(_FRAMEWORKS)}, got {framework!r}")
        if framework != "numpy":
            load_adapter(framework)  # a missing framework raises here, before anything is pinned
        return framework

    def check_out(self, out: Any, framework: str | None) -> int:
        """Check ``out`` (all but its token count, which depends on the hit) and return its tokens.

        Raises:
            ChunkTypeError: not a writable numpy array or torch tensor.
            ChunkShapeError: another shape or dtype.
            ConfigError: ``framework`` differs from ``out``'s.
            OverlapError: ``out`` overlaps the pool's arena, or its elements overlap each other.
        """
        kind = framework_of(out)
        if kind not in ("numpy", "torch"):
            raise ChunkTypeError(
                f"out must be a writable numpy array or torch tensor, got a {type(out).__name__}; JAX "
                "arrays are immutable: use framework='jax' to get a new one"
            )
        if framework is not None and framework != kind:
            raise ConfigError(f"out is a {kind} array but framework={framework!r}; pass one or the other")
        shape = tuple(out.shape)
        if len(shape) != 5:
            raise ChunkShapeError(f"out must have 5 dims (L, 2, T, H, D), got shape {shape}")
        check_array(out, self._layout.view_shape(shape[2]), self._layout, "out")
        if kind == "numpy" and not out.flags.writeable:
            raise ChunkTypeError("out is a read-only numpy array; pass a writable one")
        if kind == "torch" and out.requires_grad:
            raise ChunkTypeError("out requires grad; pass a tensor that does not (or out.detach())")
        check_writable(out, kind, "out")
        if self._pool.overlaps(out):
            raise OverlapError(
                "out overlaps the cache's pool (a view of its arena or of a chunk): retrieving into it would "
                "overwrite cached chunks; pass an array with memory of its own"
            )
        return int(shape[2])

    # -- prompts to and from slots -----------------------------------------------------------------
    def filler(self, source: Any, start: int) -> Callable[[KVObj], bool]:
        """A function that copies tokens ``start ..`` of a checked ``source`` into a slot."""

        def fill(obj: KVObj) -> bool:
            self.copy_in(obj, source[:, :, start : start + obj.num_tokens])
            return True

        return fill

    def copy_in(self, obj: KVObj, piece: Any) -> None:
        """Copy ``piece`` (checked, the slot's shape) into ``obj``'s slot."""
        if self.host and isinstance(piece, np.ndarray):
            copy_engine.copy(obj.as_numpy(), piece)
        else:
            obj.copy_from(piece)

    def copy_out(self, obj: KVObj, dst: Any) -> None:
        """Copy ``obj``'s chunk into ``dst`` (a checked slice of an ``out`` or of a new array)."""
        if isinstance(dst, np.ndarray):
            if self.host:
                copy_engine.copy(dst, obj.as_numpy())
                return
            if not dst.flags.c_contiguous:  # device arenas copy into contiguous host memory only
                copy_engine.copy(dst, obj.clone("numpy"))
                return
        obj.copy_to(dst)

    def into_out(self, chain: Sequence[KVObj], out: Any) -> None:
        """Copy the chunks of a pinned prefix into ``out[:, :, :n]`` (checked by :meth:`check_out`)."""
        target = out
        if self.host and not isinstance(out, np.ndarray) and out.device.type == "cpu":
            target = host_array_of(out, "torch")  # a CPU tensor: write through numpy
        for start, obj in spans(chain):
            self.copy_out(obj, target[:, :, start : start + obj.num_tokens])

    def gather(self, chain: Sequence[KVObj], num_tokens: int, framework: str) -> Any:
        """Copy the chunks of a pinned prefix into a new contiguous array of ``framework`` (host, or the
        pool's device)."""
        layout = self._layout
        shape = layout.view_shape(num_tokens)
        if not self.host and framework != "numpy":
            views = [getattr(obj, f"as_{framework}")() for obj in chain]
            # Done on return: the slots are unpinned then.
            return load_adapter(framework).concat_tokens(views)
        spec = layout.dtype
        nbytes = layout.num_elems(num_tokens) * spec.itemsize
        raw = np.empty(nbytes + _OUTPUT_ALIGNMENT, dtype=np.uint8)
        start = (-raw.ctypes.data) % _OUTPUT_ALIGNMENT
        bits = raw[start : start + nbytes].view(spec.bits_dtype).reshape(shape)
        typed = bits.view(spec.numpy_dtype)
        for offset, obj in spans(chain):
            self.copy_out(obj, typed[:, :, offset : offset + obj.num_tokens])
        if framework == "numpy":
            return typed
        return load_adapter(framework).from_host(bits, spec)

    # -- slots to and from tiers ------------------------------------------------------------------
    def payload(self, obj: KVObj) -> np.ndarray:
        """The chunk's bytes as a C-contiguous host array: the slot itself on a CPU pool (no copy), a
        host copy of a device slot."""
        payload: np.ndarray = obj.as_numpy() if self.host else obj.clone("numpy")
        return payload

    def fill_from(self, obj: KVObj, read_into: Callable[[np.ndarray], bool]) -> bool:
        """Fill ``obj``'s slot with ``read_into(buffer)`` (a tier's read, True when the bytes are
        right): straight into the slot on a CPU pool, through a host buffer for a device slot."""
        if self.host:
            return read_into(obj.as_numpy())
        host = np.empty(self._layout.view_shape(obj.num_tokens), dtype=self._layout.dtype.numpy_dtype)
        if not read_into(host):
            return False
        obj.copy_from(host)
        return True


__all__ = ["ChunkCopies", "SlotMemory", "out_too_short", "spans"]
