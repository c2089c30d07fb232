"""The pool interface (:class:`BasePool`) and the handles it returns (:class:`KVObj`, :class:`KVBatch`)."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, NoReturn, Protocol, overload


class ChunkOwner(Protocol):
    """What a handle needs from the pool that issued it; private to the handle types.

    Every method that reaches a slot's memory takes the handle itself and checks that it owns its slot
    (not a slot index), so nothing here is a way around handles: without the live handle of a slot, no
    caller can view, write or copy it. The pool reads only a handle's public identity (``chunk_idx``,
    ``num_tokens``, ``generation``). :class:`~lmcache.storage_backend.mem_pool.local_pool.LocalPool`
    implements it.
    """

    #: Bytes per slot (``KVObj.size`` of the handles it issues).
    size_per_chunk: int

    def check_handle(self, slot: int, generation: int) -> None:
        """Raise the reason (stale, double free, edited, closed) unless the handle owns ``slot``."""
        ...

    def handle_is_live(self, slot: int, generation: int) -> bool:
        """Whether the handle ``(slot, generation)`` owns its slot now."""
        ...

    def _view_of(self, handle: KVObj, framework: str | None) -> Any:
        """Return a view of the handle's chunk whose object state belongs to the caller alone."""
        ...

    def _first_view(self, slot: int, generation: int, num_tokens: int) -> Any:
        """Return the owner's-framework view of the chunk of the handle ``(slot, generation)``, checked as
        :meth:`check_handle` does; ``KVObj.data``'s first access calls it with the handle's own identity
        (one call on allocate's hot path, where ``_view_of`` reads the handle back)."""
        ...

    def _producer_of(self, handle: KVObj) -> Any:
        """Return a DLPack producer of the handle's chunk."""
        ...

    def _copy_into(self, handle: KVObj, src: Any) -> None:
        """Check ``src`` completely, then copy it into the handle's chunk."""
        ...

    def _copy_out_of(self, handle: KVObj, dst: Any) -> None:
        """Check ``dst``, then copy the handle's chunk into it."""
        ...

    def _clone_of(self, handle: KVObj, framework: str | None) -> Any:
        """Return an owning copy of the handle's chunk in ``framework`` (default: the pool's)."""
        ...


def _refuse_pickle(what: str) -> NoReturn:
    from lmcache.errors import NotPicklableError

    raise NotPicklableError(
        f"a {what} is a handle to pool memory and cannot be pickled or copied: a copy would be a second "
        "owner of the slot. Send the bytes instead (kv_obj.clone('numpy')), or share the pool's memory "
        "(pool.base_address, pool.slot_address(i))"
    )


