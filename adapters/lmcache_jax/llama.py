"""A Llama forward pass in JAX that reads and writes KV in the pool's chunk layout.

It computes what ``transformers``' ``LlamaForCausalLM`` computes, step for step in the same dtypes
(RMSNorm in float32 then cast back; RoPE with ``cos``/``sin`` made in float32 from
``position * inv_freq`` and cast to the model's dtype; GQA attention with a float32 softmax; SwiGLU MLP),
so that logits agree with the torch model's to float32 rounding. Its KV is ``(num_layers, 2, T,
num_kv_heads, head_dim)``, the layout :class:`lmcache.chunk_cache.ChunkCache` stores: a prefix read from a
pool (chunk views, ``as_jax()``) goes straight in, and the KV it returns can be stored as it is;
:func:`prefill_with_cache` is the whole serving step on a :class:`~lmcache.chunk_cache.ChunkCache`.

Weights come from a ``transformers`` model through DLPack (:func:`params_from_torch`): the JAX arrays
alias the torch parameters' memory where alignment allows, so nothing is copied or converted.
Only default RoPE (``rope_type == "default"``) and no attention or MLP biases are supported; anything else
is refused by :meth:`LlamaSpec.from_config` rather than computed differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import jax
import jax.numpy as jnp

from lmcache.chunk_cache import ChunkCache
from lmcache.errors import ChunkShapeError, ConfigError

Params = dict[str, Any]


@dataclass(frozen=True)
class LlamaSpec:
    """The static shape of a Llama model: what ``jit`` specializes on."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float

    @classmethod
    def from_config(cls, config: Any) -> LlamaSpec:
        """Read a ``transformers`` ``LlamaConfig``; refuse features this forward pass does not compute.

        Raises:
            ConfigError: a RoPE type other than ``"default"``, attention or MLP biases, or a head count
                that does not divide into the KV heads.
        """
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"only default RoPE is implemented, the config asks for {rope_type!r}")
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise ConfigError("attention_bias and mlp_bias are not implemented: build the model without them")
        theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
        if theta is None:
            raise ConfigError("the config names no rope_theta")
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        if heads % kv_heads:
            raise ConfigError(f"{heads} query heads do not divide into {kv_heads} KV heads")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            config.num_hidden_layers, heads, kv_heads, head_dim, float(theta), float(config.rms_norm_eps)
        )


def _alias(tensor: Any) -> jax.Array:
    """A JAX view of a torch tensor through DLPack (no copy when the tensor is 64-byte aligned)."""
    return cast(jax.Array, jax.dlpack.from_dlpack(tensor.detach()))


def params_from_torch(model: Any) -> tuple[LlamaSpec, Params]:
    """Move a ``transformers`` ``LlamaForCausalLM``'s weights to JAX through DLPack.

    Linear weights keep torch's ``(out_features, in_features)`` layout, so each is a view of the
    parameter, not a transposed copy. DLPack keeps the parameters' memory alive for as long as the JAX
    arrays exist, so the torch model may be dropped. Do not update the torch weights afterwards: the
    JAX arrays share their memory and would see the writes.

    Returns:
        ``(spec, params)``: the static spec and a pytree of arrays for :func:`forward`.
    """
    spec = LlamaSpec.from_config(model.config)
    body = model.model
    layers = []
    for layer in body.layers:
        attention, mlp = layer.self_attn, layer.mlp
        layers.append(
            {
                "q": _alias(attention.q_proj.weight),
                "k": _alias(attention.k_proj.weight),
                "v": _alias(attention.v_proj.weight),
                "o": _alias(attention.o_proj.weight),
                "gate": _alias(mlp.gate_proj.weight),
                "up": _alias(mlp.up_proj.weight),
                "down": _alias(mlp.down_proj.weight),
                "input_norm": _alias(layer.input_layernorm.weight),
                "post_norm": _alias(layer.post_attention_layernorm.weight),
            }
        )
    params = {
        "embed": _alias(body.embed_tokens.weight),
        "layers": layers,
        "norm": _alias(body.norm.weight),
        "lm_head": _alias(model.lm_head.weight),
    }
    return spec, params


