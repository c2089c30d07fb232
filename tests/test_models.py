"""A real model on the chunk layout: a tiny ``transformers`` Llama in torch and the same layers in JAX.

What is checked: the model is built offline and deterministically; ``DynamicCache`` <-> ``(L, 2, T, H, D)``
conversions are bit-exact; a prefill of only the suffix on a rebuilt cache gives the full prefill's
logits (fp32 within 1e-4) and the same greedy continuation; the JAX forward pass with DLPack-moved weights
gives torch's logits and KV; and prefix reuse through a :class:`~lmcache.chunk_cache.ChunkCache` in every
direction (torch -> torch, torch -> JAX through zero-copy views, JAX -> torch) on a prefix hit, a partial
hit, a miss and a whole-prompt hit. bf16 uses the tolerance of :func:`bf16_budget` (the reason is there).
All deterministic: seeded weights and prompts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kvtest import pointer, require

FP32_ATOL = 1e-4
PROMPT = 40  # tokens: two full chunks of 16 and a partial one, in the chunk-cache tests
PREFIX = 32
CHUNK = 16


@pytest.fixture(scope="module")
def torch_models() -> dict[str, Any]:
    """The tiny Llama in fp32 and bf16 (the same weights, rounded)."""
    torch = require("torch")
    require("transformers")
    from lmcache_torch.hf import tiny_llama

    return {"float32": tiny_llama(torch.float32), "bfloat16": tiny_llama(torch.bfloat16)}


@pytest.fixture(scope="module")
def jax_models(torch_models: dict[str, Any]) -> dict[str, Any]:
    """The JAX forward pass's (spec, params) for each torch model, weights moved through DLPack."""
    require("jax")
    from lmcache_jax.llama import params_from_torch

    return {name: params_from_torch(model) for name, model in torch_models.items()}


def prompt(seed: int, length: int = PROMPT) -> list[int]:
    """A seeded random prompt of token ids."""
    return [int(t) for t in np.random.default_rng(seed).integers(0, 512, size=length)]


def as_float32(array: Any) -> np.ndarray:
    """Any framework's logits as float32 numpy (bf16 widened exactly)."""
    if type(array).__module__.startswith("torch"):
        return np.asarray(array.detach().float().numpy())
    return np.asarray(array, dtype=np.float32)


def max_diff(a: Any, b: Any) -> float:
    return float(np.abs(as_float32(a) - as_float32(b)).max())


def bf16_budget(torch_models: dict[str, Any], tokens: list[int]) -> float:
    """The bf16 tolerance: twice torch's own bf16 error on ``tokens``, measured against its fp32 logits.

    Two bf16 implementations of the same math (torch's kernels, XLA's) each round differently, and each
    lands within bf16's rounding error of the exact (fp32) result; so they can differ from each other
    by up to the sum of their errors. We measure torch's error on the same prompt and allow twice it.
    A real bug (a wrong position, head mapping or prefix) moves logits by far more: the tests check that
    the KV of a different prefix breaks this budget, so it cannot hide one.
    """
    from lmcache_torch.hf import prefill

    full32, _ = prefill(torch_models["float32"], tokens)
    full16, _ = prefill(torch_models["bfloat16"], tokens)
    return 2 * max_diff(full16, full32)


