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
from lmcache.bench.disk import bench_disk
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
SECTIONS = ("pool", "cache", "serving", "remote", "disk", "paged", "shared")


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
    steps.append(("disk", "disk tier", partial(bench_disk, backends, opts)))
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
    headline_steps = []
    for index, (_, label, step) in enumerate(steps, 1):
        say(f"[{index}/{len(steps)}] {label} ...")
        rows = step()
        load = _load()
        for row in rows:
            row.load = load
        results.extend(rows)
        if any(row.headline for row in rows):
            headline_steps.append((label, step))
        gc.collect()
    if opts.loaded:
        results.extend(_loaded_run(headline_steps, results, opts.load_procs, say))
    return results, failures


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # not every platform says
        return None


def _loaded_run(
    steps: Sequence[tuple[str, Callable[[], list[Result]]]],
    unloaded: Sequence[Result],
    procs: int,
    say: Callable[[str], None],
) -> list[Result]:
    """Run again every step that gave a headline row, with ``procs`` CPU-bound processes beside it; return
    one row per headline: the loaded figure against the unloaded one (target: at most 2x worse)."""
    from lmcache.bench.load import busy_processes

    wanted = {(r.metric, r.backend, r.note): r for r in unloaded if r.headline}  # note: e.g. threads
    loaded: list[Result] = []
    with busy_processes(procs):
        for index, (label, step) in enumerate(steps, 1):
            say(f"[loaded {index}/{len(steps)}] {label} with {procs} busy process(es) ...")
            rows = step()
            load = _load()
            for row in rows:
                before = wanted.get((row.metric, row.backend, row.note))
                if before is None:
                    continue
                kept = before.value / row.value if row.lower_is_better else row.value / before.value
                loaded.append(
                    Result(
                        f"{row.metric}, loaded",
                        row.backend,
                        row.value,
                        row.unit,
                        before.value,
                        "the same, unloaded",
                        kept,
                        0.5,
                        f"{procs} CPU-bound process(es) beside it",
                        headline=True,
                        load=load,
                    )
                )
            gc.collect()
    return loaded


def format_table(results: Sequence[Result]) -> str:
    """Render results as a Markdown table."""
    rows = ["| metric | backend | value | baseline | ratio | target | met |", "|---|---|---|---|---|---|---|"]
    for r in results:
        baseline = f"{r.baseline:,.4g} ({r.baseline_name})" if r.baseline is not None else ""
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
        target = f">= {r.target:.2f}x" if r.target is not None else ""
        met = {None: "", True: "yes", False: "**no**"}[r.meets_target]
        if r.meets_target is False and load_note(r):
            met += f" ({load_note(r)})"
        value = f"{r.value:,.4g} {r.unit}"
        if r.note:
            value += f"; {r.note}"
        rows.append(f"| {r.metric} | {r.backend} | {value} | {baseline} | {ratio} | {target} | {met} |")
    return "\n".join(rows)


def load_note(row: Result) -> str:
    """Whether the machine was busy when ``row`` was measured: its load average against the CPU count."""
    if row.load is None:
        return ""
    cpus = os.cpu_count() or 1
    state = "loaded" if row.load >= 0.75 * cpus else "not loaded"
    return f"machine {state} (load {row.load:.2f} on {cpus} CPUs)"


def summary(results: Sequence[Result]) -> str:
    """The headline rows as a short Markdown table: each a ratio against its baseline, with its target;
    a missed target says how loaded the machine was when the row ran."""
    rows = ["| headline | backend | ratio | against | target | met |", "|---|---|---|---|---|---|"]
    for r in results:
        if not r.headline:
            continue
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else f"{r.value:,.4g} {r.unit}"
        target = f">= {r.target:.2f}x" if r.target is not None else ""
        met = {None: "", True: "yes", False: "**no**"}[r.meets_target]
        if r.meets_target is False and load_note(r):
            met += f" ({load_note(r)})"
        rows.append(f"| {r.metric} | {r.backend} | {ratio} | {r.baseline_name} | {target} | {met} |")
    return "\n".join(rows)


def plot(results: Sequence[Result], path: str) -> bool:
    """Draw the headline ratios (bars) and their targets (ticks) into a PNG at ``path``.

    Returns False (nothing written) where matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in results if r.headline and r.ratio is not None]
    labels = [f"{r.metric} [{r.backend}]" for r in rows]
    figure, axes = plt.subplots(figsize=(10, 0.42 * len(rows) + 1.2))
    colors = ["tab:green" if r.meets_target is not False else "tab:red" for r in rows]
    positions = list(range(len(rows)))
    axes.barh(positions, [r.ratio or 0.0 for r in rows], color=colors)
    for position, r in zip(positions, rows, strict=True):
        if r.target is not None:
            axes.plot([r.target, r.target], [position - 0.4, position + 0.4], color="black", linewidth=2)
    axes.set_yticks(positions, labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("ratio to the baseline measured in the same run (higher is better; black: target)")
    axes.set_title("lmcache-mempool bench: headline ratios")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_report(results: Sequence[Result], failures: Sequence[str], directory: str) -> dict[str, str]:
    """Write the full table (Markdown), the JSON and the plot (PNG, with matplotlib) of a run into
    ``directory``; return the paths written, by kind."""
    import time

    os.makedirs(directory, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join(directory, f"bench-{stamp}")
    paths = {"table": base + ".md", "json": base + ".json"}
    lines = [f"- {key}: {value}" for key, value in environment().items()]
    with open(paths["table"], "w", encoding="utf-8") as table:
        table.write("\n".join([*lines, "", format_table(results), ""]))
    with open(paths["json"], "w", encoding="utf-8") as data:
        data.write(to_json(results, failures))
    if plot(results, base + ".png"):
        paths["plot"] = base + ".png"
    return paths


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


__all__ = [
    "SECTIONS",
    "environment",
    "format_table",
    "load_note",
    "plot",
    "run",
    "self_check",
    "summary",
    "to_json",
    "write_report",
]
