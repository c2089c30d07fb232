"""The vLLM adapter (adapters/lmcache_vllm), driven by vLLM 0.33.0's own code.

* Policies: vLLM's own manager tests (tests/v1/kv_offload/cpu/test_manager.py, vendored in
  tests/vllm_upstream) run with vLLM's ``"lru"`` registry slot pointing at our classes: the cases that
  only assume a correct policy run for every policy, the LRU-exact ones for ``LmcacheLRU``.
* Loading: vLLM's factories resolve our classes by ``cache_policy_module_path`` and ``spec_module_path``.
* The spec's manager: vLLM's lookup / store / load protocol, bytes exact through the slots it hands out.
* The spec's worker: vLLM's own ``test_transfer`` (tests/v1/kv_offload/cpu/test_gpu_worker.py, vendored in
  tests/vllm_upstream) with our worker in place of ``CPUOffloadingWorker``; bytes exact device -> cache ->
  device through the worker and manager of two specs (vLLM's two roles), across groups, tensor-parallel
  ranks and a spawned worker process sharing the host region; vLLM's own ``OffloadingConnectorWorker``
  (helpers from its tests/v1/kv_connector/unit/offloading_connector/test_worker.py, vendored) running
  store and load jobs through our spec.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import os
import pickle
import uuid
from typing import Any

import numpy as np
import pytest

from kvtest import require
from vllmtest import kv_caches, store_in_child

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


#: The shared host regions of the engine ids _config made; removed after each test (a failed test
#: skips its shutdowns, and its region would stay in /dev/shm).
_REGIONS: list[str] = []


@pytest.fixture(autouse=True)
def _remove_regions() -> Any:
    yield
    while _REGIONS:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_REGIONS.pop())


def _config(
    cpu_bytes: int,
    block_bytes: int,
    *,
    events: bool = False,
    engine_id: str | None = None,
    blocks_per_chunk: int = 1,
    rank: int = 0,
    world_size: int = 1,
    **extra: Any,
) -> Any:
    """vLLM's OffloadingConfig for our spec, built by vLLM's own test helper; a fresh engine id (so a
    fresh shared host region) unless one is given."""
    from lmcache_vllm.host_region import region_path

    offload_config = importlib.import_module("vllm_upstream.offload_config")
    engine_id = engine_id or f"lmcache-test-{uuid.uuid4()}"
    _REGIONS.append(region_path(engine_id))
    config = offload_config.make_offloading_config(
        spec_name="LmcacheOffloadingSpec",
        cpu_bytes_to_use=cpu_bytes,
        worker_kv_bytes_per_block=block_bytes,
        engine_id=engine_id,
        blocks_per_chunk=blocks_per_chunk,
        rank=rank,
        world_size=world_size,
        extra_config={"spec_module_path": "lmcache_vllm.spec", **extra},
    )
    return dataclasses.replace(config, enable_kv_cache_events=events)


def _spec(vllm: Any, cpu_bytes: int, block_bytes: int, **kwargs: Any) -> Any:
    """Our spec, loaded by vLLM's factory from ``spec_name`` / ``spec_module_path``."""
    from vllm.v1.kv_offload.factory import OffloadingSpecFactory

    return OffloadingSpecFactory.create_spec(_config(cpu_bytes, block_bytes, **kwargs))


def test_factory_loads_spec_by_module_path(vllm: Any) -> None:
    from lmcache_vllm.spec import LmcacheOffloadingManager, LmcacheOffloadingSpec

    spec = _spec(vllm, 4096, 64)
    assert type(spec) is LmcacheOffloadingSpec
    manager = spec.get_manager()
    assert isinstance(manager, LmcacheOffloadingManager)
    assert spec.get_manager() is manager
    assert manager.cache.pool.max_chunk_num == 4096 // 256  # 64-byte chunks in 256-byte aligned slots
    assert os.path.exists(spec.region_path)  # the arena is the shared region, which shutdown removes
    manager.shutdown()
    assert not os.path.exists(spec.region_path)


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


# -- the worker: device KV blocks <-> the cache's slots -------------------------------------------------


