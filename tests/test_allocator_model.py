"""Property-based tests: the pool against a simple model, under every sequence of operations.

Invariants checked after every step: no slot is in two live KVObjs, counts match the model, and every
live chunk still holds the bytes written into it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    precondition,
    rule,
)

from kvtest import forge, random_bits, run_state_machine, small_pool, to_native
from lmcache.allocator import ChunkAllocator
from lmcache.errors import DoubleFreeError, InvalidHandleError, StaleHandleError

SLOTS = 6


class PoolModel(RuleBasedStateMachine):
    """Drives one pool; ``live`` maps each live KVObj to the bytes it must hold."""

    backend = "numpy"
    objs = Bundle("objs")

    def __init__(self) -> None:
        super().__init__()
        self.pool = small_pool(self.backend, slots=SLOTS)
        self.live: dict[int, tuple[Any, np.ndarray]] = {}  # serial -> (KVObj, expected bytes)
        self.serial: dict[int, int] = {}  # id(KVObj) -> serial (stable across hypothesis replays)
        self.dead: list[Any] = []
        self.allocations = self.frees = self.failed = self.peak = 0
        self.seed = 0

    def _chunk(self, tokens: int) -> np.ndarray:
        self.seed += 1
        return random_bits((2, 2, tokens, 2, 8), "float16", seed=self.seed)

    def _record(self, obj: Any, content: np.ndarray | None) -> Any:
        if content is None:  # allocated, not written: give it content so corruption shows
            content = self._chunk(obj.num_tokens)
            obj.copy_from(to_native(content, self.backend))
        key = self.allocations
        self.serial[id(obj)] = key
        self.live[key] = (obj, content)
        self.allocations += 1
        self.peak = max(self.peak, len(self.live))
        return obj

    @rule(target=objs, tokens=st.integers(1, 16), put=st.booleans())
    def allocate(self, tokens: int, put: bool) -> Any:
        content = self._chunk(tokens)
        native = to_native(content, self.backend)
        obj = self.pool.put(native) if put else self.pool.allocate(native)
        if obj is None:
            assert len(self.live) == SLOTS
            self.failed += 1
            return multiple()
        return self._record(obj, content if put else None)

    @rule(target=objs, sizes=st.lists(st.integers(1, 16), min_size=1, max_size=4))
    def allocate_batch(self, sizes: list[int]) -> Any:
        objs = self.pool.allocate_batch([to_native(self._chunk(n), self.backend) for n in sizes])
        if objs is None:
            assert len(self.live) + len(sizes) > SLOTS
            self.failed += len(sizes)
            return multiple()
        assert [o.num_tokens for o in objs] == sizes
        return multiple(*(self._record(obj, None) for obj in objs))

    @rule(obj=consumes(objs))
    def free(self, obj: Any) -> None:
        key = self.serial[id(obj)]
        if key not in self.live:  # already freed by free_batch
            before = self.pool.stats()
            with pytest.raises((DoubleFreeError, StaleHandleError)):  # stale if the slot was reused since
                self.pool.free(obj)
            assert self.pool.stats() == before
            return
        self.pool.free(obj)
        del self.live[key]
        self.dead.append(obj)
        self.frees += 1

    @rule(data=st.data())
    def free_batch(self, data: st.DataObject) -> None:
        if not self.live:
            return
        chosen = data.draw(st.lists(st.sampled_from(sorted(self.live)), unique=True, max_size=3))
        objs = [self.live[key][0] for key in chosen]
        self.pool.free_batch(objs)
        for key in chosen:
            self.dead.append(self.live.pop(key)[0])
        self.frees += len(chosen)

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def reissue(self, data: st.DataObject) -> None:
        """Free and allocate one slot in one step: the old handle is stale, the new one holds the bytes."""
        key = data.draw(st.sampled_from(sorted(self.live)))
        obj, content = self.live.pop(key)
        new = self.pool.reissue(obj)
        assert new.chunk_idx == obj.chunk_idx
        assert new.is_live
        assert not obj.is_live
        self.dead.append(obj)
        self.frees += 1
        self._record(new, content)

    @precondition(lambda self: bool(self.dead))
    @rule(data=st.data())
    def free_dead_handle(self, data: st.DataObject) -> None:
        obj = data.draw(st.sampled_from(self.dead))
        before = self.pool.stats()
        with pytest.raises((DoubleFreeError, StaleHandleError)):
            self.pool.free(obj)
        with pytest.raises(InvalidHandleError):
            obj.copy_from(to_native(self._chunk(obj.num_tokens), self.backend))
        with pytest.raises(StaleHandleError):
            obj.data  # noqa: B018
        assert self.pool.stats() == before

    @rule(slot=st.integers(-1, SLOTS), generation=st.integers(-3, 200), tokens=st.integers(1, 16))
    def use_forged_handle(self, slot: int, generation: int, tokens: int) -> None:
        """A hand-built or edited handle frees nothing and reaches no memory, whatever it names."""
        if any((o.chunk_idx, o.generation) == (slot, generation) for o, _ in self.live.values()):
            return  # a copy of a real handle's identity, not a forgery
        forged = forge(self.pool, slot, tokens, generation)
        before = self.pool.stats()
        with pytest.raises(InvalidHandleError):
            self.pool.free(forged)
        with pytest.raises(InvalidHandleError):
            forged.data  # noqa: B018
        with pytest.raises(InvalidHandleError):
            self.pool.free_batch([forged])
        assert self.pool.stats() == before

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def edit_live_handle(self, data: st.DataObject) -> None:
        """A live handle's identity cannot be edited, and a numpy-int copy of it frees nothing."""
        obj, _ = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        for field in ("chunk_idx", "num_tokens", "size", "generation", "data"):
            with pytest.raises(AttributeError):
                setattr(obj, field, 0)
        twin = forge(self.pool, np.int64(obj.chunk_idx), obj.num_tokens, obj.generation)
        before = self.pool.stats()
        with pytest.raises(StaleHandleError):
            self.pool.free(twin)
        assert self.pool.stats() == before

    @rule(sizes=st.lists(st.integers(1, 16), min_size=1, max_size=3))
    def edit_batch(self, sizes: list[int]) -> None:
        """A batch's slots and tokens are immutable: appending, popping or replacing them fails."""
        batch = self.pool.allocate_batch([to_native(self._chunk(n), self.backend) for n in sizes])
        if batch is None:
            self.failed += len(sizes)
            return
        for field in ("chunk_idx", "num_tokens"):
            assert isinstance(getattr(batch, field), tuple)
            with pytest.raises(AttributeError):
                setattr(batch, field, [])
        self.allocations += len(sizes)
        self.peak = max(self.peak, len(self.live) + len(sizes))
        self.pool.free_batch(batch)
        self.frees += len(sizes)

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def overwrite(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.live)))
        obj, _ = self.live[key]
        content = self._chunk(obj.num_tokens)
        obj.copy_from(to_native(content, self.backend))
        self.live[key] = (obj, content)

    @invariant()
    def slots_are_exclusive_and_intact(self) -> None:
        slots = [obj.chunk_idx for obj, _ in self.live.values()]
        assert len(slots) == len(set(slots))
        for obj, content in self.live.values():
            assert obj.is_live
            assert obj.as_numpy().tobytes() == content.tobytes()

    @invariant()
    def counts_match_the_model(self) -> None:
        stats = self.pool.stats()
        assert stats.used == len(self.live)
        assert stats.free == SLOTS - len(self.live)
        assert (stats.allocations, stats.frees) == (self.allocations, self.frees)
        assert stats.failed_allocations == self.failed
        assert stats.peak_used == self.peak

    def teardown(self) -> None:
        self.pool.close()


