"""Hugging Face ``transformers`` models on the pool's chunk layout: a tiny Llama, cache conversions, prefill.

A serving engine that reuses a prefix needs three things from its model code, and this module owns them
for ``transformers`` Llama-architecture models:

* a model to run: :func:`tiny_llama` builds one from a config with random weights (fixed seed, nothing
  downloaded), small enough for tests and big enough to be a real Llama (GQA, RoPE, SwiGLU, RMSNorm);
* the conversion between ``transformers``' ``DynamicCache`` (per layer, keys and values of shape
  ``(1, num_kv_heads, T, head_dim)``) and the chunk layout ``(num_layers, 2, T, num_kv_heads, head_dim)``
  that :class:`lmcache.chunk_cache.ChunkCache` stores: :func:`cache_to_kv` and :func:`kv_to_cache`;
* a prefill that starts from a cached prefix: :func:`prefill` runs only the tokens after it, and
  :func:`greedy` continues from the cache it returns; :func:`prefill_with_cache` is the whole serving
  step (retrieve the longest cached prefix, rebuild the cache, prefill the rest, store the new chunks).

torch is imported at module level (this is the torch adapter); ``transformers`` only inside the functions
that need it, so ``import lmcache_torch.hf`` works without it and a missing install names the extra.
The API used is ``transformers``' ``Cache.layers`` (``DynamicLayer.keys`` / ``.values``) and
``Cache.update``; the forward keyword for the cache is ``cache`` in recent releases and
``past_key_values`` before, and :func:`prefill` uses whichever the model takes.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.dlpack import from_dlpack

from lmcache.chunk_cache import ChunkCache
from lmcache.errors import BackendUnavailableError, ChunkShapeError, ChunkTypeError, ConfigError

#: The tiny model's shape: 4 layers, 4 query heads sharing 2 KV heads (GQA), head size 64, an MLP of
#: Llama-3's proportions. Random weights: its tokens mean nothing, its arithmetic is a Llama's.
TINY_LLAMA: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 256,
    "intermediate_size": 896,  # 3.5x hidden, Llama-3's proportion (8B: 14336 / 4096)
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    # The default (0.02) gives near-uniform logits whose greedy continuation repeats one token, which
    # would prove nothing about prefix reuse; 0.1 gives logits of a few units and varied continuations.
    "initializer_range": 0.1,
}


def _transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError as exc:
        raise BackendUnavailableError(
            "lmcache_torch.hf needs transformers: pip install 'lmcache-mempool[hf]'"
        ) from exc


def tiny_llama(
    dtype: torch.dtype = torch.float32,
    *,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    **overrides: Any,
) -> Any:
    """Build a Llama-architecture ``LlamaForCausalLM`` with random weights, offline and deterministic.

    The config is :data:`TINY_LLAMA` updated with ``overrides`` (any ``LlamaConfig`` field). Weights
    come from ``torch.manual_seed(seed)``, so two calls with the same arguments give the same model.
    Nothing is downloaded. The model is in eval mode, in ``dtype``.

    Args:
        dtype: the parameters' dtype (``torch.float32`` or ``torch.bfloat16``).
        seed: seeds the weight initialization.
        attn_implementation: ``"sdpa"`` (default) or ``"eager"``.
        **overrides: ``LlamaConfig`` fields that replace the tiny defaults.

    Returns:
        The model (a ``transformers.LlamaForCausalLM``).
    """
    transformers = _transformers()
    fields = {**TINY_LLAMA, **overrides}
    config = transformers.LlamaConfig(**fields, attn_implementation=attn_implementation)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)  # building a model must not move the caller's random stream
    return model.to(dtype).eval()


def kv_shape(model: Any, num_tokens: int) -> tuple[int, int, int, int, int]:
    """The chunk-layout shape ``(num_layers, 2, num_tokens, num_kv_heads, head_dim)`` of ``model``'s KV."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return (config.num_hidden_layers, 2, num_tokens, config.num_key_value_heads, head_dim)


