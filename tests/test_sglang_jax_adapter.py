"""The sglang-jax adapter (adapters/lmcache_sglang_jax) against sglang-jax's own ``HostKVPool`` ABC.

sglang-jax is pinned to commit cddbf6f1 of github.com/sgl-project/sglang-jax (PyPI's sglang-jax 0.0.2
predates the host pool). The "device" KV buffers are JAX CPU arrays in sglang-jax's per-layer layout
``(pages, page_size, 2 * num_kv_heads, head_dim)`` (fused K/V); a layer of an entry is its padded pages.

The HiCache role (LMCacheLRUHostKVPool) runs under sglang-jax's own device pool (MHATokenToKVPool),
HiCacheController, UnifiedRadixCache and init_hicache, on JAX's CPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvtest import require

PAGE_SHAPE = (4, 2 * 2, 16)  # page_size 4, 2 KV heads fused K/V, head_dim 16


@pytest.fixture(autouse=True)
def _needs_jax_and_sglang_jax() -> None:
    """Every case here drives sglang-jax's ABC with JAX arrays: skip (or fail, where required) without."""
    require("jax")
    require("sgl_jax")


def _pool(pool_size: int = 3, max_pages: int = 5, layer_num: int = 3, dtype: Any = "bfloat16") -> Any:
    require("jax")
    require("sgl_jax")
    from lmcache_sglang_jax import LMCacheHostKVPool

    return LMCacheHostKVPool(pool_size, max_pages, layer_num, PAGE_SHAPE, dtype)


def _layers(pages: int, layer_num: int, dtype: str, seed: int) -> list[Any]:
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**16, size=(layer_num, pages, *PAGE_SHAPE), dtype=np.uint16)
    if dtype == "float32":
        bits = rng.integers(0, 2**32, size=(layer_num, pages, *PAGE_SHAPE), dtype=np.uint32)
    cpu = jax.devices("cpu")[0]
    return [jax.device_put(jax.lax.bitcast_convert_type(jnp.asarray(b), jnp.dtype(dtype)), cpu) for b in bits]


def _bits(array: Any) -> np.ndarray:
    host = np.asarray(array)
    return host.view(np.uint16 if host.dtype.itemsize == 2 else np.uint32)


def test_is_a_host_kv_pool() -> None:
    pool = _pool()
    from sgl_jax.srt.mem_cache.host_kv_pool import HostKVPool

    assert isinstance(pool, HostKVPool)
    assert pool.total_size() == pool.available_size() == 3
    pool.close()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("pages", [1, 3, 5])
def test_device_host_device_bytes_exact(dtype: str, pages: int) -> None:
    import jax

    pool = _pool(dtype=dtype)
    layers = _layers(pages, 3, dtype, seed=pages)
    buffer_id = pool.reserve()
    assert buffer_id is not None
    staged = pool.copy_from_device(layers, buffer_id)
    assert staged.buffer_id == buffer_id
    back = [jax.device_put(a, jax.devices()[0]) for a in staged.array_pytree]  # host -> "device"
    for src, got, slot in zip(layers, back, pool.read_slot(buffer_id, pages), strict=True):
        assert got.shape == src.shape
        assert got.dtype == src.dtype
        np.testing.assert_array_equal(_bits(got), _bits(src))
        np.testing.assert_array_equal(_bits(slot), _bits(src))  # the bytes live in the LMCache slot
    pool.release(buffer_id)
    pool.close()


def test_entries_do_not_overlap() -> None:
    pool = _pool()
    ids = [pool.reserve() for _ in range(3)]
    sets = {i: _layers(5, 3, "bfloat16", seed=10 + k) for k, i in enumerate(ids)}
    for i, layers in sets.items():
        pool.copy_from_device(layers, i)
    for i, layers in sets.items():
        for src, slot in zip(layers, pool.read_slot(i, 5), strict=True):
            np.testing.assert_array_equal(_bits(slot), _bits(src))
    pool.close()


def test_reserve_never_hands_a_slot_twice() -> None:
    pool = _pool(pool_size=4)
    rng = np.random.default_rng(0)
    held: set[int] = set()
    for _ in range(400):
        if held and (len(held) == 4 or rng.random() < 0.45):
            victim = sorted(held)[int(rng.integers(len(held)))]
            pool.release(victim)
            held.remove(victim)
        else:
            got = pool.reserve()
            assert got is not None
            assert got not in held
            assert 0 <= got < 4
            held.add(got)
        assert pool.available_size() == 4 - len(held)
    while len(held) < 4:
        got = pool.reserve()
        assert got is not None
        assert got not in held
        held.add(got)
    assert pool.reserve() is None
    assert pool.available_size() == 0
    pool.close()


