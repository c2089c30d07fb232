"""A client's view of the server's arena: its mapping as an arena of the client's framework, and the
:class:`~lmcache.storage_backend.mem_pool.KVObj` handles through which the client reads leased chunks
and fills reserved ones.

:class:`MappedSlots` is the owner (the ``ChunkOwner`` protocol, through
:class:`~lmcache.arena_owner.ArenaOwner`) of every handle the client makes: a handle is live while the
lease or reservation it belongs to is held on a live connection. Once the lease is released, the store
committed, or the connection lost, every way to reach the slot through the handle raises
:class:`~lmcache.errors.StaleHandleError`: the server may have given the slot to another chunk.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from lmcache.arena_owner import ArenaOwner
from lmcache.checks import ChunkChecker
from lmcache.errors import ForeignHandleError, StaleHandleError
from lmcache.layout import SlotLayout
from lmcache.memory import MemoryExtent
from lmcache.registry import load_adapter
from lmcache.storage_backend.mem_pool.base_pool import KVObj


class MappedSlots(ArenaOwner):
    """The server's arena as this client maps it, and the handles of what this client holds.

    Args:
        layout: the server's slot layout.
        num_slots: slots in the arena.
        memory: the client's mapping of the arena (``uint8``, ``num_slots * layout.slot_bytes``).
        backend: the framework of the client's views (numpy, torch or JAX).
        pin_memory: page-lock the mapping for device copies (torch with CUDA: exactly its bytes, with
            ``cudaHostRegister``); None: as a pool of ``backend`` would.
    """

    #: Where the slots live (for :class:`~lmcache.cache_copies.ChunkCopies`).
    device = "cpu"

    def __init__(
        self, layout: SlotLayout, num_slots: int, memory: np.ndarray, backend: str, pin_memory: bool | None
    ) -> None:
        self.layout = layout
        self.num_slots = num_slots
        self.backend = backend
        self.size_per_chunk = layout.slot_bytes
        self._arena = load_adapter(backend).create_arena(
            layout, num_slots, device="cpu", pin_memory=pin_memory, memory=memory
        )
        self._checker = ChunkChecker(layout, backend)
        base = self._arena.base_address
        self._extent = MemoryExtent("cpu", base, base + num_slots * layout.slot_bytes, False)
        self._live: set[tuple[int, int]] = set()  # (slot, ticket) of every live handle
        self._tickets = itertools.count(1)
        self._revoked = False

    # -- handles -----------------------------------------------------------------------------------------
    def issue(self, chunks: Iterable[tuple[int, int]]) -> list[KVObj]:
        """Make a live handle for each ``(slot, num_tokens)`` (a lease's chunks, a reservation's slots);
        none when this view was revoked."""
        if self._revoked:
            return []
        handles = []
        for slot, num_tokens in chunks:
            ticket = next(self._tickets)
            self._live.add((slot, ticket))
            handles.append(KVObj._issue(self, slot, num_tokens, ticket))
        return handles

    def drop(self, handles: Sequence[KVObj]) -> None:
        """End the handles (their lease was released or their store committed)."""
        for handle in handles:
            self._live.discard((handle.chunk_idx, handle.generation))

    def revoke(self) -> None:
        """End every handle, now and to come (the connection is gone: the server released them all)."""
        self._revoked = True
        self._live.clear()

    @property
    def revoked(self) -> bool:
        """Whether :meth:`revoke` was called."""
        return self._revoked

    # -- ChunkOwner -------------------------------------------------------------------------------------
    def check_handle(self, slot: int, generation: int) -> None:
        """Raise :class:`StaleHandleError` unless the handle ``(slot, generation)`` is live."""
        if (slot, generation) not in self._live:
            raise StaleHandleError(
                f"the chunk in slot {slot} is no longer held: its lease was released, its store "
                "committed, or the connection to the cache server was lost (the slot may hold another "
                "chunk now); take a new lease"
            )

    def handle_is_live(self, slot: int, generation: int) -> bool:
        """Whether the handle ``(slot, generation)`` is live."""
        return (slot, generation) in self._live

    def _live_slot(self, handle: KVObj) -> int:
        if handle.pool is not self:
            raise ForeignHandleError("this KVObj belongs to another pool or connection, not to this one")
        self.check_handle(handle.chunk_idx, handle.generation)
        return handle.chunk_idx

    # -- the arena --------------------------------------------------------------------------------------
    def whole(self) -> Any:
        """The whole mapping as one native ``(num_slots, slot_elems)`` array of the client's framework."""
        return self._arena.whole()

    @property
    def base_address(self) -> int:
        """The mapping's address in this process."""
        return self._arena.base_address

    @property
    def pinned(self) -> bool:
        """Whether the mapping is page-locked."""
        return self._arena.pinned

    def close(self) -> None:
        """Revoke every handle and release the pinning; views taken earlier stay valid memory."""
        self.revoke()
        self._arena.close()

    def __repr__(self) -> str:
        return f"MappedSlots({self.num_slots} slots, {self.backend}, {len(self._live)} held)"


__all__ = ["MappedSlots"]
