"""The disk tier's index (:class:`lmcache.disk.index.DiskIndex`) against a brute-force model.

The model keeps a recency stamp per chunk and finds each victim by scanning every leaf: the least
recently used leaf that is not protected, where a chunk that becomes a leaf again (or an orphan) starts
colder than every other leaf. The index does the same in O(1) per chunk; after every step its leaves,
in eviction order, and its byte counts must be the model's.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from lmcache.disk.index import DiskIndex

# A fixed tree of six chunks (two prompts): a key's parent never changes (a key names its prefix).
PARENT: dict[bytes, bytes | None] = {b"a": None, b"b": b"a", b"c": b"b", b"d": b"a", b"e": None, b"f": b"e"}
KEYS = sorted(PARENT)


def test_leaves_are_evicted_least_recent_first_and_parents_after_children() -> None:
    index = DiskIndex(capacity=400)
    for key in (b"a", b"b", b"c", b"d"):
        index.add(key, key.decode(), 100, PARENT[key])
    assert index.leaves() == [b"c", b"d"]  # a and b have children
    index.touch(b"c")
    fits, evicted = index.make_room(100)
    assert fits
    assert [e.key for e in evicted] == [b"d"]
    index.commit(b"e", "e", 100, None)
    assert index.leaves() == [b"c", b"e"]
    fits, evicted = index.make_room(250)  # 400 used: 250 more fit once 250 are gone
    assert fits
    # c is the coldest leaf; then b is a leaf, coldest; then a: parents only after their children
    assert [e.key for e in evicted] == [b"c", b"b", b"a"]
    assert index.leaves() == [b"e"]
    assert index.used == 100


def test_the_parent_of_the_chunk_being_written_is_never_evicted() -> None:
    index = DiskIndex(capacity=200)
    index.add(b"a", "a", 100, None)
    index.add(b"e", "e", 100, None)
    index.touch(b"e")  # a is the least recent leaf
    fits, evicted = index.make_room(100, protect=b"a")
    assert fits
    assert [e.key for e in evicted] == [b"e"]
    index.commit(b"b", "b", 100, b"a")
    assert index.leaves() == [b"b"]
    fits, evicted = index.make_room(100, protect=b"b")
    assert not fits  # only b is a leaf, and it is protected
    assert evicted == []
    assert index.used == 200


def test_a_chunk_bigger_than_the_capacity_evicts_nothing() -> None:
    index = DiskIndex(capacity=100)
    index.add(b"a", "a", 50, None)
    assert index.make_room(101) == (False, [])
    assert index.used == 50


def test_orphans_and_parents_found_after_their_children() -> None:
    index = DiskIndex(capacity=1000)
    index.add(b"c", "c", 10, b"b")  # b is not indexed (yet)
    index.add(b"e", "e", 10, None)
    index.commit(b"f", "f", 10, b"x")  # written without its parent on disk: an orphan, coldest
    assert index.leaves() == [b"f", b"c", b"e"]
    index.add(b"b", "b", 10, b"a")  # found later (another process wrote it): it has a child already
    assert index.leaves() == [b"f", b"c", b"e"]
    index.remove(b"c")
    assert index.leaves() == [b"b", b"f", b"e"]  # a leaf again: coldest


def test_re_adding_a_key_updates_its_size() -> None:
    index = DiskIndex(capacity=1000)
    index.add(b"a", "a", 10, None)
    index.add(b"a", "a2", 30, None)
    assert (len(index), index.used, index.get(b"a").name) == (1, 30, "a2")  # type: ignore[union-attr]


class IndexModel(RuleBasedStateMachine):
    """Adds, commits, touches, removals and evictions on one index, checked against the model."""

    CAPACITY = 400

    def __init__(self) -> None:
        super().__init__()
        self.index = DiskIndex(self.CAPACITY)
        self.sizes: dict[bytes, int] = {}
        self.stamp: dict[bytes, int] = {}  # recency of leaves (stale for chunks with children)
        self.clock = 0
        self.reserved = 0

    # -- the model ---------------------------------------------------------------------------------
    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def _cold(self) -> int:
        return min(self.stamp.values(), default=0) - 1

    def _children(self, key: bytes) -> int:
        return sum(1 for k in self.sizes if PARENT[k] == key)

    def _leaves(self) -> list[bytes]:
        return sorted((k for k in self.sizes if not self._children(k)), key=lambda k: self.stamp[k])

    def _add(self, key: bytes, size: int, cold: bool) -> None:
        if key in self.sizes:
            self.sizes[key] = size
            if not self._children(key):
                self.stamp[key] = self._tick()
            return
        self.sizes[key] = size
        self.stamp[key] = self._cold() if cold else self._tick()

    def _remove(self, key: bytes) -> None:
        del self.sizes[key]
        del self.stamp[key]
        parent = PARENT[key]
        if parent in self.sizes and not self._children(parent):
            self.stamp[parent] = self._cold()

    # -- rules -------------------------------------------------------------------------------------
    @rule(key=st.sampled_from(KEYS), size=st.integers(1, 150))
    def add(self, key: bytes, size: int) -> None:
        self.index.add(key, key.decode(), size, PARENT[key])
        self._add(key, size, cold=False)

    @rule(key=st.sampled_from(KEYS), size=st.integers(1, 150), protect=st.booleans())
    def write(self, key: bytes, size: int, protect: bool) -> None:
        parent = PARENT[key]
        guard = parent if protect else None
        fits, evicted = self.index.make_room(size, protect=guard)
        expected: list[bytes] = []
        expect_fit = size <= self.CAPACITY
        if expect_fit:
            while sum(self.sizes.values()) + self.reserved + size > self.CAPACITY:
                candidates = [k for k in self._leaves() if k != guard]
                if not candidates:
                    expect_fit = False
                    break
                expected.append(candidates[0])
                self._remove(candidates[0])
        assert [e.key for e in evicted] == expected
        assert fits == expect_fit
        if fits:
            orphan = parent is not None and parent not in self.sizes
            self.index.commit(key, key.decode(), size, parent)
            self._add(key, size, cold=orphan)

    @rule(size=st.integers(1, 150))
    def reserve_and_release(self, size: int) -> None:
        fits, evicted = self.index.make_room(size)
        for entry in evicted:
            self._remove(entry.key)
        if fits:
            self.index.release(size)
        else:
            assert size > self.CAPACITY or not self._leaves()

    @rule(key=st.sampled_from(KEYS))
    def touch(self, key: bytes) -> None:
        self.index.touch(key)
        if key in self.sizes and not self._children(key):
            self.stamp[key] = self._tick()

    @rule(key=st.sampled_from(KEYS))
    def remove(self, key: bytes) -> None:
        entry = self.index.remove(key)
        assert (entry is not None) == (key in self.sizes)
        if entry is not None:
            self._remove(key)

    @invariant()
    def same_as_the_model(self) -> None:
        assert self.index.leaves() == self._leaves()
        assert sorted(self.index.keys()) == sorted(self.sizes)
        assert self.index.used == sum(self.sizes.values())
        for key in self.sizes:
            entry = self.index.get(key)
            assert entry is not None
            assert entry.children == self._children(key)


def test_index_state_machine() -> None:
    run_state_machine_as_test(
        IndexModel, settings=settings(max_examples=150, stateful_step_count=40, deadline=None)
    )
