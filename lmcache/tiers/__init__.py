"""The tiers below the chunk cache's slots, and what they share.

- :mod:`lmcache.tiers.base`: the :class:`~lmcache.tiers.base.Tier` protocol (write-behind, probe, read
  into a slot) that :class:`~lmcache.disk.DiskTier` and :class:`~lmcache.remote.RedisTier` implement;
- :mod:`lmcache.tiers.chain`: :class:`~lmcache.tiers.chain.TierChain`, the cache's glue to its tiers in
  read order (disk, then remote);
- :mod:`lmcache.tiers.format`: the value format both store (a 64-byte header with an ``xxh3_64``
  checksum over key, header and payload, then the chunk's bytes);
- :mod:`lmcache.tiers.writer`: the bounded write queue and its background thread;
- :mod:`lmcache.tiers.counters`: the live counters every tier keeps.
"""
