"""Helpers of tests/test_vllm_adapter.py that a spawned worker process imports too (so they live in a
module on the tests' path, not in the test module, which pytest imports under a package name).

Nothing here imports vllm or torch at module level: the test module imports this one before it knows
whether vllm is installed.
"""

from __future__ import annotations

from typing import Any


def kv_caches(pages: list[list[int]], num_blocks: int, seed: int) -> tuple[Any, list[Any]]:
    """vLLM's CanonicalKVCaches over random int8 CPU tensors: one tensor per page size, grouped as
    ``pages`` says (``pages[g]`` the page sizes of group g's tensors). Returns it and the tensors."""
    import torch
    from vllm.v1.kv_offload.base import CanonicalKVCacheRef, CanonicalKVCaches, CanonicalKVCacheTensor

    generator = torch.Generator().manual_seed(seed)
    tensors, refs = [], []
    for group in pages:
        group_refs = []
        for page in group:
            tensor = torch.randint(-128, 128, (num_blocks, page), dtype=torch.int8, generator=generator)
            group_refs.append(CanonicalKVCacheRef(tensor_idx=len(tensors), page_size_bytes=page))
            tensors.append(tensor)
        refs.append(group_refs)
    caches = CanonicalKVCaches(
        tensors=[CanonicalKVCacheTensor(tensor=t, page_size_bytes=t.shape[1]) for t in tensors],
        group_data_refs=refs,
    )
    return caches, tensors


def store_in_child(config: Any, store_spec: Any, src: list[int], pages: list[list[int]]) -> None:
    """A worker process of vLLM's multiprocess executor: build the worker from the spec, store, exit."""
    from vllm.v1.kv_offload.base import GPULoadStoreSpec
    from vllm.v1.kv_offload.factory import OffloadingSpecFactory

    caches, _ = kv_caches(pages, num_blocks=16, seed=7)
    worker = OffloadingSpecFactory.create_spec(config).get_worker(caches)
    worker.submit_store(1, GPULoadStoreSpec(src, (len(src),), (0,)), store_spec)
    worker.wait({1})
    if not worker.get_finished()[0].success:
        raise SystemExit(3)
    worker.shutdown()
