"""Mooncake request traces (DESIGN section 14), replayed through any chunk cache's key-level API.

A trace line is ``{"timestamp", "input_length", "output_length", "hash_ids"}``, one hash id per
512-token block, an id naming its whole prefix. Each id is given a deterministic block of 512 token ids
(``id * 512 .. id * 512 + 511``: the same id always gives the same tokens, and two ids never share a
token), so the chunk keys of a 512-token-chunk cache reproduce the trace's prefix tree exactly; the
last block holds ``input_length - 512 * (len(hash_ids) - 1)`` tokens. A replay looks each request up,
then stores it while a lease holds its cached prefix, and counts the hit tokens (the leading cached
run). Token hit rate = hit tokens / input tokens.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lmcache.cache_keys import chunk_keys, root_key
from lmcache.errors import BenchmarkError

#: Tokens per block of the Mooncake traces.
BLOCK_TOKENS = 512
#: The trace the shared cache's hit-rate figure replays, and where the project keeps it.
DEFAULT_TRACE = "mooncake_conversation_trace.jsonl"


@dataclass(frozen=True)
class Request:
    """One request of a trace, as chunk keys of :data:`BLOCK_TOKENS` tokens (namespace ``""``)."""

    num_tokens: int
    keys: list[bytes]


class KeyCache(Protocol):
    """The calls a replay makes: a ``ChunkCache`` or a shared cache's client."""

    def lookup_keys(self, keys: Sequence[bytes], num_tokens: int) -> int: ...

    def lease_keys(self, keys: Sequence[bytes], num_tokens: int) -> Any: ...

    def begin_store(self, keys: Sequence[bytes], num_tokens: int) -> Any: ...


def find_trace(path: str | None) -> Path | None:
    """The trace at ``path``, or (None) the project's copy: ``$LMCACHE_TRACES`` or ``../shared/traces``
    beside the source tree; None when there is none."""
    if path is not None:
        return Path(path)
    here = Path(__file__).resolve().parents[2]
    for directory in (os.environ.get("LMCACHE_TRACES"), here.parent / "shared" / "traces"):
        if directory and (Path(directory) / DEFAULT_TRACE).is_file():
            return Path(directory) / DEFAULT_TRACE
    return None


def read_trace(path: Path, limit: int | None = None) -> list[Request]:
    """Read up to ``limit`` requests of a Mooncake trace (gzip accepted) as chunk keys.

    Raises:
        BenchmarkError: a line is not a Mooncake request.
    """
    opener: Any = gzip.open if path.suffix == ".gz" else open
    root = root_key("")
    requests: list[Request] = []
    with opener(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if limit is not None and len(requests) >= limit:
                break
            try:
                record = json.loads(line)
                length, ids = int(record["input_length"]), [int(h) for h in record["hash_ids"]]
            except (ValueError, KeyError, TypeError) as exc:
                raise BenchmarkError(f"{path}:{number} is not a Mooncake trace request: {exc}") from exc
            if not ids or not 0 < length <= BLOCK_TOKENS * len(ids):
                raise BenchmarkError(f"{path}:{number}: {length} tokens do not fit {len(ids)} blocks")
            tokens = (
                np.asarray(ids, dtype=np.int64)[:, None] * BLOCK_TOKENS + np.arange(BLOCK_TOKENS)
            ).ravel()
            requests.append(Request(length, list(chunk_keys(tokens[:length], BLOCK_TOKENS, root))))
    return requests


def replay(requests: Sequence[Request], replicas: Sequence[KeyCache]) -> tuple[int, int]:
    """Serve ``requests`` round-robin by ``replicas``: look up, then store under a lease of the cached
    prefix. Returns ``(hit tokens, input tokens)``.

    Stores reserve and commit slots without copying bytes: a hit-rate replay measures which chunks are
    cached, not what they hold.
    """
    hit = total = 0
    for index, request in enumerate(requests):
        cache = replicas[index % len(replicas)]
        keys, num_tokens = request.keys, request.num_tokens
        hit += cache.lookup_keys(keys, num_tokens)
        total += num_tokens
        lease = cache.lease_keys(keys, num_tokens)
        try:
            cache.begin_store(keys, num_tokens).commit()
        finally:
            lease.release()
    return hit, total


__all__ = ["BLOCK_TOKENS", "DEFAULT_TRACE", "KeyCache", "Request", "find_trace", "read_trace", "replay"]