def cache_to_kv(cache: Any, *, start: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy a ``DynamicCache``'s keys and values from token ``start`` on into the chunk layout.

    Args:
        cache: a ``transformers`` cache with ``layers`` of ``(1, H, T, D)`` keys and values.
        start: the first token to copy (tokens before it, a prefix already stored, are skipped).
        out: where to write, ``(L, 2, T - start, H, D)`` of the cache's dtype; a new tensor if None.

    Returns:
        ``out`` (or the new tensor): layer ``l``'s keys at ``[l, 0]`` and values at ``[l, 1]``, token-major.

    Raises:
        ChunkShapeError: a batch size other than 1, a ``start`` past the end, or an ``out`` of the wrong
            shape or dtype (nothing is written then).
    """
    layers = list(cache.layers)
    if not layers:
        raise ChunkShapeError("the cache has no layers: run a prefill into it first")
    keys0 = layers[0].keys
    batch, heads, total, head_dim = keys0.shape
    if batch != 1:
        raise ChunkShapeError(f"cache_to_kv converts one request (batch 1), got batch {batch}")
    if not 0 <= start <= total:
        raise ChunkShapeError(f"start={start} is outside the cache's {total} tokens")
    shape = (len(layers), 2, total - start, heads, head_dim)
    if out is None:
        out = torch.empty(shape, dtype=keys0.dtype, device=keys0.device)
    elif tuple(out.shape) != shape or out.dtype != keys0.dtype:
        raise ChunkShapeError(f"out must be {shape} of {keys0.dtype}, got {tuple(out.shape)} of {out.dtype}")
    for index, layer in enumerate(layers):
        out[index, 0].copy_(layer.keys[0, :, start:].transpose(0, 1))
        out[index, 1].copy_(layer.values[0, :, start:].transpose(0, 1))
    return out


def kv_to_cache(kv: Any, cache: Any = None) -> Any:
    """Build (or extend) a ``DynamicCache`` from KV in the chunk layout ``(L, 2, T, H, D)``.

    ``kv`` may be a torch tensor or any DLPack array on the CPU (a JAX array, a pool chunk's view): its
    values are copied into the cache, so the source (a pool slot, say) may be freed or evicted afterwards.

    Args:
        kv: the keys and values, ``(L, 2, T, H, D)``.
        cache: a cache to append to (its layers must match); a new ``DynamicCache`` if None.

    Returns:
        The cache, holding per layer ``(1, H, T, D)`` keys and values.

    Raises:
        ChunkShapeError: ``kv`` is not 5-D with 2 on axis 1.
        ChunkTypeError: ``kv`` is neither a tensor nor a DLPack array.
    """
    if not isinstance(kv, torch.Tensor):
        if not hasattr(kv, "__dlpack__"):
            raise ChunkTypeError(f"kv must be a torch tensor or a DLPack array, got {type(kv).__name__}")
        kv = from_dlpack(kv)
    if kv.dim() != 5 or kv.shape[1] != 2:
        raise ChunkShapeError(
            f"kv must be (num_layers, 2, tokens, kv_heads, head_dim), got {tuple(kv.shape)}"
        )
    if cache is None:
        cache = _transformers().DynamicCache()
    for index in range(kv.shape[0]):
        # (T, H, D) -> (1, H, T, D); update() concatenates, which copies out of the source.
        keys = kv[index, 0].transpose(0, 1).unsqueeze(0)
        values = kv[index, 1].transpose(0, 1).unsqueeze(0)
        cache.update(keys, values, index)
    return cache


def _cache_keyword(model: Any) -> str:
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


@torch.no_grad()
def prefill(
    model: Any, token_ids: Sequence[int] | torch.Tensor, cache: Any = None
) -> tuple[torch.Tensor, Any]:
    """Run ``token_ids`` through ``model`` after the tokens already in ``cache``.

    With ``cache=None`` this is a full prefill. With a cache holding the KV of the first ``P`` tokens of a
    prompt (from :func:`kv_to_cache`), pass only the tokens after them: positions continue at ``P``, and
    the logits equal those of the full prefill at the same positions.

    Args:
        model: a ``transformers`` causal LM.
        token_ids: the tokens to run, 1-D.
        cache: the prefix's cache, extended in place; a new ``DynamicCache`` if None.

    Returns:
        ``(logits, cache)``: logits ``(len(token_ids), vocab)`` and the cache, now holding every token.

    Raises:
        ConfigError: no tokens to run.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(1, -1)
    if ids.shape[1] == 0:
        raise ConfigError("prefill needs at least one token after the cached prefix")
    if cache is None:
        cache = _transformers().DynamicCache()
    output = model(ids, use_cache=True, **{_cache_keyword(model): cache})
    return output.logits[0], cache


def check_pool(model: Any, chunk_cache: ChunkCache) -> None:
    """Check that ``chunk_cache``'s pool holds ``model``'s KV: layers, heads, head size and dtype.

    Raises:
        ConfigError: the pool's chunk shape or dtype is not the model's (the message says which to use).
    """
    layout = chunk_cache.pool.layout
    expected = kv_shape(model, layout.chunk_size)
    dtype = str(model.dtype).removeprefix("torch.")
    if tuple(layout.kv_shape) != expected or layout.dtype.name != dtype:
        raise ConfigError(
            f"the pool holds {tuple(layout.kv_shape)} chunks of {layout.dtype.name} but the model's KV is "
            f"{expected} of {dtype}: build the pool with kv_shape(model, chunk_size) and the model's dtype"
        )


@torch.no_grad()
def prefill_with_cache(
    model: Any, chunk_cache: ChunkCache, token_ids: Sequence[int], *, store: bool = True
) -> tuple[torch.Tensor, Any, int]:
    """Serve a prompt's prefill: reuse its longest cached prefix, compute the rest, store the new chunks.

    The cached prefix is copied out of the pool (``retrieve``) and into a new ``DynamicCache``, so the
    pool's chunks may be evicted as soon as this returns. At most ``len(token_ids) - 1`` tokens are
    reused: the last token is always computed, since its logits are the answer.

    Args:
        model: the model whose KV the cache holds (see :func:`check_pool`).
        chunk_cache: the chunk cache to read from and store into.
        token_ids: the whole prompt, 1-D.
        store: store the prompt's KV afterwards (chunks already cached are not copied again).

    Returns:
        ``(logits, cache, reused)``: logits of the tokens after the reused prefix,
        ``(len(token_ids) - reused, vocab)``; the ``DynamicCache`` of the whole prompt (continue it with
        :func:`greedy`); and ``reused``, the tokens taken from the chunk cache.

    Raises:
        ConfigError: an empty prompt, or a pool that does not hold this model's KV.
    """
    tokens = [int(t) for t in token_ids]
    if not tokens:
        raise ConfigError("prefill_with_cache needs a prompt of at least one token")
    check_pool(model, chunk_cache)
    prefix, cached = chunk_cache.retrieve(tokens, framework="torch")
    reused = min(cached, len(tokens) - 1)
    cache = kv_to_cache(prefix[:, :, :reused]) if reused else None
    logits, cache = prefill(model, tokens[reused:], cache)
    if store:
        chunk_cache.store(tokens, cache_to_kv(cache))
    return logits, cache, reused


@torch.no_grad()
def greedy(model: Any, cache: Any, logits: torch.Tensor, steps: int) -> list[int]:
    """Continue greedily for ``steps`` tokens from a prefilled ``cache`` and its last ``logits``.

    Args:
        model: the model that filled ``cache``.
        cache: the cache after the prompt (extended in place, one token per step).
        logits: the prompt's last logits, ``(vocab,)`` (or ``(T, vocab)``: the last row is used).
        steps: how many tokens to produce.

    Returns:
        The ``steps`` token ids, each the argmax after the previous.

    Raises:
        ConfigError: ``steps`` < 1.
    """
    if steps < 1:
        raise ConfigError(f"greedy needs steps >= 1, got {steps}")
    last = logits if logits.dim() == 1 else logits[-1]
    tokens = [int(last.argmax())]
    while len(tokens) < steps:
        step_logits, cache = prefill(model, tokens[-1:], cache)
        tokens.append(int(step_logits[-1].argmax()))
    return tokens


__all__ = [
    "TINY_LLAMA",
    "cache_to_kv",
    "check_pool",
    "greedy",
    "kv_shape",
    "kv_to_cache",
    "prefill",
    "prefill_with_cache",
    "tiny_llama",
]
