"""The chunk cache's prefix index: which chunks are cached, in which slots, who pins them, and which
chunk is evicted next.

:class:`PrefixIndex` alone writes the entries (:class:`~lmcache.cache_records.CacheEntry`), their pins
and leases, and the counters; the eviction policy (:mod:`lmcache.policies`) only chooses among the
candidates it is told about. What the index needs from the pool is :class:`SlotSource`. Chunks are added
through a :class:`Reservation` (slots taken first, filled by the caller outside the lock, then
published), so a chunk is visible only once its bytes are in its slot.

Invariants (checked by the test-suite's state machines, after every step):

* The cached set is prefix-closed: every cached chunk's parent is cached. Only leaves are evicted: the
  index parks a chosen victim that still has cached children (see :mod:`lmcache.policies.base`).
* Keys chain: a key names its whole prefix, so a cached chunk found at position ``i`` of a prompt has the
  chunk found at ``i - 1`` as its parent. Keys that do not chain (not ``ChunkCache.keys`` of one prompt)
  are refused with a :class:`~lmcache.errors.ConfigError`, never filed under a wrong parent.
* Pins cover whole prefixes (a pinned chunk's parent is pinned), and a pinned chunk is never evicted or
  cleared. A pin count never goes below zero: an unbalanced unpin raises before anything changes.
* ``pinned``, ``leased`` and ``chunks`` in :meth:`PrefixIndex.stats` are exact.

Thread-safe: the lock is held for dict work and slot hand-out only, O(1) per chunk. A lease or
reservation that is garbage collected unreleased gives its pins and slots back at the index's next call
(the collector may run inside a locked section, so it only queues them).
"""

from __future__ import annotations

import collections
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from lmcache.allocator import closed_error
from lmcache.cache_records import CacheEntry, CacheStats, ShapeOnly
from lmcache.errors import CacheInvariantError, ConfigError, NotPicklableError
from lmcache.layout import SlotLayout
from lmcache.policies.base import EvictionPolicy
from lmcache.storage_backend.mem_pool.base_pool import KVObj

Taken = tuple[bytes, KVObj, int]  # a slot taken for a missing chunk: (key, slot, tokens)
_POLICIES_IN_USE: set[int] = set()  # id() of every policy object an index holds (one index each)


class SlotSource(Protocol):
    """What the index needs from the pool (a :class:`~lmcache.storage_backend.mem_pool.LocalPool`)."""

    @property
    def closed(self) -> bool:
        """Whether the pool was closed (its slots can be neither taken nor given back)."""
        ...

    def allocate(self, kv_chunk: Any) -> KVObj | None:
        """A slot for a chunk shaped like ``kv_chunk``, or None when the pool is full."""
        ...

    def free(self, kv_obj: KVObj) -> None:
        """Take the slot back."""
        ...

    def reissue(self, kv_obj: KVObj) -> KVObj:
        """Free the slot and hand it out again in one step (the old handle goes stale)."""
        ...


