"""Paged transfer kernels: bytes exact against a naive numpy reference, for every layout and framework.

Caches are filled with random bytes (NaNs with any payload included), so a kernel that routes bytes
through float arithmetic fails. Every test compares the whole cache after a scatter, so a write outside
the request's token positions fails too.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtest import require
from lmcache.dtypes import KV_DTYPES
from lmcache.errors import BackendUnavailableError, ChunkShapeError, ChunkTypeError, ConfigError
from lmcache.paged import PagedSpec, block_table, describe, kernels, row_index, row_tokens
from pagedtest import FRAMEWORK_LAYOUTS, Paged, assert_same, host_bits, random_src

# JAX caches on the CPU are written in place by numpy; "jax-xla" runs the same cases through XLA's
# scatter, the path of every other platform.
XLA_LAYOUTS = [(framework, layout, "xla") for framework, layout in FRAMEWORK_LAYOUTS if framework == "jax"]


@pytest.fixture(params=[*FRAMEWORK_LAYOUTS, *XLA_LAYOUTS], ids=lambda p: "-".join((p[0], *p[2:], p[1])))
def framework_layout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    require(request.param[0])
    if request.param[2:] == ("xla",):
        monkeypatch.setattr(kernels("jax"), "_on_host", lambda caches, spec: False)
    return request.param[0], request.param[1]


# -- the arithmetic (numpy only) ---------------------------------------------------------------------
def fake_spec(num_blocks: int = 10, block_size: int = 4) -> PagedSpec:
    return PagedSpec("stacked", "torch", 2, 2, num_blocks, block_size, 2, 8, KV_DTYPES["float16"])


@pytest.mark.parametrize(
    ("block_size", "start", "count", "g"),
    [(16, 0, 256, 16), (16, 256, 100, 4), (16, 8, 16, 8), (3, 0, 9, 3), (3, 1, 5, 1), (4, 0, 0, 4)],
)
def test_row_tokens(block_size: int, start: int, count: int, g: int) -> None:
    assert row_tokens(block_size, start, count) == g


def test_row_index_matches_per_token_arithmetic() -> None:
    table = np.array([7, 2, 9, 0, 5], np.int64)
    S = 4
    for start, count in [(0, 20), (4, 8), (2, 6), (3, 17)]:
        g = row_tokens(S, start, count)
        rows = row_index(table, S, start, count, g)
        flat = [int(table[t // S]) * S + t % S for t in range(start, start + count)]
        # Row r covers flat positions rows[r]*g .. rows[r]*g+g-1: exactly the request's tokens in order.
        assert [int(r) * g + i for r in rows for i in range(g)] == flat


def test_block_table_takes_sequences_and_arrays() -> None:
    spec = fake_spec()
    for ids in ([3, 1, 4], (3, 1, 4), np.array([3, 1, 4], np.int32), np.array([3, 1, 4, 4, 99], np.uint64)):
        table = block_table(ids, 9, spec)  # 9 tokens in blocks of 4: 3 ids used, the rest ignored
        assert table.dtype == np.int64
        assert table.tolist() == [3, 1, 4]
    assert block_table([], 0, spec).tolist() == []


@pytest.mark.parametrize(
    ("ids", "tokens", "error", "match"),
    [
        ([1, 2], 9, ChunkShapeError, "need 3 block ids, got 2"),
        ([1, 10, 2], 9, ChunkShapeError, "block id 10 is out of range"),
        ([1, -1, 2], 9, ChunkShapeError, "block id -1 is out of range"),
        ([1, 2, 1], 9, ChunkShapeError, "block id 1 appears twice"),
        ([1.0, 2.0, 3.0], 9, ChunkTypeError, "must be integer ids"),
        ([[1, 2, 3]], 9, ChunkTypeError, "must be 1-D"),
        ("123", 9, ChunkTypeError, "1-D sequence of integers"),
        (3, 9, ChunkTypeError, "1-D sequence of integers"),
        (None, 9, ChunkTypeError, "1-D sequence of integers"),
        ([True, False, True], 9, ChunkTypeError, "must be integer ids"),
    ],
)
def test_block_table_errors(ids: Any, tokens: int, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        block_table(ids, tokens, fake_spec())


def test_duplicates_past_the_used_part_are_ignored() -> None:
    assert block_table([5, 6, 6, 6], 8, fake_spec()).tolist() == [5, 6]


def test_unknown_layout_and_wrong_containers() -> None:
    with pytest.raises(ConfigError, match="unknown paged layout 'paged'"):
        describe([], "paged")
    with pytest.raises(ChunkTypeError, match="one torch or JAX array"):
        describe(np.zeros((2, 2, 4, 4, 2, 8)), "stacked")
    with pytest.raises(ChunkTypeError, match="non-empty list"):
        describe([], "vllm")
    with pytest.raises(ChunkTypeError, match="must be a torch array"):
        describe([np.zeros((2, 4, 4, 2, 8))], "vllm")


def test_missing_framework_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import lmcache.paged as paged

    monkeypatch.setitem(paged.KERNEL_MODULES, "torch", "lmcache_torch.no_such_module")
    with pytest.raises(BackendUnavailableError, match=r"lmcache-mempool\[torch\]"):
        kernels("torch")


def test_core_module_imports_no_framework() -> None:
    code = (
        "import sys, numpy as np\n"
        "import lmcache.paged as paged\n"
        "spec = paged.PagedSpec('vllm', 'torch', 1, 2, 4, 2, 1, 8, paged.normalize_dtype('float16'))\n"
        "assert paged.block_table(np.array([3, 0]), 3, spec).tolist() == [3, 0]\n"
        "sys.exit(1 if {'torch', 'jax', 'jaxlib'} & set(sys.modules) else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _dims(spec: Any) -> tuple[int, ...]:
    """(num_layers, kv, num_blocks, block_size, num_kv_heads, head_size) of a PagedSpec."""
    return (spec.num_layers, spec.kv, spec.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_size)


# -- shapes the kernels accept -----------------------------------------------------------------------
def test_torch_describe_and_shape_errors() -> None:
    torch = require("torch")
    layers = [torch.zeros(2, 6, 4, 2, 8, dtype=torch.bfloat16) for _ in range(3)]
    spec = describe(layers, "vllm")
    assert _dims(spec) == (3, 2, 6, 4, 2, 8)
    assert spec.dtype.name == "bfloat16"
    assert describe(torch.zeros(3, 1, 6, 4, 2, 8), "stacked").kv == 1  # MLA
    with pytest.raises(ChunkShapeError, match="layer 1 of the paged cache has shape"):
        describe([layers[0], torch.zeros(2, 7, 4, 2, 8, dtype=torch.bfloat16)], "vllm")
    with pytest.raises(ChunkShapeError, match="layer 1 of the paged cache has dtype"):
        describe([layers[0], torch.zeros(2, 6, 4, 2, 8, dtype=torch.float16)], "vllm")
    with pytest.raises(ChunkShapeError, match="not contiguous"):
        describe([torch.zeros(8, 2, 4, 6, 2).permute(1, 0, 2, 4, 3)], "vllm")
    with pytest.raises(ChunkShapeError, match=r"\(2 or 1, num_blocks"):
        describe([torch.zeros(3, 6, 4, 2, 8)], "vllm")
    with pytest.raises(ChunkShapeError, match="'stacked' paged cache has shape"):
        describe(torch.zeros(3, 2, 6, 4, 2), "stacked")
    with pytest.raises(ChunkTypeError, match="must be a jax array"):
        describe(layers, "interleaved")


def test_jax_describe_and_shape_errors() -> None:
    jnp = require("jax").numpy
    spec = describe([jnp.zeros((6, 4, 4, 8), jnp.bfloat16)] * 2, "interleaved")
    assert _dims(spec) == (2, 2, 6, 4, 2, 8)
    with pytest.raises(ChunkShapeError, match="interleaved on the head axis"):
        describe([jnp.zeros((6, 4, 3, 8))], "interleaved")
    with pytest.raises(ChunkTypeError, match="layout 'vllm' takes a non-empty list of per-layer torch"):
        describe(jnp.zeros((6, 4, 4, 8)), "vllm")


def test_check_fits_names_the_dimension() -> None:
    from lmcache.config import LMCacheMemPoolMetadata
    from lmcache.layout import SlotLayout

    spec = fake_spec()
    layout = SlotLayout.from_metadata(LMCacheMemPoolMetadata((2, 2, 16, 2, 8), "float16", 0.01))
    spec.check_fits(layout)
    with pytest.raises(ChunkShapeError, match="num_kv_heads = 2 but the pool's chunks have 4"):
        spec.check_fits(SlotLayout.from_metadata(LMCacheMemPoolMetadata((2, 2, 16, 4, 8), "float16", 0.01)))
    with pytest.raises(ChunkShapeError, match="dtype float16 but the pool holds bfloat16"):
        spec.check_fits(SlotLayout.from_metadata(LMCacheMemPoolMetadata((2, 2, 16, 2, 8), "bfloat16", 0.01)))


def test_torch_kernel_rejects_a_wrong_chunk() -> None:
    torch = require("torch")
    paged = Paged("torch", "vllm", (2, 2, 6, 4, 2, 8), "float16")
    spec = describe(paged.caches, "vllm")
    table = block_table([0, 1], 8, spec)
    module = kernels("torch")
    with pytest.raises(ChunkShapeError, match="has shape"):
        module.gather_into(paged.caches, spec, table, 0, torch.empty(2, 2, 8, 2, 4, dtype=torch.float16))
    with pytest.raises(ChunkShapeError, match="has dtype"):
        module.scatter_from(paged.caches, spec, table, 0, torch.zeros(2, 2, 8, 2, 8))
    with pytest.raises(ChunkShapeError, match="contiguous"):
        module.gather_into(
            paged.caches, spec, table, 0, torch.empty(2, 2, 2, 8, 8, dtype=torch.float16).transpose(2, 3)
        )
    assert_same(paged)


def test_jax_kernel_rejects_a_wrong_source() -> None:
    jnp = require("jax").numpy
    paged = Paged("jax", "stacked", (2, 2, 6, 4, 2, 8), "float16")
    spec = describe(paged.caches, "stacked")
    table = block_table([0, 1], 8, spec)
    module = kernels("jax")
    with pytest.raises(ChunkShapeError, match="or longer in dim 2"):
        module.scatter(paged.caches, spec, table, 0, jnp.zeros((2, 2, 4, 2, 8), jnp.float16), 8)
    with pytest.raises(ChunkShapeError, match="has dtype"):
        module.scatter(paged.caches, spec, table, 0, jnp.zeros((2, 2, 8, 2, 8), jnp.float32), 8)
    assert_same(paged)


# -- bytes exact, both ways --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("geometry", "ranges"),
    [
        ((2, 2, 12, 4, 2, 8), [(0, 16), (16, 16), (32, 5)]),  # block-aligned chunks, partial last one
        ((2, 2, 12, 4, 2, 8), [(0, 6), (6, 6), (12, 6), (18, 3)]),  # chunk 6, block 4: neither divides
        ((3, 1, 9, 3, 1, 16), [(0, 8), (8, 8), (16, 4)]),  # MLA, chunk 8, block 3
        ((1, 2, 5, 16, 2, 8), [(0, 4), (4, 4), (8, 4), (12, 3)]),  # blocks bigger than chunks
    ],
)
def test_round_trip_bytes_exact(
    framework_layout: tuple[str, str],
    geometry: tuple[int, int, int, int, int, int],
    ranges: list[tuple[int, int]],
) -> None:
    framework, layout = framework_layout
    if layout == "interleaved" and geometry[1] == 1:
        geometry = (geometry[0], 2, *geometry[2:])  # the interleaved layout has no MLA form
    paged = Paged(framework, layout, geometry)
    total = ranges[-1][0] + ranges[-1][1]
    ids = np.random.default_rng(1).permutation(geometry[2])
    table = block_table(ids, total, describe(paged.caches, layout))
    for start, count in ranges:  # gather each chunk range (a store)
        assert np.array_equal(paged.gather(table, start, count), paged.ref_gather(table, start, count))
    for i, (start, count) in enumerate(ranges):  # scatter each chunk (a load), then compare everything
        paged.scatter(table, start, random_src(paged, count, seed=10 + i))
    assert_same(paged)
    for start, count in ranges:
        assert np.array_equal(paged.gather(table, start, count), paged.ref_gather(table, start, count))


@pytest.mark.parametrize("dtype", ["float32", "float16", "float8_e4m3fn", "int8", "uint8"])
def test_every_dtype(framework_layout: tuple[str, str], dtype: str) -> None:
    framework, layout = framework_layout
    paged = Paged(framework, layout, (2, 2, 6, 4, 1, 3), dtype)  # 3-element tokens: odd row widths
    table = block_table([4, 0, 5, 2], 13, describe(paged.caches, layout))
    assert np.array_equal(paged.gather(table, 0, 13), paged.ref_gather(table, 0, 13))
    paged.scatter(table, 0, random_src(paged, 13, seed=3))
    paged.scatter(table, 3, random_src(paged, 7, seed=4))
    assert_same(paged)


@pytest.mark.parametrize("bucket", [1, 16, 48])
def test_jax_padding_writes_only_count_tokens(bucket: int) -> None:
    require("jax")
    paged = Paged("jax", "stacked", (2, 2, 10, 4, 2, 8))
    table = block_table(np.arange(10)[::-1], 37, describe(paged.caches, "stacked"))
    for start, count in [(0, 16), (16, 16), (32, 5), (3, 7)]:
        gathered = paged.gather(table, start, count, bucket=bucket)
        assert np.array_equal(gathered, paged.ref_gather(table, start, count))
        paged.scatter(table, start, random_src(paged, count, seed=count), bucket=bucket)
    assert_same(paged)


def test_jax_scatter_donates_the_cache() -> None:
    jax = require("jax")
    paged = Paged("jax", "interleaved", (2, 2, 4, 4, 2, 8))
    before = list(paged.caches)
    addresses = [x.unsafe_buffer_pointer() for x in before]
    table = block_table([1, 3], 8, describe(before, "interleaved"))
    assert kernels("jax").on_host(before, describe(before, "interleaved"))
    paged.scatter(table, 0, random_src(paged, 8, seed=0))
    assert all(isinstance(x, jax.Array) for x in paged.caches)
    assert all(x.is_deleted() for x in before)
    # On the CPU the rows went into the cache's own buffers: no copy of the cache was made.
    assert [x.unsafe_buffer_pointer() for x in paged.caches] == addresses
    assert_same(paged)


def test_jax_in_place_scatter_waits_for_readers_of_the_cache() -> None:
    jax = require("jax")
    jnp = jax.numpy
    paged = Paged("jax", "stacked", (2, 2, 64, 16, 8, 64), "float32")
    spec = describe(paged.caches, "stacked")
    table = block_table(np.arange(64), 1024, spec)
    # A reduction over the whole cache, dispatched asynchronously and still running when the scatter
    # starts: it must see the bytes from before the scatter.
    expected = int(np.asarray(paged.caches).view(np.uint32).astype(np.uint64).sum()) % (1 << 32)
    bits_sum = jax.jit(lambda c: jnp.sum(jax.lax.bitcast_convert_type(c, jnp.uint32), dtype=jnp.uint32))
    total = bits_sum(paged.caches)
    paged.scatter(table, 0, random_src(paged, 1024, seed=5))
    assert int(total) == expected
    assert int(bits_sum(paged.caches)) != expected  # the scatter did change the cache
    assert_same(paged)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_block_tables(framework_layout: tuple[str, str], data: st.DataObject) -> None:
    framework, layout = framework_layout
    # Few distinct sizes: each JAX program compiles once per shape, and the tables are what varies.
    block_size = data.draw(st.sampled_from([1, 3, 4]), label="block_size")
    chunk = data.draw(st.sampled_from([4, 5]), label="chunk_size")
    tokens = data.draw(st.integers(1, 30), label="tokens")
    num_blocks = 32
    ids = data.draw(st.permutations(range(num_blocks)), label="block_ids")
    paged = Paged(framework, layout, (2, 2, num_blocks, block_size, 1, 4), "float16", seed=tokens)
    table = block_table(ids, tokens, describe(paged.caches, layout))
    for start in range(0, tokens, chunk):
        count = min(chunk, tokens - start)
        gathered = paged.gather(table, start, count, bucket=chunk)
        assert np.array_equal(gathered, paged.ref_gather(table, start, count))
        paged.scatter(table, start, random_src(paged, count, seed=start), bucket=chunk)
    assert_same(paged)


def test_torch_rows_of_misaligned_tensors() -> None:
    """A cache or chunk that starts 2 bytes past an aligned address still moves exactly (narrower rows)."""
    torch = require("torch")
    paged = Paged("torch", "vllm", (2, 2, 6, 4, 2, 8), "bfloat16")
    spec = describe(paged.caches, "vllm")
    table = block_table([5, 0, 3], 12, spec)
    module = kernels("torch")
    numel = 2 * 2 * 12 * 2 * 8
    backing = torch.zeros(numel + 1, dtype=torch.bfloat16)
    dst = backing[1:].view(2, 2, 12, 2, 8)  # 2 bytes past the allocation's (aligned) start
    module.gather_into(paged.caches, spec, table, 0, dst)
    assert np.array_equal(host_bits(dst), paged.ref_gather(table, 0, 12))
    shifted = []
    for layer in paged.caches:  # the cache's layers, moved 2 bytes off alignment
        buffer = torch.empty(layer.numel() + 1, dtype=layer.dtype)
        buffer[1:].copy_(layer.reshape(-1))
        shifted.append(buffer[1:].view(layer.shape))
    paged.caches = shifted
    src = random_src(paged, 12, seed=5)
    paged.scatter(table, 0, src)
    assert_same(paged)


@pytest.mark.parametrize("path", ["in-place", "xla"])
@pytest.mark.parametrize("layout", ["stacked", "interleaved"])
def test_jax_scatter_pieces_writes_each_piece(
    layout: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    require("jax")
    module = kernels("jax")
    if path == "xla":
        monkeypatch.setattr(module, "_on_host", lambda caches, spec: False)
    paged = Paged("jax", layout, (2, 2, 12, 4, 2, 8))
    spec = describe(paged.caches, layout)
    table = block_table(np.random.default_rng(2).permutation(12), 30, spec)
    pieces = [
        (0, random_src(paged, 12, seed=1)),
        (12, random_src(paged, 12, seed=2)),
        (24, random_src(paged, 6, seed=3)),
    ]
    # Strided pieces, as slots of a pool with a longer token axis would be.
    pieces[1] = (12, np.concatenate([pieces[1][1], pieces[1][1]], axis=2)[:, :, :12])
    typed = [(start, bits.view(spec.dtype.numpy_dtype)) for start, bits in pieces]
    paged.caches = module.scatter_pieces(paged.caches, spec, table, typed, bucket=16)
    for start, bits in pieces:
        paged.ref_scatter(table, start, bits)
    assert_same(paged)
    paged.caches = module.scatter_pieces(paged.caches, spec, table, [])  # nothing to write: unchanged
    assert_same(paged)


def test_jax_scatter_pieces_refuses_bad_pieces_before_donating() -> None:
    require("jax")
    module = kernels("jax")
    paged = Paged("jax", "stacked", (2, 2, 6, 4, 2, 8))
    spec = describe(paged.caches, "stacked")
    table = block_table([4, 0, 5], 12, spec)
    good = random_src(paged, 4, seed=1).view(spec.dtype.numpy_dtype)
    bad = [
        ([(0, good[:, :, :, :1])], "has shape"),
        ([(0, good.view(np.uint16))], "has dtype"),
        ([(10, good)], "block table covers 12 tokens"),
        ([(0, good), (-4, good)], "covers tokens -4"),
    ]
    for pieces, message in bad:
        with pytest.raises(ChunkShapeError, match=message):
            module.scatter_pieces(paged.caches, spec, table, pieces)
        assert not paged.caches.is_deleted()  # nothing donated
        assert_same(paged)
