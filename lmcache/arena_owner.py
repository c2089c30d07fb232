"""Serving handles from one arena: the views and copies behind every :class:`KVObj` method.

:class:`ArenaOwner` implements the private half of the
:class:`~lmcache.storage_backend.mem_pool.base_pool.ChunkOwner` protocol (views, DLPack producers and
copies of a handle's chunk) over one arena, given how its subclass checks a handle
(:meth:`ArenaOwner._live_slot`). Two owners use it: :class:`~lmcache.storage_backend.mem_pool.LocalPool`
(whose allocator says which handles are live) and the shared cache's client
(:mod:`lmcache.shared`, whose leases and reservations say so). Every method checks the handle first, so
nobody without a live handle reaches a slot's memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmcache.arena import Arena
from lmcache.checks import ChunkChecker
from lmcache.errors import OverlapError
from lmcache.memory import MemoryExtent
from lmcache.registry import detect_framework, load_adapter

if TYPE_CHECKING:  # the handle type's module imports the pools, which import this module
    from lmcache.storage_backend.mem_pool.base_pool import KVObj


class ArenaOwner:
    """Views and copies of the chunks of live handles, over one arena.

    Subclasses set ``backend`` (the framework of ``KVObj.data``), ``size_per_chunk``, ``_arena``,
    ``_checker`` (argument checks for the arena's layout) and ``_extent`` (the arena's bytes, for
    overlap checks), and implement :meth:`_live_slot` and :meth:`check_handle`.
    """

    backend: str
    size_per_chunk: int
    _arena: Arena
    _checker: ChunkChecker
    _extent: MemoryExtent

    def _live_slot(self, handle: KVObj) -> int:
        """Return the slot of ``handle`` after checking that this owner issued it and it is live."""
        raise NotImplementedError

    # -- what handles need (ChunkOwner's private half) -------------------------------------------------
    def _view_of(self, handle: KVObj, framework: str | None) -> Any:
        """Return a view of the handle's chunk in ``framework`` (None: the owner's), the caller's alone."""
        slot = self._live_slot(handle)
        if framework is None or framework == self.backend:
            return self._arena.view(slot, handle.num_tokens)
        return self._arena.export(slot, handle.num_tokens, framework)

    def _first_view(self, slot: int, generation: int, num_tokens: int) -> Any:
        """Return the view of the chunk of the live handle ``(slot, generation)`` (``KVObj.data``)."""
        self.check_handle(slot, generation)
        return self._arena.view(slot, num_tokens)

    def check_handle(self, slot: int, generation: int) -> None:
        """Raise the reason unless the handle ``(slot, generation)`` owns its slot."""
        raise NotImplementedError

    def _producer_of(self, handle: KVObj) -> Any:
        """Return a DLPack producer of the handle's chunk."""
        return self._arena.dlpack_producer(self._live_slot(handle), handle.num_tokens)

    def _copy_into(self, handle: KVObj, src: Any) -> None:
        """Check ``src`` completely, then copy it into the handle's chunk."""
        slot = self._live_slot(handle)
        framework, array, _ = self._checker.source(src, handle.num_tokens, "copy_from source")
        self._arena.copy_in(slot, handle.num_tokens, array, framework)

    def _copy_out_of(self, handle: KVObj, dst: Any) -> None:
        """Check ``dst`` (it may not overlap another slot of the arena), then copy the chunk into it."""
        slot = self._live_slot(handle)
        framework = self._checker.destination(dst, handle.num_tokens)
        self._refuse_overlap(dst, "copy_to destination", allowed=slot)
        self._arena.copy_out(slot, handle.num_tokens, dst, framework)

    def _clone_of(self, handle: KVObj, framework: str | None) -> Any:
        """Return an owning copy of the handle's chunk in ``framework`` (default: the owner's)."""
        return self._arena.clone(self._live_slot(handle), handle.num_tokens, framework or self.backend)

    # -- overlap -----------------------------------------------------------------------------------------
    def overlaps(self, array: Any) -> bool:
        """Whether ``array``'s elements share memory with this arena (any slot, in use or free).

        Writing into such an array writes past the handles into chunks that others own: layers that
        write into arrays they are given (a cache's ``retrieve(out=...)``, a paged load) refuse them.
        False for arrays whose framework does not say where their memory is.
        """
        framework = detect_framework(array)
        if framework is None:
            return False
        extent = load_adapter(framework).memory_extent(array)
        return extent is not None and extent.overlaps(self._extent)

    def _refuse_overlap(self, array: Any, what: str, *, allowed: int) -> None:
        """Raise :class:`OverlapError` if ``array`` shares memory with any slot but ``allowed``."""
        framework = detect_framework(array)
        extent = None if framework is None else load_adapter(framework).memory_extent(array)
        if extent is None or not extent.overlaps(self._extent):
            return
        start = self._extent.start + allowed * self.size_per_chunk
        if not extent.within(start, start + self.size_per_chunk):
            raise OverlapError(
                f"{what} overlaps other slots of this pool: writing it would change chunks that other "
                "handles own; copy between chunks with target.copy_from(kv_obj), or pass memory of your own"
            )


__all__ = ["ArenaOwner"]
