"""The disk tier (:class:`lmcache.disk.DiskTier`) on real directories: writes from slots and reads into
slots bit for bit, the restart (every chunk found, no byte read), eviction within ``size_gib``, the
write queue, fsync, arguments, and a state machine against a model (write-behind, flush, eviction,
restart).
"""

from __future__ import annotations

import builtins
import io
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from disktest import chunk_files, file_of, read_chunk, require_disk, shape_of, temp_files, tier
from kvtest import random_bits, same_bits, small_pool, to_native
from lmcache.disk import files as disk_files
from lmcache.errors import BackendUnavailableError, ConfigError
from lmcache.tiers.format import HEADER

SHAPE = shape_of(16)
CHUNK_BYTES = HEADER.size + int(np.prod(SHAPE)) * 2  # float16


def _gib(chunks: float) -> float:
    """``size_gib`` that holds ``chunks`` float16 chunks of SHAPE."""
    return chunks * CHUNK_BYTES / 2**30


# -- bytes in and out of slots ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "float32"])
def test_write_from_slots_and_read_into_slots_bit_exact(tmp_path: Path, backend: str, dtype: str) -> None:
    chunks = [random_bits(shape_of(n), dtype, seed=n) for n in (16, 16, 7)]
    pool = small_pool(backend, dtype)
    done: list[bool] = []
    with tier(tmp_path) as disk:
        keys = [disk.key("m", bytes([i]) * 16) for i in range(3)]
        for i, (key, chunk) in enumerate(zip(keys, chunks, strict=True)):
            obj = pool.put(to_native(chunk, backend))
            assert obj is not None
            parent = keys[i - 1] if i else None
            disk.submit(key, obj.as_numpy(), dtype, chunk.shape, done.append, parent=parent)
        assert disk.flush(5.0)
        assert done == [True, True, True]
        assert disk.stats().writes == 3
        for key, chunk in zip(keys, chunks, strict=True):
            landing = pool.allocate(chunk)
            assert landing is not None
            with disk.stream([key], dtype, [chunk.shape]) as stream:
                assert stream.hit(0)
                assert stream.read_into(landing.as_numpy())  # straight into the slot
            assert same_bits(getattr(landing, f"as_{backend}")(), to_native(chunk, backend))
        stats = disk.stats()
        assert (stats.hits, stats.corrupt, stats.errors, stats.chunks) == (3, 0, 0, 3)


def test_a_stream_reads_in_order_and_ends_at_a_miss(tmp_path: Path) -> None:
    chunks = [random_bits(SHAPE, "float16", seed=i) for i in range(3)]
    with tier(tmp_path) as disk:
        keys = [disk.key("", bytes([i]) * 16) for i in range(4)]
        for key, chunk in zip(keys[:3], chunks, strict=True):
            assert disk.write(key, chunk, "float16", SHAPE)
        with disk.stream(keys, "float16", [SHAPE] * 4) as stream:
            assert stream.hit(1)  # key 0 skipped
            out = np.empty(SHAPE, np.float16)
            assert stream.read_into(out)
            assert out.tobytes() == chunks[1].tobytes()
            assert not stream.hit(1)  # indices only go forward: the stream ends
            assert not stream.hit(2)
        with disk.stream(keys[2:], "float16", [SHAPE] * 2) as stream:
            assert stream.hit(0)
            assert stream.read_into(out)
            assert not stream.hit(1)  # key 3 was never written: a miss ends it
        with disk.stream(keys[:1], "float16", [SHAPE]) as stream:
            assert stream.hit(0)
            with pytest.raises(ConfigError, match="destination"):
                stream.read_into(np.empty(7, np.float16))
        assert disk.stats().misses == 1