def _rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    # As transformers: normalize in float32, cast back, then scale in the model's dtype.
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def _rope(spec: LlamaSpec, positions: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    exponent = jnp.arange(0, spec.head_dim, 2, dtype=jnp.float32) / spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta**exponent)
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def _linear(x: jax.Array, weight: jax.Array) -> jax.Array:
    return x @ weight.T


@partial(jax.jit, static_argnums=0)
def _forward(spec: LlamaSpec, params: Params, token_ids: jax.Array, prefix_kv: jax.Array) -> Any:
    dtype = params["embed"].dtype
    num_prefix, num_new = prefix_kv.shape[2], token_ids.shape[0]
    x = jnp.take(params["embed"], token_ids, axis=0)
    cos, sin = _rope(spec, num_prefix + jnp.arange(num_new), dtype)
    # Query t (position num_prefix + t) sees keys 0 .. num_prefix + t.
    visible = jnp.arange(num_prefix + num_new)[None, :] <= (num_prefix + jnp.arange(num_new))[:, None]
    group = spec.num_heads // spec.num_kv_heads
    scale = spec.head_dim**-0.5
    masked = jnp.finfo(dtype).min  # type: ignore[no-untyped-call]
    kv_layers = []
    for index, layer in enumerate(params["layers"]):
        h = _rms_norm(x, layer["input_norm"], spec.rms_norm_eps)
        q = _linear(h, layer["q"]).reshape(num_new, spec.num_heads, spec.head_dim)
        k = _linear(h, layer["k"]).reshape(num_new, spec.num_kv_heads, spec.head_dim)
        v = _linear(h, layer["v"]).reshape(num_new, spec.num_kv_heads, spec.head_dim)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        keys = jnp.concatenate([prefix_kv[index, 0], k], axis=0)
        values = jnp.concatenate([prefix_kv[index, 1], v], axis=0)
        kv_layers.append(jnp.stack([keys, values]))
        # GQA: query head j reads KV head j // group (transformers' repeat_kv), here without repeating
        # the KV: queries are grouped as (kv_head, group).
        grouped = q.reshape(num_new, spec.num_kv_heads, group, spec.head_dim)
        scores = jnp.einsum("tkgd,skd->kgts", grouped, keys) * jnp.asarray(scale, dtype)
        scores = jnp.where(visible, scores, masked)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)
        attended = jnp.einsum("kgts,skd->tkgd", probs, values).reshape(num_new, -1)
        x = x + _linear(attended, layer["o"])
        h = _rms_norm(x, layer["post_norm"], spec.rms_norm_eps)
        x = x + _linear(jax.nn.silu(_linear(h, layer["gate"])) * _linear(h, layer["up"]), layer["down"])
    logits = _linear(_rms_norm(x, params["norm"], spec.rms_norm_eps), params["lm_head"])
    return logits, jnp.stack(kv_layers)


