"""Replaying request traces through the real chunk cache: token hit rate by eviction policy and capacity.

``python -m lmcache replay TRACE [--capacity N,...] [--policy NAME,...] [--json] [--plot FILE.png]``.

A trace is Mooncake's format (FAST'25 release; JSON lines, gzip accepted): each request has
``input_length`` and ``hash_ids``, one id per block of :data:`BLOCK_TOKENS` tokens, where an id names the
whole prefix up to its block. Replaying (DESIGN section 14):

* each hash id becomes a deterministic block of token ids (:func:`block_tokens`: the same id always gives
  the same tokens, different ids never do), so the cache's chained keys reproduce the trace's prefix tree;
  the last block is ``input_length - BLOCK_TOKENS * (len(hash_ids) - 1)`` tokens (partial blocks are
  cached, as the cache caches partial last chunks);
* each request is looked up (its hit tokens: the leading cached run), then stored (the request's own
  chunks are pinned while it is stored), in file order, through a :class:`~lmcache.chunk_cache.ChunkCache`
  over a numpy pool of exactly ``capacity`` one-byte-per-token chunks;
* token hit rate = hit tokens / input tokens; block hit rate = hit chunks / chunks.

Replays of several policies and capacities run in parallel processes (one per CPU).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import IO

import numpy as np

from lmcache.errors import ConfigError

#: Tokens per block of a Mooncake trace (and per chunk of the replaying cache).
BLOCK_TOKENS = 512


@dataclass(frozen=True)
class Request:
    """One request of a trace: its input length and the hash id of each block."""

    input_length: int
    hash_ids: tuple[int, ...]


@dataclass(frozen=True)
class ReplayResult:
    """The outcome of replaying one trace through one policy at one capacity."""

    policy: str
    capacity: int
    token_hit_rate: float
    block_hit_rate: float
    requests: int
    hit_tokens: int
    input_tokens: int
    seconds: float


def read_trace(path: str) -> list[Request]:
    """Read a Mooncake trace (JSON lines; ``.gz`` files are decompressed).

    Raises:
        ConfigError: the file cannot be read, or a line is not a request (the message gives the line).
    """
    opener: Callable[..., IO[str]] = gzip.open if path.endswith(".gz") else open  # type: ignore[assignment]
    requests = []
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    requests.append(_request(line, path, number))
    except OSError as exc:
        raise ConfigError(f"cannot read trace {path!r}: {exc}") from None
    if not requests:
        raise ConfigError(f"trace {path!r} has no requests")
    return requests


def _request(line: str, path: str, number: int) -> Request:
    where = f"{path}, line {number}"
    try:
        record = json.loads(line)
        length, ids = record["input_length"], record["hash_ids"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{where}: not a request with input_length and hash_ids ({exc})") from None
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ConfigError(f"{where}: input_length must be a positive int, got {length!r}")
    if not isinstance(ids, list) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise ConfigError(f"{where}: hash_ids must be a list of non-negative ints")
    if len(ids) != -(-length // BLOCK_TOKENS):
        raise ConfigError(
            f"{where}: {length} input tokens need {-(-length // BLOCK_TOKENS)} hash ids of "
            f"{BLOCK_TOKENS}-token blocks, got {len(ids)}"
        )
    return Request(length, tuple(ids))


def block_tokens(hash_ids: Sequence[int], input_length: int) -> np.ndarray:
    """The token ids of a request: block ``h`` is ``h * BLOCK_TOKENS + (0 .. BLOCK_TOKENS - 1)``, so ids
    never collide between blocks; the last block is cut to the request's length."""
    ids = np.asarray(hash_ids, dtype=np.int64)
    grid = ids[:, None] * BLOCK_TOKENS + np.arange(BLOCK_TOKENS, dtype=np.int64)
    return grid.reshape(-1)[:input_length]