@pytest.mark.parametrize("backend_name", ["numpy", "torch", "jax"])
def test_pool_matches_model(backend_name: str) -> None:
    run_state_machine(PoolModel, backend_name, max_examples=100 if backend_name == "numpy" else 30)


class AllocatorModel(RuleBasedStateMachine):
    """The bare allocator against a set model: every acquire returns a free slot, never a held one."""

    def __init__(self) -> None:
        super().__init__()
        self.allocator = ChunkAllocator(5)
        self.held: dict[int, int] = {}
        self.released: list[tuple[int, int]] = []

    @rule()
    def acquire_one(self) -> None:
        taken = self.allocator.acquire_one()
        if taken is None:
            assert len(self.held) == 5
            return
        slot, ticket = taken
        assert slot not in self.held
        assert self.allocator.generation_of(slot) == ticket > 0
        self.held[slot] = ticket

    @rule(count=st.integers(0, 6))
    def acquire_many(self, count: int) -> None:
        taken = self.allocator.acquire_many(count)
        if taken is None:
            assert len(self.held) + count > 5
            return
        slots, first = taken
        assert len(set(slots)) == count
        assert not set(slots) & set(self.held)
        assert [self.allocator.generation_of(slot) for slot in slots] == list(range(first, first + count))
        self.held.update({slot: self.allocator.generation_of(slot) for slot in slots})

    @precondition(lambda self: len(self.held) >= 2)
    @rule(data=st.data())
    def release_many(self, data: st.DataObject) -> None:
        chosen = data.draw(st.lists(st.sampled_from(sorted(self.held)), min_size=1, unique=True))
        self.allocator.release_many(chosen, [self.held[slot] for slot in chosen])
        for slot in chosen:
            self.released.append((slot, self.held.pop(slot)))

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(sorted(self.held)))
        generation = self.held.pop(slot)
        self.allocator.release_one(slot, generation)
        self.released.append((slot, generation))

    @precondition(lambda self: bool(self.released))
    @rule(data=st.data(), single=st.booleans())
    def release_again(self, data: st.DataObject, single: bool) -> None:
        slot, generation = data.draw(st.sampled_from(self.released))
        before = self.allocator.stats(1)
        release = self.allocator.release_one if single else self.allocator.release_many
        with pytest.raises(InvalidHandleError):
            release(*((slot, generation) if single else ([slot], [generation])))
        assert self.allocator.stats(1) == before

    @rule(slot=st.integers(-2, 6), generation=st.integers(-3, 60), as_numpy=st.booleans())
    def release_forged(self, slot: int, generation: int, as_numpy: bool) -> None:
        """A handle the allocator never issued (or one with a numpy index) never frees anything."""
        if not as_numpy and self.held.get(slot) == generation:
            return  # that is a real handle
        before = self.allocator.stats(1)
        index: Any = np.int64(slot) if as_numpy else slot
        with pytest.raises(InvalidHandleError):
            self.allocator.release_one(index, generation)
        with pytest.raises(InvalidHandleError):
            self.allocator.release_many([index], [generation])
        assert self.allocator.stats(1) == before
        assert all(type(free) is int for free in self.allocator.free_slots)

    @invariant()
    def counts(self) -> None:
        assert self.allocator.num_used == len(self.held)
        for slot, generation in self.held.items():
            assert self.allocator.is_live(slot, generation)


TestAllocatorModel = AllocatorModel.TestCase
TestAllocatorModel.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