def _finish(worker: Any, job_id: int) -> Any:
    """Wait for ``job_id`` and return its TransferResult (the only one finished)."""
    worker.wait({job_id})
    results = worker.get_finished()
    assert [result.job_id for result in results] == [job_id]
    assert results[0].success
    return results[0]


@pytest.mark.parametrize("pages", [[[512, 256]], [[100, 37]]], ids=["aligned", "odd"])
@pytest.mark.parametrize("blocks_per_chunk", [1, 3])
def test_worker_round_trips_bytes_through_vllm_protocol(
    vllm: Any, blocks_per_chunk: int, pages: list[list[int]]
) -> None:
    """Blocks go device -> cache -> other device blocks bit-exactly, through the worker that vLLM's
    factory builds from the spec and the manager of a second spec (vLLM's two roles), with the specs
    pickled between them as vLLM's multiprocess executor sends them."""
    import torch
    from vllm.v1.kv_offload.base import GPULoadStoreSpec, LookupResult, ReqContext, make_offload_key

    from lmcache_vllm.worker import LmcacheOffloadingWorker

    per_block = sum(pages[0])  # "odd": pages no wider integer divides, copied byte by byte
    config = _config(8 * per_block * blocks_per_chunk, per_block, blocks_per_chunk=blocks_per_chunk)
    scheduler_spec, worker_spec = _spec_pair(vllm, config)
    caches, tensors = kv_caches(pages, num_blocks=32, seed=1)
    worker = worker_spec.get_worker(caches)  # vLLM registers the workers' KV caches first
    assert isinstance(worker, LmcacheOffloadingWorker)
    assert worker_spec.get_worker(caches) is worker
    assert not worker.uses_streams  # CPU tensors: the thread handler
    manager = scheduler_spec.get_manager()
    ctx = ReqContext(req_id="r")
    keys = [make_offload_key(f"chunk-{i}".encode(), 0) for i in range(3)]
    src = [5, 9, 2, 30, 17, 11, 0, 8, 21][: 3 * blocks_per_chunk]
    out = manager.prepare_store(keys, ctx)
    assert out is not None
    assert out.keys_to_store == keys
    store_spec = pickle.loads(pickle.dumps(out.store_spec))
    assert store_spec.block_ids.tolist() == out.store_spec.block_ids.tolist()
    assert worker.submit_store(1, GPULoadStoreSpec(src, (len(src),), (0,)), store_spec)
    result = _finish(worker, 1)
    assert result.transfer_size == len(src) * per_block
    # Copied, yet invisible until vLLM completes the store.
    assert [manager.lookup(key, ctx) for key in keys] == [LookupResult.HIT_PENDING] * 3
    manager.complete_store(keys, ctx)
    assert [manager.lookup(key, ctx) for key in keys] == [LookupResult.HIT] * 3
    # The slots hold the chunk bytes in vLLM's host layout: each tensor's blocks_per_chunk pages in turn.
    load = manager.prepare_load(keys, ctx)
    for i, obj in enumerate(load.objs):
        blocks = src[i * blocks_per_chunk : (i + 1) * blocks_per_chunk]
        expected = torch.cat([tensor[blocks].reshape(-1) for tensor in tensors]).numpy().view(np.uint8)
        assert np.array_equal(obj.as_numpy().reshape(-1), expected)
    dst = [31 - b for b in src]
    before = [tensor.clone() for tensor in tensors]
    assert worker.submit_load(2, pickle.loads(pickle.dumps(load)), GPULoadStoreSpec(dst, (len(dst),), (0,)))
    _finish(worker, 2)
    assert manager.has_pending_work()  # the load's slots stay leased until vLLM completes the load
    manager.complete_load(keys, ctx)
    assert not manager.has_pending_work()
    untouched = [b for b in range(32) if b not in dst]
    for tensor, old in zip(tensors, before, strict=True):
        assert torch.equal(tensor[dst], old[src])
        assert torch.equal(tensor[untouched], old[untouched])
    manager.shutdown()
    worker.shutdown()
    worker.shutdown()  # twice: nothing left to stop
    assert not os.path.exists(worker_spec.region_path)