# -- restart ---------------------------------------------------------------------------------------
def test_a_new_tier_finds_every_chunk_without_reading_a_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: dict[bytes, np.ndarray] = {}
    with tier(tmp_path) as disk:
        for space in ("llama/bf16/tp0", "llama/bf16/tp1", ""):
            for i in range(5):
                chunk = random_bits(shape_of(16 - i), "float16", seed=len(written))
                key = disk.key(space, bytes([i]) * 16)
                parent = disk.key(space, bytes([i - 1]) * 16) if i else None
                disk.submit(key, chunk, "float16", chunk.shape, parent=parent)
                written[key] = chunk
        assert disk.flush(5.0)
    (tmp_path / "unrelated.txt").write_text("not ours: left alone")

    def no_reading(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the scan read a file")

    with monkeypatch.context() as patched:
        for name in ("read", "readv", "preadv", "pread"):
            patched.setattr(os, name, no_reading)
        patched.setattr(builtins, "open", no_reading)
        patched.setattr(io, "open", no_reading)
        restarted = tier(tmp_path)
    assert len(restarted) == len(written)
    assert set(restarted.keys()) == set(written)
    assert restarted.stats().bytes == sum(HEADER.size + c.nbytes for c in written.values())
    for key, chunk in written.items():
        assert restarted.probe([key], "float16", [chunk.shape]) == [True]
        got = read_chunk(restarted, key, "float16", chunk.shape)
        assert got is not None
        assert got.tobytes() == chunk.tobytes()
    assert (tmp_path / "unrelated.txt").read_text() == "not ours: left alone"
    restarted.close()


def test_stale_temporary_files_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    with tier(tmp_path) as disk:
        key = disk.key("m", bytes(16))
        assert disk.write(key, random_bits(SHAPE, "float16"), "float16", SHAPE)
        directory = file_of(disk, key).parent
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = directory / f".{'ab' * 16}.{dead.pid}.0.tmp"  # its writer is gone
    mine = directory / f".{'cd' * 16}.{os.getpid()}.0.tmp"  # a write of this process, in progress
    old = directory / f".{'ef' * 16}.{os.getpid()}.1.tmp"  # a write an hour old: stale anyway
    for path in (stale, mine, old):
        path.write_bytes(b"partial")
    os.utime(old, (time.time() - 2 * disk_files.STALE_TEMP_SECONDS,) * 2)
    with tier(tmp_path) as restarted:
        assert temp_files(tmp_path) == [mine]
        assert len(restarted) == 1


# -- probe -----------------------------------------------------------------------------------------
def test_probe_checks_sizes_and_looks_for_chunks_other_tiers_wrote(tmp_path: Path) -> None:
    chunk = random_bits(SHAPE, "float16")
    with tier(tmp_path) as reader, tier(tmp_path) as writer:
        keys = [writer.key("m", bytes([i]) * 16) for i in range(3)]
        assert reader.probe(keys, "float16", [SHAPE] * 3) == [False] * 3
        for key in keys[:2]:
            assert writer.write(key, chunk, "float16", SHAPE)
        # the reader's index does not know them: it looks on disk, up to the first key found nowhere
        assert reader.probe(keys, "float16", [SHAPE] * 3) == [True, True, False]
        assert reader.probe(keys[:1], "float16", [shape_of(15)]) == [False]  # another size
        assert reader.probe(keys[:1], "float32", [SHAPE]) == [False]
        got = read_chunk(reader, keys[1], "float16", SHAPE)
        assert got is not None
        assert got.tobytes() == chunk.tobytes()
        with pytest.raises(ConfigError, match="2 keys but 1 shapes"):
            reader.probe(keys[:2], "float16", [SHAPE])


def test_a_miss_in_a_settled_directory_costs_no_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunk = random_bits(SHAPE, "float16")
    with tier(tmp_path) as reader, tier(tmp_path) as writer:
        first, second = (writer.key("m", bytes([7, i]) * 8) for i in range(2))  # one fan-out directory
        assert writer.write(first, chunk, "float16", SHAPE)
        fan = file_of(writer, first).parent
        long_ago = time.time() - 10
        os.utime(fan, (long_ago, long_ago))
        listings: list[str] = []
        real = os.scandir

        def scandir(path: Any) -> Any:
            listings.append(os.fspath(path))
            return real(path)

        monkeypatch.setattr(os, "scandir", scandir)
        assert reader.probe([second], "float16", [SHAPE]) == [False]
        assert listings == [str(fan)]  # listed once: settled since
        assert reader.probe([second], "float16", [SHAPE]) == [False]
        assert read_chunk(reader, second, "float16", SHAPE) is None
        assert listings == [str(fan)]  # unchanged: one lstat per miss, no listing
        assert writer.write(second, chunk, "float16", SHAPE)  # the directory changes
        assert reader.probe([second], "float16", [SHAPE]) == [True]
        assert len(listings) == 2


# -- eviction --------------------------------------------------------------------------------------
def _on_disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in chunk_files(root))


