"""The other processes of the shared cache's tests: ``python shared_peer.py ROLE SOCKET [ARGS...]``.

Roles (each connects to the server at SOCKET):

- ``write BACKEND DTYPE``: stores :data:`PROMPT` with KV from :func:`cachetest.prefix_kv` as a BACKEND
  array; prints ``ok N`` (tokens cached).
- ``read BACKEND DTYPE``: leases :data:`PROMPT`, checks that every chunk's BACKEND view is the mapping
  itself (its address is the client's arena base plus the slot's offset) and holds the expected bytes,
  and that ``retrieve`` gives them too; prints ``ok N zero-copy``.
- ``hold-lease``: stores and leases :data:`PROMPT`, prints ``held``, waits on stdin.
- ``hold-store CHUNKS``: reserves slots for a new prompt of CHUNKS chunks, writes part of the first
  chunk's bytes, prints ``reserved N`` (slots), waits on stdin.
- ``store-loop SEED``: stores prompts of derived KV without end; prints ``storing`` after the first.
- ``worker SEED STEPS``: STEPS random stores, retrieves, leases and lookups of overlapping prompts, each
  checked against the KV derived from its tokens; prints ``ok CHECKS MISMATCHES``.
- ``numpy-only``: uses the cache and checks that neither torch nor JAX was imported; prints ``ok``.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator

import numpy as np

from cachetest import CHUNK, prefix_kv
from kvtest import pointer, same_bits, to_host, to_native
from lmcache.shared import connect

PROMPT = [7 * i + 3 for i in range(3 * CHUNK + 7)]
BASES = [[1000 * base + i for i in range(8 * CHUNK)] for base in range(3)]


def write(path: str, backend: str, dtype: str) -> int:
    with connect(path, backend=backend) as cache:
        print(f"ok {cache.store(PROMPT, to_native(prefix_kv(PROMPT, dtype), backend))}")
    return 0


def read(path: str, backend: str, dtype: str) -> int:
    expected = prefix_kv(PROMPT, dtype)
    with connect(path, backend=backend) as cache:
        base, stride = pointer(cache.arena), cache.layout.slot_bytes
        with cache.lease(PROMPT) as lease:
            views = [obj.data for obj in lease.chunks]
            zero_copy = all(
                pointer(view) == base + obj.chunk_idx * stride
                for view, obj in zip(views, lease.chunks, strict=True)
            )
            got = np.concatenate([to_host(view) for view in views], axis=2) if views else None
            if got is None or got.tobytes() != expected.tobytes():
                raise SystemExit(f"the leased chunks differ from what was stored ({lease})")
        out, n = cache.retrieve(PROMPT, framework=backend)
        if n != len(PROMPT) or not same_bits(out, expected):
            raise SystemExit(f"retrieve gave {n} tokens, or other bytes")
        print(f"ok {lease.num_tokens}{' zero-copy' if zero_copy else ''}")
    return 0


def hold_lease(path: str) -> int:
    cache = connect(path)
    cache.store(PROMPT, prefix_kv(PROMPT))
    lease = cache.lease(PROMPT)
    print("held" if lease.num_tokens == len(PROMPT) else f"leased only {lease.num_tokens}", flush=True)
    sys.stdin.readline()
    return 0


def hold_store(path: str, chunks: str) -> int:
    cache = connect(path)
    tokens = [900_000 + i for i in range(int(chunks) * CHUNK)]
    pending = cache.begin_store(cache.keys(tokens), len(tokens))
    if pending.slots:  # half a chunk of the right bytes: a copy cut short
        first = pending.slots[0].as_numpy()
        first[:, :, : CHUNK // 2] = prefix_kv(tokens[:CHUNK])[:, :, : CHUNK // 2]
    print(f"reserved {len(pending.slots)}", flush=True)
    sys.stdin.readline()
    return 0


def prompt(rng: random.Random) -> list[int]:
    """A prefix of one of three bases, sometimes with a tail of its own: prompts that overlap."""
    tokens = rng.choice(BASES)[: rng.randint(1, 8 * CHUNK)]
    if rng.random() < 0.3:
        tokens = tokens + [rng.randint(0, 50) for _ in range(rng.randint(1, CHUNK))]
    return tokens


def loop_prompts(seed: int) -> Iterator[list[int]]:
    """The prompts ``store-loop`` stores, in order: overlapping heads, tails of their own."""
    rng = random.Random(seed)
    while True:
        yield prompt(rng) + [rng.randint(0, 10**6) for _ in range(2 * CHUNK)]


def store_loop(path: str, seed: str) -> int:
    cache = connect(path)
    for count, tokens in enumerate(loop_prompts(int(seed))):
        cache.store(tokens, prefix_kv(tokens))
        if count == 0:
            print("storing", flush=True)
    return 0


def worker(path: str, seed: str, steps: str) -> int:
    rng = random.Random(int(seed))
    checks = mismatches = 0
    with connect(path) as cache:
        for _ in range(int(steps)):
            tokens = prompt(rng)
            expected = prefix_kv(tokens)
            action = rng.random()
            if action < 0.35:
                cache.store(tokens, expected)
                continue
            if action < 0.7:
                out, n = cache.retrieve(tokens)
                got = None if out is None else out
            elif action < 0.9:
                with cache.lease(tokens) as lease:
                    n = lease.num_tokens
                    got = np.concatenate([o.as_numpy() for o in lease.chunks], axis=2) if n else None
                    got = None if got is None else got.copy()
            else:
                n, got = cache.lookup(tokens), None
                checks += 1
                mismatches += not (n == len(tokens) or (n % CHUNK == 0 and n < len(tokens)))
                continue
            checks += 1
            if n and (got is None or got.tobytes() != expected[:, :, :n].tobytes()):
                mismatches += 1
    print(f"ok {checks} {mismatches}")
    return 1 if mismatches else 0


def numpy_only(path: str) -> int:
    with connect(path) as cache:
        kv = prefix_kv(PROMPT)
        stored = cache.store(PROMPT, kv)
        out, n = cache.retrieve(PROMPT)
        with cache.lease(PROMPT) as lease:
            leased = lease.num_tokens
        frameworks = [name for name in ("torch", "jax", "jaxlib") if name in sys.modules]
        if (stored, n, leased) != (len(PROMPT),) * 3 or out.tobytes() != kv.tobytes() or frameworks:
            raise SystemExit(f"stored {stored}, retrieved {n}, leased {leased}; imported {frameworks}")
    print("ok")
    return 0


ROLES = {
    "write": write,
    "read": read,
    "hold-lease": hold_lease,
    "hold-store": hold_store,
    "store-loop": store_loop,
    "worker": worker,
    "numpy-only": numpy_only,
}

if __name__ == "__main__":
    role, path, *args = sys.argv[1:]
    sys.exit(ROLES[role](path, *args))