def _spec_pair(vllm: Any, config: Any) -> tuple[Any, Any]:
    """Two specs of one config, as vLLM builds one per connector role (scheduler, worker)."""
    from vllm.v1.kv_offload.factory import OffloadingSpecFactory

    return OffloadingSpecFactory.create_spec(config), OffloadingSpecFactory.create_spec(config)


def test_worker_groups_skip_and_ranks(vllm: Any) -> None:
    """Several KV cache groups (one empty, one entering its first chunk mid-way, as vLLM's
    ``block_indices`` say) and two tensor-parallel workers sharing each slot, each in its own part."""
    import torch
    from vllm.v1.kv_offload.base import GPULoadStoreSpec, ReqContext, make_offload_key

    blocks_per_chunk, world_size = 2, 2
    pages = [[256, 512], [], [256]]
    per_block = sum(sum(group) for group in pages)
    engine_id = f"lmcache-test-{uuid.uuid4()}"
    configs = [
        _config(
            16 * per_block * blocks_per_chunk * world_size,
            per_block,
            engine_id=engine_id,
            blocks_per_chunk=blocks_per_chunk,
            rank=rank,
            world_size=world_size,
        )
        for rank in range(world_size)
    ]
    from vllm.v1.kv_offload.factory import OffloadingSpecFactory

    specs = [OffloadingSpecFactory.create_spec(config) for config in configs]
    workers, all_tensors = [], []
    for rank, spec in enumerate(specs):
        caches, tensors = kv_caches(pages, num_blocks=16, seed=10 + rank)
        workers.append(spec.get_worker(caches))
        all_tensors.append(tensors)
    manager = OffloadingSpecFactory.create_spec(configs[0]).get_manager()
    ctx = ReqContext(req_id="r")
    # group 0: 2 chunks, whole; group 1: no block; group 2: 3 blocks from block index 1 (2 chunks).
    keys = [make_offload_key(bytes([i]), 0) for i in range(4)]
    out = manager.prepare_store(keys, ctx)
    assert out is not None
    src = [3, 7, 1, 12, 4, 9, 14]
    store = GPULoadStoreSpec(src, group_sizes=(4, 0, 3), block_indices=(0, 0, 1))
    for job, worker in enumerate(workers):
        assert worker.submit_store(job, store, out.store_spec)
        result = _finish(worker, job)
        assert result.transfer_size == 4 * 768 + 3 * 256
    manager.complete_store(keys, ctx)
    load = manager.prepare_load(keys, ctx)
    # Rank r's bytes of a slot start at r * blocks_per_chunk * worker_kv_bytes_per_block.
    worker_bytes = blocks_per_chunk * per_block
    slot = load.objs[0].as_numpy().reshape(-1)
    for rank, tensors in enumerate(all_tensors):
        first = np.concatenate([t[src[:2]].reshape(-1).numpy().view(np.uint8) for t in tensors[:2]])
        assert np.array_equal(slot[rank * worker_bytes : rank * worker_bytes + first.size], first)
        # Group 2 enters its first chunk (the third key's slot) one page in: its first block is page 1
        # of tensor 2, which follows tensors 0 and 1 (blocks_per_chunk pages each) in the worker's part.
        third = load.objs[2].as_numpy().reshape(-1)
        start = rank * worker_bytes + 768 * blocks_per_chunk + 256
        assert np.array_equal(third[start : start + 256], tensors[2][src[4]].numpy().view(np.uint8))
    dst = [0, 2, 5, 6, 8, 10, 11]
    before = [[tensor.clone() for tensor in tensors] for tensors in all_tensors]
    for job, worker in enumerate(workers, start=10):
        assert worker.submit_load(job, load, GPULoadStoreSpec(dst, (4, 0, 3), (0, 0, 1)), expedited=job == 11)
        _finish(worker, job)
    manager.complete_load(keys, ctx)
    for tensors, old in zip(all_tensors, before, strict=True):
        for index, (tensor, old_tensor) in enumerate(zip(tensors, old, strict=True)):
            in_group = slice(0, 4) if index < 2 else slice(4, 7)  # tensors 0, 1: group 0; 2: group 2
            assert torch.equal(tensor[dst[in_group]], old_tensor[src[in_group]])
    manager.shutdown()
    for worker in workers:
        worker.shutdown()


