"""``"lru"``: least recently used first (leaf-restricted by the index, as every policy)."""

from __future__ import annotations

from collections import OrderedDict


class LRUPolicy:
    """Evicts the candidate used least recently.

    The cache touches a prefix tail-first (a parent after its children), so a parent is always more
    recent than its children and the coldest candidate is a leaf: the index never has to park one.

    Invariants: every cached key is in exactly one of ``_order`` (candidates, coldest first) and
    ``_held`` (held keys -> whether touched since held).
    """

    name = "lru"

    def __init__(self, capacity: int) -> None:
        self._order: OrderedDict[bytes, None] = OrderedDict()
        self._held: dict[bytes, bool] = {}

    def insert(self, key: bytes, parent: bytes | None) -> None:
        """Hold a new chunk, as just used."""
        self._held[key] = True

    def touch(self, key: bytes) -> None:
        """Mark ``key`` used now."""
        if key in self._held:
            self._held[key] = True
        else:
            self._order.move_to_end(key)

    def hold(self, key: bytes) -> None:
        """Take ``key`` out of the candidates."""
        del self._order[key]
        self._held[key] = False

    def release(self, key: bytes) -> None:
        """Return ``key`` to the candidates: most recent if touched while held, else coldest."""
        touched = self._held.pop(key)
        self._order[key] = None
        if not touched:
            self._order.move_to_end(key, last=False)

    def victim(self) -> bytes | None:
        """The coldest candidate."""
        return next(iter(self._order), None)

    def evict(self, key: bytes) -> None:
        """Forget ``key`` (no history is kept)."""
        del self._order[key]

    def discard(self, key: bytes) -> None:
        """Forget ``key``, held or not."""
        if key in self._order:
            del self._order[key]
        else:
            del self._held[key]


__all__ = ["LRUPolicy"]
