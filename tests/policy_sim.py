"""An independent simulator of leaf LRU on a request trace, sharing no code with lmcache.

It checks ``python -m lmcache replay`` of the ``"lru"`` policy: same semantics, different machinery.
Chunks are identified by ``(hash id, tokens)`` (an id names its whole prefix; a partial last block is a
different chunk from a full one); candidates are kept in a heap keyed by last use, invalidated lazily,
instead of the cache's ordered dict and parking.

Semantics (DESIGN section 14): a request's hit is the leading run of its chunks that are cached; then it
is stored: a cached chunk is pinned, a missing one is inserted, evicting the least recently used unpinned
leaf when the cache is full (the store stops when nothing can be evicted); at the end every chunk of the
stored chain is marked used, last chunk first, so a parent is used after its children.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterable, Iterator

BLOCK = 512
Chunk = tuple[int, int]  # (hash id, tokens in the block)


def read(path: str) -> Iterator[tuple[int, list[int]]]:
    """``(input_length, hash_ids)`` of each request of a Mooncake trace."""
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                record = json.loads(line)
                yield record["input_length"], record["hash_ids"]


class LeafLRU:
    """A cache of ``capacity`` chunks, evicting the least recently used unpinned leaf."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.parent: dict[Chunk, Chunk | None] = {}
        self.children: dict[Chunk, int] = {}
        self.last_use: dict[Chunk, int] = {}
        self.clock = 0
        self.heap: list[tuple[int, Chunk]] = []  # (last use, chunk) of leaves; stale entries skipped

    def request(self, input_length: int, hash_ids: list[int]) -> tuple[int, int]:
        """Serve one request; return ``(hit tokens, hit chunks)``."""
        chunks = [(h, min(BLOCK, input_length - i * BLOCK)) for i, h in enumerate(hash_ids)]
        hit_chunks = 0
        for chunk in chunks:
            if chunk not in self.parent:
                break
            hit_chunks += 1
        hit_tokens = sum(tokens for _, tokens in chunks[:hit_chunks])
        chain: list[Chunk] = []
        for chunk in chunks:
            if chunk not in self.parent:
                if len(self.parent) >= self.capacity and not self._evict(set(chain)):
                    break
                above = chain[-1] if chain else None
                self.parent[chunk] = above
                self.children[chunk] = 0
                if above is not None:
                    self.children[above] += 1
            chain.append(chunk)
        for chunk in reversed(chain):
            self.clock += 1
            self.last_use[chunk] = self.clock
            if self.children[chunk] == 0:
                heapq.heappush(self.heap, (self.clock, chunk))
        return hit_tokens, hit_chunks

    def _evict(self, pinned: set[Chunk]) -> bool:
        skipped = []
        victim = None
        while self.heap:
            used, chunk = heapq.heappop(self.heap)
            if chunk not in self.parent or self.last_use.get(chunk) != used or self.children[chunk]:
                continue  # stale: evicted, used since, or no longer a leaf
            if chunk in pinned:
                skipped.append((used, chunk))
                continue
            victim = chunk
            break
        for entry in skipped:
            heapq.heappush(self.heap, entry)
        if victim is None:
            return False
        above = self.parent.pop(victim)
        del self.children[victim], self.last_use[victim]
        if above is not None:
            self.children[above] -= 1
            if self.children[above] == 0:
                heapq.heappush(self.heap, (self.last_use[above], above))
        return True


def token_hit_rate(requests: Iterable[tuple[int, list[int]]], capacity: int) -> float:
    """Replay ``requests`` through a :class:`LeafLRU` of ``capacity`` chunks; the token hit rate."""
    cache = LeafLRU(capacity)
    hit = total = 0
    for input_length, hash_ids in requests:
        tokens, _ = cache.request(input_length, hash_ids)
        hit += tokens
        total += input_length
    return hit / total