# -- the model and the conversions ----------------------------------------------------------------------
def test_tiny_llama_is_a_seeded_gqa_llama(torch_models: dict[str, Any]) -> None:
    torch = require("torch")
    from lmcache_torch.hf import kv_shape, tiny_llama

    model = torch_models["float32"]
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (4, 4, 2)
    assert config.head_dim == 64
    assert kv_shape(model, 7) == (4, 2, 7, 2, 64)
    again, other = tiny_llama(torch.float32), tiny_llama(torch.float32, seed=1)
    pairs = zip(
        model.state_dict().values(), again.state_dict().values(), other.state_dict().values(), strict=True
    )
    same, different = True, False
    for ours, same_seed, other_seed in pairs:
        same = same and torch.equal(ours, same_seed)
        different = different or not torch.equal(ours, other_seed)
    assert same, "the same seed must give the same weights"
    assert different, "another seed must give other weights"
    assert torch_models["bfloat16"].model.embed_tokens.weight.dtype == torch.bfloat16
    # Building a model leaves the caller's random stream where it was.
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    tiny_llama(torch.float32)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cache_and_chunk_layout_round_trip_bit_exact(torch_models: dict[str, Any], dtype: str) -> None:
    torch = require("torch")
    from lmcache_torch.hf import cache_to_kv, kv_to_cache, prefill

    model = torch_models[dtype]
    _, cache = prefill(model, prompt(0))
    kv = cache_to_kv(cache)
    assert tuple(kv.shape) == (4, 2, PROMPT, 2, 64)
    assert kv.is_contiguous()
    for index, layer in enumerate(cache.layers):
        assert torch.equal(kv[index, 0], layer.keys[0].transpose(0, 1))
        assert torch.equal(kv[index, 1], layer.values[0].transpose(0, 1))
    rebuilt = kv_to_cache(kv)
    assert rebuilt.get_seq_length() == PROMPT
    assert torch.equal(cache_to_kv(rebuilt), kv)
    # The rebuilt cache owns its memory: the source can be overwritten (a slot reused) afterwards.
    kv_copy = kv.clone()
    kv.zero_()
    assert torch.equal(cache_to_kv(rebuilt), kv_copy)
    # start= skips a stored prefix; out= writes in place.
    out = torch.empty((4, 2, PROMPT - PREFIX, 2, 64), dtype=kv_copy.dtype)
    assert cache_to_kv(cache, start=PREFIX, out=out) is out
    assert torch.equal(out, kv_copy[:, :, PREFIX:])
    # Appending KV to an existing cache continues it.
    head = kv_to_cache(kv_copy[:, :, :PREFIX])
    assert torch.equal(cache_to_kv(kv_to_cache(kv_copy[:, :, PREFIX:], head)), kv_copy)


def test_kv_to_cache_takes_any_dlpack_array(torch_models: dict[str, Any]) -> None:
    torch = require("torch")
    from lmcache_torch.hf import cache_to_kv, kv_to_cache, prefill

    _, cache = prefill(torch_models["float32"], prompt(1, 8))
    kv = cache_to_kv(cache)
    assert torch.equal(cache_to_kv(kv_to_cache(kv.numpy())), kv)


def test_conversions_reject_bad_input(torch_models: dict[str, Any]) -> None:
    torch = require("torch")
    from lmcache.errors import ChunkShapeError, ChunkTypeError, ConfigError
    from lmcache_torch.hf import cache_to_kv, greedy, kv_to_cache, prefill

    model = torch_models["float32"]
    _, cache = prefill(model, prompt(2, 8))
    with pytest.raises(ChunkShapeError, match="num_layers, 2, tokens"):
        kv_to_cache(torch.zeros(4, 3, 8, 2, 64))
    with pytest.raises(ChunkShapeError, match="num_layers, 2, tokens"):
        kv_to_cache(torch.zeros(2, 8, 2, 64))
    with pytest.raises(ChunkTypeError, match="list"):
        kv_to_cache([[1.0]])
    out = torch.full((4, 2, 7, 2, 64), 3.0)
    with pytest.raises(ChunkShapeError, match="out must be"):
        cache_to_kv(cache, out=out)
    assert bool((out == 3.0).all()), "a rejected out is left untouched"
    with pytest.raises(ChunkShapeError, match="outside"):
        cache_to_kv(cache, start=9)
    with pytest.raises(ConfigError, match="at least one token"):
        prefill(model, [], cache)
    with pytest.raises(ConfigError, match="steps"):
        greedy(model, cache, torch.zeros(512), 0)
    assert cache.get_seq_length() == 8, "rejected calls leave the cache as it was"


