"""``"wtinylfu"``: W-TinyLFU (Einziger et al., TOS'17, as in Caffeine), leaf-restricted by the index."""

from __future__ import annotations

from collections import OrderedDict

from lmcache.policies.base import Key, key_hash


class FrequencySketch:
    """Count-min sketch of use counts: 4 rows of 4-bit counters, halved every ``10 * capacity`` records.

    Halving (aging) makes old popularity fade, so the sketch follows a changing workload; it is one
    ``bytearray.translate`` over the table, once per ``10 * capacity`` records, so O(1) amortized.
    ``estimate`` is the minimum over the rows (never below the true aged count)."""

    _ROW_SEEDS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93)
    _HALVE = bytes(value >> 1 for value in range(256))

    def __init__(self, capacity: int) -> None:
        width_bits = max(4, (max(1, capacity) - 1).bit_length())
        self._width_bits = width_bits
        self._mask = (1 << width_bits) - 1
        self._table = bytearray(4 << width_bits)
        self._records = 0
        self._reset_at = 10 * max(1, capacity)

    def _cells(self, key: Key) -> tuple[int, int, int, int]:
        h = key_hash(key)
        bits, mask = self._width_bits, self._mask
        s0, s1, s2, s3 = self._ROW_SEEDS
        return (
            ((h * s0) >> 40) & mask,
            (1 << bits) + (((h * s1) >> 40) & mask),
            (2 << bits) + (((h * s2) >> 40) & mask),
            (3 << bits) + (((h * s3) >> 40) & mask),
        )

    def record(self, key: Key) -> None:
        table = self._table
        for cell in self._cells(key):
            if table[cell] < 15:
                table[cell] += 1
        self._records += 1
        if self._records >= self._reset_at:
            self._table = self._table.translate(self._HALVE)
            self._records //= 2

    def estimate(self, key: Key) -> int:
        table = self._table
        a, b, c, d = self._cells(key)
        return min(table[a], table[b], table[c], table[d])


_WINDOW, _PROBATION, _PROTECTED = 0, 1, 2


