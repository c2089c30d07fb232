"""The SGLang adapter (adapters/lmcache_sglang) driven through SGLang 0.5.23's own interfaces.

* Loading: SGLang's ``StorageBackendFactory.create_backend("dynamic", ...)`` builds our backend from
  ``extra_config`` naming module and class, exactly as ``--hicache-storage-backend dynamic`` does.
* The v1 calls: pages copied out of a host pool at some host indices come back bit-exactly into other
  host indices; ``batch_exists`` counts the leading stored keys; misses leave host pages untouched.
* Capacity: a full pool evicts whole pages and never hands back another page's bytes.

The host pool here is a small CPU stand-in with the page methods SGLang's controller uses
(``page_size``, ``dtype``, ``get_data_page``, ``get_dummy_flat_data_page``, ``set_from_flat_data_page``),
with the ``layer_first`` and ``page_first`` indexing of ``MHATokenToKVPoolHost``: importing that class
pulls in transformers and torchvision, which do not load next to the CPU torch here.
"""

from __future__ import annotations

from typing import Any

import pytest

from kvtest import REQUIRED

# Skip where SGLang is absent; where the session requires it (LMCACHE_REQUIRE_BACKENDS=sglang), the
# imports below fail instead.
if "sglang" not in REQUIRED:
    pytest.importorskip("torch")
    pytest.importorskip("sglang")

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

from lmcache.errors import ChunkShapeError, ChunkTypeError, ConfigError
from lmcache_sglang.storage import LmcacheHiCacheStorage

LAYERS, HEADS, HEAD_DIM, PAGE = 2, 2, 4, 4


class HostPool:
    """CPU host KV pool with ``MHATokenToKVPoolHost``'s page methods (layer_first / page_first)."""

    def __init__(self, pages: int, layout: str, dtype: Any = None) -> None:
        self.page_size = PAGE
        self.layout = layout
        self.dtype = dtype or torch.bfloat16
        self.layer_num = LAYERS
        tokens = pages * PAGE
        if layout == "layer_first":
            shape = (2, LAYERS, tokens, HEADS, HEAD_DIM)
        else:
            shape = (2, tokens, LAYERS, HEADS, HEAD_DIM)
        self.kv_buffer = torch.zeros(shape, dtype=self.dtype)

    def fill_random(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.kv_buffer.copy_(torch.randn(self.kv_buffer.shape, generator=gen).to(self.dtype))

    def get_data_page(self, index: int, flat: bool = True) -> Any:
        if self.layout == "layer_first":
            page = self.kv_buffer[:, :, index : index + PAGE]
        else:
            page = self.kv_buffer[:, index : index + PAGE]
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self) -> Any:
        return torch.zeros((2, LAYERS, PAGE, HEADS, HEAD_DIM), dtype=self.dtype).flatten()

    def set_from_flat_data_page(self, index: int, data_page: Any) -> None:
        if self.layout == "layer_first":
            self.kv_buffer[:, :, index : index + PAGE] = data_page.reshape(2, LAYERS, PAGE, HEADS, HEAD_DIM)
        else:
            self.kv_buffer[:, index : index + PAGE] = data_page.reshape(2, PAGE, LAYERS, HEADS, HEAD_DIM)

    def page_bits(self, page: int) -> Any:
        return self.get_data_page(page * PAGE).view(torch.int16).clone()


def config(extra: dict[str, Any] | None = None, tp_rank: int = 0, tp_size: int = 1) -> Any:
    base = {
        "backend_name": "lmcache_mempool",
        "module_path": "lmcache_sglang.storage",
        "class_name": "LmcacheHiCacheStorage",
    }
    return HiCacheStorageConfig(
        tp_rank=tp_rank,
        tp_size=tp_size,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=False,
        enable_storage_metrics=False,
        is_page_first_layout=False,
        model_name="test-model",
        extra_config={**base, **(extra or {})},
    )


def backend(host: HostPool, extra: dict[str, Any] | None = None, **kw: Any) -> Any:
    """Our backend as SGLang builds it: the factory's dynamic path, then the host pool registered."""
    storage = StorageBackendFactory.create_backend("dynamic", config(extra, **kw), host)
    storage.register_mem_pool_host(host)
    return storage


def indices(pages: list[int]) -> Any:
    return torch.cat([torch.arange(p * PAGE, (p + 1) * PAGE) for p in pages]) if pages else torch.empty(0)


def test_factory_builds_our_backend() -> None:
    host = HostPool(4, "layer_first")
    storage = backend(host)
    assert isinstance(storage, LmcacheHiCacheStorage)
    assert isinstance(storage, HiCacheStorage)


@pytest.mark.parametrize("layout", ["layer_first", "page_first"])
def test_v1_round_trip_into_other_host_indices(layout: str) -> None:
    host = HostPool(8, layout)
    host.fill_random(1)
    storage = backend(host)
    keys = ["h0", "h1", "h2"]
    expected = [host.page_bits(p) for p in (0, 1, 2)]
    assert storage.batch_set_v1(keys, indices([0, 1, 2])) == [True, True, True]
    before_other = host.page_bits(3)
    assert storage.batch_get_v1(keys, indices([7, 5, 4])) == [True, True, True]
    for page, bits in zip((7, 5, 4), expected, strict=True):
        assert torch.equal(host.page_bits(page), bits)
    assert torch.equal(host.page_bits(3), before_other)