def forward(
    spec: LlamaSpec, params: Params, token_ids: Any, prefix_kv: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Prefill ``token_ids`` after the prefix whose KV is ``prefix_kv``; return logits and the whole KV.

    Compiled once per (spec, token count, prefix length). JAX runs it asynchronously: if ``prefix_kv``
    reads pool memory (chunk views), wait on the outputs (``block_until_ready()``) before the chunks can
    be freed or evicted (release a lease only after that).

    Args:
        spec: the model's static spec (from :func:`params_from_torch`).
        params: the weights.
        token_ids: the tokens after the prefix, 1-D integers.
        prefix_kv: the prefix's KV, ``(num_layers, 2, P, num_kv_heads, head_dim)``; None for no prefix.

    Returns:
        ``(logits, kv)``: logits ``(len(token_ids), vocab)`` in the model's dtype and the KV of all
        ``P + len(token_ids)`` tokens, ``(num_layers, 2, P + T, num_kv_heads, head_dim)``.

    Raises:
        ConfigError: no tokens.
        ChunkShapeError: ``prefix_kv`` does not have the model's KV shape.
    """
    ids = jnp.asarray(token_ids, dtype=jnp.int32).reshape(-1)
    if ids.shape[0] == 0:
        raise ConfigError("forward needs at least one token after the prefix")
    dtype = params["embed"].dtype
    expected = (spec.num_layers, 2, spec.num_kv_heads, spec.head_dim)
    if prefix_kv is None:
        prefix_kv = jnp.zeros((spec.num_layers, 2, 0, spec.num_kv_heads, spec.head_dim), dtype)
    elif prefix_kv.ndim != 5 or (*prefix_kv.shape[:2], *prefix_kv.shape[3:]) != expected:
        raise ChunkShapeError(
            f"prefix_kv must be (num_layers, 2, tokens, kv_heads, head_dim) = "
            f"({expected[0]}, 2, P, {expected[2]}, {expected[3]}), got {tuple(prefix_kv.shape)}"
        )
    elif prefix_kv.dtype != dtype:
        raise ChunkShapeError(f"prefix_kv must be {dtype} like the weights, got {prefix_kv.dtype}")
    logits, kv = _forward(spec, params, ids, prefix_kv)
    return logits, kv


def prefill_with_cache(
    spec: LlamaSpec, params: Params, chunk_cache: ChunkCache, token_ids: Any, *, store: bool = True
) -> tuple[jax.Array, jax.Array, int]:
    """Serve a prompt's prefill: read its longest cached prefix in place, compute the rest, store the KV.

    The prefix is read through zero-copy JAX views of the pool's slots (a lease, ``as_jax()``), from a
    pool of any backend on the CPU; the lease is released only after the computation that reads them has
    finished. At most ``len(token_ids) - 1`` tokens are reused: the last token is always computed.

    Args:
        spec, params: the model (from :func:`params_from_torch`).
        chunk_cache: the chunk cache to read from and store into; its pool holds chunks of
            ``(num_layers, 2, chunk_size, num_kv_heads, head_dim)`` in the weights' dtype.
        token_ids: the whole prompt, 1-D.
        store: store the prompt's KV afterwards (chunks already cached are not copied again).

    Returns:
        ``(logits, kv, reused)``: logits of the tokens after the reused prefix, the KV of the whole prompt
        ``(num_layers, 2, len(token_ids), num_kv_heads, head_dim)``, and the tokens reused.

    Raises:
        ConfigError: an empty prompt, or a pool whose chunks are not this model's KV shape or dtype.
    """
    tokens = [int(t) for t in token_ids]
    if not tokens:
        raise ConfigError("prefill_with_cache needs a prompt of at least one token")
    layout = chunk_cache.pool.layout
    expected = (spec.num_layers, 2, layout.chunk_size, spec.num_kv_heads, spec.head_dim)
    dtype = str(params["embed"].dtype)
    if tuple(layout.kv_shape) != expected or layout.dtype.name != dtype:
        raise ConfigError(
            f"the pool holds {tuple(layout.kv_shape)} chunks of {layout.dtype.name} but the model's KV is "
            f"{expected} of {dtype}: build the pool for this model's KV shape and dtype"
        )
    with chunk_cache.lease(tokens) as lease:
        reused = min(lease.num_tokens, len(tokens) - 1)
        prefix = None
        if reused:
            views = [chunk.as_jax() for chunk in lease.chunks]
            prefix = jnp.concatenate(views, axis=2)[:, :, :reused]
        logits, kv = forward(spec, params, tokens[reused:], prefix)
        # JAX runs asynchronously: the views must stay pinned until every read of them is done.
        jax.block_until_ready((logits, kv))  # type: ignore[no-untyped-call]
    if store:
        chunk_cache.store(tokens, kv)
    return logits, kv, reused


__all__ = ["LlamaSpec", "Params", "forward", "params_from_torch", "prefill_with_cache"]
