"""The LMCache L2 adapter (adapters/lmcache_mempool_l2) against LMCache 0.5.6's own interface and loader.

LMCache's own ``MockL2Adapter`` cases (tests/v1/distributed/test_mock_l2_adapter.py of its sdist, vendored
unchanged in tests/lmcache_upstream) run here with our adapter as their ``adapter`` fixture, all but the
two classes that test the mock itself (its simulated bandwidth, its constructor); so do the round trips
of its reference plugin's tests (examples/lmc_external_l2_adapter/tests/test_plugin.py), but for the one
case that checks that plugin's class. Then bytes exact through LMCache's interface, loaded by LMCache's
``--l2-adapter`` parser and plugin factory.

Skips without LMCache (``lmcache.v1`` importable: LMCache's package joined with ours, see
lmcache_mempool_l2.packages); fails where the session requires it (``lmcache.v1`` in
LMCACHE_REQUIRE_BACKENDS).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import select
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import pytest

from kvtest import require

LMCACHE = importlib.util.find_spec("lmcache.v1") is not None
if LMCACHE:  # LMCache's own cases: collected here, so they take this module's ``adapter`` fixture
    from lmcache_upstream import external_l2_plugin_cases as plugin_cases  # its classes: not collected
    from lmcache_upstream.mock_l2_adapter_cases import (  # noqa: F401
        TestEndToEndWorkflow,
        TestEventFdInterface,
        TestEvictionInterface,
        TestLoadInterface,
        TestLookupAndLockInterface,
        TestStoreInterface,
        TestUnlockInterface,
    )

    class TestMempoolPluginRoundTrip:
        """LMCache's reference-plugin round trips (4 KB objects, a ~10 KB budget that holds two) with our
        adapter built by the same registry calls. Its test methods are taken as they are, without its
        class's "lmc_external_l2_adapter is not installed" skip (that plugin is replaced by ours) and with
        its Linux-only one; its one plugin-specific case (``test_create_via_registry``) checks our class."""

        pytestmark: ClassVar[list[Any]] = [plugin_cases._skip_unless_linux]

        @pytest.fixture(params=["dict", "config_class"])
        def adapter(self, request: pytest.FixtureRequest) -> Iterator[Any]:
            from lmcache.v1.distributed.l2_adapters.factory import create_l2_adapter_from_registry
            from lmcache.v1.distributed.l2_adapters.plugin_l2_adapter import PluginL2AdapterConfig

            spec: dict[str, Any] = {
                **PLUGIN,
                "adapter_params": {"max_object_bytes": 4096, "cache_gib": 10240 / 2**30},
            }
            if request.param == "config_class":
                spec["config_class_name"] = "MempoolL2AdapterConfig"
            inst = create_l2_adapter_from_registry(PluginL2AdapterConfig.from_dict(spec))
            yield inst
            inst.close()

        def test_create_via_registry(self, adapter: Any) -> None:
            from lmcache_mempool_l2.adapter import MempoolL2Adapter

            assert isinstance(adapter, MempoolL2Adapter)
            assert adapter.pool.max_chunk_num == 2

    @pytest.fixture
    def _shared_adapter(self: Any, socket_path: str) -> Iterator[Any]:
        """Our adapter over a shared host cache server (1 MiB of 4 KiB + 16-byte chunks) in this process."""
        from lmcache.shared import CacheServer

        with CacheServer(socket_path, _server_metadata(4096, 1 / 1024)):
            made = _make(max_object_bytes=4096, socket_path=socket_path)
            yield made
            made.close()

    # The same LMCache cases with the objects in a shared cache server; not its eviction class (delete and
    # byte accounting: the server evicts for all its clients, see docs/engines-lmcache.md).
    for _base in (
        TestEventFdInterface,
        TestStoreInterface,
        TestLookupAndLockInterface,
        TestUnlockInterface,
        TestLoadInterface,
        TestEndToEndWorkflow,
    ):
        _shared = type("TestShared" + _base.__name__[4:], (_base,), {"adapter": _shared_adapter})
        globals()[_shared.__name__] = _shared

    for _name, _case in vars(plugin_cases.TestPluginRoundTrip).items():
        if _name.startswith("test_") and _name != "test_create_via_registry":
            setattr(TestMempoolPluginRoundTrip, _name, _case)


def _server_metadata(max_object_bytes: int, gib: float) -> Any:
    from lmcache.config import LMCacheMemPoolMetadata

    return LMCacheMemPoolMetadata((1, 1, 1, 1, max_object_bytes + 16), "uint8", gib)


PLUGIN = {"type": "plugin", "module_path": "lmcache_mempool_l2.adapter", "class_name": "MempoolL2Adapter"}


@pytest.fixture(autouse=True)
def _needs_lmcache() -> None:
    """Every case drives LMCache's interface: skip (or fail, where required) without LMCache."""
    require("lmcache.v1")