def replay(
    requests: Sequence[Request],
    capacity: int,
    policy: str = "default",
    *,
    progress: Callable[[int], None] | None = None,
) -> ReplayResult:
    """Replay ``requests`` through a ChunkCache of ``capacity`` chunks under ``policy``.

    ``progress(done)`` is called every 2000 requests.

    Raises:
        ConfigError: a capacity below 1 or an unknown policy.
    """
    from lmcache.chunk_cache import ChunkCache
    from lmcache.config import LMCacheMemPoolMetadata
    from lmcache.policies import DEFAULT_POLICY
    from lmcache.storage_backend.mem_pool import LocalCPUPool

    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ConfigError(f"capacity must be a positive number of chunks, got {capacity!r}")
    shape = (1, 1, BLOCK_TOKENS, 1, 1)  # one byte per token: the bytes do not matter, the slots do
    meta = LMCacheMemPoolMetadata(shape, "uint8", capacity * BLOCK_TOKENS / 2**30)
    pool = LocalCPUPool(meta, backend="numpy")
    if pool.max_chunk_num != capacity:
        raise ConfigError(f"a pool of {capacity} chunks came out with {pool.max_chunk_num} slots")
    cache = ChunkCache(pool, policy=policy)
    longest = max(request.input_length for request in requests)
    zeros = np.zeros((1, 1, longest, 1, 1), np.uint8)
    hit_tokens = input_tokens = hit_blocks = blocks = 0
    start = time.perf_counter()
    for done, request in enumerate(requests, 1):
        tokens = block_tokens(request.hash_ids, request.input_length)
        hit = cache.lookup(tokens)
        cache.store(tokens, zeros[:, :, : request.input_length])
        hit_tokens += hit
        input_tokens += request.input_length
        hit_blocks += -(-hit // BLOCK_TOKENS)
        blocks += len(request.hash_ids)
        if progress is not None and done % 2000 == 0:
            progress(done)
    seconds = time.perf_counter() - start
    pool.close()
    return ReplayResult(
        DEFAULT_POLICY if policy == "default" else policy,
        capacity,
        hit_tokens / input_tokens,
        hit_blocks / blocks,
        len(requests),
        hit_tokens,
        input_tokens,
        seconds,
    )


def _replay_job(path: str, capacity: int, policy: str) -> ReplayResult:
    requests = read_trace(path)

    def progress(done: int) -> None:
        print(f"  {policy} at {capacity:,} chunks: {done:,}/{len(requests):,} requests", file=sys.stderr)

    return replay(requests, capacity, policy, progress=progress)


def replay_grid(
    path: str,
    capacities: Sequence[int],
    policies: Sequence[str],
    *,
    workers: int | None = None,
    say: Callable[[str], None] | None = None,
) -> list[ReplayResult]:
    """Replay the trace at ``path`` for every policy and capacity, in parallel processes; results in
    (policy, capacity) order."""
    from lmcache.policies import POLICIES

    for policy in policies:
        if policy != "default" and policy not in POLICIES:
            raise ConfigError(
                f"unknown policy {policy!r}; use default or one of {', '.join(sorted(POLICIES))}"
            )
    jobs = [(policy, capacity) for policy in policies for capacity in capacities]
    count = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    results: dict[tuple[str, int], ReplayResult] = {}
    with concurrent.futures.ProcessPoolExecutor(count) as executor:
        futures = {
            executor.submit(_replay_job, path, capacity, policy): (policy, capacity)
            for policy, capacity in jobs
        }
        for future in concurrent.futures.as_completed(futures):
            result = future.result()
            results[futures[future]] = result
            if say is not None:
                policy, capacity = futures[future]
                say(
                    f"[{len(results)}/{len(jobs)}] {policy} at {capacity:,} chunks: token hit rate "
                    f"{result.token_hit_rate:.4f} ({result.seconds:.1f} s)"
                )
    return [results[job] for job in jobs]


def format_table(results: Iterable[ReplayResult]) -> str:
    """Token hit rate by policy (rows) and capacity (columns), as a Markdown table."""
    rows = list(results)
    capacities = sorted({r.capacity for r in rows})
    policies = list(dict.fromkeys(r.policy for r in rows))
    rate = {(r.policy, r.capacity): r.token_hit_rate for r in rows}
    lines = [
        "| policy | " + " | ".join(f"{c:,}" for c in capacities) + " |",
        "|---|" + "---|" * len(capacities),
    ]
    for policy in policies:
        cells = [f"{rate[policy, c]:.4f}" if (policy, c) in rate else "" for c in capacities]
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: Iterable[ReplayResult], path: str, title: str) -> None:
    """Draw token hit rate against capacity, one line per policy, into a PNG.

    Raises:
        ConfigError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'lmcache-mempool[plot]'") from None
    rows = list(results)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for policy in dict.fromkeys(r.policy for r in rows):
        mine = sorted((r for r in rows if r.policy == policy), key=lambda r: r.capacity)
        axes.plot([r.capacity for r in mine], [r.token_hit_rate for r in mine], marker="o", label=policy)
    axes.set_xscale("log")
    axes.set_xlabel(f"capacity (chunks of {BLOCK_TOKENS} tokens)")
    axes.set_ylabel("token hit rate")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m lmcache replay``."""
    parser.add_argument("trace", help="a Mooncake trace (JSON lines, .gz accepted)")
    parser.add_argument(
        "--capacity",
        default="1000,2000,5000,10000,20000,30000,50000",
        help="capacities in chunks of 512 tokens, comma-separated (default 1k..50k)",
    )
    parser.add_argument(
        "--policy", default="default,lru", help="policies, comma-separated: a policy name or 'default'"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list of results")
    parser.add_argument("--plot", metavar="FILE.png", help="draw hit rate against capacity into FILE.png")
    parser.add_argument("--workers", type=int, default=None, help="parallel processes (default: CPUs)")


def run(args: argparse.Namespace) -> int:
    """Run ``python -m lmcache replay`` with parsed ``args``; return the exit status.

    Raises:
        ConfigError: a bad trace, capacity or policy (the command line prints it and exits with 2).
    """
    try:
        capacities = [int(text.replace("_", "")) for text in args.capacity.split(",") if text.strip()]
    except ValueError:
        raise ConfigError(f"--capacity takes comma-separated ints, got {args.capacity!r}") from None
    policies = [text.strip() for text in args.policy.split(",") if text.strip()]
    requests = read_trace(args.trace)  # fail fast on a bad trace, before the workers start
    print(f"{args.trace}: {len(requests):,} requests", file=sys.stderr)
    results = replay_grid(
        args.trace, capacities, policies, workers=args.workers, say=lambda text: print(text, file=sys.stderr)
    )
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        print(format_table(results))
    if args.plot:
        plot(results, args.plot, os.path.basename(args.trace))
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


__all__ = [
    "BLOCK_TOKENS",
    "ReplayResult",
    "Request",
    "block_tokens",
    "format_table",
    "plot",
    "add_arguments",
    "read_trace",
    "replay",
    "replay_grid",
    "run",
]
