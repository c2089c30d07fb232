"""``"lfu"`` (LFU with a bounded kept history) and ``"lfuda"`` (LFU with dynamic aging)."""

from __future__ import annotations

from collections import OrderedDict

from lmcache.policies.base import Key

_EXACT_COUNTS = 16  # counts below this have a class each; above, one class per power of two
_NUM_CLASSES = _EXACT_COUNTS + 64


def frequency_class(count: int) -> int:
    """The class of a use count: the count itself below 16, then one class per power of two.

    Classes keep LFU O(1): the lowest non-empty class is found with one bit trick over a mask of
    non-empty classes, whatever the counts are. Counts of 16 and more differ by a factor that matters
    rather than by one use, and within a class the least recently used goes first."""
    return count if count < _EXACT_COUNTS else _EXACT_COUNTS - 5 + count.bit_length()


class LFUPolicy:
    """Least frequently used, ties (same frequency class) broken by recency, with kept history.

    A chunk's count is its number of uses (inserts and reuses). When it is evicted its count moves to
    ``_history`` (the ``history_factor * capacity`` most recently evicted chunks), and a chunk inserted
    again resumes from it, so a popular prefix that was squeezed out once is not treated as new.

    Invariants: every cached chunk has a count in ``_count`` and is in ``_classes[frequency_class(count)]``
    (coldest first) unless lifted; bit ``i`` of ``_nonempty`` is set iff ``_classes[i]`` is non-empty;
    ``_fresh`` holds the chunks inserted and not yet released.
    """

    name = "lfu"

    def __init__(self, capacity: int, history_factor: int = 16) -> None:
        self._count: dict[Key, int] = {}
        self._classes: list[OrderedDict[Key, None]] = [OrderedDict() for _ in range(_NUM_CLASSES)]
        self._nonempty = 0
        self._history: OrderedDict[Key, int] = OrderedDict()
        self._history_limit = max(1, history_factor * capacity)
        self._held: set[Key] = set()
        self._lifted: set[Key] = set()
        self._fresh: set[Key] = set()

    def _place(self, key: Key, count: int, *, cold: bool = False) -> None:
        cls = frequency_class(count)
        bucket = self._classes[cls]
        bucket[key] = None
        if cold:
            bucket.move_to_end(key, last=False)
        self._nonempty |= 1 << cls

    def _unplace(self, key: Key, count: int) -> None:
        cls = frequency_class(count)
        bucket = self._classes[cls]
        del bucket[key]
        if not bucket:
            self._nonempty &= ~(1 << cls)

    def insert(self, key: Key, parent: Key | None) -> None:
        count = self._history.pop(key, 0) + 1
        self._count[key] = count
        self._place(key, count)
        self._held.add(key)
        self._fresh.add(key)

    def touch(self, key: Key) -> None:
        count = self._count[key]
        new_count = count if key in self._fresh else count + 1
        if key in self._lifted:
            self._lifted.remove(key)
        else:
            self._unplace(key, count)
        self._count[key] = new_count
        self._place(key, new_count)

    def hold(self, key: Key) -> None:
        self._held.add(key)

    def release(self, key: Key) -> None:
        self._held.remove(key)
        self._fresh.discard(key)
        if key in self._lifted:
            self._lifted.remove(key)
            self._place(key, self._count[key], cold=True)

    def victim(self) -> Key | None:
        held, classes = self._held, self._classes
        while self._nonempty:
            cls = (self._nonempty & -self._nonempty).bit_length() - 1
            bucket = classes[cls]
            key = next(iter(bucket))
            if key not in held:
                return key
            del bucket[key]
            if not bucket:
                self._nonempty &= ~(1 << cls)
            self._lifted.add(key)
        return None

    def evict(self, key: Key) -> None:
        count = self._count.pop(key)
        self._unplace(key, count)
        history = self._history
        history[key] = count
        if len(history) > self._history_limit:
            history.popitem(last=False)

    def discard(self, key: Key) -> None:
        count = self._count.pop(key)
        if key in self._lifted:
            self._lifted.remove(key)
        else:
            self._unplace(key, count)
        self._held.discard(key)
        self._fresh.discard(key)