def _make(**params: Any) -> Any:
    """Our adapter built the way LMCache's server builds one: its ``--l2-adapter`` JSON parsed by its
    argparse helpers, then its factory (the plugin loader imports our module and finds our config)."""
    from lmcache.v1.distributed.l2_adapters import create_l2_adapter
    from lmcache.v1.distributed.l2_adapters.config import (
        add_l2_adapters_args,
        parse_args_to_l2_adapters_config,
    )

    parser = add_l2_adapters_args(argparse.ArgumentParser())
    args = parser.parse_args(["--l2-adapter", json.dumps({**PLUGIN, "adapter_params": params})])
    (config,) = parse_args_to_l2_adapters_config(args).adapters
    return create_l2_adapter(config)


@pytest.fixture
def adapter() -> Iterator[Any]:
    """Our adapter in place of LMCache's mock (1 MiB, as the mock's fixture; objects up to 4 KiB)."""
    require("lmcache.v1")
    made = _make(max_object_bytes=4096, cache_gib=1 / 1024)
    yield made
    made.close()


def _key(i: int, **fields: Any) -> Any:
    from lmcache.v1.distributed.api import ObjectKey

    return ObjectKey(chunk_hash=ObjectKey.IntHash2Bytes(i), **{"model_name": "m", "kv_rank": 0, **fields})


def _obj(shape: tuple[int, ...], dtype: Any, fill: np.ndarray | None = None) -> Any:
    """A ``TensorMemoryObj`` as LMCache's L1 makes them: a flat uint8 buffer, viewed as ``shape``."""
    import torch

    from lmcache.v1.memory_management import MemoryFormat, MemoryObjMetadata, TensorMemoryObj

    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    raw = torch.zeros(nbytes, dtype=torch.uint8)
    if fill is not None:
        raw.copy_(torch.from_numpy(fill))
    meta = MemoryObjMetadata(
        shape=torch.Size(shape),
        dtype=dtype,
        address=0,
        phy_size=nbytes,
        fmt=MemoryFormat.KV_2LTD,
        ref_count=1,
    )
    return TensorMemoryObj(raw, meta, parent_allocator=None)


def _bits(obj: Any) -> np.ndarray:
    return obj.raw_tensor.numpy().copy()


def _wait(fd: int, timeout: float = 5.0) -> bool:
    from lmcache.v1.platform import consume_fd

    poll = select.poll()
    poll.register(fd, select.POLLIN)
    if not poll.poll(timeout * 1000):
        return False
    consume_fd(fd)
    return True


def _store(adapter: Any, keys: list[Any], objs: list[Any]) -> Any:
    task = adapter.submit_store_task(keys, objs)
    assert _wait(adapter.get_store_event_fd())
    return adapter.pop_completed_store_tasks()[task]


def _lookup(adapter: Any, keys: list[Any]) -> list[bool]:
    task = adapter.submit_lookup_and_lock_task(keys, {})
    assert _wait(adapter.get_lookup_and_lock_event_fd())
    bitmap = adapter.query_lookup_and_lock_result(task)
    return [bitmap.test(i) for i in range(len(keys))]


def _load(adapter: Any, keys: list[Any], objs: list[Any]) -> list[bool]:
    task = adapter.submit_load_task(keys, objs)
    assert _wait(adapter.get_load_event_fd())
    bitmap = adapter.query_load_result(task)
    return [bitmap.test(i) for i in range(len(keys))]


def test_lmcache_cases_run_on_our_adapter(adapter: Any) -> None:
    """The vendored cases take this module's fixture: our adapter, not LMCache's mock."""
    from lmcache_mempool_l2.adapter import MempoolL2Adapter

    assert type(adapter) is MempoolL2Adapter
    assert TestStoreInterface.__module__ == "lmcache_upstream.mock_l2_adapter_cases"