def test_suffix_prefill_on_rebuilt_cache_matches_full_prefill(torch_models: dict[str, Any]) -> None:
    from lmcache_torch.hf import cache_to_kv, greedy, kv_to_cache, prefill

    model = torch_models["float32"]
    tokens = prompt(3)
    full, cache = prefill(model, tokens)
    expected = greedy(model, cache, full, 8)
    assert len(set(expected)) > 1, "the continuation varies (a repeating token would prove little)"
    kv = cache_to_kv(prefill(model, tokens)[1])
    rebuilt = kv_to_cache(kv[:, :, :PREFIX])
    suffix, rebuilt = prefill(model, tokens[PREFIX:], rebuilt)
    assert suffix.shape == (PROMPT - PREFIX, 512)
    assert max_diff(suffix, full[PREFIX:]) <= FP32_ATOL
    assert greedy(model, rebuilt, suffix, 8) == expected


# -- the JAX forward pass ---------------------------------------------------------------------------------
def test_jax_weights_alias_the_torch_parameters(
    torch_models: dict[str, Any], jax_models: dict[str, Any]
) -> None:
    for dtype, model in torch_models.items():
        _, params = jax_models[dtype]
        assert pointer(params["embed"]) == model.model.embed_tokens.weight.data_ptr()
        assert pointer(params["layers"][3]["down"]) == model.model.layers[3].mlp.down_proj.weight.data_ptr()
        assert pointer(params["lm_head"]) == model.lm_head.weight.data_ptr()


def test_jax_llama_matches_hf_fp32(torch_models: dict[str, Any], jax_models: dict[str, Any]) -> None:
    jnp = require("jax").numpy
    from lmcache_jax.llama import forward
    from lmcache_torch.hf import cache_to_kv, prefill

    tokens = prompt(4)
    full, cache = prefill(torch_models["float32"], tokens)
    spec, params = jax_models["float32"]
    logits, kv = forward(spec, params, tokens)
    assert logits.shape == (PROMPT, 512)
    assert kv.shape == (4, 2, PROMPT, 2, 64)
    assert max_diff(logits, full) <= FP32_ATOL
    assert max_diff(kv, cache_to_kv(cache)) <= FP32_ATOL
    # The suffix after torch's prefix KV (a copy here; the chunk-cache tests read pool views).
    prefix = jnp.asarray(cache_to_kv(cache)[:, :, :PREFIX].numpy())
    suffix, kv_all = forward(spec, params, tokens[PREFIX:], prefix)
    assert max_diff(suffix, full[PREFIX:]) <= FP32_ATOL
    assert max_diff(kv_all, kv) <= FP32_ATOL


def test_jax_llama_matches_hf_bf16(torch_models: dict[str, Any], jax_models: dict[str, Any]) -> None:
    require("jax")
    from lmcache_jax.llama import forward
    from lmcache_torch.hf import prefill

    tokens = prompt(5)
    budget = bf16_budget(torch_models, tokens)
    full, _ = prefill(torch_models["bfloat16"], tokens)
    spec, params = jax_models["bfloat16"]
    logits, kv = forward(spec, params, tokens)
    assert str(logits.dtype) == "bfloat16"
    assert str(kv.dtype) == "bfloat16"
    assert max_diff(logits, full) <= budget
    # The budget is tight enough to catch a bug: shifting the positions by one breaks it.
    _, shifted = forward(spec, params, tokens[1:], kv[:, :, :1])
    wrong, _ = forward(spec, params, tokens[2:], shifted[:, :, :1])
    assert max_diff(wrong, full[2:]) > budget


