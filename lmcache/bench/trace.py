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

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lmcache.cache_keys import chunk_keys, root_key
from lmcache.errors import BenchmarkError, ConfigError
from lmcache.replay import BLOCK_TOKENS, block_tokens
from lmcache.replay import read_trace as read_requests

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
    """The trace at ``path``, or (None) the project's copy: ``$LMCACHE_TRACES``, ``tests/traces`` of the
    source tree, or ``../shared/traces`` beside it; None when there is none."""
    if path is not None:
        return Path(path)
    here = Path(__file__).resolve().parents[2]
    for directory in (
        os.environ.get("LMCACHE_TRACES"),
        here / "tests" / "traces",
        here.parent / "shared" / "traces",
    ):
        if directory and (Path(directory) / DEFAULT_TRACE).is_file():
            return Path(directory) / DEFAULT_TRACE
    return None


def read_trace(path: Path, limit: int | None = None) -> list[Request]:
    """Read up to ``limit`` requests of a Mooncake trace (gzip accepted) as chunk keys: the requests and
    token blocks of :mod:`lmcache.replay`, hashed as a cache of namespace ``""`` would.

    Raises:
        BenchmarkError: the file cannot be read or a line is not a Mooncake request.
    """
    try:
        trace = read_requests(str(path))
    except ConfigError as exc:
        raise BenchmarkError(str(exc)) from exc
    root = root_key("")
    return [
        Request(
            r.input_length, list(chunk_keys(block_tokens(r.hash_ids, r.input_length), BLOCK_TOKENS, root))
        )
        for r in trace[:limit]
    ]


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
