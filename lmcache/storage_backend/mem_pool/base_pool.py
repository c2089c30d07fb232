"""The pool interface (:class:`BasePool`) and the handle it returns (:class:`KVObj`)."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, overload

if TYPE_CHECKING:
    from lmcache.storage_backend.mem_pool.local_pool import LocalPool


class KVObj:
    """A chunk's slot in a pool: its index, its size, and a view of its memory.

    Built by a pool's ``allocate``; ``KVObj(chunk_idx, size, data)`` also constructs one by hand (as in
    LMCache), but such an object belongs to no pool and every pool refuses to free it.

    Attributes:
        chunk_idx: the slot's index in the pool.
        size: bytes the object occupies in the pool (the slot stride, ``pool.size_per_chunk``).
        num_tokens: tokens the chunk holds (``data.shape[2]``).

    ``data`` is a contiguous ``(L, 2, num_tokens, H, D)`` array in the pool's framework that aliases the
    start of the slot. For JAX pools it is made on first access (importing a view costs tens of
    microseconds), then kept. ``as_numpy()``, ``as_torch()``, ``as_jax()`` and the DLPack protocol give
    the same memory to any framework without a copy.

    A KVObj is a handle: once freed, its slot can go to another owner. Its conversions and copies then
    raise :class:`~lmcache.errors.InvalidHandleError`; arrays obtained earlier still point at the slot's
    memory (valid memory, but no longer yours).
    """

    # ``data`` is a plain slot, read at C speed; left unset, __getattr__ makes the view on first access.
    __slots__ = {
        "_generation": "The ticket the slot was handed out with (see ChunkAllocator).",
        "_pool": "The pool that allocated this object, or None.",
        "_views": "Views in other frameworks, made on first use.",
        "chunk_idx": "The slot's index in the pool.",
        "data": "The chunk as a contiguous (L, 2, num_tokens, H, D) array of the pool's framework.",
        "num_tokens": "Tokens the chunk holds (data.shape[2]).",
        "size": "Bytes the object occupies in the pool: the slot stride, pool.size_per_chunk.",
    }
    _views: dict[str, Any]
    data: Any

    def __init__(
        self,
        chunk_idx: int,
        size: int,
        data: Any = None,
        num_tokens: int | None = None,
        pool: LocalPool | None = None,
        generation: int = 0,
    ) -> None:
        self.chunk_idx = chunk_idx
        self.size = size
        if data is not None or pool is None:
            self.data = data
        if num_tokens is None:
            num_tokens = int(data.shape[2]) if data is not None else 0
        self.num_tokens: int = num_tokens
        self._pool = pool
        self._generation = generation
        # _views (conversions to other frameworks) is set on first use: most objects never need it.

    def __getattr__(self, name: str) -> Any:
        # Called only for unset slots: ``data`` of a pool's object whose view is not made yet.
        if name == "data":
            data = self.data = self._pool._native_view(self)  # type: ignore[union-attr]
            return data
        raise AttributeError(f"'KVObj' object has no attribute {name!r}")

    @property
    def pool(self) -> LocalPool | None:
        """The pool that allocated this object, or None for a hand-built one."""
        return self._pool

    @property
    def is_live(self) -> bool:
        """Whether this object still owns its slot (allocated and not yet freed)."""
        pool = self._pool
        return pool is not None and pool._is_live(self)

    def as_numpy(self) -> Any:
        """Return the chunk as a numpy array aliasing the slot (bf16 / fp8 as ml_dtypes types).

        Raises:
            InvalidHandleError: the object was freed or belongs to no pool.
            ChunkTypeError: the slot is in device memory (copy it out with :meth:`clone` instead).
        """
        return self._owner()._export(self, "numpy")

    def as_torch(self) -> Any:
        """Return the chunk as a ``torch.Tensor`` aliasing the slot (no copy)."""
        return self._owner()._export(self, "torch")

    def as_jax(self) -> Any:
        """Return the chunk as a ``jax.Array`` aliasing the slot (no copy).

        JAX runs work asynchronously: before this chunk is freed or overwritten, wait for every
        computation that reads the view (``out.block_until_ready()``, or ``pool.free(obj, wait_for=out)``).
        """
        return self._owner()._export(self, "jax")

    def copy_from(self, src: Any) -> None:
        """Copy ``src`` (numpy, torch, JAX or any DLPack producer, on any device) into the slot.

        ``src`` must have exactly this object's shape and the pool's dtype. Returns when the bytes are
        in the slot.
        """
        self._owner()._copy_from(self, src)

    def copy_to(self, dst: Any) -> None:
        """Copy the chunk into the writable array ``dst`` (numpy, or torch on any device)."""
        self._owner()._copy_to(self, dst)

    def clone(self, framework: str | None = None) -> Any:
        """Return an owning copy of the chunk in ``framework`` (default: the pool's), ready to use."""
        return self._owner()._clone(self, framework)

    def __dlpack__(
        self,
        *,
        stream: Any = None,
        max_version: tuple[int, int] | None = None,
        dl_device: tuple[int, int] | None = None,
        copy: bool | None = None,
    ) -> Any:
        """Export the chunk through DLPack (so ``torch.from_dlpack(obj)`` and friends work)."""
        from lmcache.dlpack import export

        producer = self._owner()._dlpack_producer(self)
        return export(producer, stream=stream, max_version=max_version, dl_device=dl_device, copy=copy)

    def __dlpack_device__(self) -> tuple[int, int]:
        """Return the DLPack ``(device_type, device_id)`` of the slot's memory."""
        return self._owner()._dlpack_producer(self).__dlpack_device__()  # type: ignore[no-any-return]

    def _owner(self) -> LocalPool:
        pool = self._pool
        if pool is None:
            from lmcache.errors import ForeignHandleError

            raise ForeignHandleError(
                "this KVObj was built by hand and belongs to no pool; get KVObjs from pool.allocate()"
            )
        pool._check_live(self)
        return pool

    def __repr__(self) -> str:
        state = "live" if self.is_live else ("unowned" if self._pool is None else "freed")
        return f"KVObj(chunk_idx={self.chunk_idx}, size={self.size}, num_tokens={self.num_tokens}, {state})"


class KVBatch(Sequence[KVObj]):
    """The result of ``allocate_batch``: a sequence of :class:`KVObj`, one per chunk, in order.

    A batch holds its slots as two plain lists (``chunk_idx``, ``num_tokens``) and a run of tickets, and
    builds each KVObj the first time it is indexed or iterated (then keeps it). So a batch that is
    handed to ``free_batch`` untouched, or addressed by ``chunk_idx`` (as jitted JAX code over
    ``pool.arena`` does), costs no per-chunk Python objects at all.

    Its KVObjs are ordinary handles: free them one by one, or the whole batch with ``free_batch``
    (which then checks every slot, like freeing each KVObj).
    """

    __slots__ = ("_objs", "_pool", "_size", "_ticket0", "chunk_idx", "num_tokens")

    def __init__(
        self, pool: LocalPool, chunk_idx: list[int], num_tokens: list[int], first_ticket: int, size: int
    ) -> None:
        self._pool = pool
        #: Slot index of each chunk, in the order of ``allocate_batch``'s input.
        self.chunk_idx = chunk_idx
        #: Tokens of each chunk.
        self.num_tokens = num_tokens
        self._ticket0 = first_ticket
        self._size = size
        self._objs: list[KVObj | None] | None = None

    def __len__(self) -> int:
        return len(self.chunk_idx)

    @overload
    def __getitem__(self, index: int) -> KVObj: ...

    @overload
    def __getitem__(self, index: slice) -> list[KVObj]: ...

    def __getitem__(self, index: int | slice) -> KVObj | list[KVObj]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        objs = self._objs
        if objs is None:
            objs = self._objs = [None] * len(self.chunk_idx)
        obj = objs[index]
        if obj is None:
            position = range(len(objs))[index]  # raises IndexError like a list
            obj = objs[index] = self._pool._handle(
                self.chunk_idx[position], self.num_tokens[position], self._ticket0 + position
            )
        return obj

    @property
    def generations(self) -> range:
        """The generation (ticket) of each chunk's slot: what ``free_batch`` checks."""
        return range(self._ticket0, self._ticket0 + len(self.chunk_idx))

    def __repr__(self) -> str:
        return f"KVBatch({len(self)} chunks, chunk_idx={self.chunk_idx[:8]}{'...' if len(self) > 8 else ''})"


class BasePool(abc.ABC):
    """Interface of a memory pool: hand out slots for KV chunks, take them back."""

    @abc.abstractmethod
    def allocate(self, kv_chunk: Any) -> KVObj | None:
        """Allocate a slot for ``kv_chunk`` and return a :class:`KVObj` viewing it.

        Args:
            kv_chunk: the KV tensor to be stored; only its shape (and dtype) are read.

        Returns:
            A KVObj whose ``data`` is a view of the slot, or None if the pool is full.

        Note:
            This does not perform the actual memory movement: copy into ``kv_obj.data`` (or use
            ``put``) afterwards.
        """

    @abc.abstractmethod
    def free(self, kv_obj: KVObj) -> None:
        """Free the slot of ``kv_obj`` so that it can be allocated again."""


__all__ = ["BasePool", "KVBatch", "KVObj"]
