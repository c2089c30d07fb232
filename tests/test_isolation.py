"""The core imports no framework, and each nox session has exactly the frameworks it claims."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest

from kvtest import ABSENT_FRAMEWORKS


def test_core_imports_neither_torch_nor_jax() -> None:
    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        import lmcache, lmcache.config, lmcache.allocator, lmcache.arena, lmcache.dlpack, lmcache.registry
        from lmcache.config import LMCacheMemPoolMetadata
        from lmcache.storage_backend.mem_pool import LocalCPUPool, LocalCPUBufferPool
        meta = LMCacheMemPoolMetadata((2, 2, 16, 2, 8), "bfloat16", 0.001)
        with LocalCPUPool(meta, backend="numpy") as pool:
            chunk = np.zeros((2, 2, 5, 2, 8), dtype=meta.dtype.numpy_dtype)
            obj = pool.put(chunk)
            obj.as_numpy()
            obj.__dlpack__()
            pool.free(obj)
        bad = [m for m in ("torch", "jax", "jaxlib") if m in sys.modules]
        print("imported:", bad)
        sys.exit(1 if bad else 0)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_session_lacks_the_frameworks_it_excludes() -> None:
    """In the core session neither framework is installed; in the torch session no JAX, and so on."""
    present = [name for name in sorted(ABSENT_FRAMEWORKS) if importlib.util.find_spec(name) is not None]
    assert not present, f"{present} must not be installed in this nox session"


def test_missing_framework_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmcache.errors import BackendUnavailableError
    from lmcache.registry import ADAPTER_MODULES, load_adapter

    monkeypatch.setitem(ADAPTER_MODULES, "torch", "lmcache_no_such_adapter_module")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(BackendUnavailableError, match=r"pip install 'lmcache-mempool\[torch\]'"):
        load_adapter("torch")
