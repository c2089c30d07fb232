"""Helpers for the paged transfer tests: a paged cache in any framework and layout, mirrored in numpy.

The mirror is updated one token at a time (the naive reference the vectorized kernels are checked
against). Caches are filled with random bytes (NaNs with any payload included), so a kernel that routes
bytes through float arithmetic fails.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvtest import require
from lmcache.dtypes import KV_DTYPES
from lmcache.paged import describe, kernels

#: JAX kernels pad token counts to a multiple of this (as ChunkCache pads to its chunk size), so tests
#: of many lengths share compiled programs; torch ignores it.
JAX_BUCKET = 16

FRAMEWORK_LAYOUTS = [("torch", "vllm"), ("torch", "stacked"), ("jax", "stacked"), ("jax", "interleaved")]


class Paged:
    """A paged cache in one framework and layout, with its bytes mirrored in numpy for reference."""

    def __init__(
        self,
        framework: str,
        layout: str,
        geometry: tuple[int, int, int, int, int, int],
        dtype: str = "bfloat16",
        seed: int = 0,
    ) -> None:
        L, kv, B, S, H, D = geometry
        self.framework, self.layout, self.geometry = framework, layout, geometry
        self.spec_dtype = KV_DTYPES[dtype]
        rng = np.random.default_rng(seed)
        bits = self.spec_dtype.bits_dtype
        if layout == "vllm":
            shapes = [(kv, B, S, H, D)] * L
        elif layout == "interleaved":
            shapes = [(B, S, 2 * H, D)] * L
        else:
            shapes = [(L, kv, B, S, H, D)]
        # Random bytes: every bit pattern, NaNs with payloads included.
        self.ref = [
            rng.integers(0, 256, size=(*s, bits.itemsize), dtype=np.uint8).view(bits)[..., 0] for s in shapes
        ]
        native = [self._native(r) for r in self.ref]
        self.caches: Any = native[0] if layout == "stacked" else native

    def _native(self, bits: np.ndarray) -> Any:
        if self.framework == "torch":
            torch = require("torch")
            return torch.from_numpy(bits.copy()).view(getattr(torch, self.spec_dtype.name))
        return require("jax").numpy.asarray(bits.view(self.spec_dtype.numpy_dtype))

    def current(self) -> list[np.ndarray]:
        """The cache's bytes now, as unsigned ints, in the reference's structure."""
        layers = [self.caches] if self.layout == "stacked" else list(self.caches)
        return [host_bits(x) for x in layers]

    def ref_gather(self, table: np.ndarray, start: int, count: int) -> np.ndarray:
        """Tokens ``start..start+count-1`` as ``(L, K, n, H, D)`` bits, one token at a time."""
        S = self.geometry[3]
        H = self.geometry[4]
        tokens = []
        for t in range(start, start + count):
            block, offset = int(table[t // S]), t % S
            if self.layout == "stacked":
                tokens.append(self.ref[0][:, :, block, offset])
            elif self.layout == "vllm":
                tokens.append(np.stack([layer[:, block, offset] for layer in self.ref]))
            else:
                tokens.append(
                    np.stack(
                        [layer[block, offset].reshape(H, 2, -1).transpose(1, 0, 2) for layer in self.ref]
                    )
                )
        return np.stack(tokens, axis=2)

    def ref_scatter(self, table: np.ndarray, start: int, src: np.ndarray) -> None:
        """Write ``src`` (``(L, K, n, H, D)`` bits) into the reference, one token at a time."""
        S = self.geometry[3]
        for j in range(src.shape[2]):
            t = start + j
            block, offset = int(table[t // S]), t % S
            if self.layout == "stacked":
                self.ref[0][:, :, block, offset] = src[:, :, j]
            elif self.layout == "vllm":
                for layer, part in zip(self.ref, src, strict=True):
                    layer[:, block, offset] = part[:, j]
            else:
                for layer, part in zip(self.ref, src, strict=True):
                    layer[block, offset] = part[:, j].transpose(1, 0, 2).reshape(layer.shape[2], -1)

    # -- the kernels, as the chunk cache calls them ---------------------------------------------------
    def gather(self, table: np.ndarray, start: int, count: int, bucket: int = JAX_BUCKET) -> np.ndarray:
        spec = describe(self.caches, self.layout)
        module = kernels(self.framework)
        if self.framework == "torch":
            torch = require("torch")
            dst = torch.empty(spec.chunk_shape(count), dtype=getattr(torch, self.spec_dtype.name))
            module.gather_into(self.caches, spec, table, start, dst)
            return host_bits(dst)
        out = module.gather(self.caches, spec, table, start, count, bucket=bucket)
        if self.layout == "interleaved":  # one (K, m, H, D) array per layer
            assert isinstance(out, list)
            out = np.stack([host_bits(layer) for layer in out])
        assert out.shape[2] % bucket == 0
        assert out.shape[2] >= count
        return host_bits(out)[:, :, :count]

    def scatter(self, table: np.ndarray, start: int, src_bits: np.ndarray, bucket: int = JAX_BUCKET) -> None:
        spec = describe(self.caches, self.layout)
        module = kernels(self.framework)
        count = src_bits.shape[2]
        if self.framework == "torch":
            module.scatter_from(self.caches, spec, table, start, self._native(src_bits))
        else:
            pad = -count % bucket
            padded = np.concatenate([src_bits, np.zeros_like(src_bits[:, :, :pad])], axis=2)
            self.caches = module.scatter(self.caches, spec, table, start, self._native(padded), count)
        self.ref_scatter(table, start, src_bits)


def host_bits(array: Any) -> np.ndarray:
    """An array's bytes as unsigned ints of its element size (torch via a bit view, JAX via numpy)."""
    if type(array).__module__.startswith("torch"):
        torch = require("torch")
        unsigned = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[array.element_size()]
        bits = array.detach().cpu().contiguous().view(unsigned).numpy()
        return bits.view(f"u{array.element_size()}")
    host = np.asarray(array)
    return host.view(f"u{host.dtype.itemsize}")


def random_src(paged: Paged, count: int, seed: int) -> np.ndarray:
    L, kv, _, _, H, D = paged.geometry
    bits = paged.spec_dtype.bits_dtype
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(L, kv, count, H, D, bits.itemsize), dtype=np.uint8).view(bits)[..., 0]


def assert_same(paged: Paged) -> None:
    for got, want in zip(paged.current(), paged.ref, strict=True):
        assert got.shape == want.shape
        assert np.array_equal(got, want), "the paged cache differs from the reference"
