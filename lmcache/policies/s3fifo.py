"""``"s3fifo"``: S3-FIFO (Yang et al., SOSP'23), leaf-restricted by the index."""

from __future__ import annotations

from collections import OrderedDict

from lmcache.policies.base import Key


class S3FIFOPolicy:
    """S3-FIFO over leaves: small FIFO (10% of capacity), main FIFO, ghost FIFO.

    A new chunk enters the small queue, or the main queue when its key is in the ghost queue. A use
    raises the chunk's use count (capped at 3) and moves nothing. ``victim()`` works on the small queue
    while it holds at least 10% of the capacity, else on the main queue. The small queue's oldest chunk
    moves to the main queue (its count cleared) if it was used since it entered, else it is the victim
    (and its key enters the ghost queue when evicted). The main queue's oldest chunk is reinserted at the
    head with its count decremented if the count is positive, else it is the victim. Every move is paid
    for by the insert or use that earned it, so ``victim()`` is O(1) amortized. The ghost queue keeps as
    many keys as the main queue's share of the capacity.

    Invariants: every cached chunk is in ``_small`` or ``_main`` (oldest first) or lifted (``_lifted``
    maps it to whether it came from the small queue); ``_uses`` has every cached chunk's count.
    """

    name = "s3fifo"

    def __init__(self, capacity: int, small_share: float = 0.1) -> None:
        capacity = max(1, capacity)
        self._small_target = max(1, round(small_share * capacity))
        self._ghost_limit = max(1, capacity - self._small_target)
        self._small: OrderedDict[Key, None] = OrderedDict()
        self._main: OrderedDict[Key, None] = OrderedDict()
        self._ghosts: OrderedDict[Key, None] = OrderedDict()
        self._uses: dict[Key, int] = {}
        self._held: set[Key] = set()
        self._lifted: dict[Key, bool] = {}  # key -> lifted from the small queue
        self._lifted_small = 0
        self._fresh: set[Key] = set()

    def insert(self, key: Key, parent: Key | None) -> None:
        if key in self._ghosts:
            del self._ghosts[key]
            self._main[key] = None
        else:
            self._small[key] = None
        self._uses[key] = 0
        self._held.add(key)
        self._fresh.add(key)

    def touch(self, key: Key) -> None:
        if key not in self._fresh:
            uses = self._uses[key]
            if uses < 3:
                self._uses[key] = uses + 1

    def hold(self, key: Key) -> None:
        self._held.add(key)

    def release(self, key: Key) -> None:
        self._held.remove(key)
        self._fresh.discard(key)
        from_small = self._lifted.pop(key, None)
        if from_small is not None:
            queue = self._small if from_small else self._main
            if from_small:
                self._lifted_small -= 1
            queue[key] = None
            queue.move_to_end(key, last=False)

    def _lift(self, key: Key, from_small: bool) -> None:
        self._lifted[key] = from_small
        if from_small:
            self._lifted_small += 1

    def _victim_in_small(self) -> Key | None:
        """The small queue's victim, moving used chunks on to the main queue; None when none is left."""
        small, main, uses, held = self._small, self._main, self._uses, self._held
        while small:
            key = next(iter(small))
            if key in held:
                del small[key]
                self._lift(key, True)
            elif uses[key] > 0:
                del small[key]
                uses[key] = 0
                main[key] = None
            else:
                return key
        return None

    def _victim_in_main(self) -> Key | None:
        """The main queue's victim, reinserting chunks with a positive count; None when none is left."""
        main, uses, held = self._main, self._uses, self._held
        while main:
            key = next(iter(main))
            if key in held:
                del main[key]
                self._lift(key, False)
            elif uses[key] > 0:
                uses[key] -= 1
                main.move_to_end(key)
            else:
                return key
        return None

    def victim(self) -> Key | None:
        small_first = len(self._small) + self._lifted_small >= self._small_target or not self._main
        key = self._victim_in_small() if small_first else self._victim_in_main()
        if key is None:
            key = self._victim_in_main() if small_first else self._victim_in_small()
        return key

    def evict(self, key: Key) -> None:
        del self._uses[key]
        if key in self._small:
            del self._small[key]
            ghosts = self._ghosts
            ghosts[key] = None
            if len(ghosts) > self._ghost_limit:
                ghosts.popitem(last=False)
        else:
            del self._main[key]

    def discard(self, key: Key) -> None:
        del self._uses[key]
        from_small = self._lifted.pop(key, None)
        if from_small is not None:
            if from_small:
                self._lifted_small -= 1
        elif key in self._small:
            del self._small[key]
        else:
            del self._main[key]
        self._held.discard(key)
        self._fresh.discard(key)


# -- W-TinyLFU --------------------------------------------------------------------------------------------