class KVObj:
    """A chunk's slot in a pool: its index, its size, and a view of its memory.

    Built by a pool's ``allocate``; ``KVObj(chunk_idx, size, data)`` also constructs one by hand (as in
    LMCache), but such an object belongs to no pool and every pool refuses to free it.

    Attributes:
        chunk_idx: the slot's index in the pool (read-only).
        size: bytes the object occupies in the pool (the slot stride, ``pool.size_per_chunk``).
        num_tokens: tokens the chunk holds (``data.shape[2]``; read-only).
        generation: the ticket the slot was handed out with (0 for a hand-built object).

    ``data`` is a contiguous ``(L, 2, num_tokens, H, D)`` array in the pool's framework that aliases the
    start of the slot. It is made on first access and belongs to this handle alone: what one owner does
    to its view object (reshaping it in place, ``requires_grad``, ``set_``, deleting a JAX array) never
    reaches the next owner of the slot. ``as_numpy()``, ``as_torch()``, ``as_jax()`` and the DLPack
    protocol give the same memory to any framework without a copy.

    A KVObj is a handle: once freed, its slot can go to another owner. Every way to reach the memory
    through it (``data`` included) then raises :class:`~lmcache.errors.InvalidHandleError`; arrays
    obtained earlier still point at the slot's memory (valid memory, but no longer yours). Handles cannot
    be pickled or copied (a copy would be a second owner).
    """

    __slots__ = {
        "_chunk_idx": "The slot's index in the pool.",
        "_data": "The native view, made on first access (or what a hand-built object was given).",
        "_generation": "The ticket the slot was handed out with (see ChunkAllocator); 0 if hand-built.",
        "_num_tokens": "Tokens the chunk holds.",
        "_pool": "The pool that allocated this object, or None.",
        "_size": "Bytes the object occupies in the pool: the slot stride.",
        "_views": "Views in other frameworks, made on first use.",
    }
    _views: dict[str, Any]

    def __init__(self, chunk_idx: int, size: int, data: Any = None, num_tokens: int | None = None) -> None:
        """Build a handle by hand (as LMCache does): it belongs to no pool, and every pool refuses it."""
        self._chunk_idx = chunk_idx
        self._size = size
        self._data = data
        if num_tokens is None:
            num_tokens = int(data.shape[2]) if data is not None else 0
        self._num_tokens: int = num_tokens
        self._pool: ChunkOwner | None = None
        self._generation = 0
        # _views (conversions to other frameworks) is set on first use: most objects never need it.

    @classmethod
    def _issue(cls, owner: ChunkOwner, slot: int, num_tokens: int, generation: int) -> KVObj:
        """The handle of a slot that ``owner``'s allocator handed out with ``generation`` (for pools and
        batches only: a handle built from another handle's identity would be a second owner)."""
        obj = cls.__new__(cls)
        obj._chunk_idx = slot
        obj._size = owner.size_per_chunk
        obj._data = None
        obj._num_tokens = num_tokens
        obj._pool = owner
        obj._generation = generation
        return obj

    @property
    def chunk_idx(self) -> int:
        """The slot's index in the pool."""
        return self._chunk_idx

    @property
    def size(self) -> int:
        """Bytes the object occupies in the pool: the slot stride, ``pool.size_per_chunk``."""
        return self._size

    @property
    def num_tokens(self) -> int:
        """Tokens the chunk holds (``data.shape[2]``)."""
        return self._num_tokens

    @property
    def generation(self) -> int:
        """The ticket the slot was handed out with: what the pool checks on every use (0: hand-built)."""
        return self._generation

    @property
    def data(self) -> Any:
        """The chunk as a contiguous ``(L, 2, num_tokens, H, D)`` array of the pool's framework.

        Raises:
            InvalidHandleError: the object was freed (its slot may belong to another owner now).
        """
        pool = self._pool
        if pool is None:
            return self._data
        data = self._data
        if data is None:  # the first access: the pool checks the handle's identity
            data = self._data = pool._first_view(self._chunk_idx, self._generation, self._num_tokens)
        else:
            pool.check_handle(self._chunk_idx, self._generation)
        return data

    @property
    def pool(self) -> ChunkOwner | None:
        """The pool that allocated this object, or None for a hand-built one."""
        return self._pool

    @property
    def is_live(self) -> bool:
        """Whether this object still owns its slot (allocated and not yet freed)."""
        pool = self._pool
        return pool is not None and pool.handle_is_live(self._chunk_idx, self._generation)

    def _identity_in(self, owner: object) -> tuple[int, int] | None:
        """``(chunk_idx, generation)`` if ``owner`` issued this handle, else None: what a pool's ``free``
        reads, in one call."""
        return (self._chunk_idx, self._generation) if self._pool is owner else None

    def _owner(self) -> ChunkOwner:
        """The issuing pool (which checks this handle on every use); hand-built objects have none."""
        pool = self._pool
        if pool is None:
            from lmcache.errors import ForeignHandleError

            raise ForeignHandleError(
                "this KVObj was built by hand and belongs to no pool; get KVObjs from pool.allocate()"
            )
        return pool

    def _export(self, framework: str) -> Any:
        pool = self._owner()
        pool.check_handle(self._chunk_idx, self._generation)
        views = getattr(self, "_views", None)
        if views is None:
            views = self._views = {}
        view = views.get(framework)
        if view is None:
            view = views[framework] = pool._view_of(self, framework)
        return view

    def as_numpy(self) -> Any:
        """Return the chunk as a numpy array aliasing the slot (bf16 / fp8 as ml_dtypes types).

        Raises:
            InvalidHandleError: the object was freed or belongs to no pool.
            ChunkTypeError: the slot is in device memory (copy it out with :meth:`clone` instead).
        """
        return self._export("numpy")

    def as_torch(self) -> Any:
        """Return the chunk as a ``torch.Tensor`` aliasing the slot (no copy)."""
        return self._export("torch")

    def as_jax(self) -> Any:
        """Return the chunk as a ``jax.Array`` aliasing the slot (no copy).

        JAX runs work asynchronously: before this chunk is freed or overwritten, wait for every
        computation that reads the view (``out.block_until_ready()``, or ``pool.free(obj, wait_for=out)``).
        """
        return self._export("jax")

    def copy_from(self, src: Any) -> None:
        """Copy ``src`` (numpy, torch, JAX or any DLPack producer, on any device) into the slot.

        ``src`` must have exactly this object's shape and the pool's dtype; it may overlap the slot.
        It is checked completely before any byte is written. Returns when the bytes are in the slot.
        """
        self._owner()._copy_into(self, src)

    def copy_to(self, dst: Any) -> None:
        """Copy the chunk into the writable array ``dst`` (numpy, or torch on any device)."""
        self._owner()._copy_out_of(self, dst)

    def clone(self, framework: str | None = None) -> Any:
        """Return an owning copy of the chunk in ``framework`` (default: the pool's), ready to use."""
        return self._owner()._clone_of(self, framework)

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

        producer = self._owner()._producer_of(self)
        return export(producer, stream=stream, max_version=max_version, dl_device=dl_device, copy=copy)

    def __dlpack_device__(self) -> tuple[int, int]:
        """Return the DLPack ``(device_type, device_id)`` of the slot's memory."""
        producer = self._owner()._producer_of(self)
        return producer.__dlpack_device__()  # type: ignore[no-any-return]

    def __reduce_ex__(self, protocol: Any) -> Any:
        if self._pool is not None:
            _refuse_pickle("KVObj from a pool")
        return (KVObj, (self._chunk_idx, self._size, self._data, self._num_tokens))

    def __repr__(self) -> str:
        state = "live" if self.is_live else ("unowned" if self._pool is None else "freed")
        return (
            f"KVObj(chunk_idx={self._chunk_idx}, size={self._size}, num_tokens={self._num_tokens}, {state})"
        )


