"""Slot geometry: where each chunk lives in the arena and the shape of its view.

The arena is one contiguous buffer whose base is aligned to :data:`BASE_ALIGNMENT` bytes and is cut into
equal slots. The slot stride is the bytes of a full chunk rounded up to ``slot_alignment`` (at least
256). A chunk of ``n`` tokens is the contiguous ``(L, 2, n, H, D)`` array at the start of its slot, not a
strided slice of a full chunk: JAX imports only compact DLPack tensors, and only aliases memory whose
address is a multiple of 64 bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmcache.config import LMCacheMemPoolMetadata
from lmcache.dtypes import DTypeSpec
from lmcache.errors import ChunkShapeError, ConfigError

#: Alignment of the arena's base address, in bytes (one page).
BASE_ALIGNMENT = 4096
#: The smallest slot alignment: enough for JAX (64), AVX-512 and GPU copy engines (256).
MIN_SLOT_ALIGNMENT = 256
#: The largest slot alignment: a 1 GiB huge page.
MAX_SLOT_ALIGNMENT = 2**30


@dataclass(frozen=True)
class SlotLayout:
    """Geometry of one slot; the same for every backend and device.

    Attributes:
        kv_shape: shape of a full chunk, ``(L, 2, chunk_size, H, D)``.
        dtype: element type.
        slot_alignment: slot stride multiple, in bytes.
        chunk_bytes: bytes of a full chunk.
        slot_bytes: distance between two slots (``chunk_bytes`` rounded up to ``slot_alignment``).
        token_elems: elements per token (``L * 2 * H * D``).
    """

    kv_shape: tuple[int, int, int, int, int]
    dtype: DTypeSpec
    slot_alignment: int = MIN_SLOT_ALIGNMENT

    def __post_init__(self) -> None:
        a = self.slot_alignment
        if (
            isinstance(a, bool)
            or not isinstance(a, int)
            or not MIN_SLOT_ALIGNMENT <= a <= MAX_SLOT_ALIGNMENT
            or a & (a - 1)
        ):
            raise ConfigError(
                f"slot_alignment must be a power of two from {MIN_SLOT_ALIGNMENT} to {MAX_SLOT_ALIGNMENT} "
                f"(1 GiB), got {a!r}"
            )

    @classmethod
    def from_metadata(
        cls, metadata: LMCacheMemPoolMetadata, slot_alignment: int = MIN_SLOT_ALIGNMENT
    ) -> SlotLayout:
        """Build the layout of a pool's metadata."""
        return cls(metadata.kv_shape, metadata.dtype, slot_alignment)

    @property
    def chunk_size(self) -> int:
        """Tokens in a full chunk."""
        return self.kv_shape[2]

    @property
    def token_elems(self) -> int:
        """Elements per token: ``L * 2 * H * D``."""
        L, kv, _, H, D = self.kv_shape
        return L * kv * H * D

    @property
    def chunk_elems(self) -> int:
        """Elements of a full chunk."""
        return math.prod(self.kv_shape)

    @property
    def chunk_bytes(self) -> int:
        """Bytes of a full chunk."""
        return self.chunk_elems * self.dtype.itemsize

    @property
    def slot_bytes(self) -> int:
        """Slot stride in bytes: a full chunk rounded up to the slot alignment."""
        a = self.slot_alignment
        return -(-self.chunk_bytes // a) * a

    @property
    def slot_elems(self) -> int:
        """Slot stride in elements (the second dim of the whole-arena array)."""
        return self.slot_bytes // self.dtype.itemsize

    def view_shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        """Shape of the view of a chunk of ``num_tokens`` tokens: ``(L, 2, n, H, D)``."""
        L, kv, _, H, D = self.kv_shape
        return (L, kv, num_tokens, H, D)

    def num_elems(self, num_tokens: int) -> int:
        """Elements of a chunk of ``num_tokens`` tokens (the prefix of its slot it occupies)."""
        return num_tokens * self.token_elems

    def slot_offset(self, slot: int) -> int:
        """Byte offset of ``slot`` from the arena's base."""
        return slot * self.slot_bytes

    def tokens_of(self, shape: tuple[int, ...]) -> int:
        """Check an array shape against the layout and return its token count.

        Raises:
            ChunkShapeError: wrong number of dims, a dim other than the token axis differs, or the
                token count is not in ``1..chunk_size``.
        """
        if len(shape) != 5:
            raise ChunkShapeError(
                f"a KV chunk must have 5 dims {self._shape_hint()}, got shape {tuple(shape)}"
            )
        L, kv, n, H, D = self.kv_shape
        for axis, want in ((0, L), (1, kv), (3, H), (4, D)):
            if shape[axis] != want:
                raise ChunkShapeError(
                    f"chunk shape {tuple(shape)} differs from the pool's {self.kv_shape} in dim {axis} "
                    f"({shape[axis]} != {want}); only dim 2 (tokens) may differ"
                )
        tokens = shape[2]
        if not 1 <= tokens <= n:
            raise ChunkShapeError(
                f"a chunk holds 1..{n} tokens (dim 2), got {tokens} in shape {tuple(shape)}; "
                f"split longer sequences into chunks of {n} tokens"
            )
        return int(tokens)

    def _shape_hint(self) -> str:
        L, kv, n, H, D = self.kv_shape
        return f"(num_layers={L}, {kv}, tokens<= {n}, num_kv_heads={H}, head_size={D})"


__all__ = ["BASE_ALIGNMENT", "MAX_SLOT_ALIGNMENT", "MIN_SLOT_ALIGNMENT", "SlotLayout"]