def test_eviction_keeps_the_bound_and_takes_least_recent_leaves(tmp_path: Path) -> None:
    chunk = random_bits(SHAPE, "float16")
    with tier(tmp_path, size_gib=_gib(4)) as disk:
        a = [disk.key("m", b"a" + bytes([i]) * 15) for i in range(3)]  # a prompt of 3 chunks
        b = [disk.key("m", b"b" + bytes([i]) * 15) for i in range(2)]
        for chain in (a[:2], b):
            for i, key in enumerate(chain):
                disk.submit(key, chunk, "float16", SHAPE, parent=chain[i - 1] if i else None)
        assert disk.flush(5.0)
        assert read_chunk(disk, a[1], "float16", SHAPE) is not None  # a[1] is now more recent than b[1]
        disk.submit(a[2], chunk, "float16", SHAPE, parent=a[1])  # a 5th chunk: one must go
        assert disk.flush(5.0)
        assert set(disk.keys()) == {a[0], a[1], a[2], b[0]}  # b[1]: the least recent leaf
        c = disk.key("m", b"c" * 16)
        disk.submit(c, chunk, "float16", SHAPE)
        assert disk.flush(5.0)
        # leaves now: b[0] (a leaf since b[1] left: coldest) and a[2]; b[0] goes
        assert set(disk.keys()) == {a[0], a[1], a[2], c}
        stats = disk.stats()
        assert stats.evicted == 2
        assert stats.bytes == _on_disk_bytes(tmp_path) == 4 * CHUNK_BYTES
        assert stats.bytes <= disk.size_gib * 2**30


def test_a_chunk_that_does_not_fit_is_dropped(tmp_path: Path) -> None:
    done: list[bool] = []
    with tier(tmp_path, size_gib=_gib(0.5)) as disk:
        disk.submit(disk.key("m", bytes(16)), random_bits(SHAPE, "float16"), "float16", SHAPE, done.append)
        assert disk.flush(5.0)
        assert done == [False]
        assert (disk.stats().dropped, len(disk), chunk_files(tmp_path)) == (1, 0, [])


def test_a_smaller_size_at_restart_evicts_the_oldest_down_to_it(tmp_path: Path) -> None:
    chunk = random_bits(SHAPE, "float16")
    with tier(tmp_path) as disk:
        keys = [disk.key("m", bytes([i]) * 16) for i in range(6)]
        for key in keys:
            assert disk.write(key, chunk, "float16", SHAPE)
        paths = [file_of(disk, key) for key in keys]
    now = time.time()
    for age, path in enumerate(reversed(paths)):  # keys[0] the oldest
        os.utime(path, (now - 100 * age,) * 2)
    with tier(tmp_path, size_gib=_gib(3)) as smaller:
        assert set(smaller.keys()) == set(keys[3:])
        assert _on_disk_bytes(tmp_path) == 3 * CHUNK_BYTES
        assert smaller.stats().evicted == 3


def test_reads_refresh_the_order_a_restarted_tier_evicts_in(tmp_path: Path) -> None:
    chunk = random_bits(SHAPE, "float16")
    with tier(tmp_path) as disk:
        keys = [disk.key("m", bytes([i]) * 16) for i in range(3)]
        for key in keys:
            assert disk.write(key, chunk, "float16", SHAPE)
        past = time.time() - 1000
        for key in keys:
            os.utime(file_of(disk, key), (past, past))
        assert read_chunk(disk, keys[0], "float16", SHAPE) is not None  # its file's time: now
    with tier(tmp_path, size_gib=_gib(1)) as smaller:
        assert smaller.keys() == [keys[0]]


