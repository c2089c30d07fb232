"""The vLLM adapter (adapters/lmcache_vllm), driven by vLLM 0.33.0's own code.

* Policies: vLLM's own manager tests (tests/v1/kv_offload/cpu/test_manager.py, vendored in
  tests/vllm_upstream) run with vLLM's ``"lru"`` registry slot pointing at our classes: the cases that
  only assume a correct policy run for every policy, the LRU-exact ones for ``LmcacheLRU``.
* Loading: vLLM's factories resolve our classes by ``cache_policy_module_path`` and ``spec_module_path``.
* The spec's manager: vLLM's lookup / store / load protocol, bytes exact through the slots it hands out.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any

import numpy as np
import pytest

from kvtest import require

CLASSES = [
    "LmcacheLRU",
    "LmcacheLFU",
    "LmcacheLFUDA",
    "LmcacheARC",
    "LmcacheS3FIFO",
    "LmcacheWTinyLFU",
    "LmcacheAdaptive",
]

# vLLM's cases that use the "lru" slot and assume only a correct policy (atomic evict, never a protected or
# pinned chunk, counts and events): every policy must pass them.
ANY_POLICY_CASES: list[tuple[str, dict[str, Any]]] = [
    ("test_already_stored_chunk_not_evicted_during_prepare_store", {"eviction_policy": "lru"}),
    ("test_cpu_eviction_removed_precedes_stored", {}),
    ("test_cpu_manager_clears_write_usage_after_failed_store", {}),
    ("test_cpu_manager_reports_allocation_size_histogram", {}),
    ("test_cpu_manager_reports_allocation_size_on_allocation_failure", {}),
    ("test_cpu_manager_reports_allocation_size_on_eviction_failure", {}),
    ("test_cpu_manager_reports_cache_usage_gauge", {}),
    ("test_cpu_manager_reports_cache_write_and_read_usage_gauges", {}),
    ("test_cpu_manager_reports_no_config_info_without_info", {}),
    ("test_evictable_cache_chunk_count", {}),
    ("test_failed_store_records_access_once_and_uses_store_miss_hook", {}),
    ("test_filter_reused_manager", {}),
    ("test_filter_reused_manager_oversized_offer_makes_progress", {}),
    ("test_filter_reused_manager_reports_stores_skipped_counter", {}),
    ("test_older_lru_request_does_not_demote_a_newer_shared_access", {}),
    ("test_prepare_load_preserves_key_order", {}),
    ("test_request_finish_forwards_grouped_deduplicated_accesses", {}),
    ("test_store_threshold_does_not_hide_ready_reuse", {}),
    ("test_take_events_prunes_retried_cleanup_and_drains_once", {}),
    ("test_touch_forwards_req_context_to_policy", {}),
]

# vLLM's cases that assert LRU's exact victims: LmcacheLRU must pass them.
LRU_CASES: list[tuple[str, dict[str, Any]]] = [
    ("test_cpu_manager", {}),
    ("test_late_old_completion_does_not_override_newer_request_recency", {}),
    ("test_lru_reset_discards_unfinished_request_recency", {}),
    (
        "test_request_finish_orders_lru_prefix_independent_of_load_completion",
        {"finish_before_completion": False},
    ),
    (
        "test_request_finish_orders_lru_prefix_independent_of_load_completion",
        {"finish_before_completion": True},
    ),
    (
        "test_request_finish_orders_lru_prefix_independent_of_store_completion",
        {"finish_before_completion": False},
    ),
    (
        "test_request_finish_orders_lru_prefix_independent_of_store_completion",
        {"finish_before_completion": True},
    ),
    ("test_request_key_positions_override_store_observation_order", {}),
]


@pytest.fixture
def vllm() -> Any:
    return require("vllm")


def _case_id(case: tuple[str, dict[str, Any]]) -> str:
    name, kwargs = case
    return name + "".join(f"[{value}]" for value in kwargs.values())


def _run_vllm_case(
    case: tuple[str, dict[str, Any]], class_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm.v1.kv_offload.cpu.policies.factory import CachePolicyFactory

    policy_module = importlib.import_module("lmcache_vllm.policy")
    cases = importlib.import_module("vllm_upstream.manager_cases")
    cls = getattr(policy_module, class_name)
    monkeypatch.setitem(CachePolicyFactory._registry, "lru", lambda: cls)
    name, kwargs = case
    func = getattr(cases, name)
    if "monkeypatch" in inspect.signature(func).parameters:
        kwargs = {**kwargs, "monkeypatch": monkeypatch}
    # The policy really is ours (the swap took): vLLM's manager builds it by the "lru" name.
    assert type(cases.make_cpu_manager(num_chunks=2)._policy) is cls
    func(**kwargs)


@pytest.mark.parametrize("class_name", CLASSES)
@pytest.mark.parametrize("case", ANY_POLICY_CASES, ids=_case_id)
def test_vllm_manager_cases_any_policy(
    vllm: Any, case: tuple[str, dict[str, Any]], class_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _run_vllm_case(case, class_name, monkeypatch)


@pytest.mark.parametrize("case", LRU_CASES, ids=_case_id)
def test_vllm_manager_cases_lru(
    vllm: Any, case: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    _run_vllm_case(case, "LmcacheLRU", monkeypatch)


def test_one_class_per_policy(vllm: Any) -> None:
    from lmcache.policies import POLICIES
    from lmcache_vllm import policy

    assert set(policy.CLASS_NAMES) == set(POLICIES)
    assert sorted(policy.CLASS_NAMES.values()) == sorted(CLASSES)
    for name, class_name in policy.CLASS_NAMES.items():
        instance = getattr(policy, class_name)(cache_capacity=4)
        assert instance.policy.name == name


@pytest.mark.parametrize("class_name", CLASSES)
def test_factory_loads_policy_by_module_path(vllm: Any, class_name: str) -> None:
    from vllm.v1.kv_offload.base import ReqContext, make_offload_key
    from vllm.v1.kv_offload.cpu.manager import CPUOffloadingManager

    manager = CPUOffloadingManager(
        num_chunks=2, cache_policy=class_name, cache_policy_module_path="lmcache_vllm.policy"
    )
    assert type(manager._policy).__name__ == class_name
    ctx = ReqContext(req_id="r")
    keys = [make_offload_key(bytes([i]), 0) for i in range(3)]
    out = manager.prepare_store(keys[:2], ctx)
    assert out is not None
    assert out.keys_to_store == keys[:2]
    manager.complete_store(keys[:2], ctx)
    manager.prepare_load(keys[:1], ctx)  # keys[0] pinned: keys[1] is the only victim
    out = manager.prepare_store(keys[2:], ctx)
    assert out is not None
    assert out.evicted_keys == [keys[1]]


def test_register_short_names(vllm: Any) -> None:
    from vllm.v1.kv_offload.cpu.policies.factory import CachePolicyFactory

    from lmcache_vllm.policy import LmcacheAdaptive, register

    names = register()
    assert register() == names  # twice: no duplicate-registration error
    assert CachePolicyFactory.get_cache_policy_cls("lmcache-adaptive") is LmcacheAdaptive


@pytest.mark.parametrize("class_name", CLASSES)
def test_evict_is_atomic_and_skips_protected(vllm: Any, class_name: str) -> None:
    from vllm.v1.kv_offload.base import ReqContext, make_offload_key
    from vllm.v1.kv_offload.cpu.policies.base import ChunkStatus

    policy = getattr(importlib.import_module("lmcache_vllm.policy"), class_name)(cache_capacity=4)
    ctx = ReqContext(req_id="r")
    keys = [make_offload_key(bytes([i]), 0) for i in range(4)]
    for i, key in enumerate(keys):
        chunk = ChunkStatus(i)
        chunk.ref_cnt = 0
        policy.insert(key, chunk, ctx)
    policy.mark_non_evictable(keys[3])  # a load in flight
    protected = {keys[0], keys[1]}
    assert policy.evict(2, protected) is None  # only keys[2] is idle and unprotected
    assert all(policy.get(key) is not None for key in keys)
    evicted = policy.evict(1, protected)
    assert evicted is not None
    assert [key for key, _ in evicted] == [keys[2]]
    assert policy.get(keys[2]) is None
    assert policy.evict(1, set()) is not None  # the protected ones are candidates again
    assert policy.evict(1, set()) is not None
    assert policy.evict(1, set()) is None  # keys[3] is pinned
    policy.clear()
    assert policy.get(keys[3]) is None


def _spec(vllm: Any, cpu_bytes: int, block_bytes: int, *, events: bool = False, **extra: Any) -> Any:
    from vllm.v1.kv_offload.factory import OffloadingSpecFactory

    offload_config = importlib.import_module("vllm_upstream.offload_config")
    config = offload_config.make_offloading_config(
        spec_name="LmcacheOffloadingSpec",
        cpu_bytes_to_use=cpu_bytes,
        worker_kv_bytes_per_block=block_bytes,
        extra_config={"spec_module_path": "lmcache_vllm.spec", **extra},
    )
    return OffloadingSpecFactory.create_spec(dataclasses.replace(config, enable_kv_cache_events=events))


def test_factory_loads_spec_by_module_path(vllm: Any) -> None:
    from lmcache_vllm.spec import LmcacheOffloadingManager, LmcacheOffloadingSpec

    spec = _spec(vllm, 4096, 64)
    assert type(spec) is LmcacheOffloadingSpec
    manager = spec.get_manager()
    assert isinstance(manager, LmcacheOffloadingManager)
    assert spec.get_manager() is manager
    assert manager.cache.pool.max_chunk_num == 4096 // 256  # 64-byte chunks in 256-byte aligned slots
    with pytest.raises(NotImplementedError, match="scheduler side only"):
        spec.get_worker(None)
    manager.shutdown()


@pytest.mark.parametrize("bad", [None, 0, -1, "1GiB", True])
def test_spec_refuses_bad_size(vllm: Any, bad: Any) -> None:
    from lmcache.errors import ConfigError

    with pytest.raises(ConfigError, match="cpu_bytes_to_use"):
        _spec(vllm, bad, 64)


def test_manager_round_trips_bytes_and_evicts(vllm: Any) -> None:
    from vllm.v1.kv_offload.base import LookupResult, ReqContext, make_offload_key

    from lmcache.errors import CacheInvariantError

    manager = _spec(vllm, 4 * 256, 64, events=True, eviction_policy="lru").get_manager()
    ctx = ReqContext(req_id="r")
    keys = [make_offload_key(f"block-{i}".encode(), 0) for i in range(6)]
    rng = np.random.default_rng(0)
    payload = {key: rng.integers(0, 256, size=(1, 1, 1, 1, 64), dtype=np.uint8) for key in keys}

    def store(batch: list[Any]) -> list[Any]:
        out = manager.prepare_store(batch, ctx)
        assert out is not None
        assert out.keys_to_store == batch
        for key in batch:
            assert manager.lookup(key, ctx) is LookupResult.HIT_PENDING
        for key, obj in zip(batch, out.store_spec.objs, strict=True):
            obj.copy_from(payload[key])
        assert len(set(out.store_spec.chunk_ids.tolist())) == len(batch)
        manager.complete_store(batch, ctx)
        return list(out.evicted_keys)

    assert manager.lookup(keys[0], ctx) is LookupResult.MISS
    assert store(keys[:4]) == []
    assert [manager.lookup(key, ctx) for key in keys[:4]] == [LookupResult.HIT] * 4
    load = manager.prepare_load(keys[:2], ctx)
    for key, obj in zip(keys[:2], load.objs, strict=True):
        assert np.array_equal(obj.as_numpy(), payload[key])
    # Full: keys[0] and keys[1] are being loaded, so the two new chunks take keys[2] and keys[3]'s slots.
    assert store(keys[4:6]) == keys[2:4]  # the least recently used idle chunks, reported to vLLM
    manager.complete_load(keys[:2], ctx)
    events = [(sorted(event.keys), event.removed) for event in manager.take_events()]
    assert events == [(sorted(keys[:4]), False), (sorted(keys[2:4]), True), (sorted(keys[4:6]), False)]
    assert list(manager.take_events()) == []
    hits = [manager.lookup(key, ctx) for key in keys]
    assert hits == [LookupResult.HIT] * 2 + [LookupResult.MISS] * 2 + [LookupResult.HIT] * 2
    for key in [keys[0], keys[1], keys[4], keys[5]]:
        load = manager.prepare_load([key], ctx)
        assert np.array_equal(load.objs[0].as_numpy(), payload[key])
        manager.complete_load([key], ctx)
    with pytest.raises(CacheInvariantError, match="not cached"):
        manager.prepare_load([keys[0], keys[2]], ctx)
    assert not manager.has_pending_work()  # the refused load pinned nothing
    with pytest.raises(CacheInvariantError, match="no load in flight"):
        manager.complete_load([keys[0]], ctx)
    manager.shutdown()


def test_manager_refuses_a_store_with_no_room_and_keeps_nothing(vllm: Any) -> None:
    from vllm.v1.kv_offload.base import LookupResult, ReqContext, make_offload_key

    manager = _spec(vllm, 2 * 256, 64).get_manager()
    ctx = ReqContext(req_id="r")
    keys = [make_offload_key(bytes([i]), 0) for i in range(4)]
    out = manager.prepare_store(keys[:2], ctx)
    assert out is not None
    # Both slots are being written: a third chunk has no room; the offer is refused whole.
    assert manager.prepare_store(keys[2:4], ctx) is None
    assert [manager.lookup(key, ctx) for key in keys[2:]] == [LookupResult.MISS] * 2
    manager.complete_store(keys[:2], ctx, success=False)  # a failed store leaves nothing behind
    assert [manager.lookup(key, ctx) for key in keys[:2]] == [LookupResult.MISS] * 2
    out = manager.prepare_store(keys[2:4], ctx)
    assert out is not None
    assert out.keys_to_store == keys[2:4]
    manager.complete_store(keys[2:4], ctx)
    # An offer of cached chunks stores nothing and keeps them.
    out = manager.prepare_store(keys[2:4], ctx)
    assert out is not None
    assert out.keys_to_store == []
    assert [manager.lookup(key, ctx) for key in keys[2:]] == [LookupResult.HIT] * 2
    manager.shutdown()


def test_policy_state_machine(vllm: Any) -> None:
    """Any sequence of vLLM manager calls: evict returns exactly n idle, unprotected chunks or None with
    nothing changed, and the policy's chunks are always the cached ones."""
    from hypothesis import settings
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
    from vllm.v1.kv_offload.base import ReqContext, make_offload_key
    from vllm.v1.kv_offload.cpu.policies.base import ChunkStatus

    policy_module = importlib.import_module("lmcache_vllm.policy")
    ctx = ReqContext(req_id="r")
    keys = [make_offload_key(bytes([i]), 0) for i in range(12)]
    key_st = st.sampled_from(keys)

    class PolicyMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.refs: dict[Any, int] = {}  # the model: key -> ref_cnt (-1 while being stored)

        @initialize(class_name=st.sampled_from(CLASSES))
        def build(self, class_name: str) -> None:
            self.policy = getattr(policy_module, class_name)(cache_capacity=8)

        @precondition(lambda self: len(self.refs) < 8)
        @rule(key=key_st, ready=st.booleans())
        def insert(self, key: Any, ready: bool) -> None:
            if key in self.refs:
                return
            chunk = ChunkStatus(len(self.refs))
            if ready:
                chunk.ref_cnt = 0
            self.policy.insert(key, chunk, ctx)
            self.refs[key] = chunk.ref_cnt

        @rule(key=key_st, success=st.booleans())
        def complete_store(self, key: Any, success: bool) -> None:
            if self.refs.get(key) != -1:
                return
            if success:
                self.policy.get(key).ref_cnt = 0
                self.policy.mark_evictable(key)
                self.refs[key] = 0
            else:
                self.policy.remove(key)
                del self.refs[key]

        @rule(key=key_st)
        def pin(self, key: Any) -> None:
            if self.refs.get(key, -1) < 0:
                return
            if self.refs[key] == 0:
                self.policy.mark_non_evictable(key)
            self.refs[key] += 1
            self.policy.get(key).ref_cnt += 1

        @rule(key=key_st)
        def unpin(self, key: Any) -> None:
            if self.refs.get(key, 0) <= 0:
                return
            self.refs[key] -= 1
            self.policy.get(key).ref_cnt -= 1
            if self.refs[key] == 0:
                self.policy.mark_evictable(key)

        @rule(touched=st.lists(key_st, max_size=4))
        def touch(self, touched: list[Any]) -> None:
            self.policy.touch(touched, ctx)

        @rule(n=st.integers(0, 5), protected=st.sets(key_st, max_size=4))
        def evict(self, n: int, protected: set[Any]) -> None:
            idle = {key for key, ref in self.refs.items() if ref == 0 and key not in protected}
            before = dict(self.refs)
            result = self.policy.evict(n, protected)
            if len(idle) < n:
                assert result is None
                assert set(self.policy.chunks) == set(before)
                return
            assert result is not None
            victims = [key for key, _ in result]
            assert len(victims) == n == len(set(victims))
            assert set(victims) <= idle
            for key, chunk in result:
                assert chunk.ref_cnt == 0
                del self.refs[key]

        @rule()
        def clear(self) -> None:
            self.policy.clear()
            self.refs.clear()

        @invariant()
        def same_chunks(self) -> None:
            if hasattr(self, "policy"):
                assert set(self.policy.chunks) == set(self.refs)
                for key, ref in self.refs.items():
                    assert self.policy.get(key).ref_cnt == ref

    PolicyMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
    PolicyMachine.TestCase().runTest()
