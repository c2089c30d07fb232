"""The disk tier: KV chunks kept in a directory, found again after a restart.

``ChunkCache(pool, disk=DiskTier(path, size_gib=...))`` (or ``disk="path"``) writes every chunk it
stores behind to one file per chunk and reads chunks it lacks from there, straight into a slot. Read
order: local slots, then disk, then remote. The parts:

- :mod:`lmcache.disk.tier`, :class:`DiskTier`: the tier (the :class:`~lmcache.tiers.base.Tier`
  protocol), its write queue (:mod:`lmcache.tiers.writer`) and counters (:class:`DiskStats`);
- :mod:`lmcache.disk.store`, :class:`~lmcache.disk.store.ChunkFiles`: the index kept in step with the
  directory (writes with eviction, files other processes wrote, bad files removed, the restart);
- :mod:`lmcache.disk.files`: the directory's layout, the atomic write (temporary name, then rename), the
  scan at start, and removal that never leaves the directory;
- :mod:`lmcache.disk.index`: which chunks are on disk, and LRU eviction among leaves within ``size_gib``;
- :mod:`lmcache.disk.stream`: reads of chunk files into slots, checked piece by piece.

Each file holds the remote tier's value format (:mod:`lmcache.tiers.format`: the 64-byte header with an
``xxh3_64`` checksum over key, header and payload), so a torn, truncated or foreign file is a counted
miss, never returned. Importing this package imports no ``xxhash``: a tier imports it when it is built
(``pip install 'lmcache-mempool[disk]'``).
"""

from lmcache.disk.files import namespace_dir
from lmcache.disk.stream import DiskStream
from lmcache.disk.tier import DISK_HINT, DiskStats, DiskTier

__all__ = ["DISK_HINT", "DiskStats", "DiskStream", "DiskTier", "namespace_dir"]