def test_worker_refuses_bad_specs_and_geometry(vllm: Any) -> None:
    from vllm.v1.kv_offload.base import GPULoadStoreSpec
    from vllm.v1.kv_offload.cpu.common import CPULoadStoreSpec

    from lmcache.errors import CacheInvariantError, ConfigError

    caches, _ = kv_caches([[256]], num_blocks=8, seed=0)
    with pytest.raises(ConfigError, match="worker_kv_bytes_per_block"):
        _spec(vllm, 8 * 256, 128).get_worker(caches)  # the spec says 128 bytes per block, the tensor 256
    bad_ref = dataclasses.replace(
        caches, group_data_refs=[[dataclasses.replace(caches.group_data_refs[0][0], page_size_bytes=300)]]
    )
    with pytest.raises(ConfigError, match="page of 300 bytes"):
        _spec(vllm, 8 * 256, 256).get_worker(bad_ref)
    spec = _spec(vllm, 4 * 256, 256)
    worker = spec.get_worker(caches)
    with pytest.raises(CacheInvariantError, match="host chunks"):
        worker.submit_store(1, GPULoadStoreSpec([0], (1,), (0,)), CPULoadStoreSpec([4]))
    with pytest.raises(CacheInvariantError, match="device blocks"):
        worker.submit_load(2, CPULoadStoreSpec([0]), GPULoadStoreSpec([8], (1,), (0,)))
    with pytest.raises(CacheInvariantError, match="group"):
        worker.submit_store(3, GPULoadStoreSpec([0, 1], (2,), (0,)), CPULoadStoreSpec([0]))
    assert worker.get_finished() == []  # nothing was queued
    worker.shutdown()


def test_host_region_is_shared_and_checked(vllm: Any, tmp_path: Any) -> None:
    from lmcache.errors import ConfigError
    from lmcache_vllm.host_region import HostRegion

    path = str(tmp_path / "region")
    first, second = HostRegion(path, 4096), HostRegion(path, 4096)
    first.array[:4] = [1, 2, 3, 4]
    assert second.array[:4].tolist() == [1, 2, 3, 4]
    assert first.array.ctypes.data != second.array.ctypes.data  # two mappings of one file
    with pytest.raises(ConfigError, match="remove the file"):
        HostRegion(path, 8192)
    first.close()
    assert os.path.exists(path)  # the second still holds it
    assert second.array[:4].tolist() == [1, 2, 3, 4]
    second.close()  # the last one: the name goes
    assert not os.path.exists(path)
    second.close()


def test_worker_in_another_process_shares_the_slots(vllm: Any) -> None:
    """vLLM's multiprocess layout: the scheduler's manager here, a worker in a spawned process storing
    into the slots the manager reserved; the bytes are in the manager's cache once the child exits, and
    load back bit-exactly through a worker of this process."""
    import multiprocessing

    import torch
    from vllm.v1.kv_offload.base import GPULoadStoreSpec, ReqContext, make_offload_key

    pages = [[256, 512]]
    config = _config(8 * 768 * 2, 768, blocks_per_chunk=2)
    from vllm.v1.kv_offload.factory import OffloadingSpecFactory

    manager = OffloadingSpecFactory.create_spec(config).get_manager()
    ctx = ReqContext(req_id="r")
    keys = [make_offload_key(bytes([i]), 0) for i in range(2)]
    out = manager.prepare_store(keys, ctx)
    assert out is not None
    src = [4, 1, 15, 6]
    child = multiprocessing.get_context("spawn").Process(
        target=store_in_child, args=(config, out.store_spec, src, pages)
    )
    child.start()
    child.join(240)
    assert child.exitcode == 0
    manager.complete_store(keys, ctx)
    _, expected = kv_caches(pages, num_blocks=16, seed=7)  # the child's tensors, made again
    caches, tensors = kv_caches(pages, num_blocks=16, seed=99)
    worker = OffloadingSpecFactory.create_spec(config).get_worker(caches)
    load = manager.prepare_load(keys, ctx)
    dst = [0, 1, 2, 3]
    assert worker.submit_load(5, load, GPULoadStoreSpec(dst, (4,), (0,)))
    _finish(worker, 5)
    manager.complete_load(keys, ctx)
    for tensor, source in zip(tensors, expected, strict=True):
        assert torch.equal(tensor[dst], source[src])
    worker.shutdown()
    manager.shutdown()