class PrefixIndex:
    """Cached chunks by key, their slots, pins and leases, and eviction under a policy.

    Args:
        slots: where slots come from (the cache's pool).
        layout: the pool's slot layout (for the shapes slots are allocated with).
        policy: the eviction policy, used by this index alone; the index tells it every fact it needs,
            by key.

    Raises:
        ConfigError: ``policy`` already serves another index (a policy holds one cache's state).
    """

    def __init__(self, slots: SlotSource, layout: SlotLayout, policy: EvictionPolicy) -> None:
        if id(policy) in _POLICIES_IN_USE:
            raise ConfigError(
                f"this {type(policy).__name__} object already serves another cache: a policy holds one "
                "cache's state; pass a new policy object, or the policy's name"
            )
        _POLICIES_IN_USE.add(id(policy))
        weakref.finalize(self, _POLICIES_IN_USE.discard, id(policy))
        self._slots = slots
        self._policy = policy
        self._lock = threading.Lock()
        self._entries: dict[bytes, CacheEntry] = {}
        self._like = [
            ShapeOnly(layout.view_shape(n), layout.dtype.numpy_dtype) for n in range(layout.chunk_size + 1)
        ]
        self._dropped: collections.deque[tuple[str, Any]] = collections.deque()  # from the collector
        self._pinned = 0
        self._leased = 0
        self._stored = 0
        self._evicted = 0
        self._cleared = 0
        self._hit_tokens = 0
        self._query_tokens = 0

    @property
    def policy(self) -> EvictionPolicy:
        """The eviction policy."""
        return self._policy

    # -- reading (without the lock: dict reads are atomic, and an entry is published complete) --------
    def __len__(self) -> int:
        """Chunks cached now."""
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        """Whether the chunk ``key`` is cached now."""
        return key in self._entries

    def keys(self) -> list[bytes]:
        """The keys cached now, in no particular order (a snapshot)."""
        with self._lock:
            return list(self._entries)

    def cached_prefix(self, keys: Iterable[bytes], tokens: Sequence[int] | None = None) -> list[bytes]:
        """The leading keys of ``keys`` that are cached now as one chain; stops consuming ``keys`` at the
        first miss (so a lazy iterator of keys is hashed no further than needed).

        Raises:
            ConfigError: a key is cached under another parent (the keys do not chain), or, with
                ``tokens``, chunk ``i`` is cached with another token count than ``tokens[i]``.
        """
        return [entry.key for entry in self._matching(keys, tokens)]

    def stats(self, **tiers: int) -> CacheStats:
        """A consistent snapshot of the counters (``tiers``: the tiers' counters, passed through)."""
        with self._lock:
            self._drain()
            return CacheStats(
                **tiers,
                chunks=len(self._entries),
                leased=self._leased,
                pinned=self._pinned,
                stored=self._stored,
                evicted=self._evicted,
                cleared=self._cleared,
                hit_tokens=self._hit_tokens,
                query_tokens=self._query_tokens,
            )

    # -- queries and pins -------------------------------------------------------------------------------
    def count_query(self, hit_tokens: int, query_tokens: int) -> None:
        """Count a pure query (``lookup``): ``hit_tokens`` of ``query_tokens`` found."""
        with self._lock:
            self._hit_tokens += hit_tokens
            self._query_tokens += query_tokens

    def pin_prefix(
        self,
        keys: Sequence[bytes],
        query_tokens: int,
        *,
        lease: bool,
        tokens: Sequence[int] | None = None,
        check: Callable[[int], None] | None = None,
    ) -> list[CacheEntry]:
        """Pin the longest cached prefix of ``keys`` and count the query; return its entries in order.

        ``tokens[i]``, when given, is the token count chunk ``i`` must have. ``check(num_tokens)`` runs
        next, under the lock. A ``lease`` pin also counts in ``leased`` until :meth:`release_lease`.

        Raises:
            ConfigError: ``keys`` do not chain, or a cached chunk has another token count than
                ``tokens`` says; whatever ``check`` raises. Nothing is pinned or counted then.
        """
        with self._lock:
            self._drain()
            chain = self._matching(keys, tokens)
            num_tokens = sum(entry.num_tokens for entry in chain)
            if check is not None:
                check(num_tokens)
            for entry in chain:
                self._pin(entry)
                if lease:
                    if entry.leases == 0:
                        self._leased += 1
                    entry.leases += 1
            self._hit_tokens += num_tokens
            self._query_tokens += query_tokens
        return chain

    def unpin(self, chain: Sequence[CacheEntry], *, touch: bool = True) -> None:
        """Take back one pin of each entry of ``chain``, tail-first; ``touch`` marks them used (each
        parent after its children, so a parent is never older than its children).

        Raises:
            CacheInvariantError: an entry would be unpinned more often than it is pinned; nothing
                changes.
        """
        with self._lock:
            self._check_pinned(chain, leases=False)
            self._unpin(chain, touch)
            self._drain()

    def hold(self, chain: Sequence[CacheEntry]) -> None:
        """Pin every entry of ``chain`` (each pinned already) once more, without a use: a write-behind
        keeps its bytes safe until sent; :meth:`unpin` with ``touch=False`` ends it."""
        with self._lock:
            self._check_pinned(chain, leases=False)
            for entry in chain:
                self._pin(entry)

    def release_lease(self, chain: Sequence[CacheEntry]) -> None:
        """End one lease on each entry of ``chain`` (a :class:`~lmcache.cache_records.Lease` calls this
        once): unpin it and mark it used.

        Raises:
            CacheInvariantError: an entry holds fewer leases than ``chain`` names it; nothing changes.
        """
        with self._lock:
            self._release_lease(chain)
            self._drain()

    def release_later(self, chain: Sequence[CacheEntry]) -> None:
        """:meth:`release_lease`, deferred to the index's next call: for a lease the garbage collector
        found unreleased (it may run while this thread holds the lock)."""
        self._dropped.append(("lease", list(chain)))

    def unpin_later(self, chain: Sequence[CacheEntry]) -> None:
        """:meth:`unpin` (with a use), deferred to the index's next call: for a pin the garbage collector
        found unreleased."""
        self._dropped.append(("pin", list(chain)))

    def reservation(self) -> Reservation:
        """Start adding chunks: see :class:`Reservation`."""
        return Reservation(self)

    # -- eviction ---------------------------------------------------------------------------------------
    def clear(self) -> int:
        """Drop every chunk that is not pinned and give its slot back; return how many.

        Leaves go first, then the parents they leave childless, so the set is prefix-closed after every
        drop (pins cover whole prefixes: an unpinned chunk has only unpinned descendants).

        Raises:
            PoolClosedError: the pool was closed (no slot could be given back); nothing is dropped.
        """
        with self._lock:
            self._drain()
            if self._slots.closed:
                raise closed_error()
            leaves = collections.deque(e for e in self._entries.values() if e.pins == 0 and not e.children)
            count = 0
            while leaves:
                entry = leaves.popleft()
                self._slots.free(entry.obj)
                parent = entry.parent
                self._remove(entry, evicted=False)
                self._cleared += 1
                count += 1
                if parent is not None and parent.pins == 0 and not parent.children:
                    leaves.append(parent)
        return count

    def discard(self, keys: Iterable[bytes]) -> list[bytes]:
        """Drop each chunk of ``keys`` that is cached, unpinned and a leaf (no cached children), giving
        its slot back; return the keys dropped, in order. Others are kept: a pinned chunk is in use, and
        dropping a parent would leave its children without their prefix. Keys are taken in order, so a
        parent named after its last child goes too; a key named twice counts once.

        Raises:
            PoolClosedError: the pool was closed (no slot could be given back); nothing is dropped.
        """
        dropped: list[bytes] = []
        with self._lock:
            self._drain()
            if self._slots.closed:
                raise closed_error()
            for key in keys:
                entry = self._entries.get(key)
                if entry is None or entry.pins or entry.children:
                    continue
                self._slots.free(entry.obj)
                self._remove(entry, evicted=False)
                self._cleared += 1
                dropped.append(key)
        return dropped

    # -- what a Reservation asks for (this module's companion class) ----------------------------------
    def _walk(
        self,
        keys: Sequence[bytes],
        tokens: Sequence[int | None],
        parent: CacheEntry | None,
        *,
        pool_full: bool,
        after_missing: bool,
        take: bool = True,
    ) -> tuple[list[CacheEntry], list[Taken], int, bool]:
        """Walk ``keys`` (after ``parent``) in order under one lock: pin each cached chunk, then (from the
        first missing one, or at once when ``after_missing``) take a slot for each chunk, evicting as
        needed; without ``take``, stop at the first missing chunk instead. A token count of None skips the
        check of a cached chunk's tokens (it is never None where a slot may be taken).

        Returns ``(pinned, taken, walked, pool_full)``: the entries pinned, the slots taken, how many
        keys were walked (fewer than given when a chunk got no slot: nothing was left to evict), and
        whether the pool was found full (a hint for the next walk). On any error, what this walk pinned
        and took is given back before it raises.

        Raises:
            ConfigError: the keys do not chain after ``parent``, or a cached chunk's token count differs.
            PoolClosedError: the pool was closed.
        """
        pinned: list[CacheEntry] = []
        taken: list[Taken] = []
        with self._lock:
            self._drain()
            try:
                entries = self._entries
                for walked, (key, num_tokens) in enumerate(zip(keys, tokens, strict=True)):
                    if not (after_missing or taken):
                        entry = entries.get(key)
                        if entry is not None:
                            self._check_link(entry, parent, num_tokens, walked)
                            self._pin(entry)
                            pinned.append(entry)
                            parent = entry
                            continue
                    if not take or num_tokens is None:
                        return pinned, taken, walked, pool_full
                    obj, pool_full = self._take_slot(num_tokens, pool_full)
                    if obj is None:
                        return pinned, taken, walked, pool_full
                    taken.append((key, obj, num_tokens))
            except BaseException:
                for _, obj, _ in taken:
                    self._slots.free(obj)
                self._unpin(pinned, False)
                raise
        return pinned, taken, len(keys), pool_full

    def _publish(
        self, chain: Sequence[CacheEntry], taken: Sequence[Taken]
    ) -> tuple[list[CacheEntry], list[CacheEntry]]:
        """Publish filled slots ``taken`` as the chunks after ``chain`` (pinned by :meth:`_walk`), in
        order; each stays pinned (the reservation unpins the whole prefix once done).

        A chunk that another store published meanwhile joins the prefix instead (its slot is given
        back). One cached under another parent ends the publishing there: its slot and the rest are given
        back (keys that do not chain never join).

        Returns:
            ``(appended, new)``: the entries that now follow ``chain``, and those published here.
        """
        appended: list[CacheEntry] = []
        new: list[CacheEntry] = []
        with self._lock:
            self._check_pinned(chain, leases=False)
            parent = chain[-1] if chain else None
            for index, (key, obj, num_tokens) in enumerate(taken):
                entry = self._entries.get(key)
                if entry is not None:
                    if entry.parent is not parent or entry.num_tokens != num_tokens:
                        for _, rest, _ in taken[index:]:
                            self._slots.free(rest)
                        break
                    self._slots.free(obj)
                    self._pin(entry)
                else:
                    entry = CacheEntry(key, obj, parent, num_tokens)
                    if parent is not None:
                        parent.children += 1
                    entry.pins = 1  # inserted into the policy as held
                    self._pinned += 1
                    self._entries[key] = entry
                    self._policy.insert(key, None if parent is None else parent.key)
                    self._stored += 1
                    new.append(entry)
                appended.append(entry)
                parent = entry
        return appended, new

    def _give_back(self, slots: Iterable[KVObj]) -> None:
        """Give slots taken by :meth:`_walk` back to the pool unused."""
        with self._lock:
            for obj in slots:
                self._slots.free(obj)

    def _abandon_later(self, chain: Sequence[CacheEntry], taken: Sequence[Taken]) -> None:
        """A reservation collected unfinished: give its slots back and unpin its chain at the next call."""
        self._dropped.append(("reservation", (list(chain), list(taken))))

    # -- internals (under the lock) -------------------------------------------------------------------
    def _drain(self) -> None:
        """Give back what collected leases and reservations held (queued by the garbage collector)."""
        while self._dropped:
            kind, held = self._dropped.popleft()
            if kind == "lease":
                self._release_lease(held)
            elif kind == "pin":
                self._check_pinned(held, leases=False)
                self._unpin(held, True)
            else:
                chain, taken = held
                for _, obj, _ in taken:
                    self._slots.free(obj)
                self._check_pinned(chain, leases=False)
                self._unpin(chain, False)

    def _matching(self, keys: Iterable[bytes], tokens: Sequence[int] | None) -> list[CacheEntry]:
        """The entries of the longest cached prefix of ``keys`` (consumed no further than its first
        miss), checked to chain (and to have ``tokens``). Read without the lock by :meth:`cached_prefix`:
        dict reads are atomic and an entry is published complete."""
        chain: list[CacheEntry] = []
        entries = self._entries
        parent = None
        for position, key in enumerate(keys):
            entry = entries.get(key)
            if entry is None:
                break
            self._check_link(entry, parent, None if tokens is None else tokens[position], position)
            chain.append(entry)
            parent = entry
        return chain

    def _check_link(
        self, entry: CacheEntry, parent: CacheEntry | None, num_tokens: int | None, position: int
    ) -> None:
        if entry.parent is not parent:
            raise ConfigError(
                f"key {position} is cached as the chunk after another prefix: the keys are not one "
                "prompt's chain; pass cache.keys(tokens) of one prompt, from its first chunk"
            )
        if num_tokens is not None and entry.num_tokens != num_tokens:
            raise ConfigError(
                f"chunk {position} is cached with {entry.num_tokens} tokens, but the prompt's length gives "
                f"it {num_tokens}: pass the num_tokens of the prompt whose keys these are"
            )

    def _release_lease(self, chain: Sequence[CacheEntry]) -> None:
        self._check_pinned(chain, leases=True)
        for entry in chain:
            entry.leases -= 1
            if entry.leases == 0:
                self._leased -= 1
        self._unpin(chain, True)

    def _take_slot(self, num_tokens: int, pool_full: bool) -> tuple[KVObj | None, bool]:
        """Get a slot, evicting leaves until one is free.

        ``pool_full`` says the pool had no free slot for the previous chunk: then eviction comes first,
        sparing a failed ``allocate`` per chunk (a slot freed meanwhile by someone else is still found
        once nothing is evictable). Returns the slot (None when the pool is full and nothing is
        evictable) and whether the pool was found full. The pool acts before the index changes, so a
        pool that refuses (closed) leaves the index as it was.
        """
        like = self._like[num_tokens]
        slots = self._slots
        obj = None if pool_full else slots.allocate(like)
        while obj is None:
            victim = self._next_victim()
            if victim is None:
                if not pool_full:
                    return None, True
                pool_full = False  # look once more for a slot freed by someone else
                obj = slots.allocate(like)
                continue
            pool_full = True
            # The slot gets a new generation either way, so a KVObj kept from a released lease goes
            # stale instead of reading the next chunk: reissued in one step for the same length.
            if victim.num_tokens == num_tokens:
                obj = slots.reissue(victim.obj)
                self._remove(victim, evicted=True)
                self._evicted += 1
                return obj, True
            slots.free(victim.obj)
            self._remove(victim, evicted=True)
            self._evicted += 1
            obj = slots.allocate(like)
        return obj, pool_full

    def _pin(self, entry: CacheEntry) -> None:
        if entry.pins == 0:
            if not entry.parked:
                self._policy.hold(entry.key)
            self._pinned += 1
        entry.pins += 1

    def _unpin(self, chain: Sequence[CacheEntry], touch: bool) -> None:
        policy = self._policy
        for entry in reversed(chain):
            if touch:
                policy.touch(entry.key)
            entry.pins -= 1
            if entry.pins == 0:
                self._pinned -= 1
                entry.parked = False  # used (or held for a write) since it was parked: a candidate again
                policy.release(entry.key)

    def _check_pinned(self, chain: Sequence[CacheEntry], *, leases: bool) -> None:
        """Raise unless every entry of ``chain`` holds at least as many pins (and, with ``leases``,
        leases) as ``chain`` names it."""
        counts = collections.Counter(id(entry) for entry in chain)
        for entry in chain:
            needed = counts[id(entry)]
            if entry.pins < needed or (leases and entry.leases < needed) or entry.key not in self._entries:
                raise CacheInvariantError(
                    f"chunk {entry.key.hex()} would be unpinned more often than it is pinned (or it is not "
                    "this index's); nothing was unpinned"
                )

    def _next_victim(self) -> CacheEntry | None:
        """The policy's next victim that is a leaf, parking those that still have cached children."""
        policy = self._policy
        while True:
            chosen = policy.victim()
            if chosen is None:
                return None
            key: bytes = chosen  # type: ignore[assignment]  # the index gives policies bytes keys only
            entry = self._entries.get(key)
            if entry is None or entry.pins:
                raise CacheInvariantError(
                    f"the {getattr(policy, 'name', 'eviction')} policy chose chunk {key.hex()}, which is "
                    f"{'not cached' if entry is None else 'pinned'}; eviction refused"
                )
            if not entry.children:
                return entry
            entry.parked = True
            policy.hold(key)

    def _remove(self, entry: CacheEntry, *, evicted: bool) -> None:
        """Drop ``entry`` (unpinned; its slot given back already); release its parent if it was a parked
        victim whose last child this was."""
        del self._entries[entry.key]
        if evicted:
            self._policy.evict(entry.key)
        else:
            self._policy.discard(entry.key)
        parent = entry.parent
        if parent is not None:
            parent.children -= 1
            if not parent.children and parent.parked and parent.key in self._entries:
                parent.parked = False
                if not parent.pins:  # a pinned one stays held: its unpin releases it
                    self._policy.release(parent.key)  # not used since parked: back at the cold end