def test_release_errors_leave_state_unchanged() -> None:
    from lmcache.errors import DoubleFreeError, InvalidHandleError

    pool = _pool()
    b = pool.reserve()
    assert b is not None
    with pytest.raises(InvalidHandleError, match="outside the pool's range"):
        pool.release(99)
    with pytest.raises(InvalidHandleError, match="must be an int"):
        pool.release("0")  # type: ignore[arg-type]
    free_id = next(i for i in range(3) if i != b)
    with pytest.raises(DoubleFreeError, match="not reserved"):
        pool.release(free_id)
    assert pool.available_size() == 2
    pool.release(b)
    with pytest.raises(DoubleFreeError):
        pool.release(b)
    assert pool.available_size() == 3
    pool.close()


def test_copy_from_device_rejects_bad_layers_and_keeps_the_slot() -> None:
    import jax.numpy as jnp

    from lmcache.errors import ChunkShapeError, DoubleFreeError

    pool = _pool()
    b = pool.reserve()
    assert b is not None
    good = _layers(2, 3, "bfloat16", seed=1)
    pool.copy_from_device(good, b)
    with pytest.raises(ChunkShapeError, match="3 layers"):
        pool.copy_from_device(good[:2], b)
    with pytest.raises(ChunkShapeError, match="max_padded_pages"):
        pool.copy_from_device(_layers(6, 3, "bfloat16", seed=2), b)
    with pytest.raises(ChunkShapeError, match="dtype"):
        pool.copy_from_device([layer.astype(jnp.float32) for layer in good], b)
    ragged = [*good[:2], jnp.zeros((2, 4, 4, 8), jnp.bfloat16)]
    with pytest.raises(ChunkShapeError, match="layer 2 has shape"):
        pool.copy_from_device(ragged, b)
    with pytest.raises(DoubleFreeError):
        pool.copy_from_device(good, (b + 1) % 3)
    for src, slot in zip(good, pool.read_slot(b, 2), strict=True):
        np.testing.assert_array_equal(_bits(slot), _bits(src))
    pool.close()


def test_bad_config() -> None:
    require("sgl_jax")
    from lmcache.errors import ConfigError
    from lmcache_sglang_jax import LMCacheHostKVPool

    with pytest.raises(ConfigError, match="pool_size"):
        LMCacheHostKVPool(0, 5, 3, PAGE_SHAPE, "bfloat16")
    with pytest.raises(ConfigError, match="per_layer_shape"):
        LMCacheHostKVPool(2, 5, 3, (), "bfloat16")


def test_sglang_jax_own_pd_pool_cases() -> None:
    """sglang-jax's own QueueHostKVPool cases (TestABCExtensionDoesNotBreakPD) with our pool in its place."""
    import importlib
    import unittest

    require("jax")
    require("sgl_jax")
    from lmcache_sglang_jax import LMCacheHostKVPool

    cases = importlib.import_module("sglang_jax_upstream.host_kv_pool_cases")
    original = cases.QueueHostKVPool
    cases.QueueHostKVPool = LMCacheHostKVPool
    try:
        suite = unittest.defaultTestLoader.loadTestsFromTestCase(cases.TestABCExtensionDoesNotBreakPD)
        result = unittest.TestResult()
        suite.run(result)
    finally:
        cases.QueueHostKVPool = original
    assert suite.countTestCases() == 3
    assert not result.errors, result.errors
    assert not result.failures, result.failures
    assert not result.skipped, result.skipped
    assert result.testsRun == 3


# -- the HiCache role: LMCacheLRUHostKVPool in sglang-jax's LRUHostKVPool's place ---------------------
HICACHE_CASES = {
    # module of tests/sglang_jax_upstream -> (test cases run, test case classes left out)
    "host_kv_pool_cases": (41, {"TestABCExtensionDoesNotBreakPD"}),  # that class is the PD role's (above)
    "hicache_controller_cases": (12, set()),
    "hicache_e2e_cases": (52, set()),
}


