"""The pool's benchmark and self-check: ``python -m lmcache bench``.

The package holds one module per section (:mod:`~lmcache.bench.pool`, :mod:`~lmcache.bench.cache`,
:mod:`~lmcache.bench.serving`, :mod:`~lmcache.bench.remote`, :mod:`~lmcache.bench.disk`,
:mod:`~lmcache.bench.paged`, :mod:`~lmcache.bench.shared` with :mod:`~lmcache.bench.trace`), what they
share (:mod:`~lmcache.bench.common`: results, options, timing and pool helpers) and the driver
(:mod:`~lmcache.bench.report`: self-check, run, table and JSON). This module re-exports what the command
line and the tests use. The pool helper is ``lmcache.bench.common.pool``: ``lmcache.bench.pool`` is the
pool benchmarks' module.
"""

from __future__ import annotations

from lmcache.bench.common import DEFAULT_SHAPE, Options, Result
from lmcache.bench.pool import BATCH_SHAPE, NaivePool
from lmcache.bench.report import (
    SECTIONS,
    environment,
    format_table,
    run,
    self_check,
    summary,
    to_json,
    write_report,
)

__all__ = [
    "BATCH_SHAPE",
    "DEFAULT_SHAPE",
    "SECTIONS",
    "NaivePool",
    "Options",
    "Result",
    "environment",
    "format_table",
    "run",
    "self_check",
    "summary",
    "to_json",
    "write_report",
]