def test_vllm_worker_transfer_cases(vllm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's own ``test_transfer`` (tests/v1/kv_offload/cpu/test_gpu_worker.py, vendored unchanged)
    with its ``CPUOffloadingWorker`` replaced by the worker vLLM's factory builds from our spec, on CPU
    tensors: every page moved lands where vLLM's check expects it, the others stay, sizes and times
    reported. Run for its CPU-transfer parameters; its shared-memory variants build vLLM's own
    ``SharedOffloadRegion``, which our worker replaces with the pool's region."""
    cases = importlib.import_module("vllm_upstream.gpu_worker_cases")

    def our_worker(
        *, kv_caches: Any, blocks_per_chunk: int, num_cpu_chunks: int, mmap_region: Any = None
    ) -> Any:
        if mmap_region is not None:
            raise AssertionError("run only the cases without vLLM's shared region")
        per_block = sum(tensor.page_size_bytes for tensor in kv_caches.tensors)
        spec = _spec(
            vllm, num_cpu_chunks * per_block * blocks_per_chunk, per_block, blocks_per_chunk=blocks_per_chunk
        )
        assert spec.num_slots == num_cpu_chunks
        return spec.get_worker(kv_caches)

    def seed_host(seed: int) -> None:
        # vllm.utils.torch_utils.set_random_seed without its last step, the device seed, which vLLM's
        # platform on a machine without an accelerator does not implement.
        import random

        import torch

        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    monkeypatch.setattr(cases, "CPUOffloadingWorker", our_worker)
    monkeypatch.setattr(cases, "set_random_seed", seed_host)
    runs = 0
    for gpu_to_cpu in (True, False):
        for page in cases.GPU_PAGE_SIZES:
            for blocks_per_chunk in cases.BLOCKS_PER_CHUNK_VALUES:
                cases.test_transfer(
                    default_vllm_config=None,
                    gpu_to_cpu=gpu_to_cpu,
                    num_mappings=cases.NUM_MAPPINGS[0],
                    gpu_page_size_bytes=page,
                    blocks_per_chunk=blocks_per_chunk,
                    num_gpu_blocks=cases.NUM_GPU_BLOCKS[0],
                    num_cpu_chunks=cases.NUM_CPU_CHUNKS[0],
                    num_tensors=cases.NUM_TENSORS[0],
                    seed=cases.SEEDS[0],
                    device="cpu",
                    use_shared_memory=False,
                    replicated_layout=False,
                )
                runs += 1
    assert runs == 8


def test_vllm_connector_worker_moves_blocks_through_our_spec(vllm: Any) -> None:
    """vLLM's own worker-side connector (``OffloadingConnectorWorker``) with our spec: it canonicalizes
    the KV caches that vLLM's model-runner allocation made (two layers of different page sizes in one
    backing buffer, the layout of vLLM's ``test_register_kv_caches_uniform_type``), builds our worker
    through ``spec.get_worker``, submits a store job and a load job from the connector metadata the
    scheduler would send, and reports them done (``completed_jobs``, ``finished_recving``); the loaded
    blocks equal the stored ones bit for bit, the others are untouched."""
    import time

    import torch
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.common import (
        OffloadingConnectorMetadata,
        TransferJob,
    )
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.worker import OffloadingConnectorWorker
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
        KVCacheTensor,
        UniformTypeKVCacheSpecs,
    )
    from vllm.v1.kv_offload.base import GPULoadStoreSpec, ReqContext, make_offload_key
    from vllm.v1.kv_offload.factory import OffloadingSpecFactory

    from lmcache_vllm.worker import LmcacheOffloadingWorker

    cases = importlib.import_module("vllm_upstream.connector_worker_cases")
    block_size, num_blocks = cases.BLOCK_SIZE, cases.NUM_BLOCKS
    layer_a, layer_b = "model.layers.0.self_attn", "model.layers.1.self_attn"
    spec_a = FullAttentionSpec(block_size=block_size, num_kv_heads=4, head_size=64, dtype=torch.float16)
    spec_b = FullAttentionSpec(block_size=block_size, num_kv_heads=8, head_size=64, dtype=torch.float16)
    page_a, page_b = spec_a.page_size_bytes, spec_b.page_size_bytes
    window = page_a + page_b
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[
            KVCacheTensor(
                size=window * num_blocks,
                layers=[layer_a],
                layer_stride=page_a * num_blocks,
                block_stride=page_a,
            ),
            KVCacheTensor(
                size=window * num_blocks,
                layers=[layer_b],
                layer_stride=page_b * num_blocks,
                block_stride=page_b,
                offset=page_a * num_blocks,
            ),
        ],
        kv_cache_groups=[
            KVCacheGroupSpec(
                layer_names=[layer_a, layer_b],
                kv_cache_spec=UniformTypeKVCacheSpecs(
                    block_size=block_size, kv_cache_specs={layer_a: spec_a, layer_b: spec_b}
                ),
            )
        ],
    )
    kv_caches = cases._allocate_kv_caches(kv_cache_config, [], device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(3)
    for tensor in kv_caches.values():
        bits = tensor.view(torch.int16)
        bits.copy_(torch.randint(-(2**15), 2**15, bits.shape, dtype=torch.int16, generator=generator))
    config = _config(8 * window, window)
    connector = OffloadingConnectorWorker(
        spec=OffloadingSpecFactory.create_spec(config),
        vllm_config=cases._single_rank_vllm_config(4),
        kv_cache_config=kv_cache_config,
    )
    connector.register_kv_caches(kv_caches)
    assert isinstance(connector.worker, LmcacheOffloadingWorker)
    manager = OffloadingSpecFactory.create_spec(config).get_manager()
    ctx = ReqContext(req_id="req")
    keys = [make_offload_key(bytes([i]), 0) for i in range(3)]
    out = manager.prepare_store(keys, ctx)
    assert out is not None
    src, dst = [1, 4, 7], [0, 2, 9]
    before = {name: tensor.view(torch.int16).clone() for name, tensor in kv_caches.items()}
    store = TransferJob(req_id="req", src_spec=GPULoadStoreSpec(src, (3,), (0,)), dst_spec=out.store_spec)
    connector.prepare_store_kv(OffloadingConnectorMetadata(load_jobs={}, store_jobs={5: store}))
    connector.start_kv_transfers(OffloadingConnectorMetadata(load_jobs={}, store_jobs={}))
    completed: dict[int, int] = {}
    deadline = time.monotonic() + 30
    while 5 not in completed and time.monotonic() < deadline:
        assert connector.get_finished(set()) == (set(), set())
        meta = connector.build_connector_worker_meta()
        if meta is not None:
            completed.update(meta.completed_jobs)
    assert completed == {5: 1}
    manager.complete_store(keys, ctx)
    load = TransferJob(
        req_id="req2", src_spec=manager.prepare_load(keys, ctx), dst_spec=GPULoadStoreSpec(dst, (3,), (0,))
    )
    connector.start_kv_transfers(OffloadingConnectorMetadata(load_jobs={6: load}, store_jobs={}))
    received: set[str] = set()
    while "req2" not in received and time.monotonic() < deadline:
        received |= connector.get_finished(set())[1]
    assert received == {"req2"}
    manager.complete_load(keys, ctx)
    untouched = [b for b in range(num_blocks) if b not in dst]
    for name, tensor in kv_caches.items():
        bits = tensor.view(torch.int16)
        assert torch.equal(bits[dst], before[name][src])
        assert torch.equal(bits[untouched], before[name][untouched])
    connector.shutdown()
    manager.shutdown()
