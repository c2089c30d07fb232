"""The copy engine: split copies give numpy's bytes exactly, for any shape, strides, dtype and overlap."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache import copy_engine
from lmcache.copy_engine import CopyEngine
from lmcache.errors import ConfigError

SMALL = {"min_split_bytes": 64, "piece_bytes": 32}  # split even tiny arrays, so every path runs


@st.composite
def strided_pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """A destination and a source of one shape, each a (possibly strided, reversed) view of its own
    buffer, of the same dtype."""
    dtype = draw(st.sampled_from([np.uint8, np.float16, np.int32, np.float64]))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=4)))

    def view() -> np.ndarray:
        steps = [draw(st.sampled_from([1, 2, -1])) for _ in shape]
        grid = [n * abs(k) for n, k in zip(shape, steps, strict=True)]
        base = np.arange(int(np.prod(grid))).astype(dtype).reshape(grid)
        return base[tuple(slice(None, None, k) for k in steps)]

    return view(), view()


@settings(max_examples=300, deadline=None)
@given(pair=strided_pairs(), threads=st.integers(1, 4))
def test_split_copies_equal_numpys(pair: tuple[np.ndarray, np.ndarray], threads: int) -> None:
    dst, src = pair
    want = dst.copy()
    np.copyto(want, src)
    CopyEngine(threads, **SMALL).copy(dst, src)
    assert dst.tobytes() == want.tobytes()


@settings(max_examples=200, deadline=None)
@given(length=st.integers(2, 400), shift=st.integers(-50, 50), threads=st.integers(2, 4))
def test_overlapping_copies_are_exact(length: int, shift: int, threads: int) -> None:
    """A source that overlaps its destination (shifted in one buffer) is copied as numpy does."""
    buffer = np.arange(length + 100, dtype=np.int64)
    want = buffer.copy()
    start = 50 + shift
    np.copyto(want[50 : 50 + length], want[start : start + length].copy())
    CopyEngine(threads, **SMALL).copy(buffer[50 : 50 + length], buffer[start : start + length])
    assert np.array_equal(buffer, want)


def test_large_copies_are_exact_from_many_threads_at_once() -> None:
    engine = CopyEngine(3, min_split_bytes=1 << 16, piece_bytes=1 << 14)
    sources = [np.random.default_rng(i).integers(0, 255, 1 << 20, dtype=np.uint8) for i in range(6)]
    targets = [np.zeros_like(s) for s in sources]
    threads = [threading.Thread(target=engine.copy, args=pair) for pair in zip(targets, sources, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(np.array_equal(t, s) for t, s in zip(targets, sources, strict=True))


def test_a_failing_piece_raises_in_the_caller() -> None:
    engine = CopyEngine(2, **SMALL)
    with pytest.raises(TypeError):
        engine.copy(np.zeros(1000, np.float32), np.zeros(1000, np.float64))  # casting="no" refuses


@pytest.mark.parametrize("bad", [0, -1, 99, 2.5, True, "2"])
def test_thread_counts_out_of_range_are_refused(bad: object) -> None:
    before = copy_engine.threads()
    with pytest.raises(ConfigError):
        copy_engine.set_threads(bad)  # type: ignore[arg-type]
    assert copy_engine.threads() == before


def test_set_threads_applies_and_restores() -> None:
    before = copy_engine.threads()
    try:
        copy_engine.set_threads(1)
        assert copy_engine.threads() == 1
        data = np.arange(3 << 20, dtype=np.uint8)
        out = np.empty_like(data)
        copy_engine.copy(out, data)
        assert np.array_equal(out, data)
    finally:
        copy_engine.set_threads(before)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_copies_with_new_helpers() -> None:
    engine_data = np.random.default_rng(1).integers(0, 255, 16 << 20, dtype=np.uint8)
    copy_engine.copy(np.empty_like(engine_data), engine_data)  # the parent's helpers exist now
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            out = np.empty_like(engine_data)
            copy_engine.copy(out, engine_data)
            status = 0 if np.array_equal(out, engine_data) else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_run_runs_every_task_once_and_reraises_the_first_error(threads: int) -> None:
    """``run`` runs each task exactly once, on any thread; a task's error reaches the caller after every
    other task has run, so no task is left half-scheduled."""
    engine = CopyEngine(threads)
    seen: list[int] = []
    lock = threading.Lock()

    def task(i: int) -> None:
        with lock:
            seen.append(i)
        if i == 3:
            raise ValueError("task 3")

    with pytest.raises(ValueError, match="task 3"):
        engine.run([lambda i=i: task(i) for i in range(40)])
    assert sorted(seen) == list(range(40))
    seen.clear()
    engine.run([lambda i=i: task(i) for i in range(4, 9)])
    assert sorted(seen) == list(range(4, 9))
    engine.stop()
