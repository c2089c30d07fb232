"""Loans: access to slots someone else owns, through handles that cannot free them and that end.

A chunk cache owns its slots, but hands them to others: a lease's readers (``Lease.chunks``) and a
caller that fills a pending store (``PendingStore.slots``). Handing out the cache's own handles would let
a reader free a cached chunk's slot (``pool.free`` accepts any live handle of the pool), or write into a
chunk after it was published. A :class:`ChunkLoan` issues handles of its own instead: ordinary
:class:`~lmcache.storage_backend.mem_pool.KVObj` objects (``data``, ``as_torch()``, ``as_jax()``,
DLPack, ``copy_to``, ``clone``) whose owner is the loan, not the pool. So

* the pool refuses to free or reissue them (they are not its handles);
* a read-only loan refuses ``copy_from`` and gives numpy views that are not writeable;
* once the loan ends (the lease is released, the store committed or aborted) every use raises
  :class:`~lmcache.errors.StaleHandleError`, as for a freed handle.

Each use is checked twice: against the loan, then, through the owner's handle, against the pool.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmcache.errors import ReadOnlyHandleError, StaleHandleError
from lmcache.storage_backend.mem_pool.base_pool import ChunkOwner, KVObj

_SERIALS = itertools.count(1)  # every loan's handles carry a ticket no other loan uses


class ChunkLoan:
    """Lent access to ``handles`` (live handles of one owner, which keeps them): :attr:`handles` are the
    loan's own, one per lent handle, in order.

    Args:
        handles: the owner's handles to lend (they must stay live until :meth:`end`).
        writable: whether borrowers may write the chunks (``copy_from``); read-only loans also give
            read-only numpy views.
        purpose: what the loan is for, in messages (``"lease"``, ``"pending store"``).
    """

    __slots__ = ("_lent", "_lock", "_open", "_purpose", "_ticket", "_writable", "handles", "size_per_chunk")

    def __init__(self, handles: Sequence[KVObj], *, writable: bool, purpose: str) -> None:
        self._lent: dict[int, KVObj] = {obj.chunk_idx: obj for obj in handles}
        self._writable = writable
        self._purpose = purpose
        self._ticket = next(_SERIALS)
        self._open = True
        self._lock = threading.Lock()
        #: Bytes per slot, as the owner's handles report.
        self.size_per_chunk = handles[0].size if handles else 0
        #: The loan's handles, in the order of the lent ones.
        self.handles: list[KVObj] = [
            KVObj._issue(self, obj.chunk_idx, obj.num_tokens, self._ticket) for obj in handles
        ]

    @property
    def open(self) -> bool:
        """Whether the loan's handles may still be used."""
        return self._open

    def end(self) -> None:
        """End the loan: every handle it issued goes stale. Calling it again does nothing."""
        with self._lock:
            self._open = False

    # -- what its handles need (ChunkOwner) ---------------------------------------------------------
    def check_handle(self, slot: int, generation: int) -> None:
        """Raise unless the loan is open and issued the handle ``(slot, generation)``."""
        if not self.handle_is_live(slot, generation):
            raise StaleHandleError(
                f"this KVObj was lent by a {self._purpose} that has ended (released, committed or "
                "aborted): the slot may hold another chunk now; take a new lease"
            )

    def handle_is_live(self, slot: int, generation: int) -> bool:
        """Whether the handle ``(slot, generation)`` is this open loan's."""
        return self._open and generation == self._ticket and slot in self._lent

    def _owner_handle(self, handle: KVObj) -> tuple[ChunkOwner, KVObj]:
        if handle.pool is not self:
            raise StaleHandleError(f"this KVObj was not lent by this {self._purpose}")
        self.check_handle(handle.chunk_idx, handle.generation)
        return self._lent_owner(handle.chunk_idx)

    def _view_of(self, handle: KVObj, framework: str | None) -> Any:
        owner, lent = self._owner_handle(handle)
        return self._lent_view(owner, lent, framework)

    def _first_view(self, slot: int, generation: int, num_tokens: int) -> Any:
        self.check_handle(slot, generation)
        owner, lent = self._lent_owner(slot)
        return self._lent_view(owner, lent, None)

    def _lent_owner(self, slot: int) -> tuple[ChunkOwner, KVObj]:
        lent = self._lent[slot]
        owner = lent.pool
        if owner is None:  # a loan lends only pool handles
            raise StaleHandleError(f"the {self._purpose}'s slot has no pool")
        return owner, lent

    def _lent_view(self, owner: ChunkOwner, lent: KVObj, framework: str | None) -> Any:
        view = owner._view_of(lent, framework)
        if not self._writable and isinstance(view, np.ndarray):
            view.flags.writeable = False
        return view

    def _producer_of(self, handle: KVObj) -> Any:
        owner, lent = self._owner_handle(handle)
        return owner._producer_of(lent)

    def _copy_into(self, handle: KVObj, src: Any) -> None:
        owner, lent = self._owner_handle(handle)
        if not self._writable:
            raise ReadOnlyHandleError(
                f"a {self._purpose}'s chunks are read-only: the cache owns them and other readers share "
                "them; copy out (kv_obj.clone() or copy_to) to change a copy of your own"
            )
        owner._copy_into(lent, src)

    def _copy_out_of(self, handle: KVObj, dst: Any) -> None:
        owner, lent = self._owner_handle(handle)
        owner._copy_out_of(lent, dst)

    def _clone_of(self, handle: KVObj, framework: str | None) -> Any:
        owner, lent = self._owner_handle(handle)
        return owner._clone_of(lent, framework)

    def __repr__(self) -> str:
        state = "open" if self._open else "ended"
        return f"ChunkLoan({self._purpose}, {len(self._lent)} chunks, {state})"


__all__ = ["ChunkLoan"]