def test_join_with_lmcache_in_another_directory(tmp_path: Any) -> None:
    """LMCache's package alone in one directory (as with this project installed editable): importing
    the adapter joins our modules into it, and a round trip works in that process."""
    import importlib.metadata
    import os
    import subprocess
    import sys

    import lmcache

    (home,) = {os.path.dirname(p) for p in lmcache.__path__ if os.path.isdir(os.path.join(p, "v1"))}
    files = importlib.metadata.distribution("lmcache").files or []
    tops = {f.parts[1] for f in files if len(f.parts) > 1 and f.parts[0] == "lmcache"}
    alone = tmp_path / "lmcache"
    alone.mkdir()
    for name in tops - {"__pycache__"}:
        (alone / name).symlink_to(os.path.join(home, "lmcache", name))
    assert not (alone / "chunk_cache.py").exists()
    script = (
        "import lmcache, lmcache_mempool_l2.adapter as a, numpy as np, torch\n"
        "assert len(lmcache.__path__) == 2, lmcache.__path__\n"
        "from lmcache.v1.distributed.api import ObjectKey\n"
        "from lmcache.v1.memory_management import TensorMemoryObj, MemoryObjMetadata, MemoryFormat\n"
        "def obj(t):\n"
        "    m = MemoryObjMetadata(shape=t.shape, dtype=t.dtype, address=0, phy_size=t.numel(),\n"
        "                          fmt=MemoryFormat.KV_2LTD, ref_count=1)\n"
        "    return TensorMemoryObj(t, m, parent_allocator=None)\n"
        "ad = a.MempoolL2Adapter({'max_object_bytes': 64, 'cache_gib': 0.001})\n"
        "k = ObjectKey(chunk_hash=b'1234', model_name='m', kv_rank=0)\n"
        "src = torch.arange(64, dtype=torch.uint8)\n"
        "ad._run_store(0, [k], [obj(src)])\n"
        "dst = torch.zeros(64, dtype=torch.uint8)\n"
        "ad._run_load(1, [k], [obj(dst)])\n"
        "assert ad.query_load_result(1).test(0) and torch.equal(dst, src)\n"
        "ad.close()\n"
        "print('joined', lmcache.chunk_cache.__file__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "joined" in done.stdout


def test_plugin_loader_builds_our_adapter_with_our_config() -> None:
    from lmcache.v1.distributed.l2_adapters.base import L2AdapterInterface
    from lmcache_mempool_l2.adapter import MempoolL2Adapter, MempoolL2AdapterConfig

    made = _make(max_object_bytes=1000, cache_gib=0.001, policy="lru", num_workers=1)
    assert isinstance(made, MempoolL2Adapter)
    assert isinstance(made, L2AdapterInterface)
    assert isinstance(made.config, MempoolL2AdapterConfig)
    assert (made.config.max_object_bytes, made.config.policy, made.config.num_workers) == (1000, "lru", 1)
    assert made.supports_global_eviction
    assert made.get_usage().total_capacity_bytes == made.pool.max_chunk_num * 1000
    assert made.report_status()["is_healthy"] is True
    made.close()
    made.close()  # twice: nothing
    assert made.report_status()["is_healthy"] is False


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "needs max_object_bytes"),
        ({"max_object_bytes": 0}, "max_object_bytes must be an int > 0"),
        ({"max_object_bytes": 64, "cache_gib": -1}, "cache_gib must be a number > 0"),
        ({"max_object_bytes": 64, "policy": "nope"}, "policy must be one of"),
        ({"max_object_bytes": 64, "chunk_bytes": 64}, "unknown keys ['chunk_bytes']"),
    ],
)
def test_bad_adapter_params_are_refused_with_the_key(params: dict[str, Any], message: str) -> None:
    from lmcache.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _make(**params)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16", "float32", "float8_e4m3fn", "uint8"])
