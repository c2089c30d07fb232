"""The chunk-index allocator: which slots are free, and who owns the others.

It knows nothing of memory, only of slot indices, so every backend shares it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from lmcache.errors import ConfigError, DoubleFreeError, StaleHandleError


@dataclass(frozen=True)
class PoolStats:
    """A consistent snapshot of a pool's counters, in slots (``slot_bytes`` is in bytes).

    ``used + free == total`` and ``allocations - frees == used`` always hold.
    """

    total: int
    used: int
    free: int
    peak_used: int
    allocations: int
    frees: int
    failed_allocations: int
    slot_bytes: int


class ChunkAllocator:
    """Hands out slot indices in O(1) and takes them back in O(1), with a generation per slot.

    Why: a pool must never give one slot to two owners, even when a caller frees twice or frees a
    handle it kept after the slot was reused. Each hand-out draws a new ticket from a per-allocator counter;
    a slot's generation is that ticket while it is handed out, and minus the ticket once it is freed
    (0 if never used). A handle records its ticket; ``release`` accepts it only if the slot still has
    that generation. So stale and double frees are caught in O(1), always (not in a debug mode), and
    change nothing; tickets are unique, so a handle edited to name another slot is caught too.

    Invariants (checked by the property tests):
        * a slot is free iff its generation is <= 0; free slots are exactly ``_free`` plus the
          never-used slots ``[_fresh, capacity)``;
        * ``used == capacity - len(_free) - (capacity - _fresh)``;
        * no index appears twice in ``_free``.

    Never-used slots are handed out from a counter, so construction costs O(1) bookkeeping beyond one
    list of generations (8 bytes per slot) and touches no arena memory.

    Fields are changed only under ``lock`` (a ``threading.Lock``, or ``None`` for single-owner use).
    """

    __slots__ = (
        "_failed",
        "_free",
        "_frees",
        "_fresh",
        "_min_free",
        "_ticket",
        "capacity",
        "generation",
        "lock",
    )

    def __init__(self, capacity: int, *, thread_safe: bool = True) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise ConfigError(f"an allocator needs a positive slot count, got {capacity!r}")
        #: Number of slots; fixed.
        self.capacity = capacity
        #: Generation of each slot: its ticket while handed out, minus it once freed, 0 if never used.
        #: Read-only outside this class.
        self.generation: list[int] = [0] * capacity
        #: Lock guarding every field, or None when the owner promised single-threaded use.
        self.lock: threading.Lock | None = threading.Lock() if thread_safe else None
        self._free: list[int] = []  # freed slots, reused last-in first-out (warm in cache)
        self._fresh = 0  # slots [_fresh, capacity) were never handed out
        self._min_free = capacity  # the lowest free count seen, for peak_used
        self._frees = 0
        self._failed = 0
        self._ticket = 0

    @property
    def num_free(self) -> int:
        """Slots that can be handed out now."""
        return len(self._free) + self.capacity - self._fresh

    @property
    def num_used(self) -> int:
        """Slots handed out and not yet released."""
        return self.capacity - self.num_free

    def acquire(self, count_failure: bool = True) -> int:
        """Pop a free slot, give it a new ticket and return its index; -1 if none is free.

        Reduces ``num_free`` by 1 on success; counts a failed allocation otherwise (unless
        ``count_failure`` is False: a waiting caller counts once, when it gives up).
        """
        lock = self.lock
        if lock is not None:
            lock.acquire()
        try:
            free = self._free
            if free:
                slot = free.pop()
            elif self._fresh < self.capacity:
                slot = self._fresh
                self._fresh = slot + 1
            else:
                if count_failure:
                    self._failed += 1
                return -1
            ticket = self._ticket + 1
            self._ticket = ticket
            self.generation[slot] = ticket
            n = len(free) + self.capacity - self._fresh
            if n < self._min_free:
                self._min_free = n
            return slot
        finally:
            if lock is not None:
                lock.release()

    def acquire_many(self, count: int) -> list[int] | None:
        """Take ``count`` slots at once, or none: all-or-nothing. Returns their indices or None."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigError(f"count must be a non-negative int, got {count!r}")
        lock = self.lock
        if lock is not None:
            lock.acquire()
        try:
            free = self._free
            available = len(free) + self.capacity - self._fresh
            if count > available:
                self._failed += count
                return None
            take = min(count, len(free))
            slots = free[len(free) - take :]
            del free[len(free) - take :]
            slots.reverse()  # same order single acquires would give
            rest = count - take
            if rest:
                slots.extend(range(self._fresh, self._fresh + rest))
                self._fresh += rest
            gens = self.generation
            ticket = self._ticket
            for slot in slots:
                ticket += 1
                gens[slot] = ticket
            self._ticket = ticket
            n = available - count
            if n < self._min_free:
                self._min_free = n
            return slots
        finally:
            if lock is not None:
                lock.release()

    def release(self, slot: int, generation: int) -> None:
        """Give back ``slot`` handed out with ``generation``; mark it free (generation ``-ticket``).

        Raises:
            DoubleFreeError: the slot was already released and is still free.
            StaleHandleError: the slot was released and handed out again since.
        """
        lock = self.lock
        if lock is not None:
            lock.acquire()
        try:
            gens = self.generation
            if gens[slot] != generation:
                raise self._handle_error(slot, generation)
            gens[slot] = -generation
            self._free.append(slot)
            self._frees += 1
        finally:
            if lock is not None:
                lock.release()

    def release_many(self, handles: list[tuple[int, int]]) -> None:
        """Release several ``(slot, generation)`` pairs; check all first, so an error frees none."""
        lock = self.lock
        if lock is not None:
            lock.acquire()
        try:
            gens = self.generation
            seen: set[int] = set()
            for slot, generation in handles:
                if gens[slot] != generation:
                    raise self._handle_error(slot, generation)
                if slot in seen:
                    raise DoubleFreeError(
                        f"slot {slot} appears twice in one free_batch; each KVObj may be freed once"
                    )
                seen.add(slot)
            for slot, generation in handles:
                gens[slot] = -generation
            self._free.extend(slot for slot, _ in handles)
            self._frees += len(handles)
        finally:
            if lock is not None:
                lock.release()

    def count_failure(self) -> None:
        """Count one failed allocation (for callers that waited with ``count_failure=False``)."""
        lock = self.lock
        if lock is not None:
            lock.acquire()
        self._failed += 1
        if lock is not None:
            lock.release()

    def is_live(self, slot: int, generation: int) -> bool:
        """Whether a handle ``(slot, generation)`` still owns its slot."""
        return self.generation[slot] == generation

    def stats(self, slot_bytes: int) -> PoolStats:
        """Return a consistent snapshot of the counters."""
        lock = self.lock
        if lock is not None:
            lock.acquire()
        try:
            free = len(self._free) + self.capacity - self._fresh
            used = self.capacity - free
            return PoolStats(
                total=self.capacity,
                used=used,
                free=free,
                peak_used=self.capacity - self._min_free,
                allocations=self._frees + used,
                frees=self._frees,
                failed_allocations=self._failed,
                slot_bytes=slot_bytes,
            )
        finally:
            if lock is not None:
                lock.release()

    def _handle_error(self, slot: int, generation: int) -> DoubleFreeError | StaleHandleError:
        current = self.generation[slot]
        if current == -generation:
            return DoubleFreeError(
                f"double free of chunk {slot}: this KVObj was already freed; free each KVObj once"
            )
        return StaleHandleError(
            f"stale KVObj for chunk {slot}: it was freed and the slot was handed out again "
            "or the handle was edited; drop handles once they are freed"
        )


__all__ = ["ChunkAllocator", "PoolStats"]
