"""torch specifics: ordinary (not inference-mode) tensors, pinning rules, arena shape."""

from __future__ import annotations

import pytest

from kvtest import pointer, random_bits, require, require_no_gpu, same_bits, small_pool, to_native


@pytest.fixture
def torch():  # type: ignore[no-untyped-def]
    return require("torch")


def test_views_are_ordinary_tensors(torch) -> None:  # type: ignore[no-untyped-def]
    pool = small_pool("torch", dtype="bfloat16")
    src = to_native(random_bits((2, 2, 16, 2, 8), "bfloat16"), "torch")
    obj = pool.allocate(src)
    assert obj is not None
    assert not obj.data.is_inference()
    assert not obj.data.requires_grad
    obj.data.copy_(src)
    with torch.inference_mode():
        obj.data.copy_(src * 2)
    with torch.no_grad():
        obj.data.add_(1)
    assert same_bits(obj.data, (src * 2) + 1)


def test_arena_is_one_tensor(torch) -> None:  # type: ignore[no-untyped-def]
    pool = small_pool("torch", dtype="float16", slots=3)
    arena = pool.arena
    assert tuple(arena.shape) == (3, pool.layout.slot_elems)
    assert arena.dtype == torch.float16
    assert pointer(arena) == pool.base_address
    obj = pool.put(to_native(random_bits((2, 2, 16, 2, 8), "float16"), "torch"))
    assert obj is not None
    row = arena[obj.chunk_idx, : pool.layout.chunk_elems].view(pool.layout.kv_shape)
    assert torch.equal(row, obj.data)


def test_pinning_needs_cuda() -> None:
    from lmcache.errors import DeviceUnavailableError

    require_no_gpu("torch")
    assert not small_pool("torch").pinned  # default: no accelerator, no pinning
    with pytest.raises(DeviceUnavailableError, match="pin_memory=True needs a CUDA device"):
        small_pool("torch", pin_memory=True)