def test_store_then_load_is_bytes_exact(dtype_name: str) -> None:
    """Random bytes (every bit pattern, NaN payloads included) through store, lookup-and-lock and load
    into LMCache's buffers; a partial last chunk (fewer tokens) too."""
    import torch

    dtype = getattr(torch, dtype_name)
    adapter = _make(max_object_bytes=2 * 2 * 16 * 64 * 4, cache_gib=0.01)
    rng = np.random.default_rng(7)
    shapes = [(2, 2, 16, 64), (2, 2, 16, 64), (2, 2, 5, 64)]  # KV_2LTD: the last chunk is partial
    size = torch.empty((), dtype=dtype).element_size()
    fills = [rng.integers(0, 256, int(np.prod(s)) * size, dtype=np.uint8) for s in shapes]
    keys = [_key(i) for i in range(len(shapes))]
    src = [_obj(s, dtype, f) for s, f in zip(shapes, fills, strict=True)]
    result = _store(adapter, keys, src)
    assert result.is_successful()
    assert result.bytes_transferred() == sum(f.nbytes for f in fills)
    assert _lookup(adapter, keys) == [True, True, True]
    dst = [_obj(s, dtype) for s in shapes]
    assert _load(adapter, keys, dst) == [True, True, True]
    for got, want in zip(dst, fills, strict=True):
        np.testing.assert_array_equal(_bits(got), want)
        assert got.tensor.shape == torch.Size(got.get_shape())
    adapter.submit_unlock(keys)
    assert adapter.report_status()["locked_key_count"] == 0
    adapter.close()


def test_every_key_field_names_another_object() -> None:
    """Keys that differ only in cache salt, KV rank, object group or model hold separate bytes."""
    import torch

    adapter = _make(max_object_bytes=64, cache_gib=0.001)
    keys = [_key(1), _key(1, cache_salt="s"), _key(1, kv_rank=1), _key(1, object_group_id=1), _key(2)]
    keys.append(_key(1, model_name="other"))
    fills = [np.full(64, i, dtype=np.uint8) for i in range(len(keys))]
    assert _store(adapter, keys, [_obj((64,), torch.uint8, f) for f in fills]).is_successful()
    dst = [_obj((64,), torch.uint8) for _ in keys]
    assert all(_load(adapter, keys, dst))
    for got, want in zip(dst, fills, strict=True):
        np.testing.assert_array_equal(_bits(got), want)
    adapter.close()


def test_submit_returns_before_the_work_and_the_fd_signals_its_end() -> None:
    """A store whose copy is held back: ``submit`` has returned, no result and no signal yet; released,
    the fd fires and the result is there."""
    import torch

    adapter = _make(max_object_bytes=64, cache_gib=0.001, num_workers=1)
    gate = threading.Event()
    real = adapter._store_one

    def held(key: Any, obj: Any) -> Any:
        assert gate.wait(10)
        return real(key, obj)

    adapter._store_one = held
    task = adapter.submit_store_task([_key(1)], [_obj((64,), torch.uint8, np.arange(64, dtype=np.uint8))])
    assert not _wait(adapter.get_store_event_fd(), timeout=0.2)
    assert adapter.pop_completed_store_tasks() == {}
    gate.set()
    assert _wait(adapter.get_store_event_fd())
    assert adapter.pop_completed_store_tasks()[task].is_successful()
    adapter.close()


def test_a_locked_object_outlives_eviction_and_goes_after_unlock() -> None:
    """A pool of a few slots: the locked key survives stores that evict every other one (LMCache's
    listeners hear of those as deleted); unlocked, it can be evicted too."""
    import torch

    from lmcache.v1.distributed.internal_api import L2AdapterListener

    class Listener(L2AdapterListener):  # type: ignore[misc]
        def __init__(self) -> None:
            self.deleted: list[Any] = []

        def on_l2_keys_stored(self, keys: list[Any], sizes: list[int]) -> None:
            pass

        def on_l2_keys_accessed(self, keys: list[Any]) -> None:
            pass

        def on_l2_keys_deleted(self, keys: list[Any]) -> None:
            self.deleted.extend(keys)

    adapter = _make(max_object_bytes=4096 - 16, cache_gib=4 * 4096 / 2**30, num_workers=1)
    slots = adapter.pool.max_chunk_num
    assert slots == 4
    listener = Listener()
    adapter.register_listener(listener)
    first = [_key(i) for i in range(slots)]
    fill = np.arange(4080, dtype=np.uint64).astype(np.uint8)
    assert _store(adapter, first, [_obj((4080,), torch.uint8, fill) for _ in first]).is_successful()
    assert _lookup(adapter, first[:1]) == [True]  # locks key 0
    more = [_key(100 + i) for i in range(slots)]
    _store(adapter, more, [_obj((4080,), torch.uint8, fill) for _ in more])
    assert _lookup(adapter, first) == [True, False, False, False]
    assert set(first[1:]) <= set(listener.deleted)
    assert first[0] not in listener.deleted
    dst = _obj((4080,), torch.uint8)
    assert _load(adapter, first[:1], [dst]) == [True]
    np.testing.assert_array_equal(_bits(dst), fill)
    adapter.submit_unlock(first[:1])  # the lookup just above locked it once more
    adapter.submit_unlock(first[:1])
    assert adapter.report_status()["locked_key_count"] == 0
    _store(adapter, [_key(200 + i) for i in range(slots)], [_obj((4080,), torch.uint8) for _ in range(slots)])
    assert _lookup(adapter, first[:1]) == [False]
    assert first[0] in listener.deleted
    assert adapter.get_usage().total_bytes_used == slots * 4080
    adapter.close()