# -- LFU with dynamic aging ---------------------------------------------------------------------------------


class LFUDAPolicy:
    """LFU with dynamic aging (LFUDA; Arlitt et al., 2000, as in Squid), with kept history.

    Each chunk has a priority ``floor + frequency_class(count)``, set when it is inserted or used, where
    ``floor`` is the priority of the last victim; the victim is the lowest priority, ties by recency. The
    floor rises as chunks are evicted, so a chunk that was popular long ago but is not used any more ages
    out, while one that is used keeps its frequency advantage: frequency-led like LFU, but it forgets,
    which makes it track recency in large caches. Counts survive eviction in a bounded history as in
    :class:`LFUPolicy`.

    O(1): priorities are integers no more than ``_NUM_CLASSES`` above the floor, and the floor only rises,
    so finding the lowest non-empty priority steps over at most that many empty ones per rise.

    Invariants: every cached chunk has ``_count`` and ``_priority``, and is in
    ``_buckets[_priority[key]]`` (coldest first) unless lifted; ``_queued`` counts the chunks in buckets;
    no bucket below ``_floor`` is non-empty. A lifted chunk released after the floor passed its priority is
    placed at the floor, at the cold end.
    """

    name = "lfuda"

    def __init__(self, capacity: int, history_factor: int = 16) -> None:
        self._count: dict[Key, int] = {}
        self._priority: dict[Key, int] = {}
        self._buckets: dict[int, OrderedDict[Key, None]] = {}
        self._floor = 0
        self._queued = 0
        self._history: OrderedDict[Key, int] = OrderedDict()
        self._history_limit = max(1, history_factor * capacity)
        self._held: set[Key] = set()
        self._lifted: set[Key] = set()
        self._fresh: set[Key] = set()

    def _place(self, key: Key, priority: int, *, cold: bool = False) -> None:
        bucket = self._buckets.get(priority)
        if bucket is None:
            bucket = self._buckets[priority] = OrderedDict()
        bucket[key] = None
        if cold:
            bucket.move_to_end(key, last=False)
        self._priority[key] = priority
        self._queued += 1

    def _unplace(self, key: Key) -> None:
        priority = self._priority[key]
        bucket = self._buckets[priority]
        del bucket[key]
        if not bucket:
            del self._buckets[priority]
        self._queued -= 1

    def insert(self, key: Key, parent: Key | None) -> None:
        count = self._history.pop(key, 0) + 1
        self._count[key] = count
        self._place(key, self._floor + frequency_class(count))
        self._held.add(key)
        self._fresh.add(key)

    def touch(self, key: Key) -> None:
        if key in self._lifted:
            self._lifted.remove(key)
        else:
            self._unplace(key)
        count = self._count[key]
        if key not in self._fresh:
            count += 1
            self._count[key] = count
        self._place(key, self._floor + frequency_class(count))

    def hold(self, key: Key) -> None:
        self._held.add(key)

    def release(self, key: Key) -> None:
        self._held.remove(key)
        self._fresh.discard(key)
        if key in self._lifted:
            self._lifted.remove(key)
            self._place(key, max(self._priority[key], self._floor), cold=True)

    def victim(self) -> Key | None:
        held, buckets = self._held, self._buckets
        while self._queued:
            bucket = buckets.get(self._floor)
            if not bucket:
                self._floor += 1
                continue
            key = next(iter(bucket))
            if key not in held:
                return key
            self._unplace(key)
            self._lifted.add(key)
        return None

    def evict(self, key: Key) -> None:
        self._unplace(key)
        del self._priority[key]
        history = self._history
        history[key] = self._count.pop(key)
        if len(history) > self._history_limit:
            history.popitem(last=False)

    def discard(self, key: Key) -> None:
        if key in self._lifted:
            self._lifted.remove(key)
        else:
            self._unplace(key)
        del self._count[key]
        del self._priority[key]
        self._held.discard(key)
        self._fresh.discard(key)


# -- ARC ------------------------------------------------------------------------------------------------