class KVBatch(Sequence[KVObj]):
    """The result of ``allocate_batch``: a sequence of :class:`KVObj`, one per chunk, in order.

    A batch holds its slots as two tuples (``chunk_idx``, ``num_tokens``) and a run of tickets, and builds
    each KVObj the first time it is indexed or iterated (then keeps it). So a batch that is handed to
    ``free_batch`` untouched, or addressed by ``chunk_idx`` (as jitted JAX code over ``pool.arena``
    does), costs no per-chunk Python objects at all. Its identity cannot be edited: the tuples are
    immutable and ``free_batch`` checks every slot against the ticket it was handed out with.

    Its KVObjs are ordinary handles: free them one by one, or the whole batch with ``free_batch``
    (which then checks every slot, like freeing each KVObj).
    """

    __slots__ = ("_chunk_idx", "_num_tokens", "_objs", "_pool", "_ticket0")
    _pool: ChunkOwner
    _chunk_idx: tuple[int, ...]
    _num_tokens: tuple[int, ...]
    _ticket0: int
    _objs: list[KVObj | None] | None

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise TypeError(
            "a KVBatch is made by pool.allocate_batch(chunks); it cannot be built by hand (a batch built "
            "from other handles' slots and tickets would be a second owner of them)"
        )

    @classmethod
    def _issue(
        cls, pool: ChunkOwner, chunk_idx: Sequence[int], num_tokens: Sequence[int], first_ticket: int
    ) -> KVBatch:
        """The batch of slots ``pool``'s allocator handed out with tickets ``first_ticket, ...`` (for
        pools only)."""
        batch = cls.__new__(cls)
        batch._pool = pool
        batch._chunk_idx = tuple(chunk_idx)
        batch._num_tokens = tuple(num_tokens)
        batch._ticket0 = first_ticket
        batch._objs = None
        return batch

    @property
    def pool(self) -> ChunkOwner:
        """The pool that allocated the batch."""
        return self._pool

    @property
    def chunk_idx(self) -> tuple[int, ...]:
        """Slot index of each chunk, in the order of ``allocate_batch``'s input."""
        return self._chunk_idx

    @property
    def num_tokens(self) -> tuple[int, ...]:
        """Tokens of each chunk."""
        return self._num_tokens

    @property
    def generations(self) -> range:
        """The generation (ticket) of each chunk's slot: what ``free_batch`` checks."""
        return range(self._ticket0, self._ticket0 + len(self._chunk_idx))

    def __len__(self) -> int:
        return len(self._chunk_idx)

    @overload
    def __getitem__(self, index: int) -> KVObj: ...

    @overload
    def __getitem__(self, index: slice) -> list[KVObj]: ...

    def __getitem__(self, index: int | slice) -> KVObj | list[KVObj]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        objs = self._objs
        if objs is None:
            objs = self._objs = [None] * len(self._chunk_idx)
        obj = objs[index]
        if obj is None:
            position = range(len(objs))[index]  # raises IndexError like a list
            obj = objs[index] = KVObj._issue(
                self._pool, self._chunk_idx[position], self._num_tokens[position], self._ticket0 + position
            )
        return obj

    def __reduce_ex__(self, protocol: Any) -> Any:
        _refuse_pickle("KVBatch")

    def __repr__(self) -> str:
        more = "..." if len(self) > 8 else ""
        return f"KVBatch({len(self)} chunks, chunk_idx={list(self._chunk_idx[:8])}{more})"


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


__all__ = ["BasePool", "ChunkOwner", "KVBatch", "KVObj"]