def test_too_large_object_fails_its_task_and_a_wrong_sized_buffer_is_not_loaded() -> None:
    import torch

    adapter = _make(max_object_bytes=64, cache_gib=0.001)
    fill = np.arange(64, dtype=np.uint8)
    result = _store(adapter, [_key(1), _key(2)], [_obj((65,), torch.uint8), _obj((64,), torch.uint8, fill)])
    assert not result.is_successful()  # the batch's other object is stored still
    assert _lookup(adapter, [_key(1), _key(2)]) == [False, True]
    adapter.submit_unlock([_key(2)])
    small = _obj((32,), torch.uint8)
    right = _obj((64,), torch.uint8)
    assert _load(adapter, [_key(2), _key(2)], [small, right]) == [False, True]
    np.testing.assert_array_equal(_bits(small), np.zeros(32, dtype=np.uint8))  # left untouched
    np.testing.assert_array_equal(_bits(right), fill)
    adapter.close()


def test_mismatched_batches_and_closed_adapters_raise() -> None:
    import torch

    from lmcache.errors import ChunkShapeError, ConfigError

    adapter = _make(max_object_bytes=64, cache_gib=0.001)
    with pytest.raises(ChunkShapeError, match="2 keys need 2 memory objects, got 1"):
        adapter.submit_store_task([_key(1), _key(2)], [_obj((64,), torch.uint8)])
    with pytest.raises(ChunkShapeError, match="1 keys need 1 memory objects, got 0"):
        adapter.submit_load_task([_key(1)], [])
    adapter.close()
    with pytest.raises(ConfigError, match="closed"):
        adapter.submit_lookup_and_lock_task([_key(1)], {})


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_lmcache_server_builds_and_reports_our_adapter(tmp_path: Any) -> None:
    """``lmcache server`` (LMCache's server mode, on this CPU) started with our ``--l2-adapter`` JSON: its
    store and prefetch controllers run over our adapter, and its ``/status`` reports it healthy."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    for module in ("fastapi", "uvicorn", "zmq", "msgspec", "blake3", "httpx"):
        require(module)  # the server's own imports (the lmcache_l2 session installs them, and OpenTelemetry)
    port, http_port = _free_port(), _free_port()
    spec = {**PLUGIN, "adapter_params": {"max_object_bytes": 1 << 20, "cache_gib": 0.05}}
    command = [sys.executable, "-c", "import sys; from lmcache.cli.main import main; sys.exit(main())"]
    command += ["server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--http-host", "127.0.0.1", "--http-port", str(http_port)]
    command += ["--l1-size-gb", "0.05", "--eviction-policy", "LRU", "--chunk-size", "16"]
    command += ["--l2-adapter", json.dumps(spec)]
    log = tmp_path / "server.log"
    env = {**os.environ, "LMCACHE_DISABLE_BANNER": "1", "LMCACHE_TRACK_USAGE": "false"}
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        status = None
        deadline = time.monotonic() + 120
        while status is None and time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/status", timeout=2) as reply:
                    status = json.loads(reply.read())
            except OSError:
                time.sleep(0.5)
        assert status is not None, log.read_text()[-4000:]
        manager = status["storage_manager"]
        (ours,) = manager["l2_adapters"]
        assert ours["type"] == "MempoolL2Adapter"
        assert ours["is_healthy"] is True
        assert ours["slots"] == 51  # 0.05 GiB of 1 MiB + 16-byte slots
        assert manager["store_controller"]["num_active_adapters"] == 1
        assert manager["prefetch_controller"]["num_active_adapters"] == 1
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)


def test_two_lmcache_servers_share_objects_through_one_cache_server(socket_path: str) -> None:
    """Two adapters (two LMCache servers of a host) on one shared cache server: what one stores the other
    loads bytes-exact; a lock taken by one keeps the object while the other's stores evict the rest."""
    import torch

    from lmcache.shared import CacheServer

    with CacheServer(socket_path, _server_metadata(4080, 4 * 4096 / 2**30)):
        writer = _make(max_object_bytes=4080, socket_path=socket_path)
        reader = _make(max_object_bytes=4080, socket_path=socket_path)
        assert not writer.supports_global_eviction  # the server evicts, for every client
        rng = np.random.default_rng(3)
        fills = [rng.integers(0, 256, 4080, dtype=np.uint8) for _ in range(4)]
        keys = [_key(i) for i in range(4)]
        assert _store(writer, keys, [_obj((4080,), torch.uint8, f) for f in fills]).is_successful()
        assert _lookup(reader, keys) == [True] * 4
        reader.submit_unlock(keys[1:])
        dst = [_obj((4080,), torch.uint8) for _ in keys]
        assert _load(reader, keys, dst) == [True] * 4
        for got, want in zip(dst, fills, strict=True):
            np.testing.assert_array_equal(_bits(got), want)
        more = [_key(100 + i) for i in range(8)]
        _store(writer, more, [_obj((4080,), torch.uint8) for _ in more])
        assert _lookup(writer, keys) == [True, False, False, False]  # key 0: locked by the reader
        writer.submit_unlock(keys[:1])
        again = _obj((4080,), torch.uint8)
        assert _load(writer, keys[:1], [again]) == [True]
        np.testing.assert_array_equal(_bits(again), fills[0])
        reader.submit_unlock(keys[:1])
        assert reader.report_status()["locked_key_count"] == 0
        writer.close()
        reader.close()


