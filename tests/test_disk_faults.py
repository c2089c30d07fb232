"""The disk tier under faults, with real files: damaged, foreign or misplaced files, links out of the
directory, a full disk, a read-only or vanished directory. A fault is a counted miss or error, never
wrong bytes and never an exception from ``store`` / ``lookup`` / ``retrieve`` / ``lease``; a bad file
is removed, and nothing outside the tier's directory is ever read, written or removed.

A full disk is an ``ENOSPC`` injected at ``os.pwritev`` (the call the tier writes with), and a
read-only directory is ``EROFS`` injected at every call that would change the filesystem: the tests run
as root, for whom ``chmod`` stops nothing, and need no privileges this way. Where the process may mount
filesystems, the same faults are also tested on a real 1 MiB tmpfs and a real read-only bind mount.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from cachetest import CHUNK, cache_pool, prefix_kv
from disktest import chunk_files, disk_full, failing, file_of, mounted, read_only, temp_files, tier
from kvtest import same_bits
from lmcache.chunk_cache import ChunkCache
from lmcache.config import LMCacheMemPoolMetadata
from lmcache.storage_backend.mem_pool import LocalCPUPool
from lmcache.tiers.format import HEADER

PROMPT = [3 * i + 2 for i in range(3 * CHUNK + 5)]  # 3 full chunks and a partial one
CHUNKS = 4
OUTSIDE = b"outside the tier's directory: never touched " * 50


def _written(root: Path, namespace: str = "m") -> tuple[ChunkCache, list[bytes]]:
    """A cache on ``root`` that stored and flushed PROMPT; its tier keys."""
    cache = ChunkCache(cache_pool(), namespace=namespace, disk=tier(root))
    assert cache.store(PROMPT, prefix_kv(PROMPT)) == len(PROMPT)
    assert cache.flush(5.0)
    disk = cache.disk
    assert disk is not None
    return cache, [disk.key(namespace, key) for key in cache.keys(PROMPT)]


def _damage(case: str, path: Path, writer: ChunkCache, keys: list[bytes], outside: Path) -> None:
    """Damage the file of ``keys[1]`` at ``path`` the way ``case`` says."""
    disk = writer.disk
    assert disk is not None
    size = path.stat().st_size
    chunk = prefix_kv(PROMPT)[:, :, CHUNK : 2 * CHUNK]
    if case == "truncated":
        os.truncate(path, size - 100)
    elif case == "payload byte flipped":
        with path.open("r+b") as f:
            f.seek(HEADER.size + 100)
            byte = f.read(1)
            f.seek(HEADER.size + 100)
            f.write(bytes([byte[0] ^ 0x10]))
    elif case == "header byte flipped":
        with path.open("r+b") as f:
            f.seek(20)  # in the checksum field
            byte = f.read(1)
            f.seek(20)
            f.write(bytes([byte[0] ^ 0x01]))
    elif case == "another shape":  # a valid file of this key, of a chunk with one token less
        other = np.ascontiguousarray(chunk[:, :, :-1])
        with tier(disk.path) as another:
            assert another.write(keys[1], other, "float16", other.shape, parent=keys[0])
    elif case == "another dtype":  # the same bytes as int8, twice as many elements: the same size
        other = np.ascontiguousarray(chunk).view(np.int8)
        with tier(disk.path) as another:
            assert another.write(keys[1], other, "int8", other.shape, parent=keys[0])
        assert path.stat().st_size == size
    elif case == "another namespace's file":
        with tier(disk.path) as foreign:
            theirs = foreign.key("n", writer.keys(PROMPT)[1])
            assert foreign.write(theirs, np.ascontiguousarray(chunk), "float16", chunk.shape)
            path.write_bytes(file_of(foreign, theirs).read_bytes())  # the same bytes, under our name
    elif case == "zero length":
        path.write_bytes(b"")
    elif case == "a directory":
        path.unlink()
        path.mkdir()
        (path / "inside").write_bytes(b"x")
    elif case == "a link out of the directory":
        path.unlink()
        path.symlink_to(outside)
    elif case == "a named pipe":  # opening it for reading would block without O_NONBLOCK
        path.unlink()
        os.mkfifo(path)
    else:
        raise AssertionError(case)


CASES = [
    "truncated",
    "payload byte flipped",
    "header byte flipped",
    "another shape",
    "another dtype",
    "another namespace's file",
    "zero length",
    "a directory",
    "a link out of the directory",
    "a named pipe",
]


@pytest.mark.parametrize("when", ["live", "after a restart"])
@pytest.mark.parametrize("case", CASES)
def test_a_bad_file_is_a_counted_miss_and_is_removed(tmp_path: Path, case: str, when: str) -> None:
    outside = tmp_path / "outside.kv"
    outside.write_bytes(OUTSIDE)
    root = tmp_path / "disk"
    writer, keys = _written(root)
    disk = writer.disk
    assert disk is not None
    path = file_of(disk, keys[1])
    _damage(case, path, writer, keys, outside)
    reader_tier = disk if when == "live" else tier(root)
    reader = ChunkCache(cache_pool(), namespace="m", disk=reader_tier)
    kv = prefix_kv(PROMPT)
    out, n = reader.retrieve(PROMPT)
    assert n == CHUNK  # the first chunk; the bad second one ends the prefix
    assert same_bits(out, kv[:, :, :CHUNK])
    assert reader.stats().disk_corrupt == 1
    assert not os.path.lexists(path)  # removed: file, directory or link
    assert outside.read_bytes() == OUTSIDE  # a link's target is never read, written or removed
    assert reader.lookup(PROMPT) == CHUNK  # now a plain miss, not counted again
    assert reader.retrieve(PROMPT)[1] == CHUNK
    assert reader.stats().disk_corrupt == 1
    assert reader.stats().disk_errors == 0
    writer.clear()
    assert writer.store(PROMPT, kv) == len(PROMPT)  # written again: whole again
    assert writer.flush(5.0)
    fresh = ChunkCache(cache_pool(), namespace="m", disk=tier(root))
    out, n = fresh.retrieve(PROMPT)
    assert n == len(PROMPT)
    assert same_bits(out, kv)


def test_a_linked_directory_is_never_followed(tmp_path: Path) -> None:
    """A fan-out directory replaced by a link to a directory elsewhere holding the same files: the tier
    neither reads them, nor removes them, nor writes through the link."""
    root = tmp_path / "disk"
    writer, keys = _written(root)
    disk = writer.disk
    assert disk is not None
    fan = file_of(disk, keys[1]).parent
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(fan, elsewhere)
    before = sorted((p.name, p.read_bytes()) for p in elsewhere.iterdir())
    shutil.rmtree(fan)
    fan.symlink_to(elsewhere, target_is_directory=True)
    for reader_tier in (disk, tier(root)):  # the live index, and a restart's scan
        reader = ChunkCache(cache_pool(), namespace="m", disk=reader_tier)
        assert reader.retrieve(PROMPT)[1] == CHUNK
        assert reader.stats().disk_errors == 0
    writer.clear()
    assert writer.store(PROMPT, prefix_kv(PROMPT)) == len(PROMPT)
    assert writer.flush(5.0)
    assert writer.stats().disk_errors >= 1  # the write through the link was refused
    assert sorted((p.name, p.read_bytes()) for p in elsewhere.iterdir()) == before


# -- a full disk ---------------------------------------------------------------------------------------
def test_a_full_disk_never_raises_and_the_cache_serves_from_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kv = prefix_kv(PROMPT)
    chunk_bytes = HEADER.size + kv[:, :, :CHUNK].nbytes
    failures = disk_full(monkeypatch, free=chunk_bytes + 500)  # one chunk fits, the next one half
    cache = ChunkCache(cache_pool(), namespace="m", disk=tier(tmp_path))
    assert cache.store(PROMPT, kv) == len(PROMPT)
    assert cache.flush(5.0)
    stats = cache.stats()
    assert (stats.disk_writes, stats.disk_errors, stats.disk_dropped) == (1, CHUNKS - 1, CHUNKS - 1)
    assert failures
    assert stats.pinned == 0  # failed writes unpin their chunks
    out, n = cache.retrieve(PROMPT)
    assert n == len(PROMPT)
    assert same_bits(out, kv)
    assert temp_files(tmp_path) == []  # the torn write's temporary file is gone
    assert len(chunk_files(tmp_path)) == 1
    monkeypatch.undo()  # room again: writes go on
    other = [9000 + i for i in range(2 * CHUNK)]
    assert cache.store(other, prefix_kv(other)) == len(other)
    assert cache.flush(5.0)
    assert cache.stats().disk_writes == 3


def test_a_real_full_filesystem(tmp_path: Path) -> None:
    """A 256 KiB tmpfs (where mounting is permitted): writes fail with ENOSPC as the disk fills,
    counted; the files that made it are whole; the cache serves everything from memory."""
    with mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=256k", "tmpfs") as small:
        kv_shape = (2, 2, CHUNK, 2, 64)  # 16 KiB chunks
        prompt = list(range(40 * CHUNK))
        kv = prefix_kv(prompt, "float16", kv_shape)
        pool = LocalCPUPool(
            LMCacheMemPoolMetadata(kv_shape, "float16", 41 * 16 * 1024 / 2**30), backend="numpy"
        )
        disk = tier(small, size_gib=1.0)  # the bound is far above what the filesystem holds
        cache = ChunkCache(pool, namespace="m", disk=disk)
        assert cache.store(prompt, kv) == len(prompt)
        assert cache.flush(10.0)
        stats = cache.stats()
        assert stats.disk_errors >= 1
        assert stats.disk_writes + stats.disk_dropped == 40
        assert temp_files(small) == []
        out, n = cache.retrieve(prompt)
        assert (n, same_bits(out, kv)) == (len(prompt), True)
        cache.close()
        reader = ChunkCache(
            LocalCPUPool(
                LMCacheMemPoolMetadata(kv_shape, "float16", 41 * 16 * 1024 / 2**30), backend="numpy"
            ),
            namespace="m",
            disk=tier(small),
        )
        out, n = reader.retrieve(prompt)
        assert n == stats.disk_writes * CHUNK  # the chunks written before the disk filled, in order
        assert same_bits(out, kv[:, :, :n])
        assert reader.stats().disk_corrupt == 0


# -- a read-only directory -----------------------------------------------------------------------------
def test_a_read_only_directory_is_read_and_never_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, _ = _written(tmp_path)
    writer.close()
    kv = prefix_kv(PROMPT)
    read_only(monkeypatch)
    cache = ChunkCache(cache_pool(), namespace="m", disk=tier(tmp_path))  # built on a read-only directory
    out, n = cache.retrieve(PROMPT)
    assert n == len(PROMPT)
    assert same_bits(out, kv)
    other = [7000 + i for i in range(2 * CHUNK + 3)]
    assert cache.store(other, prefix_kv(other)) == len(other)  # into memory; the disk refuses
    assert cache.flush(5.0)
    stats = cache.stats()
    assert (stats.disk_writes, stats.disk_dropped) == (0, 3)
    assert stats.disk_errors >= 3
    out, n = cache.retrieve(other)
    assert (n, same_bits(out, prefix_kv(other))) == (len(other), True)
    monkeypatch.undo()
    assert len(chunk_files(tmp_path)) == CHUNKS


def test_a_read_only_directory_that_does_not_exist_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read_only(monkeypatch)
    monkeypatch.setattr(os, "mkdir", failing(errno.EROFS, os.mkdir))
    cache = ChunkCache(cache_pool(), namespace="m", disk=tier(tmp_path / "missing"))
    assert cache.stats().disk_errors == 1  # the directory could not be made: counted, not raised
    assert cache.store(PROMPT, prefix_kv(PROMPT)) == len(PROMPT)
    assert cache.flush(5.0)
    assert cache.lookup(PROMPT) == len(PROMPT)
    assert cache.stats().disk_dropped == CHUNKS


def test_a_real_read_only_bind_mount(tmp_path: Path) -> None:
    """Where mounting is permitted: chunks under a read-only bind mount are read; writes fail, counted."""
    writer, _ = _written(tmp_path / "disk")
    writer.close()
    with mounted(tmp_path / "ro", "--bind", "-o", "ro", str(tmp_path / "disk")) as ro:
        cache = ChunkCache(cache_pool(), namespace="m", disk=tier(ro))
        out, n = cache.retrieve(PROMPT)
        assert (n, same_bits(out, prefix_kv(PROMPT))) == (len(PROMPT), True)
        other = [7000 + i for i in range(CHUNK)]
        assert cache.store(other, prefix_kv(other)) == len(other)
        assert cache.flush(5.0)
        assert (cache.stats().disk_writes, cache.stats().disk_dropped) == (0, 1)
        assert cache.stats().disk_errors >= 1
        cache.close()


# -- a vanished directory ------------------------------------------------------------------------------
def test_a_vanished_directory_is_made_again(tmp_path: Path) -> None:
    root = tmp_path / "disk"
    writer, _ = _written(root)
    shutil.rmtree(root)
    reader = ChunkCache(cache_pool(), namespace="m", disk=writer.disk)  # its index still lists them
    assert reader.retrieve(PROMPT)[1] == 0  # gone: misses, forgotten
    assert reader.stats().disk_corrupt == reader.stats().disk_errors == 0
    other = [5000 + i for i in range(2 * CHUNK)]
    assert writer.store(other, prefix_kv(other)) == len(other)
    assert writer.flush(5.0)
    assert writer.stats().disk_writes == CHUNKS + 2  # the directory was made again
    assert len(chunk_files(root)) == 2


def test_a_directory_replaced_by_a_file_counts_errors(tmp_path: Path) -> None:
    root = tmp_path / "disk"
    writer, _ = _written(root)
    shutil.rmtree(root)
    root.write_bytes(b"not a directory")
    other = [5000 + i for i in range(2 * CHUNK)]
    assert writer.store(other, prefix_kv(other)) == len(other)
    assert writer.flush(5.0)
    stats = writer.stats()
    assert (stats.disk_errors, stats.disk_dropped) == (2, 2)
    assert writer.retrieve(other)[1] == len(other)  # from memory
    assert root.read_bytes() == b"not a directory"


def test_reads_of_a_file_that_fails_mid_read_are_counted_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, _ = _written(tmp_path)
    reader = ChunkCache(cache_pool(), namespace="m", disk=writer.disk)
    monkeypatch.setattr(os, "preadv", failing(errno.EIO, os.preadv))
    assert reader.retrieve(PROMPT) == (None, 0)
    assert reader.stats().disk_errors == 1
    monkeypatch.undo()
    assert len(chunk_files(tmp_path)) == CHUNKS  # an I/O error is no reason to remove a file
    assert reader.retrieve(PROMPT)[1] == len(PROMPT)