def test_batch_exists_counts_leading_stored_keys() -> None:
    host = HostPool(4, "layer_first")
    host.fill_random(2)
    storage = backend(host)
    storage.batch_set_v1(["a", "b"], indices([0, 1]))
    assert storage.batch_exists(["a", "b", "c"]) == 2
    assert storage.batch_exists(["c", "a", "b"]) == 0
    assert storage.batch_exists(["a", "c", "b"]) == 1
    assert storage.batch_exists([]) == 0


def test_miss_leaves_host_page_untouched() -> None:
    host = HostPool(4, "layer_first")
    host.fill_random(3)
    storage = backend(host)
    storage.batch_set_v1(["a"], indices([0]))
    before = host.page_bits(2)
    assert storage.batch_get_v1(["a", "missing"], indices([1, 2])) == [True, False]
    assert torch.equal(host.page_bits(1), host.page_bits(0))
    assert torch.equal(host.page_bits(2), before)


def test_tp_ranks_do_not_share_pages() -> None:
    host = HostPool(2, "layer_first")
    host.fill_random(4)
    rank0, rank1 = backend(host, tp_rank=0, tp_size=2), backend(host, tp_rank=1, tp_size=2)
    assert rank0.namespace != rank1.namespace
    assert rank0._key("k") != rank1._key("k")


def test_classic_calls_round_trip() -> None:
    host = HostPool(2, "page_first")
    host.fill_random(5)
    storage = backend(host)
    page = host.get_data_page(0)
    assert storage.set("p", page)
    assert storage.batch_set(["q"], [host.get_data_page(PAGE)])
    out = host.get_dummy_flat_data_page()
    assert storage.get("p", out) is out
    assert torch.equal(out.view(torch.int16), page.view(torch.int16))
    outs = storage.batch_get(
        ["q", "nope"], [host.get_dummy_flat_data_page(), host.get_dummy_flat_data_page()]
    )
    assert outs[1] is None
    assert torch.equal(outs[0].view(torch.int16), host.page_bits(1).reshape(-1))
    assert storage.exists("p")
    assert not storage.exists("nope")


@pytest.mark.parametrize(
    ("keys", "idx", "error"),
    [
        ("abc", None, ConfigError),
        ([1, 2], None, ConfigError),
        ([""], None, ConfigError),
        (["a", "b"], "short", ChunkShapeError),
        (["a"], "list", ChunkTypeError),
        (["a"], "unaligned", ChunkShapeError),
    ],
)
def test_bad_input_raises_and_changes_nothing(keys: Any, idx: Any, error: type) -> None:
    host = HostPool(4, "layer_first")
    host.fill_random(6)
    storage = backend(host)
    storage.batch_set_v1(["kept"], indices([0]))
    host_indices = {
        None: indices([1]),
        "short": indices([1]),
        "list": list(range(PAGE)),
        "unaligned": torch.arange(1, PAGE + 1),
    }[idx]
    before = host.kv_buffer.clone()
    with pytest.raises(error):
        storage.batch_set_v1(keys, host_indices)
    with pytest.raises(error):
        storage.batch_get_v1(keys, host_indices)
    assert torch.equal(host.kv_buffer.view(torch.int16), before.view(torch.int16))
    assert len(storage.cache) == 1
    assert storage.batch_exists(["kept"]) == 1


def test_v1_needs_a_registered_host_pool() -> None:
    storage = StorageBackendFactory.create_backend("dynamic", config(), None)
    with pytest.raises(ConfigError, match="register_mem_pool_host"):
        storage.batch_set_v1(["a"], indices([0]))


@pytest.mark.parametrize("bad", [0, -1, "big", True])
def test_bad_cache_size_is_a_config_error(bad: Any) -> None:
    with pytest.raises(ConfigError, match="lmcache_cache_gib"):
        LmcacheHiCacheStorage(config({"lmcache_cache_gib": bad}))


def test_full_pool_evicts_pages_and_never_returns_wrong_bytes() -> None:
    host = HostPool(64, "layer_first")
    host.fill_random(7)
    page_bytes = host.get_dummy_flat_data_page().numel() * 2
    storage = backend(host, {"lmcache_cache_gib": 6 * page_bytes / 2**30})
    capacity = storage.cache.pool.max_chunk_num
    assert 0 < capacity < 32
    keys = [f"k{i}" for i in range(32)]
    expected = {k: host.page_bits(i) for i, k in enumerate(keys)}
    stored = storage.batch_set_v1(keys, indices(list(range(32))))
    assert all(stored)
    assert len(storage.cache) <= capacity
    found = 0
    for i, key in enumerate(keys):
        target = 32 + (i % 32)
        if storage.batch_get_v1([key], indices([target]))[0]:
            found += 1
            assert torch.equal(host.page_bits(target), expected[key])
    assert 0 < found <= capacity
