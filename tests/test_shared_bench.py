"""The shared cache's benchmark helpers: Mooncake trace replay semantics and the memory measurement.

The figures themselves come from ``python -m lmcache bench``; these tests check that the replay counts
what DESIGN section 14 says (hit tokens of each lookup, round-robin replicas, a shared server against
private caches) and that the memory figure reads the mapping's own Pss.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import numpy as np

from lmcache.bench import common
from lmcache.bench.shared import mapping_memory
from lmcache.bench.trace import BLOCK_TOKENS, read_trace, replay
from lmcache.chunk_cache import ChunkCache
from lmcache.config import LMCacheMemPoolMetadata
from lmcache.shared import CacheServer, connect

SHAPE = (1, 1, BLOCK_TOKENS, 1, 1)
TRACE = [
    {"input_length": 1500, "hash_ids": [0, 1, 2]},
    {"input_length": 1200, "hash_ids": [0, 1, 3]},
    {"input_length": 100, "hash_ids": [4]},
    {"input_length": 1500, "hash_ids": [0, 1, 2]},
]


def _trace(tmp_path: Path) -> Path:
    path = tmp_path / "trace.jsonl"
    lines = [json.dumps({"timestamp": 0, "output_length": 1, **request}) for request in TRACE]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _cache(slots: int) -> ChunkCache:
    return ChunkCache(common.slots_pool("numpy", SHAPE, "uint8", slots))


def test_trace_requests_are_the_keys_of_their_derived_tokens(tmp_path: Path) -> None:
    requests = read_trace(_trace(tmp_path))
    tokens = (np.array([0, 1, 2])[:, None] * BLOCK_TOKENS + np.arange(BLOCK_TOKENS)).ravel()[:1500]
    assert requests[0].num_tokens == 1500
    assert requests[0].keys == _cache(4).keys(tokens)
    assert requests[1].keys[:2] == requests[0].keys[:2]  # a shared prefix: the same first two keys
    assert requests[1].keys[2] != requests[0].keys[2]
    assert len(read_trace(_trace(tmp_path), limit=2)) == 2


def test_replay_counts_the_leading_hit_of_each_request(tmp_path: Path) -> None:
    requests = read_trace(_trace(tmp_path))
    assert replay(requests, [_cache(16)]) == (0 + 2 * BLOCK_TOKENS + 0 + 1500, 4300)
    # Round-robin over two private caches: the requests sharing a prefix land on different replicas.
    assert replay(requests, [_cache(8), _cache(8)]) == (0 + 0 + 0 + 2 * BLOCK_TOKENS, 4300)


def test_replay_through_a_server_is_the_single_caches(tmp_path: Path, socket_path: str) -> None:
    requests = read_trace(_trace(tmp_path))
    with CacheServer(socket_path, common_meta(16)) as server:
        clients = [connect(server.socket_path) for _ in range(2)]
        assert replay(requests, clients) == replay(requests, [_cache(16)])
        assert all(client.stats().errors == 0 for client in clients)
        for client in clients:
            client.close()


def common_meta(slots: int) -> LMCacheMemPoolMetadata:
    return LMCacheMemPoolMetadata(SHAPE, "uint8", common.slots_gib(SHAPE, "uint8", slots))


def test_mapping_memory_counts_the_shared_arena(socket_path: str) -> None:
    gc.collect()  # mappings of clients earlier tests closed go with their last views
    with CacheServer(socket_path, common_meta(64)), connect(socket_path) as client:
        before_rss, before_pss = mapping_memory(os.getpid())
        arena = np.asarray(client.arena).view(np.uint8).reshape(-1)
        arena[::4096] = 1  # this process now has every page of its new mapping
        rss, pss = mapping_memory(os.getpid())
        assert rss - before_rss == arena.nbytes
        assert 0 < pss - before_pss <= arena.nbytes