def test_jax_forward_rejects_bad_input(jax_models: dict[str, Any], torch_models: dict[str, Any]) -> None:
    jnp = require("jax").numpy
    torch = require("torch")
    from lmcache.errors import ChunkShapeError, ConfigError
    from lmcache_jax.llama import LlamaSpec, forward
    from lmcache_torch.hf import tiny_llama

    spec, params = jax_models["float32"]
    with pytest.raises(ChunkShapeError, match="prefix_kv must be"):
        forward(spec, params, [1, 2], jnp.zeros((4, 2, 3, 4, 64), jnp.float32))
    with pytest.raises(ChunkShapeError, match="like the weights"):
        forward(spec, params, [1, 2], jnp.zeros((4, 2, 3, 2, 64), jnp.bfloat16))
    with pytest.raises(ConfigError, match="at least one token"):
        forward(spec, params, [])
    scaled = tiny_llama(
        torch.float32, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    )
    with pytest.raises(ConfigError, match="default RoPE"):
        LlamaSpec.from_config(scaled.config)
    with pytest.raises(ConfigError, match="bias"):
        LlamaSpec.from_config(tiny_llama(torch.float32, attention_bias=True).config)


# -- prefix reuse through the chunk cache ------------------------------------------------------------------
def model_cache(backend: str, dtype: str, slots: int = 16) -> Any:
    """A chunk cache over a CPU pool of ``slots`` chunks of the tiny Llama's KV (16 tokens each)."""
    from lmcache.chunk_cache import ChunkCache
    from lmcache.config import LMCacheMemPoolMetadata
    from lmcache.layout import SlotLayout
    from lmcache.storage_backend.mem_pool import LocalCPUPool

    shape = (4, 2, CHUNK, 2, 64)
    slot_bytes = SlotLayout.from_metadata(LMCacheMemPoolMetadata(shape, dtype, 1.0)).slot_bytes
    meta = LMCacheMemPoolMetadata(shape, dtype, slots * slot_bytes / 2**30)
    return ChunkCache(LocalCPUPool(meta, backend=backend, pin_memory=False), namespace=f"tiny-llama/{dtype}")


# The first request, then (request, tokens reused) for: a prefix hit (two whole chunks), a partial hit
# (the second chunk differs after 4 shared tokens), a miss, and the first prompt again (all but its last
# token: that one is always computed).
FIRST = prompt(10)
REQUESTS = (
    ("prefix hit", FIRST[:PREFIX] + prompt(11, 8), PREFIX),
    ("partial hit", FIRST[:20] + prompt(12, 20), CHUNK),
    ("miss", prompt(13), 0),
    ("whole prompt", FIRST, PROMPT - 1),
)


