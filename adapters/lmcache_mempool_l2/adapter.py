"""``MempoolL2Adapter``: an L2 adapter of LMCache's server mode over this project's
:class:`~lmcache.chunk_cache.ChunkCache`.

LMCache's L2 controllers hand an L2 adapter batches of ``ObjectKey`` and ``MemoryObj`` (L1 buffers
they own) through a non-blocking interface: ``submit_*`` returns a task id at once, the adapter signals
an event fd per operation kind when a task completes, and the controller polls the result
(``pop_completed_store_tasks``, ``query_lookup_and_lock_result``, ``query_load_result``).

Here every object is one single-chunk entry of the cache, keyed by a 16-byte ``blake2b`` of all the
``ObjectKey`` fields (chunk hash, model, KV rank, object group, cache salt) seeded with a namespace. A
slot holds a 16-byte header (the object's byte count) and the object's bytes, copied as raw bytes from
the ``MemoryObj``'s tensor, so any layout and dtype round-trips bit-exactly. Slots are
``max_object_bytes`` plus the header; smaller objects (a last partial chunk, a smaller object group)
take a whole slot.

With ``socket_path``, the objects live in this project's shared host cache server
(``python -m lmcache serve``, :mod:`lmcache.shared`) instead of this process: every LMCache server on the
host that connects to it shares them (LMCache's ``shared`` L2 flag then says so), and the server's
policy evicts for all of them.

Tasks run on a thread pool (``num_workers``, default 2: LMCache's store and prefetch controllers call
concurrently). ``submit_lookup_and_lock_task`` leases each found chunk (the cache never evicts a leased
chunk) until ``submit_unlock`` of its key; a key locked twice needs two unlocks. Chunks the cache evicts
to make room, and those :meth:`MempoolL2Adapter.delete` drops, are reported to LMCache's listeners as
deleted, so its byte accounting follows the cache.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lmcache_mempool_l2.packages import join_lmcache

join_lmcache()

import torch  # noqa: E402

from lmcache.cache_records import Lease  # noqa: E402
from lmcache.chunk_cache import ChunkCache  # noqa: E402
from lmcache.config import LMCacheMemPoolMetadata  # noqa: E402
from lmcache.errors import ChunkShapeError, ChunkTypeError, ConfigError  # noqa: E402
from lmcache.lmcache_native import Bitmap  # noqa: E402
from lmcache.policies import POLICIES, make_policy  # noqa: E402
from lmcache.policies.base import Key  # noqa: E402
from lmcache.policies.recorder import EvictionRecorder  # noqa: E402
from lmcache.shared import SharedChunkCache, connect  # noqa: E402
from lmcache.storage_backend.mem_pool import LocalCPUPool  # noqa: E402
from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey  # noqa: E402
from lmcache.v1.distributed.internal_api import L2StoreResult  # noqa: E402
from lmcache.v1.distributed.l2_adapters.base import L2AdapterInterface, L2TaskId  # noqa: E402
from lmcache.v1.distributed.l2_adapters.config import L2AdapterConfigBase  # noqa: E402
from lmcache.v1.memory_management import MemoryObj  # noqa: E402
from lmcache.v1.platform import create_event_notifier  # noqa: E402

logger = logging.getLogger(__name__)

#: Bytes before an object's bytes in its slot: its byte count (little-endian uint64), then zeros.
HEADER_BYTES = 16
DEFAULT_CACHE_GIB = 1.0
DEFAULT_NUM_WORKERS = 2
#: ``adapter_params`` keys this adapter reads.
OPTIONS = ("max_object_bytes", "cache_gib", "policy", "namespace", "num_workers", "socket_path")


def _number(params: dict[str, Any], name: str, default: float | None, *, integer: bool) -> float:
    """``params[name]`` (or ``default``) checked to be a number > 0 (an int where ``integer``).

    Raises:
        ConfigError: it is not (the message names the key).
    """
    value = params.get(name, default)
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not isinstance(value, (int, float)):
        value = None
    if value is None or value <= 0:
        what = "an int" if integer else "a number"
        raise ConfigError(f"adapter_params {name} must be {what} > 0, got {params.get(name, default)!r}")
    return float(value)


class MempoolL2AdapterConfig(L2AdapterConfigBase):  # type: ignore[misc]
    """The adapter's settings, parsed from the plugin's ``adapter_params`` (LMCache's plugin factory
    finds this class by the ``<class_name>Config`` convention and calls :meth:`from_dict`).

    Args:
        max_object_bytes: the largest ``MemoryObj`` stored (bytes of one KV chunk of LMCache's layout):
            the slot size, less the header. Required.
        cache_gib: the host memory budget of the pool, in GiB (default 1).
        policy: an eviction policy name of :data:`lmcache.policies.POLICIES` (default: the cache's).
        namespace: seeds every key: adapters whose chunks must never mix use different ones.
        num_workers: threads running the tasks (default 2).
        socket_path: the socket of a shared host cache server (``python -m lmcache serve --socket PATH
            --kv-shape 1,1,1,1,N --dtype uint8``, N at least ``max_object_bytes`` + 16) to keep the
            objects in; None (default): a pool in this process. The server sets the memory and the
            policy: ``cache_gib`` and ``policy`` are refused with it.

    Raises:
        ConfigError: a value is unusable (the message names the key).
    """

    def __init__(
        self,
        max_object_bytes: int,
        cache_gib: float = DEFAULT_CACHE_GIB,
        policy: str | None = None,
        namespace: str = "",
        num_workers: int = DEFAULT_NUM_WORKERS,
        socket_path: str | None = None,
    ) -> None:
        params = {"max_object_bytes": max_object_bytes, "cache_gib": cache_gib, "num_workers": num_workers}
        self.max_object_bytes = int(_number(params, "max_object_bytes", None, integer=True))
        self.cache_gib = float(_number(params, "cache_gib", DEFAULT_CACHE_GIB, integer=False))
        self.num_workers = int(_number(params, "num_workers", DEFAULT_NUM_WORKERS, integer=True))
        if policy is not None and (not isinstance(policy, str) or policy not in POLICIES):
            raise ConfigError(f"adapter_params policy must be one of {sorted(POLICIES)}, got {policy!r}")
        if not isinstance(namespace, str):
            raise ConfigError(f"adapter_params namespace must be a str, got {namespace!r}")
        if socket_path is not None and (not isinstance(socket_path, str) or not socket_path):
            raise ConfigError(f"adapter_params socket_path must be a path (str), got {socket_path!r}")
        self.policy = policy
        self.namespace = namespace
        self.socket_path = socket_path

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MempoolL2AdapterConfig:
        """Parse ``adapter_params``; an unknown key is refused (a typo would silently be a default).

        Raises:
            ConfigError: an unknown key, a missing ``max_object_bytes``, or an unusable value.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"adapter_params must be a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - set(OPTIONS) - {"type"})
        if unknown:
            raise ConfigError(f"adapter_params has unknown keys {unknown}; known: {list(OPTIONS)}")
        if "max_object_bytes" not in d:
            raise ConfigError(
                "adapter_params needs max_object_bytes: the byte size of one KV chunk in LMCache's L1 "
                "(num_layers * 2 * chunk_size * num_kv_heads * head_size * dtype bytes)"
            )
        if d.get("socket_path") is not None:
            local = sorted({"cache_gib", "policy"} & set(d))
            if local:
                raise ConfigError(
                    f"adapter_params {local} do not apply with socket_path: the shared cache server sets "
                    "its memory and policy (python -m lmcache serve --size-gib N --policy NAME)"
                )
        return cls(
            d["max_object_bytes"],
            d.get("cache_gib", DEFAULT_CACHE_GIB),
            d.get("policy"),
            d.get("namespace", ""),
            d.get("num_workers", DEFAULT_NUM_WORKERS),
            d.get("socket_path"),
        )

    @classmethod
    def help(cls) -> str:
        """The fields, for LMCache's command-line help."""
        return (
            "lmcache-mempool L2 adapter (plugin) adapter_params:\n"
            "- max_object_bytes (int): bytes of one KV chunk object (required)\n"
            f"- cache_gib (float): host memory budget in GiB (default {DEFAULT_CACHE_GIB})\n"
            f"- policy (str): eviction policy, one of {sorted(POLICIES)}\n"
            "- namespace (str): seeds every key (default '')\n"
            f"- num_workers (int): task threads (default {DEFAULT_NUM_WORKERS})\n"
            "- socket_path (str): a shared host cache server's socket (python -m lmcache serve)"
        )


def _object_bytes(obj: MemoryObj) -> torch.Tensor:
    """The ``get_size()`` bytes of ``obj`` as a 1-D ``uint8`` view of its tensor (no copy: a store reads
    it, a load writes it).

    Raises:
        ChunkTypeError: ``obj`` has no tensor (invalidated) or a non-contiguous one.
        ChunkShapeError: its tensor holds fewer bytes than ``get_size()``.
    """
    raw = obj.raw_tensor
    if not isinstance(raw, torch.Tensor):
        raise ChunkTypeError(f"{type(obj).__name__} has no tensor (invalidated, or not tensor-backed)")
    if not raw.is_contiguous():
        raise ChunkTypeError(f"{type(obj).__name__}'s tensor is not contiguous: its bytes cannot be viewed")
    flat = raw.reshape(-1).view(torch.uint8)
    size = obj.get_size()
    if size > flat.numel():
        raise ChunkShapeError(f"{type(obj).__name__} says {size} bytes but its tensor holds {flat.numel()}")
    return flat[:size]


class MempoolL2Adapter(L2AdapterInterface):  # type: ignore[misc]
    """LMCache's ``L2AdapterInterface`` over an in-process :class:`~lmcache.chunk_cache.ChunkCache`.

    Args:
        config: a :class:`MempoolL2AdapterConfig`, or the raw ``adapter_params`` dict.
        l1_memory_desc: what LMCache's plugin factory passes when it knows its L1 buffer (unused: the
            copies go through each object's tensor).

    Raises:
        ConfigError: ``config`` is unusable (the message names the key).
    """

    config_class_name = "MempoolL2AdapterConfig"

    def __init__(self, config: MempoolL2AdapterConfig | dict[str, Any], l1_memory_desc: Any = None) -> None:
        if isinstance(config, dict):
            config = MempoolL2AdapterConfig.from_dict(config)
        if not isinstance(config, MempoolL2AdapterConfig):
            raise ConfigError(
                f"config must be a MempoolL2AdapterConfig or a dict, got {type(config).__name__}"
            )
        slot = config.max_object_bytes + HEADER_BYTES
        namespace = "lmcache-l2|" + config.namespace
        self._evicted: deque[Key] = deque()  # digests the cache evicted, not yet reported
        #: The pool the objects' bytes live in (None with a shared cache server: the server's).
        self.pool: LocalCPUPool | None = None
        #: The cache holding one entry per stored key: in this process, or a shared server's client.
        self.cache: ChunkCache | SharedChunkCache
        if config.socket_path is None:
            meta = LMCacheMemPoolMetadata((1, 1, 1, 1, slot), "uint8", config.cache_gib)
            self.pool = LocalCPUPool(meta, backend="torch")
            policy = EvictionRecorder(
                make_policy(config.policy, self.pool.max_chunk_num), self._evicted.append
            )
            self.cache = ChunkCache(self.pool, namespace=namespace, policy=policy)
            capacity = self.pool.max_chunk_num * config.max_object_bytes
        else:
            self.cache = connect(config.socket_path, backend="torch", namespace=namespace)
            layout = self.cache.layout
            fits = layout.kv_shape[:4] == (1, 1, 1, 1) and layout.chunk_bytes >= slot
            if not fits or layout.dtype.name != "uint8":
                self.cache.close()
                raise ConfigError(
                    f"the cache server at {config.socket_path} keeps chunks of shape {layout.kv_shape} "
                    f"{layout.dtype.name}; this adapter needs (1, 1, 1, 1, N) uint8 with N >= {slot} "
                    f"(max_object_bytes + {HEADER_BYTES}): start it with --kv-shape 1,1,1,1,{slot} "
                    "--dtype uint8"
                )
            capacity = 0  # the server evicts for all its clients: no aggregate eviction from LMCache
        super().__init__(max_capacity_bytes=capacity)
        self.config = config
        self._root = hashlib.blake2b(namespace.encode(), digest_size=16).digest()
        self._lock = threading.Lock()
        self._closed = False
        self._next_task: L2TaskId = 0
        self._stores: dict[L2TaskId, L2StoreResult] = {}
        self._lookups: dict[L2TaskId, Bitmap] = {}
        self._loads: dict[L2TaskId, Bitmap] = {}
        self._leases: dict[ObjectKey, list[Lease]] = defaultdict(list)
        # What LMCache was told is stored, by digest, for its accounting.
        self._sizes: dict[bytes, tuple[ObjectKey, int]] = {}
        self._store_fd = create_event_notifier()
        self._lookup_fd = create_event_notifier()
        self._load_fd = create_event_notifier()
        self._workers = ThreadPoolExecutor(config.num_workers, thread_name_prefix="lmcache-mempool-l2")

    # -- keys ------------------------------------------------------------------------------------------
    def digest(self, key: ObjectKey) -> bytes:
        """The cache key of ``key``: every field of it, length-prefixed, hashed with the namespace."""
        h = hashlib.blake2b(key=self._root, digest_size=16, person=b"lmcache-l2")
        for text in (key.model_name, key.cache_salt):
            data = text.encode()
            h.update(struct.pack("<Q", len(data)) + data)
        h.update(struct.pack("<Q", len(key.chunk_hash)) + bytes(key.chunk_hash))
        h.update(struct.pack("<qq", key.kv_rank, key.object_group_id))
        return h.digest()

    # -- event fds -------------------------------------------------------------------------------------
    def get_store_event_fd(self) -> int:
        """The fd signalled when a store task completes."""
        return int(self._store_fd.fileno())

    def get_lookup_and_lock_event_fd(self) -> int:
        """The fd signalled when a lookup-and-lock task completes."""
        return int(self._lookup_fd.fileno())

    def get_load_event_fd(self) -> int:
        """The fd signalled when a load task completes."""
        return int(self._load_fd.fileno())

    # -- tasks -----------------------------------------------------------------------------------------
    def _submit(self, run: Callable[[L2TaskId], None]) -> L2TaskId:
        with self._lock:
            if self._closed:
                raise ConfigError("this L2 adapter was closed: create a new one")
            task_id = self._next_task
            self._next_task += 1
            self._workers.submit(run, task_id)  # under the lock: close() cannot shut the pool between
        return task_id

    def _check_batch(self, keys: list[ObjectKey], objects: list[MemoryObj]) -> None:
        if len(keys) != len(objects):
            raise ChunkShapeError(f"{len(keys)} keys need {len(keys)} memory objects, got {len(objects)}")

    def submit_store_task(self, keys: list[ObjectKey], objects: list[MemoryObj]) -> L2TaskId:
        """Queue a store of ``objects`` under ``keys``; return its task id at once.

        A key stored already is skipped; an object the pool has no slot for (every slot leased) is not
        stored, as LMCache's own adapters skip what does not fit. The task fails (its result is not
        successful) when an object is larger than ``max_object_bytes`` or unreadable; the others of the
        batch are still stored.

        Raises:
            ChunkShapeError: ``keys`` and ``objects`` differ in length (nothing is queued).
        """
        self._check_batch(keys, objects)
        return self._submit(lambda task_id: self._run_store(task_id, list(keys), list(objects)))

    def _run_store(self, task_id: L2TaskId, keys: list[ObjectKey], objects: list[MemoryObj]) -> None:
        ok = True
        stored: list[ObjectKey] = []
        sizes: list[int] = []
        try:
            for key, obj in zip(keys, objects, strict=True):
                try:
                    size = self._store_one(key, obj)
                except Exception:  # a task reports its failure through its result
                    logger.exception("lmcache-mempool L2 adapter: storing %s failed", key)
                    ok = False
                    continue
                if size is not None:
                    stored.append(key)
                    sizes.append(size)
            with self._lock:
                for key, size in zip(stored, sizes, strict=True):
                    self._sizes[self.digest(key)] = (key, size)
            self._report_evictions()
            if stored:
                self._notify_keys_stored(stored, sizes)
        except Exception:  # a listener that raised: the task still completes, as failed
            logger.exception("lmcache-mempool L2 adapter: store task %d failed", task_id)
            ok = False
        finally:
            with self._lock:
                self._stores[task_id] = L2StoreResult(ok, sum(sizes))
            self._store_fd.notify()

    def _store_one(self, key: ObjectKey, obj: MemoryObj) -> int | None:
        """Copy ``obj`` into a new slot under ``key``; its byte count, or None when not stored now."""
        src = _object_bytes(obj)
        size = src.numel()
        if size > self.config.max_object_bytes:
            raise ChunkShapeError(
                f"an object of {size} bytes does not fit max_object_bytes {self.config.max_object_bytes}: "
                "raise max_object_bytes in adapter_params"
            )
        with self.cache.begin_store([self.digest(key)], 1) as pending:
            if pending.cached or not pending.slots:
                return None  # stored already, or no slot free of leases
            slot = pending.slots[0].as_torch().reshape(-1)
            header = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
            header[:8] = torch.frombuffer(bytearray(struct.pack("<Q", size)), dtype=torch.uint8)
            slot[:HEADER_BYTES].copy_(header)
            slot[HEADER_BYTES : HEADER_BYTES + size].copy_(src)
            pending.commit()
        return size

    def _report_evictions(self) -> None:
        """Tell LMCache's listeners about the stored keys the cache evicted since the last call (a shared
        server evicts for every client: nothing is recorded there)."""
        gone: list[ObjectKey] = []
        sizes: list[int] = []
        with self._lock:
            while self._evicted:
                digest = self._evicted.popleft()
                entry = self._sizes.pop(digest, None) if isinstance(digest, bytes) else None
                if entry is not None:
                    gone.append(entry[0])
                    sizes.append(entry[1])
        if gone:
            self._notify_keys_deleted(gone, sizes)

    def pop_completed_store_tasks(self) -> dict[L2TaskId, L2StoreResult]:
        """The results of the store tasks completed since the last call, by task id."""
        with self._lock:
            done, self._stores = self._stores, {}
        return done

    def submit_lookup_and_lock_task(
        self, keys: list[ObjectKey], group_layout_descs: dict[int, MemoryLayoutDesc]
    ) -> L2TaskId:
        """Queue a lookup of ``keys`` that leases each one found (pinned until :meth:`submit_unlock`);
        return its task id at once. ``group_layout_descs`` is LMCache's advisory layout hint (unused)."""
        return self._submit(lambda task_id: self._run_lookup(task_id, list(keys)))

    def _run_lookup(self, task_id: L2TaskId, keys: list[ObjectKey]) -> None:
        bitmap = Bitmap(len(keys))
        try:
            for i, key in enumerate(keys):
                try:
                    lease = self.cache.lease_keys([self.digest(key)], 1)
                except Exception:  # a failed lookup of one key is a miss
                    logger.exception("lmcache-mempool L2 adapter: looking up %s failed", key)
                    continue
                if not lease.num_tokens:
                    lease.release()
                    continue
                with self._lock:
                    self._leases[key].append(lease)
                bitmap.set(i)
        finally:
            with self._lock:
                self._lookups[task_id] = bitmap
            self._lookup_fd.notify()

    def query_lookup_and_lock_result(self, task_id: L2TaskId) -> Bitmap | None:
        """The bitmap of a completed lookup-and-lock task (1: found and locked), once; None before."""
        with self._lock:
            return self._lookups.pop(task_id, None)

    def submit_unlock(self, keys: list[ObjectKey]) -> None:
        """Release one lock of each of ``keys`` (a key not locked is ignored). Done at once: releasing a
        lease cannot fail, and LMCache never retries an unlock."""
        with self._lock:
            leases = []
            for key in keys:
                held = self._leases.get(key)
                if held:
                    leases.append(held.pop())
                    if not held:
                        del self._leases[key]
        for lease in leases:
            lease.release()

    def submit_load_task(self, keys: list[ObjectKey], objects: list[MemoryObj]) -> L2TaskId:
        """Queue a copy of the objects of ``keys`` into ``objects`` (LMCache's buffers); return its task id
        at once. A key is loaded (its bit set) when it is stored and its object has exactly the stored
        byte count; otherwise its buffer is left untouched.

        Raises:
            ChunkShapeError: ``keys`` and ``objects`` differ in length (nothing is queued).
        """
        self._check_batch(keys, objects)
        return self._submit(lambda task_id: self._run_load(task_id, list(keys), list(objects)))

    def _run_load(self, task_id: L2TaskId, keys: list[ObjectKey], objects: list[MemoryObj]) -> None:
        bitmap = Bitmap(len(keys))
        loaded: list[ObjectKey] = []
        try:
            for i, (key, obj) in enumerate(zip(keys, objects, strict=True)):
                try:
                    found = self._load_one(key, obj)
                except Exception:  # a failed load of one key is reported by its bit
                    logger.exception("lmcache-mempool L2 adapter: loading %s failed", key)
                    continue
                if found:
                    bitmap.set(i)
                    loaded.append(key)
            if loaded:
                self._notify_keys_accessed(loaded)
        except Exception:  # a listener that raised: the bytes are loaded, the task completes
            logger.exception("lmcache-mempool L2 adapter: load task %d: a listener failed", task_id)
        finally:
            with self._lock:
                self._loads[task_id] = bitmap
            self._load_fd.notify()

    def _load_one(self, key: ObjectKey, obj: MemoryObj) -> bool:
        dst = _object_bytes(obj)
        with self.cache.lease_keys([self.digest(key)], 1) as pin:
            if not pin.num_tokens:
                return False
            slot = pin.chunks[0].as_torch().reshape(-1)
            size = int.from_bytes(bytes(slot[:8].tolist()), "little")
            if size != dst.numel():
                raise ChunkShapeError(
                    f"the stored object of {key} has {size} bytes; the load buffer has {dst.numel()}"
                )
            dst.copy_(slot[HEADER_BYTES : HEADER_BYTES + size])
        return True

    def query_load_result(self, task_id: L2TaskId) -> Bitmap | None:
        """The bitmap of a completed load task (1: loaded), once; None before."""
        with self._lock:
            return self._loads.pop(task_id, None)

    # -- eviction, status, lifecycle ---------------------------------------------------------------------
    def delete(self, keys: list[ObjectKey]) -> None:
        """Drop ``keys`` from the cache now (LMCache's L2 eviction calls this); a locked key, or one not
        stored, stays. Listeners hear of the keys dropped. With a shared cache server nothing is dropped
        (its protocol has no delete; its policy evicts)."""
        if not isinstance(self.cache, ChunkCache):
            logger.debug("lmcache-mempool L2 adapter: delete of %d keys ignored (shared server)", len(keys))
            return
        dropped = self.cache.discard_keys(list(dict.fromkeys(self.digest(key) for key in keys)))
        gone: list[ObjectKey] = []
        sizes: list[int] = []
        with self._lock:
            for digest in dropped:
                entry = self._sizes.pop(digest, None)
                if entry is not None:
                    gone.append(entry[0])
                    sizes.append(entry[1])
        if gone:
            self._notify_keys_deleted(gone, sizes)

    def report_status(self) -> dict[str, Any]:
        """Health and the cache's counters, for LMCache's status endpoint."""
        stats = self.cache.stats()
        with self._lock:
            locked = sum(len(held) for held in self._leases.values())
        return {
            "is_healthy": not self._closed,
            "type": type(self).__name__,
            "stored_object_count": stats.chunks,
            "locked_key_count": locked,
            "slots": self.pool.max_chunk_num if self.pool is not None else None,
            "socket_path": self.config.socket_path,
            "evicted": stats.evicted,
            "max_capacity_bytes": self._max_capacity_bytes,
        }

    def close(self) -> None:
        """Finish the queued tasks, release every lock, close the pool and the event fds; closing twice
        does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._workers.shutdown(wait=True)
        with self._lock:
            leases = [lease for held in self._leases.values() for lease in held]
            self._leases.clear()
        for lease in leases:
            lease.release()
        self.cache.close()
        if self.pool is not None:
            self.pool.close()
        for notifier in (self._store_fd, self._lookup_fd, self._load_fd):
            notifier.close()


__all__ = ["HEADER_BYTES", "OPTIONS", "MempoolL2Adapter", "MempoolL2AdapterConfig"]
