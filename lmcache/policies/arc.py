"""``"arc"``: Adaptive Replacement Cache (Megiddo and Modha, FAST'03), leaf-restricted by the index."""

from __future__ import annotations

from collections import OrderedDict

from lmcache.policies.base import Key


class ARCPolicy:
    """Adaptive Replacement Cache over leaves.

    ``_recent`` (T1) holds chunks used once since they entered, ``_frequent`` (T2) chunks used again;
    ``_recent_ghosts`` (B1) and ``_frequent_ghosts`` (B2) remember keys evicted from each. A chunk
    inserted while in B1 says the recency list was too small: the target size ``_target`` of T1 grows;
    one in B2 shrinks it; either way the chunk enters T2. ``victim()`` takes the coldest evictable chunk
    of T1 when T1 is over its target, otherwise of T2 (falling back to the other list when one has no
    evictable chunk). ARC's tie rule for an incoming B2 key is left out: ``victim()`` does not know the
    incoming key. Ghosts are capped as in ARC: ``|T1| + |B1| <= capacity`` and all four lists together
    ``<= 2 * capacity``.

    Invariants: every cached chunk is in exactly one of ``_recent``/``_frequent`` or lifted (``_lifted``
    maps it to the list it was lifted from); ``_lifted_recent`` counts those from T1.
    """

    name = "arc"

    def __init__(self, capacity: int) -> None:
        self._capacity = max(1, capacity)
        self._target = 0.0
        self._recent: OrderedDict[Key, None] = OrderedDict()
        self._frequent: OrderedDict[Key, None] = OrderedDict()
        self._recent_ghosts: OrderedDict[Key, None] = OrderedDict()
        self._frequent_ghosts: OrderedDict[Key, None] = OrderedDict()
        self._held: set[Key] = set()
        self._lifted: dict[Key, bool] = {}  # key -> lifted from T1
        self._lifted_recent = 0
        self._fresh: set[Key] = set()

    def _recent_size(self) -> int:
        return len(self._recent) + self._lifted_recent

    def insert(self, key: Key, parent: Key | None) -> None:
        recent_ghosts, frequent_ghosts = self._recent_ghosts, self._frequent_ghosts
        if key in recent_ghosts:
            step = max(len(frequent_ghosts) / len(recent_ghosts), 1.0)
            self._target = min(float(self._capacity), self._target + step)
            del recent_ghosts[key]
            self._frequent[key] = None
        elif key in frequent_ghosts:
            step = max(len(recent_ghosts) / len(frequent_ghosts), 1.0)
            self._target = max(0.0, self._target - step)
            del frequent_ghosts[key]
            self._frequent[key] = None
        else:
            self._recent[key] = None
        self._held.add(key)
        self._fresh.add(key)

    def touch(self, key: Key) -> None:
        fresh = key in self._fresh
        lifted_from_recent = self._lifted.pop(key, None)
        if lifted_from_recent is not None:
            if lifted_from_recent:
                self._lifted_recent -= 1
            in_recent = lifted_from_recent
        else:
            in_recent = key in self._recent
            if in_recent:
                del self._recent[key]
            else:
                del self._frequent[key]
        if in_recent and fresh:
            self._recent[key] = None
        else:
            self._frequent[key] = None

    def hold(self, key: Key) -> None:
        self._held.add(key)

    def release(self, key: Key) -> None:
        self._held.remove(key)
        self._fresh.discard(key)
        lifted_from_recent = self._lifted.pop(key, None)
        if lifted_from_recent is not None:
            queue = self._recent if lifted_from_recent else self._frequent
            if lifted_from_recent:
                self._lifted_recent -= 1
            queue[key] = None
            queue.move_to_end(key, last=False)

    def _coldest(self, queue: OrderedDict[Key, None], from_recent: bool) -> Key | None:
        held = self._held
        while queue:
            key = next(iter(queue))
            if key not in held:
                return key
            del queue[key]
            self._lifted[key] = from_recent
            if from_recent:
                self._lifted_recent += 1
        return None

    def victim(self) -> Key | None:
        recent_first = bool(self._recent) and self._recent_size() > self._target
        key = self._coldest(self._recent, True) if recent_first else self._coldest(self._frequent, False)
        if key is None:
            key = self._coldest(self._frequent, False) if recent_first else self._coldest(self._recent, True)
        return key

    def evict(self, key: Key) -> None:
        if key in self._recent:
            del self._recent[key]
            ghosts = self._recent_ghosts
        else:
            del self._frequent[key]
            ghosts = self._frequent_ghosts
        ghosts[key] = None
        capacity = self._capacity
        if self._recent_size() + len(self._recent_ghosts) > capacity:
            self._recent_ghosts.popitem(last=False)
        cached = len(self._recent) + len(self._frequent) + len(self._lifted)
        while cached + len(self._recent_ghosts) + len(self._frequent_ghosts) > 2 * capacity:
            (self._frequent_ghosts or self._recent_ghosts).popitem(last=False)

    def discard(self, key: Key) -> None:
        lifted_from_recent = self._lifted.pop(key, None)
        if lifted_from_recent is not None:
            if lifted_from_recent:
                self._lifted_recent -= 1
        elif key in self._recent:
            del self._recent[key]
        else:
            del self._frequent[key]
        self._held.discard(key)
        self._fresh.discard(key)


# -- S3-FIFO ---------------------------------------------------------------------------------------------
