"""The disk tier with real processes: writers killed with SIGKILL at random moments and mid-write, and
two processes sharing one directory (one writing, one reading).

After a kill, a new tier on the directory must see only complete chunks, each bit-exact, and no
temporary file of the dead writer.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from disk_peer import CHUNK_TOKENS, DTYPE, NAMESPACE, SHAPE, cache, kv_of, prompt

from disktest import chunk_files, file_of, read_chunk, require_disk, run_peer, start_peer, temp_files, tier


def _wait_for(process: subprocess.Popen[str], line: str) -> None:
    assert process.stdout is not None
    got = process.stdout.readline().strip()
    assert got == line, f"the peer printed {got!r} instead of {line!r} (exit code {process.poll()})"


def _kill(process: subprocess.Popen[str]) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait(10)
    assert process.returncode == -signal.SIGKILL
    if process.stdout is not None:
        process.stdout.close()


def _check_complete(directory: Path, prompts: int) -> int:
    """A restarted cache on ``directory``: every chunk file is whole and every prompt's cached prefix
    is bit-exact; returns how many chunk files there are."""
    restarted = cache(str(directory), size_gib=0.1)
    disk = restarted.disk
    assert disk is not None
    assert temp_files(directory) == []  # the dead writer's temporary files are gone
    owner = {disk.key(NAMESPACE, key): i for i in range(prompts) for key in restarted.keys(prompt(i))}
    on_disk = disk.keys()
    assert set(on_disk) <= set(owner)  # nothing but chunks of the prompts written
    for key in on_disk:
        tokens = (file_of(disk, key).stat().st_size - 64) // (SHAPE[0] * SHAPE[1] * SHAPE[3] * SHAPE[4] * 2)
        assert read_chunk(disk, key, DTYPE, (*SHAPE[:2], tokens, *SHAPE[3:])) is not None
    for i in sorted({owner[key] for key in on_disk}):
        tokens = prompt(i)
        out, n = restarted.retrieve(tokens)
        if n:
            assert out.tobytes() == kv_of(tokens)[:, :, :n].tobytes(), f"prompt {i}: wrong bytes after a kill"
        restarted.clear()
    stats = disk.stats()
    assert stats.corrupt == 0  # a killed writer leaves no visible partial file
    assert stats.errors == 0
    disk.close()
    return len(on_disk)


@pytest.mark.slow
def test_a_writer_killed_at_random_moments_leaves_only_complete_chunks(tmp_path: Path) -> None:
    require_disk()
    rng = random.Random(22)
    torn = files = 0
    for trial in range(20):
        directory = tmp_path / f"trial{trial}"
        writer = start_peer("loop", str(directory))
        try:
            _wait_for(writer, "ready")
            time.sleep(rng.uniform(0.0, 0.4))
        finally:
            _kill(writer)
        torn += bool(temp_files(directory))
        files += _check_complete(directory, prompts=5000)
        shutil.rmtree(directory)
    assert files > 20  # every trial got past its first prompt (4 chunk files) before the kill
    print(f"{torn} of 20 kills left a temporary file; {files} chunk files checked")


def test_a_writer_killed_mid_write_leaves_a_temporary_file_that_a_restart_removes(tmp_path: Path) -> None:
    require_disk()
    writer = start_peer("stuck", str(tmp_path))
    try:
        _wait_for(writer, "stuck")
    finally:
        _kill(writer)
    [temp] = temp_files(tmp_path)  # the torn write: half a chunk under a temporary name
    assert 0 < temp.stat().st_size < 64 + SHAPE[0] * SHAPE[1] * CHUNK_TOKENS * SHAPE[3] * SHAPE[4] * 2
    assert len(chunk_files(tmp_path)) == 2
    restarted = tier(tmp_path)
    assert temp_files(tmp_path) == []
    assert len(restarted) == 2  # the two complete chunks, not the torn one
    assert restarted.key(NAMESPACE, bytes([2]) * 16) not in restarted
    restarted.close()


def test_one_process_writes_while_another_reads(tmp_path: Path) -> None:
    """The reader's tier is built before the writer writes anything: it finds the writer's files when
    asked for them (no restart), and never returns wrong bytes, during the writes or after."""
    require_disk()
    reader = cache(str(tmp_path))
    writer = start_peer("write", str(tmp_path), "12")
    seen = 0
    try:
        while writer.poll() is None:
            i = random.randrange(12)
            tokens = prompt(i)
            out, n = reader.retrieve(tokens)
            if n:
                assert out.tobytes() == kv_of(tokens)[:, :, :n].tobytes()
                seen += n
            reader.clear()  # read from disk again next time
    finally:
        assert writer.wait(60) == 0
        assert writer.stdout is not None
        assert writer.stdout.read().startswith("done")
        writer.stdout.close()
    for i in range(12):
        tokens = prompt(i)
        assert reader.lookup(tokens) == len(tokens)
        out, n = reader.retrieve(tokens)
        assert n == len(tokens)
        assert out.tobytes() == kv_of(tokens).tobytes()
    assert reader.stats().disk_corrupt == 0
    assert reader.disk is not None
    reader.disk.close()


def test_a_process_started_after_the_writer_finds_every_chunk(tmp_path: Path) -> None:
    require_disk()
    assert run_peer("write", str(tmp_path), "6").startswith("done")
    total = sum(len(prompt(i)) for i in range(6))
    assert run_peer("read", str(tmp_path), "6").strip() == f"ok {total}"
