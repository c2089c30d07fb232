"""GPU benchmark: host<->device copies through the pool (and from a shared cache's pinned mapping)
against torch's own pinned copy, and pinning time.

Writes a Markdown table to stdout and JSON to ``--out``. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any


def _median_time(fn: Any, torch: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


@contextlib.contextmanager
def shared_lease(shape: tuple[int, ...], chunk: Any) -> Iterator[Any]:
    """A chunk stored in a shared cache (an in-process server) and leased by a torch client, whose
    mapping is pinned: yields the leased chunk's tensor view."""
    from lmcache.config import LMCacheMemPoolMetadata
    from lmcache.shared import CacheServer, connect

    tokens = list(range(shape[2]))
    with tempfile.TemporaryDirectory(prefix="lmc-") as directory:
        path = os.path.join(directory, "bench.sock")
        meta = LMCacheMemPoolMetadata(shape, "bfloat16", 0.25)
        with CacheServer(path, meta), connect(path, backend="torch") as client:
            if not client.pinned or client.store(tokens, chunk) != len(tokens):
                raise RuntimeError(f"the shared cache did not pin or store: {client.stats()}")
            with client.lease(tokens) as lease:
                yield lease.chunks[0].as_torch()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="gpu-bench.json")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--pin-gib", type=float, default=16.0)
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("torch is not installed: GPU benchmark skipped")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: GPU benchmark skipped")
        return 0
    from lmcache.config import LMCacheMemPoolMetadata
    from lmcache.storage_backend.mem_pool import LocalCPUPool

    shape = (32, 2, 256, 8, 128)  # 32 MiB bf16
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    pool = LocalCPUPool(LMCacheMemPoolMetadata(shape, torch.bfloat16, 1))
    obj = pool.allocate(torch.empty(shape, dtype=torch.bfloat16, device="meta"))
    gpu = torch.randn(shape, device="cuda").to(torch.bfloat16)
    gpu_out = torch.empty_like(gpu)
    ref_pinned = torch.empty(shape, dtype=torch.bfloat16, pin_memory=True)
    nbytes = gpu.numel() * gpu.element_size()
    obj.copy_from(gpu)
    ref_pinned.copy_(gpu)
    cases = {
        "D2H pool copy_from": lambda: obj.copy_from(gpu),
        "D2H torch pinned copy_": lambda: ref_pinned.copy_(gpu),
        "H2D pool copy_to": lambda: obj.copy_to(gpu_out),
        "H2D torch pinned copy_": lambda: gpu_out.copy_(ref_pinned),
        "H2D pool view .to(cuda, non_blocking)": lambda: obj.data.to("cuda", non_blocking=True),
    }
    shared = "H2D shared-cache lease view .to(cuda, non_blocking)"
    with shared_lease(shape, gpu) as leased:
        cases[shared] = lambda: leased.to("cuda", non_blocking=True)
        gbps = {name: nbytes / _median_time(fn, torch, args.repeat) / 1e9 for name, fn in cases.items()}
    results["bandwidth_GBps"] = gbps
    results["ratio_D2H"] = gbps["D2H pool copy_from"] / gbps["D2H torch pinned copy_"]
    results["ratio_H2D"] = gbps["H2D pool copy_to"] / gbps["H2D torch pinned copy_"]
    results["ratio_H2D_view"] = gbps["H2D pool view .to(cuda, non_blocking)"] / gbps["H2D torch pinned copy_"]
    results["ratio_H2D_shared"] = gbps[shared] / gbps["H2D torch pinned copy_"]
    pool.close()

    start = time.perf_counter()
    big = LocalCPUPool(LMCacheMemPoolMetadata(shape, torch.bfloat16, args.pin_gib))
    results["pin_seconds"] = time.perf_counter() - start
    results["pin_gib"] = big.max_chunk_num * big.size_per_chunk / 2**30
    results["pinned"] = big.pinned
    big.close()

    print(f"device: {results['device']}, torch {results['torch']}")
    print("| copy (32 MiB bf16 chunk) | GB/s |")
    print("|---|---|")
    for name, value in gbps.items():
        print(f"| {name} | {value:.1f} |")
    print(
        f"ratio pool/torch: D2H {results['ratio_D2H']:.2f}x, H2D {results['ratio_H2D']:.2f}x, "
        f"H2D via view {results['ratio_H2D_view']:.2f}x, H2D of a shared-cache lease "
        f"{results['ratio_H2D_shared']:.2f}x (target >= 0.9x)"
    )
    print(f"pinning a {results['pin_gib']:.1f} GiB pool at exact size took {results['pin_seconds']:.2f} s")
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