class Reservation:
    """Chunks being added to a :class:`PrefixIndex`: a pinned chain of cached chunks, then slots taken
    for the missing ones, which the caller fills outside the lock and publishes.

    :meth:`extend` walks keys in order (a cached chunk is pinned into the chain, a missing one gets a
    slot, evicting as needed); fill each slot of :attr:`slots`, then :meth:`publish` them (visible from
    then on, still pinned) or go straight to :meth:`commit`, which publishes what is filled, gives the rest
    back and unpins the chain. Until published, new chunks are invisible. A reservation that is aborted
    (or left by a ``with`` block without a commit, or collected unfinished) gives its unpublished slots
    back and unpins its chain. It can be neither copied nor pickled (a copy would commit or abort twice).
    Not thread-safe: one owner drives it. It reaches the index only through the index's ``_walk``,
    ``_publish``, ``_give_back`` and ``_abandon_later``.
    """

    __slots__ = ("__weakref__", "_chain", "_done", "_finalizer", "_index", "_new", "_pending", "_pool_full")

    def __init__(self, index: PrefixIndex) -> None:
        self._index = index
        self._chain: list[CacheEntry] = []  # pinned: cached before, or published by this reservation
        self._new: list[CacheEntry] = []  # published by this reservation
        self._pending: list[Taken] = []  # slots for missing chunks, in key order
        self._pool_full = False
        self._done = False
        # The lists are handed over, not copied: the finalizer sees what the reservation holds when it
        # is collected. Not at interpreter exit (the index may be half torn down by then).
        self._finalizer = weakref.finalize(self, index._abandon_later, self._chain, self._pending)
        self._finalizer.atexit = False

    @property
    def slots(self) -> list[KVObj]:
        """The slots taken for missing chunks and not yet published, in key order."""
        return [obj for _, obj, _ in self._pending]

    @property
    def pinned(self) -> list[CacheEntry]:
        """The chunks pinned so far, in key order: cached ones, and those published by :meth:`publish`."""
        return list(self._chain)

    def pin(self, keys: Sequence[bytes], tokens: Sequence[int] | None = None) -> int:
        """Pin the leading cached chunks of ``keys`` (with no slot pending); return how many.

        Raises:
            ConfigError: the keys do not chain (or ``tokens`` differ from the cached chunks').
        """
        self._check_open()
        if self._pending:
            raise CacheInvariantError("pin() needs every taken slot published first")
        checked: Sequence[int | None] = [None] * len(keys) if tokens is None else tokens
        pinned, _, _, _ = self._index._walk(
            keys, checked, self._tail(), pool_full=False, after_missing=False, take=False
        )
        self._chain += pinned
        return len(pinned)

    def extend(self, keys: Sequence[bytes], tokens: Sequence[int]) -> int:
        """Walk ``keys`` (the chunks after those walked before; ``tokens[i]`` tokens each): pin cached
        chunks (while no slot is pending), take a slot for each missing one. Returns how many keys were
        walked: fewer than given when a chunk got no slot (nothing left to evict).

        Raises:
            ConfigError: the keys do not chain, or a cached chunk has another token count.
        """
        self._check_open()
        pinned, taken, walked, self._pool_full = self._index._walk(
            keys, tokens, self._tail(), pool_full=self._pool_full, after_missing=bool(self._pending)
        )
        self._chain += pinned
        self._pending += taken
        return walked

    def take(self, key: bytes, num_tokens: int) -> KVObj | None:
        """Take a slot for the chunk ``key`` after those walked before (evicting as needed), even if it is
        cached meanwhile (then it is published once, by whoever publishes first); None when no slot can
        be had."""
        self._check_open()
        _, taken, _, self._pool_full = self._index._walk(
            [key], [num_tokens], self._tail(), pool_full=self._pool_full, after_missing=True
        )
        self._pending += taken
        return taken[0][1] if taken else None

    def drop_last(self) -> None:
        """Give back the slot of the last missing chunk (its fill failed): it will not be published."""
        self._check_open()
        if self._pending:
            _, obj, _ = self._pending.pop()
            self._index._give_back([obj])

    def publish(self) -> None:
        """Publish every pending slot (filled by now): visible from here on, still pinned."""
        self._check_open()
        if self._pending:
            appended, new = self._index._publish(self._chain, self._pending)
            self._pending.clear()
            self._chain += appended
            self._new += new

    def commit(
        self, count: int | None = None, *, hold: bool = False
    ) -> tuple[list[CacheEntry], list[CacheEntry]]:
        """Publish the first ``count`` pending slots (default: all), give back the rest, and unpin the
        chain, marking it used.

        With ``hold``, the chain up to the last chunk this reservation published stays pinned once more
        (a write-behind; end it with ``index.unpin(held, touch=False)``).

        Returns:
            ``(prefix, new)``: every chunk of the prefix now cached, in key order, and those this
            reservation published.

        Raises:
            ConfigError: ``count`` is not an int >= 0 (nothing changes).
        """
        self._check_open()
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
            raise ConfigError(f"count must be None or an int >= 0 (slots filled), got {count!r}")
        keep = len(self._pending) if count is None else min(count, len(self._pending))
        rest = self._pending[keep:]
        del self._pending[keep:]
        if rest:
            self._index._give_back(obj for _, obj, _ in rest)
        self.publish()
        self._done = True
        self._finalizer.detach()
        chain, new = list(self._chain), list(self._new)
        if hold and new:
            self._index.hold(chain[: chain.index(new[-1]) + 1])
        self._index.unpin(chain, touch=True)
        return chain, new

    def abort(self) -> None:
        """Give the unpublished slots back and unpin the chain without a use (chunks published already
        stay); calling it again, or after a commit, does nothing."""
        if self._done:
            return
        self._done = True
        self._finalizer.detach()
        if self._pending:
            self._index._give_back(obj for _, obj, _ in self._pending)
            self._pending.clear()
        self._index.unpin(self._chain, touch=False)

    def _tail(self) -> CacheEntry | None:
        return self._chain[-1] if self._chain else None

    def _check_open(self) -> None:
        if self._done:
            raise CacheInvariantError("this reservation was committed or aborted already")

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise NotPicklableError("a Reservation holds slots and pins; it can be neither copied nor pickled")

    def __repr__(self) -> str:
        state = "done" if self._done else "open"
        return f"Reservation({len(self._chain)} pinned, {len(self._pending)} slots, {state})"


__all__ = ["PrefixIndex", "Reservation", "SlotSource"]