@pytest.mark.parametrize("module", sorted(HICACHE_CASES))
def test_sglang_jax_own_hicache_cases(module: str) -> None:
    """sglang-jax's own LRUHostKVPool, HiCacheController and HiCache end-to-end (UnifiedRadixCache) cases,
    vendored unchanged, with LMCacheLRUHostKVPool in LRUHostKVPool's place (their fixtures build it by
    that module-level name)."""
    import importlib
    import unittest

    from lmcache_sglang_jax import LMCacheLRUHostKVPool

    built: list[Any] = []

    class Counted(LMCacheLRUHostKVPool):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            built.append(self)

    cases = importlib.import_module(f"sglang_jax_upstream.{module}")
    expected, left_out = HICACHE_CASES[module]
    original = cases.LRUHostKVPool
    cases.LRUHostKVPool = Counted
    try:
        suite = unittest.TestSuite()
        for name in sorted(dir(cases)):
            obj = getattr(cases, name)
            if isinstance(obj, type) and issubclass(obj, unittest.TestCase) and name not in left_out:
                suite.addTests(unittest.defaultTestLoader.loadTestsFromTestCase(obj))
        result = unittest.TestResult()
        suite.run(result)
    finally:
        cases.LRUHostKVPool = original
    assert not result.errors, result.errors
    assert not result.failures, result.failures
    assert not result.skipped, result.skipped
    assert result.testsRun == expected
    assert built  # their fixtures built our pool, not theirs


def _device_pool(dtype: str, page_size: int, pages: int = 8, layer_num: int = 2) -> Any:
    import jax.numpy as jnp
    from sgl_jax.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sgl_jax.srt.utils.mesh_utils import create_device_mesh

    mesh = create_device_mesh(ici_parallelism=[1, -1], dcn_parallelism=[1, 1])
    return MHATokenToKVPool(
        size=pages * page_size,
        page_size=page_size,
        dtype=jnp.dtype(dtype),
        head_num=2,
        head_dim=16,
        layer_num=layer_num,
        mesh=mesh,
        dp_size=1,
    )


def _hicache_pool(device_pool: Any, pool_size: int = 4, host_memory_kind: str = "auto") -> Any:
    from lmcache_sglang_jax import LMCacheLRUHostKVPool

    return LMCacheLRUHostKVPool(
        device_pool=device_pool,
        pool_size=pool_size,
        page_size=device_pool.page_size,
        layer_num=device_pool.layer_num,
        per_layer_shape=tuple(int(d) for d in device_pool.kv_buffer[0].shape[1:]),
        dtype=device_pool.dtype,
        mesh=device_pool.mesh,
        partition_spec=device_pool.kv_sharding.spec,
        host_memory_kind=host_memory_kind,
    )


