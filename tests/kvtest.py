"""Test helpers: the backend matrix, chunk makers and pointer helpers (imported as ``kvtest``).

There is one way to skip: :func:`require`. In a nox session that names a framework in
``LMCACHE_REQUIRE_BACKENDS``, a missing framework fails the test instead of skipping it.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from lmcache.config import LMCacheMemPoolMetadata
from lmcache.dtypes import KV_DTYPES
from lmcache.storage_backend.mem_pool import KVObj, LocalCPUPool

BACKENDS = ("numpy", "torch", "jax")
REQUIRED = {name for name in os.environ.get("LMCACHE_REQUIRE_BACKENDS", "").split(",") if name}
ABSENT_FRAMEWORKS = {name for name in os.environ.get("LMCACHE_ABSENT_FRAMEWORKS", "").split(",") if name}
SMALL_SHAPE = (2, 2, 16, 2, 8)  # (L, 2, chunk_size, H, D): 1 KiB per token-row set, fast to copy


def require(framework: str) -> Any:
    """Import ``framework``; skip if it is not installed, fail if this session requires it.

    With :func:`require_gpu`, :func:`require_no_gpu` and :func:`require_mounts`, the suite's only ways
    to skip.
    """
    if framework == "numpy":
        return np
    if importlib.util.find_spec(framework) is None:
        if framework in REQUIRED:
            pytest.fail(f"{framework} is required in this session (LMCACHE_REQUIRE_BACKENDS) but missing")
        pytest.skip(f"{framework} is not installed")
    return importlib.import_module(framework)


def random_bits(shape: tuple[int, ...], dtype_name: str, seed: int = 0) -> np.ndarray:
    """Random values of ``dtype_name`` as a numpy array (ml_dtypes for bf16 / fp8), NaN-free."""
    spec = KV_DTYPES[dtype_name]
    rng = np.random.default_rng(seed)
    if spec.name in ("int8", "uint8"):
        return rng.integers(0, 100, size=shape).astype(spec.numpy_dtype)
    return rng.uniform(-4, 4, size=shape).astype(np.float32).astype(spec.numpy_dtype)


def to_native(array: np.ndarray, framework: str) -> Any:
    """Copy a numpy array into ``framework`` (torch via its bits, so bf16 / fp8 work)."""
    if framework == "numpy":
        return array.copy()
    if framework == "torch":
        torch = require("torch")
        bits = np.ascontiguousarray(array).view(f"u{array.dtype.itemsize}")
        return torch.from_numpy(bits.copy()).view(getattr(torch, array.dtype.name))
    jnp = require("jax").numpy
    return jnp.asarray(array)


def to_host(array: Any) -> np.ndarray:
    """Copy any framework's array to numpy (bf16 / fp8 as ml_dtypes), for bit-exact comparison."""
    module = type(array).__module__.partition(".")[0]
    if module == "torch":
        torch = require("torch")
        t = array.detach().cpu().contiguous()
        spec = KV_DTYPES[str(t.dtype).removeprefix("torch.")]
        unsigned = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[spec.itemsize]
        return t.view(unsigned).numpy().view(spec.numpy_dtype)
    return np.asarray(array)


def same_bits(a: Any, b: Any) -> bool:
    """Whether two arrays hold the same bytes (shape and dtype included)."""
    x, y = to_host(a), to_host(b)
    return x.shape == y.shape and x.dtype == y.dtype and x.tobytes() == y.tobytes()


def pointer(array: Any) -> int:
    """The address of an array's first element, in any framework."""
    if isinstance(array, np.ndarray):
        return int(array.ctypes.data)
    if hasattr(array, "data_ptr"):
        return int(array.data_ptr())
    return int(array.unsafe_buffer_pointer())


def kv_dtype_for(backend: str, name: str) -> Any:
    """The dtype as the backend's users would spell it (torch.bfloat16, jnp.bfloat16, "bfloat16")."""
    if backend == "torch":
        return getattr(require("torch"), name)
    if backend == "jax":
        return getattr(require("jax").numpy, name)
    return name


def small_pool(backend: str, dtype: str = "float16", slots: int = 8, **kwargs: Any) -> LocalCPUPool:
    """A CPU pool of ``slots`` slots of ``SMALL_SHAPE``."""
    from lmcache.layout import SlotLayout

    meta = LMCacheMemPoolMetadata(SMALL_SHAPE, dtype, 1.0)
    slot_bytes = SlotLayout.from_metadata(meta).slot_bytes
    meta = LMCacheMemPoolMetadata(SMALL_SHAPE, dtype, slots * slot_bytes / 2**30)
    return LocalCPUPool(meta, backend=backend, **kwargs)


def forge(pool: Any, slot: Any, num_tokens: int, generation: int) -> KVObj:
    """A pool-bound handle naming any slot and generation: what only code reaching private names can
    build (the public constructor binds no pool). The pool must refuse it unless it is a live handle's."""
    return KVObj._issue(pool, slot, num_tokens, generation)


def live_kvobjs() -> int:
    """How many KVObj instances exist now (to check that a path builds none)."""
    gc.collect()
    return sum(type(obj) is KVObj for obj in gc.get_objects())


def _sees_gpu(framework: str) -> bool:
    from lmcache.registry import load_adapter

    return framework != "numpy" and bool(load_adapter(framework).accelerators())


def require_no_gpu(framework: str) -> Any:
    """Import ``framework`` and skip if it sees a GPU (tests of the no-accelerator behaviour)."""
    module = require(framework)
    if _sees_gpu(framework):
        pytest.skip(f"{framework} sees a GPU; tests/gpu covers this case")
    return module


def require_gpu(framework: str) -> Any:
    """Import ``framework`` and skip unless it sees a GPU (the GPU tests' only skip)."""
    module = require(framework)
    if not _sees_gpu(framework):
        pytest.skip(f"{framework} sees no GPU")
    return module


def require_mounts() -> None:
    """Skip unless this process may mount filesystems (root with ``CAP_SYS_ADMIN``, a ``mount``
    binary): the tests of a real full disk and a real read-only mount. Fails instead where the session
    requires it (``mounts`` in ``LMCACHE_REQUIRE_BACKENDS``)."""
    import shutil
    import subprocess
    import tempfile

    probe = tempfile.mkdtemp(prefix="lmcache-mount-probe-")
    try:
        mounted = shutil.which("mount") is not None and (
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", probe], capture_output=True, check=False
            ).returncode
            == 0
        )
        if mounted:
            subprocess.run(["umount", probe], capture_output=True, check=True)
    finally:
        os.rmdir(probe)
    if not mounted:
        if "mounts" in REQUIRED:
            pytest.fail("mounting is required in this session (LMCACHE_REQUIRE_BACKENDS) but not permitted")
        pytest.skip("this process may not mount filesystems (needs root with CAP_SYS_ADMIN)")


def wait_until(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    """Poll ``condition`` every 20 ms for up to ``seconds``; return its last answer."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def run_state_machine(machine: Any, backend: str, max_examples: int) -> None:
    """Run a hypothesis state machine class whose ``backend`` attribute names the pool's backend.

    Skips (or fails, in the backend's own session) like :func:`require`; 30 steps per example.
    """
    from hypothesis import HealthCheck, settings

    require(backend)
    runner = type(f"{machine.__name__}_{backend}", (machine,), {"backend": backend}).TestCase
    runner.settings = settings(
        max_examples=max_examples,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    runner().runTest()
