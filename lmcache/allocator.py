"""The chunk-index allocator: which slots are free, and who owns the others.

It knows nothing of memory, only of slot indices, so every backend shares it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from lmcache import forksafe
from lmcache.errors import ConfigError, DoubleFreeError, PoolClosedError, StaleHandleError


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


def closed_error() -> PoolClosedError:
    """The error every call on a closed pool raises."""
    return PoolClosedError("the pool was closed; create a new pool to allocate or free again")


class ChunkAllocator:
    """Which slots are free and who owns the others: O(1) hand-out and return, a generation per slot.

    Why: a pool must never give one slot to two owners, even when a caller frees twice, frees a handle
    it kept after the slot was reused, or forges a handle. Each hand-out draws a new ticket
    (``ticket + 1``, so tickets are positive and unique); a slot's generation is that ticket while it is
    handed out, and minus the ticket once it is freed (0 if never used). A handle records its ticket, and
    a slot is taken back only if its generation equals that ticket and is positive. So stale, double and
    forged frees are caught in O(1), always (not in a debug mode), and change nothing: a generation the
    allocator never issued (0, negative, or not yet drawn) never matches.

    Invariants (checked by the property tests):
        * a slot is free iff its generation is <= 0; free slots are exactly ``free_slots`` plus the
          never-used slots ``[_fresh, capacity)``; no index appears twice in ``free_slots``, and every
          index in it is a plain ``int``;
        * freed slots are reused before never-used ones, so a never-used slot is taken only when every
          slot below ``_fresh`` is in use: ``_fresh`` is the peak of ``num_used``;
        * every hand-out draws one ticket, so ``ticket`` counts allocations, and
          ``frees == allocations - num_used``.

    So the hot path keeps no counters of its own: used, peak, allocations and frees all follow from
    ``_fresh``, ``len(free_slots)`` and ``ticket``. Never-used slots are handed out from a counter, so
    construction costs one list of generations (8 bytes per slot) and touches no arena memory.

    Only this class writes its fields, and only under ``lock`` (a ``threading.Lock``, or None for
    single-owner use). After :meth:`close` every hand-out and return raises
    :class:`~lmcache.errors.PoolClosedError`. After ``os.fork()`` the child gets fresh locks (a lock held
    by another thread of the parent at fork time would otherwise deadlock the child).
    """

    __slots__ = (
        "__weakref__",
        "_closed",
        "_failed",
        "_fresh",
        "_generation",
        "capacity",
        "free_slots",
        "lock",
        "ticket",
    )

    def __init__(self, capacity: int, *, thread_safe: bool = True) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise ConfigError(f"an allocator needs a positive slot count, got {capacity!r}")
        #: Number of slots; fixed.
        self.capacity = capacity
        # Generation of each slot: its ticket while handed out, minus it once freed, 0 if never used.
        self._generation: list[int] = [0] * capacity
        #: Lock guarding every field, or None when the owner promised single-threaded use.
        self.lock: threading.Lock | None = threading.Lock() if thread_safe else None
        #: Freed slots, reused last-in first-out (warm in cache). Read-only outside this class.
        self.free_slots: list[int] = []
        self._fresh = 0  # slots [_fresh, capacity) were never handed out
        self._failed = 0
        self._closed = False
        #: The last ticket drawn: every hand-out draws ``ticket + 1``.
        self.ticket = 0
        if self.lock is not None:
            forksafe.register(self)

    # -- state ---------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Slots that can be handed out now."""
        return self.capacity - self.num_used

    @property
    def num_used(self) -> int:
        """Slots handed out and not yet released."""
        return self._fresh - len(self.free_slots)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def generation_of(self, slot: int) -> int:
        """The generation of ``slot`` now (positive: handed out with that ticket)."""
        return self._generation[slot]

    def is_live(self, slot: int, generation: int) -> bool:
        """Whether a handle ``(slot, generation)`` still owns its slot (False once closed)."""
        return (
            slot.__class__ is int
            and 0 <= slot < self.capacity
            and generation > 0
            and self._generation[slot] == generation
            and not self._closed
        )

    def _locked(self) -> AbstractContextManager[Any]:
        return self.lock if self.lock is not None else nullcontext()

    # -- one slot ------------------------------------------------------------------------------------
    def acquire_one(self) -> tuple[int, int] | None:
        """Hand out one slot: return ``(slot, ticket)``, or None (a failed allocation) when full.

        Raises:
            PoolClosedError: the allocator was closed.
        """
        lock = self.lock
        if lock is not None:
            lock.acquire()
        try:
            if self._closed:
                raise closed_error()
            free = self.free_slots
            if free:
                slot = free.pop()
            elif self._fresh < self.capacity:
                slot = self._fresh
                self._fresh = slot + 1
            else:
                self._failed += 1
                return None
            ticket = self.ticket = self.ticket + 1
            self._generation[slot] = ticket
            return slot, ticket
        finally:
            if lock is not None:
                lock.release()

    def release_one(self, slot: int, generation: int) -> None:
        """Take back ``slot``, handed out with ``generation``, and increase the free count by 1.

        Raises:
            DoubleFreeError: the slot was already released by this handle.
            StaleHandleError: the handle does not own the slot (reused since, edited or forged).
            PoolClosedError: the allocator was closed.
        """
        lock = self.lock
        if lock is not None:
            lock.acquire()
        try:
            gens = self._generation
            # is_live, inlined (one call less per free): slot.__class__ is int, since an index of another
            # type (bool, numpy int) is an edited handle and must never reach free_slots; generation > 0,
            # since 0 and minus a ticket are never issued.
            if not (
                slot.__class__ is int
                and 0 <= slot < self.capacity
                and generation > 0
                and gens[slot] == generation
                and not self._closed
            ):
                raise self.handle_error(slot, generation)
            gens[slot] = -generation
            self.free_slots.append(slot)
        finally:
            if lock is not None:
                lock.release()

    def reissue_one(self, slot: int, generation: int) -> int:
        """Hand ``slot``, held with ``generation``, to a new owner in one step; return the new ticket.

        A release and an acquire of the same slot under one lock: the old ticket stops matching (the old
        handle is stale), counted as one free and one allocation.

        Raises:
            DoubleFreeError, StaleHandleError, PoolClosedError: as :meth:`release_one`; nothing changes.
        """
        lock = self.lock
        if lock is not None:
            lock.acquire()
        try:
            if not self.is_live(slot, generation):
                raise self.handle_error(slot, generation)
            ticket = self.ticket = self.ticket + 1
            self._generation[slot] = ticket
            return ticket
        finally:
            if lock is not None:
                lock.release()

    # -- batches -------------------------------------------------------------------------------------
    def acquire_many(self, count: int, count_failure: bool = True) -> tuple[list[int], int] | None:
        """Take ``count`` slots at once, or none: all-or-nothing.

        Returns:
            ``(slots, first_ticket)``: slot ``slots[i]`` has generation ``first_ticket + i``; or None
            when fewer than ``count`` slots are free (counted as ``count`` failed allocations unless
            ``count_failure`` is False: a waiting caller counts once, when it gives up).

        Raises:
            PoolClosedError: the allocator was closed.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigError(f"count must be a non-negative int, got {count!r}")
        with self._locked():
            if self._closed:
                raise closed_error()
            free = self.free_slots
            if count > self.capacity - self._fresh + len(free):
                if count_failure:
                    self._failed += count
                return None
            take = min(count, len(free))
            slots = free[len(free) - take :]
            del free[len(free) - take :]
            slots.reverse()  # the order single acquires would give
            rest = count - take
            if rest:
                slots.extend(range(self._fresh, self._fresh + rest))
                self._fresh += rest
            first = self.ticket + 1
            gens = self._generation
            for slot, ticket in zip(slots, range(first, first + count), strict=True):
                gens[slot] = ticket
            self.ticket = first + count - 1
            return slots, first

    def release_many(self, slots: Sequence[int], generations: Sequence[int]) -> None:
        """Take back ``slots[i]`` handed out with ``generations[i]``; all are checked first, so an error
        frees none.

        Raises:
            DoubleFreeError: a slot is named twice, or was already released.
            StaleHandleError: a slot was released and handed out again since, or the handle was edited.
            PoolClosedError: the allocator was closed.
        """
        if len(slots) != len(generations):
            raise StaleHandleError(
                f"{len(slots)} slots but {len(generations)} generations: the batch was edited; "
                "free batches as allocate_batch returned them"
            )
        if not slots:
            return
        with self._locked():
            if self._closed:
                raise closed_error()
            gens = self._generation
            # Checked at C speed: the current generations of all slots against the handles'. Every
            # slot must be a plain int (not bool or a numpy int) and in range; every generation > 0.
            try:
                current = itemgetter(*slots)(gens) if len(slots) > 1 else (gens[slots[0]],)
                valid = (
                    current == tuple(generations)
                    and min(slots) >= 0
                    and min(generations) > 0
                    and all(slot.__class__ is int for slot in slots)
                    and len(set(slots)) == len(slots)
                )
            except (IndexError, TypeError):
                valid = False
            if not valid:
                raise self._first_bad_handle(slots, generations)
            for slot, generation in zip(slots, generations, strict=True):
                gens[slot] = -generation
            self.free_slots.extend(slots)

    def _first_bad_handle(
        self, slots: Sequence[int], generations: Sequence[int]
    ) -> DoubleFreeError | StaleHandleError | PoolClosedError:
        seen: set[int] = set()
        for slot, generation in zip(slots, generations, strict=True):
            if not self.is_live(slot, generation):
                return self.handle_error(slot, generation)
            if slot in seen:
                return DoubleFreeError(
                    f"chunk {slot} appears twice in one free_batch; each KVObj may be freed once"
                )
            seen.add(slot)
        return StaleHandleError("free_batch was given an edited batch; free batches as allocated")

    def count_failure(self) -> None:
        """Count one failed allocation (for callers that waited with ``count_failure=False``)."""
        with self._locked():
            self._failed += 1

    def stats(self, slot_bytes: int) -> PoolStats:
        """Return a consistent snapshot of the counters."""
        with self._locked():
            used = self._fresh - len(self.free_slots)
            return PoolStats(
                total=self.capacity,
                used=used,
                free=self.capacity - used,
                peak_used=self._fresh,
                allocations=self.ticket,
                frees=self.ticket - used,
                failed_allocations=self._failed,
                slot_bytes=slot_bytes,
            )

    def close(self) -> None:
        """Refuse every later hand-out and return; closing twice is a no-op."""
        with self._locked():
            self._closed = True

    def handle_error(
        self, slot: object, generation: object, *, freeing: bool = True
    ) -> DoubleFreeError | StaleHandleError | PoolClosedError:
        """Build the error that says why handle ``(slot, generation)`` does not own its slot.

        ``freeing`` False: the handle was used (not freed), so a freed handle is stale, not freed twice.
        """
        if self._closed:
            return closed_error()
        if not (slot.__class__ is int and 0 <= slot < self.capacity):  # type: ignore[operator]
            return StaleHandleError(
                f"KVObj names chunk {slot!r} ({type(slot).__name__}), not an int in this pool's "
                f"0..{self.capacity - 1}: the handle was edited; use KVObjs as allocate() returned them"
            )
        if not (generation.__class__ is int and generation > 0):  # type: ignore[operator]
            return StaleHandleError(
                f"KVObj for chunk {slot} carries generation {generation!r}, which this pool never issued: "
                "the handle was built by hand or edited; free only KVObjs that allocate() returned"
            )
        current = self._generation[slot]  # type: ignore[index]
        if current == -generation and not freeing:  # type: ignore[operator]
            return StaleHandleError(
                f"this KVObj of chunk {slot} was freed; its memory is no longer yours (allocate again)"
            )
        if current == -generation:  # type: ignore[operator]
            return DoubleFreeError(
                f"double free of chunk {slot}: this KVObj was already freed; free each KVObj once"
            )
        return StaleHandleError(
            f"stale KVObj for chunk {slot}: it was freed and the slot was handed out again "
            "or the handle was edited; drop handles once they are freed"
        )

    def reset_locks_after_fork(self) -> None:
        """Give a forked child a new lock (the parent's may be held by a thread the child lacks)."""
        if self.lock is not None:
            self.lock = threading.Lock()


__all__ = ["ChunkAllocator", "PoolStats", "closed_error"]
