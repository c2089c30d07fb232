"""The README's example runs, and the public API has every name and signature of the LMCache v0 API page."""

from __future__ import annotations

import inspect
import pathlib
import re

import pytest

from kvtest import require

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (object path, parameters the LMCache v0 API page lists, in order). From LMCache's mem_pool reference page.
SEED_API = [
    ("base_pool.BasePool.allocate", ["self", "kv_chunk"]),
    ("base_pool.BasePool.free", ["self", "kv_obj"]),
    ("base_pool.KVObj", ["chunk_idx", "size", "data"]),
    ("local_pool.LocalPool", ["metadata"]),
    ("local_pool.LocalPool.allocate", ["self", "kv_chunk"]),
    ("local_pool.LocalPool.free", ["self", "kv_obj"]),
    ("local_pool.LocalPool.init_max_chunk_num", ["self", "metadata"]),
    ("local_pool.LocalCPUPool", ["metadata"]),
    ("local_pool.LocalGPUPool", ["metadata"]),
    ("local_pool.LocalCPUBufferPool", ["metadata"]),
    ("local_pool.LocalCPUBufferPool.allocate", ["self", "kv_chunk"]),
]


@pytest.mark.parametrize(("path", "params"), SEED_API, ids=[p for p, _ in SEED_API])
def test_lmcache_v0_names_and_signatures(path: str, params: list[str]) -> None:
    import importlib

    module_name, _, attr_path = path.partition(".")
    obj: object = importlib.import_module(f"lmcache.storage_backend.mem_pool.{module_name}")
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    signature = inspect.signature(obj)  # type: ignore[arg-type]
    names = list(signature.parameters)
    assert names[: len(params)] == params
    extra = [p for p in list(signature.parameters.values())[len(params) :]]
    variadic = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    assert all(p.default is not inspect.Parameter.empty or p.kind in variadic for p in extra), (
        "parameters beyond the LMCache v0 API's must be optional"
    )
    package = importlib.import_module("lmcache.storage_backend.mem_pool")
    assert getattr(package, attr_path.split(".")[0]) is getattr(
        importlib.import_module(f"lmcache.storage_backend.mem_pool.{module_name}"), attr_path.split(".")[0]
    )


def test_readme_example_runs() -> None:
    require("torch")
    require("jax")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert blocks, "README.md has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