class WTinyLFUPolicy:
    """W-TinyLFU over leaves, with a hill-climbing window.

    New chunks enter the LRU window. The main space is a segmented LRU: ``probation`` (chunks that have
    not been used in the main space yet) and ``protected`` (80% of the main space; a probation chunk
    used again moves there, pushing protected's coldest back to probation). While the window is at or
    over its target, ``victim()`` lets the window's coldest chunk (the candidate) contest the main space's
    victim (probation's coldest, else protected's): the one the sketch says is used less often is the
    victim, and a winning candidate moves into probation. Below its target the window grows: the victim
    comes from the main space.

    The window's target starts at 1% of the capacity and is tuned by hill climbing (as in Caffeine):
    every ``10 * capacity`` chunk accesses (hits are touches, misses inserts) the hit rate is compared
    with the previous sample's; the window moves by a step in the same direction if the hit rate did not
    fall, else in the other; the step starts at 6.25% of the capacity, decays by 0.98 per sample and
    restarts after a hit-rate jump of 5 points. A large window makes it LRU; a small one, frequency-led.

    Invariants: ``_segment`` maps every cached chunk to its segment; each chunk is in its segment's
    queue (coldest first) unless lifted; ``_lifted_count[s]`` counts the lifted chunks of segment ``s``.
    """

    name = "wtinylfu"

    def __init__(self, capacity: int, *, window_share: float = 0.01, climb: bool = True) -> None:
        capacity = max(2, capacity)
        self._capacity = capacity
        self._queues: tuple[OrderedDict[Key, None], ...] = (OrderedDict(), OrderedDict(), OrderedDict())
        self._segment: dict[Key, int] = {}
        self._lifted: set[Key] = set()
        self._lifted_count = [0, 0, 0]
        self._held: set[Key] = set()
        self._fresh: set[Key] = set()
        self._sketch = FrequencySketch(capacity)
        self._window_target = max(1.0, window_share * capacity)
        self._climb = climb
        self._sample_size = 10 * capacity
        self._hits = 0
        self._misses = 0
        self._previous_hit_rate = 0.0
        self._step = 0.0625 * capacity

    def _size(self, segment: int) -> int:
        return len(self._queues[segment]) + self._lifted_count[segment]

    def _protected_target(self) -> float:
        return 0.8 * (self._capacity - self._window_target)

    def _record(self, key: Key, hit: bool) -> None:
        self._sketch.record(key)
        if hit:
            self._hits += 1
        else:
            self._misses += 1
        if self._climb and self._hits + self._misses >= self._sample_size:
            self._climb_step()

    def _climb_step(self) -> None:
        hit_rate = self._hits / (self._hits + self._misses)
        change = hit_rate - self._previous_hit_rate
        if change < 0:
            self._step = -self._step
        self._window_target = min(self._capacity - 1.0, max(1.0, self._window_target + self._step))
        if abs(change) >= 0.05:
            self._step = (0.0625 if self._step > 0 else -0.0625) * self._capacity
        else:
            self._step *= 0.98
        self._previous_hit_rate = hit_rate
        self._hits = self._misses = 0

    def _move(self, key: Key, segment: int) -> None:
        """Put a cached chunk at the hot end of ``segment`` (out of its old queue, or out of lifted)."""
        old = self._segment[key]
        if key in self._lifted:
            self._lifted.remove(key)
            self._lifted_count[old] -= 1
        else:
            del self._queues[old][key]
        self._queues[segment][key] = None
        self._segment[key] = segment

    def insert(self, key: Key, parent: Key | None) -> None:
        self._segment[key] = _WINDOW
        self._queues[_WINDOW][key] = None
        self._held.add(key)
        self._fresh.add(key)
        self._record(key, hit=False)

    def touch(self, key: Key) -> None:
        segment = self._segment[key]
        if key in self._fresh:
            self._move(key, segment)
            return
        self._record(key, hit=True)
        if segment == _PROBATION:
            self._move(key, _PROTECTED)
            protected = self._queues[_PROTECTED]
            if self._size(_PROTECTED) > self._protected_target() and protected:
                self._move(next(iter(protected)), _PROBATION)
        else:
            self._move(key, segment)

    def hold(self, key: Key) -> None:
        self._held.add(key)

    def release(self, key: Key) -> None:
        self._held.remove(key)
        self._fresh.discard(key)
        if key in self._lifted:
            self._lifted.remove(key)
            segment = self._segment[key]
            self._lifted_count[segment] -= 1
            queue = self._queues[segment]
            queue[key] = None
            queue.move_to_end(key, last=False)

    def _coldest(self, segment: int) -> Key | None:
        queue, held = self._queues[segment], self._held
        while queue:
            key = next(iter(queue))
            if key not in held:
                return key
            del queue[key]
            self._lifted.add(key)
            self._lifted_count[segment] += 1
        return None

    def victim(self) -> Key | None:
        main_room = self._capacity - self._window_target - self._size(_PROBATION) - self._size(_PROTECTED)
        while main_room > 0 and self._size(_WINDOW) > self._window_target:
            overflow = self._coldest(_WINDOW)  # the main space has room: no contest
            if overflow is None:
                break
            self._move(overflow, _PROBATION)
            main_room -= 1
        main_victim = self._coldest(_PROBATION)
        if main_victim is None:
            main_victim = self._coldest(_PROTECTED)
        if self._size(_WINDOW) >= self._window_target or main_victim is None:
            candidate = self._coldest(_WINDOW)
            if candidate is None:
                return main_victim
            if main_victim is None:
                return candidate
            if self._sketch.estimate(candidate) > self._sketch.estimate(main_victim):
                self._move(candidate, _PROBATION)
                return main_victim
            return candidate
        return main_victim

    def evict(self, key: Key) -> None:
        del self._queues[self._segment.pop(key)][key]

    def discard(self, key: Key) -> None:
        segment = self._segment.pop(key)
        if key in self._lifted:
            self._lifted.remove(key)
            self._lifted_count[segment] -= 1
        else:
            del self._queues[segment][key]
        self._held.discard(key)
        self._fresh.discard(key)


# -- Adaptive: follow the expert that would have hit most ------------------------------------------------
