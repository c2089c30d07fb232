"""The driver of ``python -m lmcache bench``: the self-check, the sections in order, and the report.

Every figure is measured in the same run as its baseline and reported as a ratio, so it can be compared
across machines. Timings are the best of ``repeat`` interleaved trials (the least disturbed by other
load on the machine). Frameworks are imported only for the backends that are benchmarked.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import json
import os
import platform
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np

from lmcache.bench import common
from lmcache.bench.cache import bench_chunk_cache
from lmcache.bench.common import Options, Result
from lmcache.bench.paged import bench_paged
from lmcache.bench.pool import (
    bench_alloc_free,
    bench_backend_parity,
    bench_batch,
    bench_construction,
    bench_copy,
    bench_scaling,
    bench_views,
)
from lmcache.bench.remote import bench_remote
from lmcache.bench.serving import bench_serving
from lmcache.bench.shared import bench_shared
from lmcache.dtypes import normalize_dtype
from lmcache.errors import ConfigError
from lmcache.registry import installed_backends

#: The sections of the benchmark, in the order they run (``--section`` picks some).
SECTIONS = ("pool", "cache", "serving", "remote", "paged", "shared")


# -- self-check --------------------------------------------------------------------------------------
def self_check(backends: Sequence[str]) -> list[str]:
    """Run the pool's contract on each backend; return the failures (empty when all holds)."""
    from lmcache.errors import DoubleFreeError

    failures = []
    for backend in backends:
        try:
            pool = common.pool(backend, (2, 2, 16, 2, 8), "bfloat16", 8 * 2048 / 2**30)
            full = common.filled(backend, (2, 2, 16, 2, 8), "bfloat16")
            objs = [pool.put(full) for _ in range(8)]
            if any(o is None for o in objs) or len({o.chunk_idx for o in objs}) != 8:  # type: ignore[union-attr]
                failures.append(f"{backend}: 8 slots were not handed out distinctly")
            if pool.allocate(full) is not None:
                failures.append(f"{backend}: a full pool did not return None")
            pool.free(objs[0])  # type: ignore[arg-type]
            try:
                pool.free(objs[0])  # type: ignore[arg-type]
                failures.append(f"{backend}: a double free was accepted")
            except DoubleFreeError:
                pass
            part = pool.put(common.filled(backend, (2, 2, 5, 2, 8), "bfloat16"))
            if part is None:
                failures.append(f"{backend}: no slot after a free")
                continue
            address = pool.slot_address(part.chunk_idx)
            for target in backends:
                view = getattr(part, f"as_{target}")()
                pointer = (
                    view.ctypes.data
                    if isinstance(view, np.ndarray)
                    else view.data_ptr()
                    if hasattr(view, "data_ptr")
                    else view.unsafe_buffer_pointer()
                )
                if pointer != address:
                    failures.append(f"{backend} -> {target}: the view is not zero-copy")
            if part.clone("numpy").tobytes() != part.as_numpy().tobytes():
                failures.append(f"{backend}: clone differs from the view")
        except Exception as exc:  # noqa: BLE001 - a self-check reports every failure, then exits non-zero
            failures.append(f"{backend}: {type(exc).__name__}: {exc}")
    return failures


# -- driver ------------------------------------------------------------------------------------------
def environment() -> dict[str, Any]:
    """Versions, machine and accelerators, as ``python -m lmcache info`` prints them."""
    from lmcache import __version__
    from lmcache.registry import load_adapter

    info: dict[str, Any] = {
        "lmcache-mempool": __version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "numpy": np.__version__,
    }
    for backend in installed_backends():
        if backend == "numpy":
            continue
        module = importlib.import_module(backend)
        info[backend] = getattr(module, "__version__", "?")
        try:
            info[f"{backend} accelerators"] = load_adapter(backend).accelerators() or "none"
        except Exception as exc:  # noqa: BLE001 - info reports a broken install instead of failing
            info[f"{backend} accelerators"] = f"error: {exc}"
    return info


def run(opts: Options) -> tuple[list[Result], list[str]]:
    """Run the self-check and every benchmark; return the results and the self-check failures."""
    backends = list(opts.backends) or installed_backends()
    normalize_dtype(opts.dtype)
    steps: list[tuple[str, str, Callable[[], list[Result]]]] = []  # (section, label, step)
    for backend in backends:
        steps.append(("pool", f"{backend}: allocate/free", partial(bench_alloc_free, backend, opts)))
    steps.append(("pool", "backend parity and first view", partial(bench_backend_parity, backends, opts)))
    for backend in backends:
        steps.append(("pool", f"{backend}: batches", partial(bench_batch, backend, opts)))
        steps.append(("pool", f"{backend}: copy bandwidth", partial(bench_copy, backend, opts)))
    steps.append(("pool", "pool-size scaling", partial(bench_scaling, opts)))
    for backend in backends:
        steps.append(("pool", f"{backend}: construction", partial(bench_construction, backend, opts)))
    steps.append(("pool", "cross-framework views", partial(bench_views, backends, opts)))
    steps.append(("cache", "chunk cache", partial(bench_chunk_cache, backends, opts)))
    steps.append(("serving", "serving scenario", partial(bench_serving, backends, opts)))
    steps.append(("remote", "remote tier (loopback redis)", partial(bench_remote, opts)))
    steps.append(("paged", "paged transfer", partial(bench_paged, backends, opts)))
    steps.append(("shared", "shared cache (lmcache serve)", partial(bench_shared, backends, opts)))
    unknown = set(opts.sections) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"unknown bench sections {sorted(unknown)}; use some of {', '.join(SECTIONS)}")
    steps = [step for step in steps if not opts.sections or step[0] in opts.sections]

    def say(text: str) -> None:
        if opts.progress is not None:
            print(text, file=opts.progress, flush=True)

    say(f"self-check on {', '.join(backends)} ...")
    failures = self_check(backends)
    say("self-check: " + ("PASS" if not failures else f"FAIL ({len(failures)})"))
    results: list[Result] = []
    for index, (_, label, step) in enumerate(steps, 1):
        say(f"[{index}/{len(steps)}] {label} ...")
        results.extend(step())
        gc.collect()
    return results, failures


def format_table(results: Sequence[Result]) -> str:
    """Render results as a Markdown table."""
    rows = ["| metric | backend | value | baseline | ratio | target | met |", "|---|---|---|---|---|---|---|"]
    for r in results:
        baseline = f"{r.baseline:,.4g} ({r.baseline_name})" if r.baseline is not None else ""
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
        target = f">= {r.target:.2f}x" if r.target is not None else ""
        met = {None: "", True: "yes", False: "**no**"}[r.meets_target]
        value = f"{r.value:,.4g} {r.unit}"
        if r.note:
            value += f"; {r.note}"
        rows.append(f"| {r.metric} | {r.backend} | {value} | {baseline} | {ratio} | {target} | {met} |")
    return "\n".join(rows)


def to_json(results: Sequence[Result], failures: Sequence[str]) -> str:
    """Render results, self-check and environment as JSON."""
    return json.dumps(
        {
            "environment": environment(),
            "self_check": {"passed": not failures, "failures": list(failures)},
            "results": [dataclasses.asdict(r) | {"meets_target": r.meets_target} for r in results],
        },
        indent=2,
    )


__all__ = ["SECTIONS", "environment", "format_table", "run", "self_check", "to_json"]