# -- the write queue ---------------------------------------------------------------------------------
class _Gate:
    """Holds the first ``os.pwritev`` until opened (a slow disk), then lets every call through."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()
        real = os.pwritev

        def writev(fd: int, buffers: Any, offset: int) -> int:
            self.entered.set()
            self.open.wait(10)
            return int(real(fd, buffers, offset))

        monkeypatch.setattr(os, "pwritev", writev)


def test_a_full_queue_drops_the_oldest_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunk = random_bits(SHAPE, "float16")
    done: list[tuple[str, bool]] = []
    with tier(tmp_path, queue_size=2) as disk:
        gate = _Gate(monkeypatch)
        for name in ("first", "a", "b", "c"):
            key = disk.key("m", name.encode().ljust(16, b"."))
            disk.submit(key, chunk, "float16", SHAPE, lambda ok, name=name: done.append((name, ok)))
            if name == "first":
                assert gate.entered.wait(5)  # the writer holds it
        assert done == [("a", False)]
        stats = disk.stats()
        assert (stats.dropped, stats.pending, stats.writes) == (1, 3, 0)
        assert not disk.flush(0.05)
        gate.open.set()
        assert disk.flush(5.0)
        assert sorted(done) == [("a", False), ("b", True), ("c", True), ("first", True)]
        assert disk.stats().writes == 3


def test_close_is_prompt_while_a_write_hangs_and_later_writes_are_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunk = random_bits(SHAPE, "float16")
    done: list[bool] = []
    disk = tier(tmp_path)
    gate = _Gate(monkeypatch)
    disk.submit(disk.key("m", b"1" * 16), chunk, "float16", SHAPE)
    assert gate.entered.wait(5)
    disk.submit(disk.key("m", b"2" * 16), chunk, "float16", SHAPE, done.append)
    start = time.monotonic()
    disk.close(timeout=0.2)
    assert time.monotonic() - start < 2
    assert done == [False]  # still queued at close: dropped
    disk.submit(disk.key("m", b"3" * 16), chunk, "float16", SHAPE, done.append)
    assert done == [False, False]
    disk.close()  # idempotent
    gate.open.set()
    assert disk.stats().dropped == 2


def test_a_chunk_on_disk_is_refreshed_not_written_again(tmp_path: Path) -> None:
    chunk = random_bits(SHAPE, "float16")
    done: list[bool] = []
    with tier(tmp_path) as disk:
        key = disk.key("m", bytes(16))
        disk.submit(key, chunk, "float16", SHAPE, done.append)
        assert disk.flush(5.0)
        before = file_of(disk, key).stat().st_ino
        disk.submit(key, chunk, "float16", SHAPE, done.append)
        assert done == [True, True]  # the second at once, from submit
        assert disk.flush(5.0)
        assert disk.stats().writes == 1
        assert file_of(disk, key).stat().st_ino == before


def test_fsync_syncs_the_file_before_the_rename_and_the_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append("fsync dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync file")
        real_fsync(fd)

    def rename(src: Any, dst: Any) -> None:
        events.append("rename")
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    chunk = random_bits(SHAPE, "float16")
    with tier(tmp_path / "synced", fsync=True) as disk:
        assert disk.fsync
        assert disk.write(disk.key("m", bytes(16)), chunk, "float16", SHAPE)
        # the first write made the namespace and fan-out directories: their parents are synced too
        assert events[-3:] == ["fsync file", "rename", "fsync dir"]
        events.clear()
        assert disk.write(disk.key("m", bytes(15) + b"\x01"), chunk, "float16", SHAPE)
        assert events == ["fsync file", "rename", "fsync dir"]
    events.clear()
    with tier(tmp_path / "unsynced") as disk:
        assert disk.write(disk.key("m", bytes(16)), chunk, "float16", SHAPE)
        assert events == ["rename"]


# -- keys, arguments, imports ------------------------------------------------------------------------
@pytest.mark.parametrize("namespace", ["", "llama-3-8b/bf16/tp0", "../../etc", "名前", "a" * 300, ".hidden"])
def test_namespace_directories_are_safe_names(tmp_path: Path, namespace: str) -> None:
    with tier(tmp_path) as disk:
        key = disk.key(namespace, bytes(16))
        space, hex_key = disk.layout.split(key)
        assert disk_files.NAMESPACE_DIR.fullmatch(space)
        assert hex_key == "00" * 16
        assert disk.key(namespace + "x", bytes(16)) != key
        assert disk.write(key, random_bits(SHAPE, "float16"), "float16", SHAPE)
        assert file_of(disk, key).resolve().is_relative_to(tmp_path.resolve())


def test_bad_arguments_raise_config_errors(tmp_path: Path) -> None:
    require_disk()
    from lmcache.disk import DiskTier

    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        DiskTier(tmp_path / "file")
    for bad in (0, -1.0, True, "1", float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="size_gib"):
            DiskTier(tmp_path, size_gib=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="queue_size"):
        DiskTier(tmp_path, queue_size=0)
    with pytest.raises(ConfigError, match="fsync"):
        DiskTier(tmp_path, fsync="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="path"):
        DiskTier(3)  # type: ignore[arg-type]
    chunk = random_bits(SHAPE, "float16")
    with DiskTier(tmp_path / "t") as disk:
        for key in (
            b"lmcache:00",
            b"x/00",
            disk.key("m", bytes(16)) + b"/..",
            b"../" + bytes(16).hex().encode(),
        ):
            with pytest.raises(ConfigError, match="not a disk tier key"):
                disk.submit(key, chunk, "float16", SHAPE)
            with pytest.raises(ConfigError, match="not a disk tier key"):
                disk.probe([key], "float16", [SHAPE])
            with pytest.raises(ConfigError, match="not a disk tier key"):
                disk.stream([key], "float16", [SHAPE])
        key = disk.key("m", bytes(16))
        with pytest.raises(ConfigError, match="another namespace"):
            disk.submit(key, chunk, "float16", SHAPE, parent=disk.key("n", bytes(16)))
        with pytest.raises(ConfigError, match="needs"):
            disk.submit(key, chunk, "float16", shape_of(15))
        with pytest.raises(ConfigError, match="C-contiguous"):
            disk.submit(key, np.asfortranarray(chunk), "float16", SHAPE)
        assert disk.flush(1.0)
        assert disk.stats().pending == disk.stats().writes == 0
    assert os.listdir(tmp_path / "t") == []


def test_missing_xxhash_names_the_disk_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmcache.disk import DiskTier

    monkeypatch.setitem(sys.modules, "xxhash", None)
    with pytest.raises(BackendUnavailableError, match=r"pip install 'lmcache-mempool\[disk\]'"):
        DiskTier(tmp_path)


def test_importing_the_disk_tier_imports_no_xxhash() -> None:
    code = (
        "import sys, lmcache.disk, lmcache.chunk_cache; "
        "bad = [m for m in ('xxhash', 'redis', 'torch', 'jax') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "adapters")]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_repr_and_properties(tmp_path: Path) -> None:
    with tier(tmp_path, size_gib=2, queue_size=7, batch_bytes=1 << 20) as disk:
        assert (disk.size_gib, disk.queue_size, disk.batch_bytes, disk.fsync) == (2.0, 7, 1 << 20, False)
        assert disk.path == os.path.realpath(tmp_path)
        assert disk.name == "disk"
        assert repr(disk) == f"DiskTier({disk.path!r}, size_gib=2, fsync=False, 0 chunks)"


# -- the tier against a model ------------------------------------------------------------------------
# A fixed tree of chunks (a key names its prefix, so its parent and bytes never change).
TREE: dict[int, int | None] = {0: None, 1: 0, 2: 1, 3: 0, 4: None, 5: 4, 6: 5}
TOKENS = {0: 16, 1: 16, 2: 5, 3: 9, 4: 16, 5: 16, 6: 12}


class DiskModel(RuleBasedStateMachine):
    """Write-behind, flushes, reads, restarts, and files deleted by hand, on a tier with room for about
    three and a half chunks.

    The model knows each chunk's bytes (a function of its key, as real KV is). After every step: a read
    returns exactly those bytes, or nothing for a chunk not on disk; the files stay within
    ``size_gib``; the chunks on disk are prefix-closed (only leaves are evicted, never the parent of the
    chunk being written) but for the children of a file deleted by hand; after a flush the chunk
    written last is on disk; a restarted tier finds exactly the chunks there were.
    """

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="lmcache-disk-model-"))
        self.capacity = 3.5 * CHUNK_BYTES
        self.disk = tier(self.root, size_gib=self.capacity / 2**30, queue_size=64)
        self.keys = {i: self.disk.key("model", bytes([i]) * 16) for i in TREE}
        self.bytes = {i: random_bits(shape_of(TOKENS[i]), "float16", seed=i) for i in TREE}
        self.last: int | None = None
        self.orphans: set[int] = set()  # chunks whose parent file was deleted by hand

    def _on_disk(self) -> set[int]:
        present = set(self.disk.keys())
        return {i for i, key in self.keys.items() if key in present}

    def _submit(self, i: int) -> None:
        parent = TREE[i]
        chunk = self.bytes[i]
        self.disk.submit(
            self.keys[i], chunk, "float16", chunk.shape, parent=None if parent is None else self.keys[parent]
        )
        self.orphans.discard(i)

    @rule(i=st.sampled_from(sorted(TREE)))
    def write(self, i: int) -> None:
        if TREE[i] is not None and TREE[i] not in self._on_disk():
            return  # a cache writes a chunk after its parent
        self._submit(i)
        assert self.disk.flush(5.0)
        self.last = i

    @rule(leaf=st.sampled_from([2, 3, 6]), reader=st.sampled_from(sorted(TREE)))
    def write_a_path_behind_while_reading(self, leaf: int, reader: int) -> None:
        path = [leaf]
        while TREE[path[-1]] is not None:
            path.append(TREE[path[-1]])  # type: ignore[arg-type]
        for i in reversed(path):  # queued in prefix order, written by the writer thread meanwhile
            self._submit(i)
            self.read(reader, strict=False)
        assert self.disk.flush(5.0)
        self.last = leaf

    @rule(i=st.sampled_from(sorted(TREE)))
    def read(self, i: int, strict: bool = True) -> None:
        there = i in self._on_disk()
        got = read_chunk(self.disk, self.keys[i], "float16", self.bytes[i].shape)
        if got is not None:
            assert got.tobytes() == self.bytes[i].tobytes()
        if strict:  # with writes in flight a chunk may be evicted between the two looks
            assert (got is not None) == there

    @rule()
    def restart(self) -> None:
        before = self._on_disk()
        self.disk.close()
        self.disk = tier(self.root, size_gib=self.capacity / 2**30, queue_size=64)
        assert self._on_disk() == before

    @precondition(lambda self: bool(self._on_disk()))
    @rule(data=st.data())
    def delete_a_file_by_hand(self, data: st.DataObject) -> None:
        on_disk = self._on_disk()
        i = data.draw(st.sampled_from(sorted(on_disk)))
        file_of(self.disk, self.keys[i]).unlink()
        assert read_chunk(self.disk, self.keys[i], "float16", self.bytes[i].shape) is None  # forgotten
        self.orphans |= {child for child in on_disk if TREE[child] == i}
        if self.last == i:
            self.last = None

    @invariant()
    def within_bounds_and_prefix_closed(self) -> None:
        on_disk = self._on_disk()
        assert sum(p.stat().st_size for p in chunk_files(self.root)) <= self.capacity
        assert self.disk.stats().bytes <= self.capacity
        for i in on_disk:
            assert TREE[i] is None or TREE[i] in on_disk or i in self.orphans
        if self.last is not None:
            assert self.last in on_disk
        stats = self.disk.stats()
        assert (stats.corrupt, stats.errors, stats.dropped) == (0, 0, 0)

    def teardown(self) -> None:
        self.disk.close()
        shutil.rmtree(self.root, ignore_errors=True)


def test_disk_tier_state_machine() -> None:
    require_disk()
    run_state_machine_as_test(
        DiskModel, settings=settings(max_examples=40, stateful_step_count=25, deadline=None)
    )


def test_bench_section_measures_against_plain_file_io(tmp_path: Path) -> None:
    require_disk()
    from lmcache.bench import Options
    from lmcache.bench.disk import SCAN_CHUNKS, bench_disk

    results = bench_disk(["numpy"], Options(repeat=1, progress=None, disk_dir=str(tmp_path)))
    assert [r.metric for r in results] == [
        "disk write (256 KiB chunk)",
        "disk read (256 KiB chunk)",
        "xxh3_64 over a 256 KiB chunk",
        "disk write (32 MiB chunk)",
        "disk read (32 MiB chunk)",
        "disk write, fsync (32 MiB chunk)",
        "disk read, device (32 MiB chunk)",
        "xxh3_64 over a 32 MiB chunk",
        *(f"disk restart: scan of {n // 4} chunk files" for n in SCAN_CHUNKS),
    ]  # no TTFT rows: torch is not among the backends
    for result in results:
        assert result.baseline is not None
        if result.ratio is not None and result.metric.startswith("disk "):
            assert result.ratio == pytest.approx(
                result.baseline / result.value if result.unit == "ms" else result.value / result.baseline
            )
    assert [r.target for r in results[3:7]] == [0.8, 0.8, None, 0.8]
    assert os.listdir(tmp_path) == []  # its workspace is removed
