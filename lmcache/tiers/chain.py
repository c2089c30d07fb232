"""The chunk cache's tiers in read order (disk, then remote): writing behind, probing, pulling chunks
into local slots.

:class:`TierChain` is the glue between a :class:`~lmcache.chunk_cache.ChunkCache` and its tiers; every
tier is a :class:`~lmcache.tiers.base.Tier`. What it asks of the cache is the prefix index (to pin
and add chunks) and the copies (a slot's bytes as a host buffer, a tier's read into a slot).

* **Write-behind.** Each chunk a ``store`` adds is queued for every tier, straight from its slot; the
  prefix up to the last new chunk stays pinned (a whole prefix, so pins stay prefix-closed) until every
  tier sent or dropped its writes.
* **Probe.** ``lookup`` asks each tier in turn, one round trip each, for the chunks after what the
  tiers above it hold.
* **Pull.** ``retrieve``, ``lease`` and ``load_paged`` fetch the chunks after the local prefix from each
  tier in turn, in batches of the tier's ``batch_bytes``, reading each payload straight into a new local
  slot (evicting as usual). A chunk fetched from a tier is written behind to the tiers above it (a
  remote hit lands on disk too).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from lmcache.cache_copies import ChunkCopies
from lmcache.cache_records import CacheEntry
from lmcache.layout import SlotLayout
from lmcache.prefix_index import PrefixIndex
from lmcache.tiers.base import TIER_COUNTERS, Tier, TierStream

Shape = tuple[int, int, int, int, int]


class TierChain:
    """The tiers below a cache's slots, in read order.

    Args:
        tiers: ``(tier, owned)`` pairs in read order; an owned tier (built by the cache from a URL or a
            path) is closed by :meth:`close`, the others stay their creator's.
        index: the cache's prefix index.
        copies: the cache's copies.
        layout: the pool's slot layout.
        namespace: the cache's namespace (part of every tier key).
    """

    def __init__(
        self,
        tiers: Sequence[tuple[Tier, bool]],
        index: PrefixIndex,
        copies: ChunkCopies,
        layout: SlotLayout,
        namespace: str,
    ) -> None:
        self._tiers = [tier for tier, _ in tiers]
        self._owned = [tier for tier, owned in tiers if owned]
        self._index = index
        self._copies = copies
        self._layout = layout
        self._dtype = layout.dtype.name
        self._namespace = namespace

    @property
    def tiers(self) -> list[Tier]:
        """The tiers, in read order."""
        return list(self._tiers)

    def __bool__(self) -> bool:
        return bool(self._tiers)

    def shapes(self, tokens: Sequence[int]) -> list[Shape]:
        """The view shapes of chunks of ``tokens[i]`` tokens."""
        return [self._layout.view_shape(n) for n in tokens]  # type: ignore[misc]

    # -- writes ---------------------------------------------------------------------------------------
    def write_behind(self, held: list[CacheEntry], new: list[CacheEntry], upto: int | None = None) -> None:
        """Queue ``new`` for every tier (the first ``upto`` tiers only, when given); unpin ``held`` (their
        prefix, pinned once more by the caller) once every write was sent or dropped.

        Called without the index's lock: a tier may call ``on_done`` at once (a full queue drops).
        """
        targets = self._tiers if upto is None else self._tiers[:upto]
        if not targets or not new:
            if held:
                self._index.unpin(held, touch=False)
            return
        lock = threading.Lock()
        left = [len(new) * len(targets)]

        def on_done(sent: bool) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                self._index.unpin(held, touch=False)

        submitted = 0
        try:
            for tier in targets:
                for entry in new:
                    payload = self._copies.payload(entry.obj)
                    parent = None if entry.parent is None else tier.key(self._namespace, entry.parent.key)
                    key = tier.key(self._namespace, entry.key)
                    tier.submit(key, payload, self._dtype, payload.shape, on_done, parent=parent)
                    submitted += 1
        finally:
            for _ in range(len(new) * len(targets) - submitted):  # never submitted (an error): not pending
                on_done(False)

    # -- reads ----------------------------------------------------------------------------------------
    def probe(self, keys: Sequence[bytes], tokens: Sequence[int], local: int) -> int:
        """How many leading chunks of ``keys`` the cache and its tiers hold, ``local`` of them in slots:
        each tier is asked (one round trip) for the chunks after what the tiers above it hold."""
        found = local
        for tier in self._tiers:
            if found >= len(keys):
                break
            flags = tier.probe(
                [tier.key(self._namespace, key) for key in keys[found:]],
                self._dtype,
                self.shapes(tokens[found:]),
            )
            run = flags.index(False) if False in flags else len(flags)
            found += run
        return found

    def pull(self, keys: Sequence[bytes], tokens: Sequence[int]) -> None:
        """Fetch the chunks of ``keys`` after the local prefix into local slots, from each tier in turn.

        Stops at the first chunk no tier holds, at a chunk that gets no slot, or at a value rejected.
        """
        start = len(self._index.cached_prefix(keys))
        for position, tier in enumerate(self._tiers):
            if start >= len(keys):
                return
            start = self._pull_from(position, tier, keys, tokens, start)

    def _pull_from(
        self, position: int, tier: Tier, keys: Sequence[bytes], tokens: Sequence[int], start: int
    ) -> int:
        """Pull chunks ``start ..`` of ``keys`` from one tier, in batches; return the chunks cached after."""
        per_batch = max(1, tier.batch_bytes // self._layout.chunk_bytes)
        while start < len(keys):
            end = min(len(keys), start + per_batch)
            tier_keys = [tier.key(self._namespace, key) for key in keys[start:end]]
            with tier.stream(tier_keys, self._dtype, self.shapes(tokens[start:end])) as stream:
                cached = self._insert_batch(position, stream, keys, tokens, start, end)
            if cached < end:
                return cached
            start = end
        return start

    def _insert_batch(
        self,
        position: int,
        stream: TierStream,
        keys: Sequence[bytes],
        tokens: Sequence[int],
        start: int,
        end: int,
    ) -> int:
        """Read chunks ``start .. end - 1`` from ``stream`` into new slots after the pinned prefix."""
        with self._index.reservation() as reservation:
            if reservation.pin(keys[:start]) < start:
                return 0  # a local chunk was evicted meanwhile: nothing to attach the pulled ones to
            for index in range(start, end):
                if not stream.hit(index - start):
                    break
                obj = reservation.take(keys[index], tokens[index])
                if obj is None:
                    break  # nothing left to evict
                if not self._copies.fill_from(obj, stream.read_into):
                    reservation.drop_last()
                    break
            chain, new = reservation.commit(hold=position > 0)
        if position > 0 and new:
            self.write_behind(chain[: chain.index(new[-1]) + 1], new, upto=position)
        return len(chain)

    # -- lifecycle ------------------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every tier's queued writes were sent or dropped; False if ``timeout`` passed first."""
        return all([tier.flush(timeout) for tier in self._tiers])

    def close(self) -> None:
        """Close the tiers the cache built itself (they return promptly even when their store is gone)."""
        for tier in self._owned:
            tier.close()

    def counters(self) -> dict[str, int]:
        """Every tier's counters, named ``<tier>_<counter>`` as in ``CacheStats``."""
        counts: dict[str, int] = {}
        for tier in self._tiers:
            stats = tier.stats()
            for name in TIER_COUNTERS:
                key = f"{tier.name}_{name}"
                counts[key] = counts.get(key, 0) + int(getattr(stats, name))
        return counts


__all__ = ["TierChain"]
