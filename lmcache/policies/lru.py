"""``"lru"``: least recently used first (leaf-restricted by the index, as every policy)."""

from __future__ import annotations

from collections import OrderedDict

from lmcache.policies.base import Key


class LRUPolicy:
    """Least recently used.

    Invariants: ``_order`` holds every cached chunk except the lifted ones, coldest first; ``_held`` is
    the set of held chunks; ``_lifted`` is the subset of held chunks that ``victim()`` took out of
    ``_order`` (each was the coldest chunk when it was lifted).
    """

    name = "lru"

    def __init__(self, capacity: int) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()
        self._held: set[Key] = set()
        self._lifted: set[Key] = set()

    def insert(self, key: Key, parent: Key | None) -> None:
        self._order[key] = None
        self._held.add(key)

    def touch(self, key: Key) -> None:
        if key in self._lifted:
            self._lifted.remove(key)
            self._order[key] = None
        else:
            self._order.move_to_end(key)

    def hold(self, key: Key) -> None:
        self._held.add(key)

    def release(self, key: Key) -> None:
        self._held.remove(key)
        if key in self._lifted:  # lifted while coldest and not used since: back at the cold end
            self._lifted.remove(key)
            self._order[key] = None
            self._order.move_to_end(key, last=False)

    def victim(self) -> Key | None:
        order, held = self._order, self._held
        while order:
            key = next(iter(order))
            if key not in held:
                return key
            del order[key]
            self._lifted.add(key)
        return None

    def evict(self, key: Key) -> None:
        del self._order[key]

    def discard(self, key: Key) -> None:
        self._order.pop(key, None)
        self._held.discard(key)
        self._lifted.discard(key)