def tolerance(torch_models: dict[str, Any], dtype: str, tokens: list[int]) -> float:
    return FP32_ATOL if dtype == "float32" else bf16_budget(torch_models, tokens)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_prefix_reuse_matches_full_prefill(torch_models: dict[str, Any], dtype: str) -> None:
    from lmcache_torch.hf import greedy, prefill, prefill_with_cache

    model = torch_models[dtype]
    cache = model_cache("torch", dtype)
    _, _, reused = prefill_with_cache(model, cache, FIRST)
    assert reused == 0
    assert cache.lookup(FIRST) == PROMPT
    for label, request, expected in REQUESTS:
        assert cache.lookup(request) == (PROMPT if label == "whole prompt" else expected), label
        full, full_cache = prefill(model, request)
        logits, kv_cache, reused = prefill_with_cache(model, cache, request)
        assert reused == expected, label
        assert logits.shape == (PROMPT - expected, 512)
        assert max_diff(logits, full[expected:]) <= tolerance(torch_models, dtype, request), label
        if dtype == "float32":
            assert greedy(model, kv_cache, logits, 8) == greedy(model, full_cache, full, 8), label
        assert cache.lookup(request) == PROMPT, "the request's own chunks are stored after it"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_jax_reads_torch_prefix_through_zero_copy_views(
    torch_models: dict[str, Any], jax_models: dict[str, Any], dtype: str
) -> None:
    from lmcache_jax.llama import prefill_with_cache as jax_prefill
    from lmcache_torch.hf import prefill, prefill_with_cache

    cache = model_cache("torch", dtype)
    prefill_with_cache(torch_models[dtype], cache, FIRST)
    request = REQUESTS[0][1]
    with cache.lease(request) as lease:  # what jax_prefill reads: views of the slots, no copy
        assert lease.num_tokens == PREFIX
        views = [chunk.as_jax() for chunk in lease.chunks]
        assert [pointer(v) for v in views] == [cache.pool.slot_address(c.chunk_idx) for c in lease.chunks]
    spec, params = jax_models[dtype]
    for label, request, expected in REQUESTS:
        full, _ = prefill(torch_models[dtype], request)
        logits, kv, reused = jax_prefill(spec, params, cache, request, store=False)
        assert reused == expected, label
        assert kv.shape == (4, 2, PROMPT, 2, 64)
        assert max_diff(logits, full[expected:]) <= tolerance(torch_models, dtype, request), label
    assert cache.stats().leased == 0, "every lease was released"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_consumes_jax_prefix(
    torch_models: dict[str, Any], jax_models: dict[str, Any], dtype: str
) -> None:
    from lmcache_jax.llama import prefill_with_cache as jax_prefill
    from lmcache_torch.hf import greedy, prefill, prefill_with_cache

    cache = model_cache("jax", dtype)
    spec, params = jax_models[dtype]
    _, kv, reused = jax_prefill(spec, params, cache, FIRST)
    assert reused == 0
    assert cache.lookup(FIRST) == PROMPT
    with cache.lease(FIRST) as lease:  # the stored bytes are the JAX KV's, and torch views alias them
        stored = [chunk.as_torch() for chunk in lease.chunks]
        assert [pointer(t) for t in stored] == [cache.pool.slot_address(c.chunk_idx) for c in lease.chunks]
        assert max_diff(require("torch").cat(stored, dim=2), kv) == 0.0
    model = torch_models[dtype]
    for label, request, expected in REQUESTS:
        full, full_cache = prefill(model, request)
        logits, kv_cache, reused = prefill_with_cache(model, cache, request, store=False)
        assert reused == expected, label
        assert max_diff(logits, full[expected:]) <= tolerance(torch_models, dtype, request), label
        if dtype == "float32":
            assert greedy(model, kv_cache, logits, 8) == greedy(model, full_cache, full, 8), label


def test_prefill_with_cache_rejects_a_pool_of_another_model(
    torch_models: dict[str, Any], jax_models: dict[str, Any]
) -> None:
    from lmcache.errors import ConfigError
    from lmcache_jax.llama import prefill_with_cache as jax_prefill
    from lmcache_torch.hf import prefill_with_cache

    cache = model_cache("torch", "bfloat16")
    with pytest.raises(ConfigError, match="model's KV"):
        prefill_with_cache(torch_models["float32"], cache, FIRST)
    with pytest.raises(ConfigError, match="model's KV"):
        jax_prefill(*jax_models["float32"], cache, FIRST)
    with pytest.raises(ConfigError, match="at least one token"):
        prefill_with_cache(torch_models["bfloat16"], cache, [])
    with pytest.raises(ConfigError, match="at least one token"):
        jax_prefill(*jax_models["bfloat16"], cache, [])
    assert len(cache) == 0, "nothing was stored"


def test_serving_scenario_is_left_out_without_torch() -> None:
    import io

    from lmcache.bench import Options
    from lmcache.bench.serving import available, bench_serving

    progress = io.StringIO()
    assert not available(["numpy", "jax"])
    assert bench_serving(["numpy", "jax"], Options(repeat=2, progress=progress)) == []
    assert "needs torch and transformers" in progress.getvalue()


def test_serving_bench_module_imports_no_framework() -> None:
    import subprocess
    import sys

    code = (
        "import sys, lmcache.bench.serving\n"
        "bad = [m for m in ('torch', 'jax', 'transformers') if m in sys.modules]\n"
        "sys.exit(f'imported: {bad}' if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