def _fill_page(device_pool: Any, page: int, seed: int) -> list[np.ndarray]:
    """Write random bits (every pattern, NaN payloads included) into one device page of every layer."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    bits = []
    for layer in range(device_pool.layer_num):
        buf = device_pool.kv_buffer[layer]
        width = np.uint16 if np.dtype(buf.dtype).itemsize == 2 else np.uint32
        raw = rng.integers(0, np.iinfo(width).max, size=buf.shape[1:], dtype=width, endpoint=True)
        # set as bits: XLA on the CPU rewrites bfloat16 NaN payloads in a float scatter
        bits_buf = jax.lax.bitcast_convert_type(buf, jnp.dtype(width))
        bits_buf = bits_buf.at[page].set(jnp.asarray(raw), out_sharding=buf.sharding)
        device_pool.kv_buffer[layer] = jax.lax.bitcast_convert_type(bits_buf, buf.dtype)
        bits.append(raw)
    return bits


def _page_bits(device_pool: Any, page: int) -> list[np.ndarray]:
    return [_bits(device_pool.kv_buffer[layer][page]) for layer in range(device_pool.layer_num)]


@pytest.mark.parametrize(
    ("dtype", "page_size", "kind"),
    [
        ("bfloat16", 1, "auto"),
        ("bfloat16", 4, "auto"),
        ("float32", 1, "auto"),
        ("float32", 4, "auto"),
        ("bfloat16", 4, "pinned_host"),
    ],
)
def test_hicache_device_host_device_bytes_exact(dtype: str, page_size: int, kind: str) -> None:
    """Through sglang-jax's interface: HiCacheController.write backs device pages up into host pages,
    whose bytes are then in the LMCache slots; load puts them back into other device pages bit-exactly,
    and no other device page changes."""
    from sgl_jax.srt.mem_cache.hicache_controller import HiCacheController

    device_pool = _device_pool(dtype, page_size)
    pool = _hicache_pool(device_pool, pool_size=4, host_memory_kind=kind)
    assert pool.memory_kind == ("pinned_host" if kind == "pinned_host" else "default")  # JAX's CPU
    ctrl = HiCacheController(pool, device_pool)
    try:
        srcs, dsts = [1, 2, 3], [5, 6, 7]
        sent = {src: _fill_page(device_pool, src, seed=src) for src in srcs}
        guard = {p: _page_bits(device_pool, p) for p in (0, 4, 8)}
        hosts = [int(p) for p in pool.alloc(3)]
        ctrl.write(srcs, hosts)
        ctrl.drain_pending()
        for src, host in zip(srcs, hosts, strict=True):
            in_slot = pool.read_page(host)  # the bytes live in the LMCache slot
            for layer, want in enumerate(sent[src]):
                np.testing.assert_array_equal(_bits(in_slot[layer]), want)
        ctrl.load(hosts, dsts)
        for src, dst in zip(srcs, dsts, strict=True):
            for got, want in zip(_page_bits(device_pool, dst), sent[src], strict=True):
                np.testing.assert_array_equal(got, want)
        for page, before in guard.items():
            for got, want in zip(_page_bits(device_pool, page), before, strict=True):
                np.testing.assert_array_equal(got, want)
    finally:
        ctrl.shutdown()
        pool.close()


def test_hicache_pool_is_a_host_kv_pool_on_lmcache_memory() -> None:
    import jax
    from sgl_jax.srt.mem_cache.host_kv_pool import HostKVPool

    from lmcache.errors import ConfigError

    device_pool = _device_pool("bfloat16", 1)
    pool = _hicache_pool(device_pool, pool_size=3)
    assert isinstance(pool, HostKVPool)
    assert pool.total_size() == pool.available_size() == 3
    device = jax.devices()[0]
    on_accelerator = device.platform != "cpu" and "pinned_host" in {
        m.kind for m in device.addressable_memories()
    }
    assert pool.memory_kind == ("pinned_host" if on_accelerator else "default")
    pool.close()
    with pytest.raises(ConfigError, match="host_memory_kind"):
        _hicache_pool(device_pool, host_memory_kind="unpinned_host")


def test_hicache_lifecycle_errors_are_the_projects_and_change_nothing() -> None:
    from lmcache.errors import ChunkShapeError, DoubleFreeError, InvalidHandleError
    from lmcache_sglang_jax import HostPageDoubleFreeError, HostPageStateError, TransferOrderError

    device_pool = _device_pool("bfloat16", 1)
    pool = _hicache_pool(device_pool, pool_size=4)
    a, b = (int(p) for p in pool.alloc(2))
    pool.inc_lock_ref(b)
    with pytest.raises(HostPageStateError, match="locked") as locked:
        pool.free([a, b])  # b is locked: a must stay allocated too
    assert isinstance(locked.value, RuntimeError)
    assert pool.available_size() == 2
    pool.dec_lock_ref(b)
    with pytest.raises(HostPageStateError, match="underflow"):
        pool.dec_lock_ref(b)
    pool.free([a])
    with pytest.raises(HostPageDoubleFreeError, match="double free") as double:
        pool.free([b, a])
    assert isinstance(double.value, DoubleFreeError)
    assert isinstance(double.value, RuntimeError)
    assert pool.available_size() == 3  # b still allocated
    with pytest.raises(InvalidHandleError, match="outside the pool's range"):
        pool.inc_lock_ref(4)
    with pytest.raises(InvalidHandleError, match="must be an int"):
        pool.release("1")  # type: ignore[arg-type]
    with pytest.raises(HostPageStateError, match="not allocated"):
        pool.stage_backup([0], [a])
    with pytest.raises(InvalidHandleError, match="device page"):
        pool.stage_backup([device_pool.kv_buffer[0].shape[0]], [b])
    with pytest.raises(InvalidHandleError, match="twice"):
        pool.stage_backup([1, 2], [b, b])
    with pytest.raises(ChunkShapeError, match="differ in length"):
        pool.copy_into([1, 2], [b])
    with pytest.raises(ChunkShapeError, match="need_pages"):
        pool.alloc(0)
    with pytest.raises(TransferOrderError, match="stage_backup first"):
        pool.flush_backup([b])
    with pytest.raises(TransferOrderError, match="no backed-up KV"):
        pool.stage_load([b])
    with pytest.raises(TransferOrderError, match="stage_load first"):
        pool.flush_load([b], [0])
    assert pool.alloc(4) is None  # all or nothing: 3 free
    assert pool.available_size() == 3
    pool.close()


class HiCachePoolMachine(RuleBasedStateMachine):
    """LMCacheLRUHostKVPool against a model (allocated pages, lock counts, backed-up bytes per host page,
    bytes per device page) over alloc / free / lock / unlock / backup / load, valid and invalid."""

    POOL = 4
    DEVICE_PAGES = 6

    def __init__(self) -> None:
        super().__init__()
        self.device_pool = _device_pool("bfloat16", 1, pages=self.DEVICE_PAGES - 1)  # + a sentinel page
        self.pool = _hicache_pool(self.device_pool, pool_size=self.POOL)
        self.allocated: set[int] = set()
        self.locks: dict[int, int] = {}
        self.host: dict[int, list[np.ndarray]] = {}
        self.device = {p: _page_bits(self.device_pool, p) for p in range(self.DEVICE_PAGES)}
        self.seed = 0

    def teardown(self) -> None:
        self.pool.close()

    @rule(n=st.integers(1, 5))
    def alloc(self, n: int) -> None:
        got = self.pool.alloc(n)
        if n > self.POOL - len(self.allocated):
            assert got is None
            return
        assert got is not None
        ids = {int(p) for p in got}
        assert len(ids) == n
        assert not ids & self.allocated
        assert all(0 <= p < self.POOL for p in ids)
        self.allocated |= ids
        for p in ids:
            self.locks[p] = 0

    @rule(picks=st.lists(st.integers(0, 3), min_size=1, max_size=3))
    def free(self, picks: list[int]) -> None:
        from lmcache_sglang_jax import HostPageDoubleFreeError, HostPageStateError

        # ids are checked in order, the first bad one decides the error, and nothing is freed
        first_bad = next((p for p in picks if p not in self.allocated or self.locks[p]), None)
        if first_bad is not None and first_bad not in self.allocated:
            with pytest.raises(HostPageDoubleFreeError):
                self.pool.free(picks)
        elif first_bad is not None:
            with pytest.raises(HostPageStateError, match="locked"):
                self.pool.free(picks)
        else:
            self.pool.free(picks)
            for p in set(picks):
                self.allocated.discard(p)
                self.host.pop(p, None)
                del self.locks[p]

    @rule(page=st.integers(0, 3))
    def lock(self, page: int) -> None:
        from lmcache_sglang_jax import HostPageStateError

        if page not in self.allocated:
            with pytest.raises(HostPageStateError):
                self.pool.inc_lock_ref(page)
            return
        self.pool.inc_lock_ref(page)
        self.locks[page] += 1

    @rule(page=st.integers(0, 3))
    def unlock(self, page: int) -> None:
        from lmcache_sglang_jax import HostPageStateError

        if page not in self.allocated or not self.locks[page]:
            with pytest.raises(HostPageStateError):
                self.pool.dec_lock_ref(page)
            return
        self.pool.dec_lock_ref(page)
        self.locks[page] -= 1

    @rule(page=st.integers(0, DEVICE_PAGES - 1))
    def write_device(self, page: int) -> None:
        self.seed += 1
        self.device[page] = _fill_page(self.device_pool, page, seed=self.seed)

    @rule(
        pairs=st.lists(st.tuples(st.integers(0, DEVICE_PAGES - 1), st.integers(0, 3)), min_size=1, max_size=3)
    )
    def backup(self, pairs: list[tuple[int, int]]) -> None:
        from lmcache.errors import InvalidHandleError
        from lmcache_sglang_jax import HostPageStateError

        devices = [d for d, _ in pairs]
        hosts = [h for _, h in pairs]
        if len(set(hosts)) != len(hosts):
            with pytest.raises(InvalidHandleError, match="twice"):
                self.pool.copy_into(devices, hosts)
        elif any(h not in self.allocated for h in hosts):
            with pytest.raises(HostPageStateError, match="not allocated"):
                self.pool.copy_into(devices, hosts)
        else:
            self.pool.copy_into(devices, hosts)
            for d, h in pairs:
                self.host[h] = [bits.copy() for bits in self.device[d]]

    @rule(
        pairs=st.lists(st.tuples(st.integers(0, 3), st.integers(0, DEVICE_PAGES - 1)), min_size=1, max_size=3)
    )
    def load(self, pairs: list[tuple[int, int]]) -> None:
        from lmcache.errors import InvalidHandleError
        from lmcache_sglang_jax import HostPageStateError, TransferOrderError

        hosts = [h for h, _ in pairs]
        devices = [d for _, d in pairs]
        if len(set(hosts)) != len(hosts):
            with pytest.raises(InvalidHandleError, match="twice"):
                self.pool.copy_to_device(hosts, devices)
        elif any(h not in self.allocated for h in hosts):
            with pytest.raises(HostPageStateError, match="not allocated"):
                self.pool.copy_to_device(hosts, devices)
        elif any(h not in self.host for h in hosts):
            with pytest.raises(TransferOrderError, match="no backed-up KV"):
                self.pool.copy_to_device(hosts, devices)
        elif len(set(devices)) != len(devices):
            with pytest.raises(InvalidHandleError, match="twice"):
                self.pool.copy_to_device(hosts, devices)
            # stage_load ran, flush_load refused: the staged pages stay until the next flush or free
            self.pool.flush_load(hosts, list(range(len(hosts))))  # drain them into scratch pages
            for k, h in enumerate(hosts):
                self.device[k] = [bits.copy() for bits in self.host[h]]
        else:
            self.pool.copy_to_device(hosts, devices)
            for h, d in pairs:
                self.device[d] = [bits.copy() for bits in self.host[h]]

    @invariant()
    def matches_the_model(self) -> None:
        from lmcache_sglang_jax import HostPageStateError, TransferOrderError

        assert self.pool.available_size() == self.POOL - len(self.allocated)
        for h in range(self.POOL):
            if h not in self.allocated:
                with pytest.raises(HostPageStateError, match="not allocated"):
                    self.pool.read_page(h)
            elif h not in self.host:  # allocated, never backed up since: no bytes, not a former owner's
                with pytest.raises(TransferOrderError, match="no backed-up KV"):
                    self.pool.read_page(h)
        for h, want in self.host.items():
            got = self.pool.read_page(h)
            for layer, bits in enumerate(want):
                np.testing.assert_array_equal(_bits(got[layer]), bits)
        for d, want in self.device.items():
            for got, bits in zip(_page_bits(self.device_pool, d), want, strict=True):
                np.testing.assert_array_equal(got, bits)


def test_hicache_pool_state_machine() -> None:
    from hypothesis import HealthCheck, settings

    runner = HiCachePoolMachine.TestCase
    runner.settings = settings(
        max_examples=30, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    runner().runTest()


def test_init_hicache_builds_our_pool_when_swapped_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """sglang-jax's own wiring (kv_cache_builder.init_hicache, what --hicache-storage none runs) builds
    LMCacheLRUHostKVPool once it stands in sgl_jax.srt.mem_cache.host_kv_pool.LRUHostKVPool, sized by
    --hicache-ratio, and the radix cache's evict_host frees its pages."""
    import types

    import jax
    import jax.numpy as jnp
    from sgl_jax.srt.mem_cache import host_kv_pool
    from sgl_jax.srt.mem_cache.allocator import TokenToKVPoolAllocator
    from sgl_jax.srt.mem_cache.kv_cache_builder import init_hicache
    from sgl_jax.srt.mem_cache.memory_pool import ReqToTokenPool
    from sgl_jax.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

    from lmcache_sglang_jax import LMCacheLRUHostKVPool

    device_pool = _device_pool("bfloat16", 1, pages=32)
    allocator = TokenToKVPoolAllocator(size=32, kvcache=device_pool, dp_size=1)
    jax.sharding.set_mesh(device_pool.mesh)
    cache = UnifiedRadixCache(
        req_to_token_pool=ReqToTokenPool(size=8, max_context_len=64, dtype=np.int32),
        token_to_kv_pool_allocator=allocator,
        page_size=1,
        kv_head_num=2,
        head_dim=16,
        layer_num=2,
        max_seq_len=64,
        dtype=jnp.bfloat16,
    )
    monkeypatch.setattr(host_kv_pool, "LRUHostKVPool", LMCacheLRUHostKVPool)
    args = types.SimpleNamespace(
        hicache_ratio=0.5, hicache_write_through_threshold=1, hicache_write_policy="write_through"
    )
    init_hicache(cache, args, device_pool.mesh, allocator)
    try:
        assert isinstance(cache.host_pool, LMCacheLRUHostKVPool)
        assert cache.host_pool.total_size() == 16  # 0.5 x 32 tokens / page_size 1
        assert cache.evict_host(1) == 0  # nothing backed up yet: nothing to evict
    finally:
        cache.hicache_controller.shutdown()
        cache.host_pool.close()