def test_shared_mode_refuses_a_server_of_another_layout_and_local_only_params(socket_path: str) -> None:
    from lmcache.config import LMCacheMemPoolMetadata
    from lmcache.errors import ConfigError
    from lmcache.shared import CacheServer

    with pytest.raises(ConfigError, match="do not apply with socket_path"):
        _make(max_object_bytes=64, socket_path=socket_path, cache_gib=1)
    other = LMCacheMemPoolMetadata((2, 2, 16, 2, 8), "bfloat16", 0.001)
    with CacheServer(socket_path, other), pytest.raises(ConfigError, match="--kv-shape 1,1,1,1,80 --dtype"):
        _make(max_object_bytes=64, socket_path=socket_path)
    with CacheServer(socket_path, _server_metadata(32, 0.001)), pytest.raises(ConfigError, match="N >= 80"):
        _make(max_object_bytes=64, socket_path=socket_path)


def test_a_raising_listener_still_completes_the_task() -> None:
    """LMCache's controllers wait on the fd: a listener that raises must not leave a task unfinished."""
    import torch

    from lmcache.v1.distributed.internal_api import L2AdapterListener

    class Broken(L2AdapterListener):  # type: ignore[misc]
        def on_l2_keys_stored(self, keys: list[Any], sizes: list[int]) -> None:
            raise RuntimeError("listener down")

        def on_l2_keys_accessed(self, keys: list[Any]) -> None:
            raise RuntimeError("listener down")

        def on_l2_keys_deleted(self, keys: list[Any]) -> None:
            pass

    adapter = _make(max_object_bytes=64, cache_gib=0.001)
    adapter.register_listener(Broken())
    fill = np.arange(64, dtype=np.uint8)
    assert not _store(adapter, [_key(1)], [_obj((64,), torch.uint8, fill)]).is_successful()
    dst = _obj((64,), torch.uint8)
    assert _load(adapter, [_key(1)], [dst]) == [True]  # the bytes were stored and are loaded
    np.testing.assert_array_equal(_bits(dst), fill)
    adapter.close()
