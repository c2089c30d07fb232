"""``python -m lmcache replay``: traces drive the real chunk cache, and leaf LRU agrees with an independent
simulator (tests/policy_sim.py, which shares no code with lmcache) within 0.003 token hit rate."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import policy_sim
from lmcache.errors import ConfigError
from lmcache.replay import BLOCK_TOKENS, block_tokens, read_trace, replay

TRACES = Path(__file__).with_name("traces")
CONVERSATION = TRACES / "mooncake_conversation_trace.jsonl"
SYNTHETIC = TRACES / "mooncake_synthetic_trace.jsonl"
CAPACITIES = (1000, 2000, 5000, 10000, 20000, 30000, 50000)
#: The whole traces at every capacity take minutes: the nox "policies" session sets this.
FULL = os.environ.get("LMCACHE_REPLAY_FULL") == "1"


def _agree(path: Path, capacities: tuple[int, ...], limit: int | None) -> None:
    requests = read_trace(str(path))[:limit]
    simulated = [(r.input_length, list(r.hash_ids)) for r in requests]
    for capacity in capacities:
        real = replay(requests, capacity, "lru").token_hit_rate
        independent = policy_sim.token_hit_rate(simulated, capacity)
        assert abs(real - independent) <= 0.003, (path.name, capacity, real, independent)


@pytest.mark.parametrize("path", [CONVERSATION, SYNTHETIC], ids=["conversation", "synthetic"])
def test_lru_replay_agrees_with_an_independent_simulator(path: Path) -> None:
    if FULL:
        _agree(path, CAPACITIES, None)
    else:  # the first 1,500 requests at small capacities, where eviction is busiest
        _agree(path, (200, 1000, 3000), 1500)


def test_lru_replay_reproduces_the_published_figures() -> None:
    """DESIGN section 14's leaf-LRU row for the synthetic trace at 1k and 10k chunks."""
    requests = read_trace(str(SYNTHETIC))
    assert round(replay(requests, 1000, "lru").token_hit_rate, 3) == 0.086
    assert round(replay(requests, 10000, "lru").token_hit_rate, 3) == 0.432


def test_block_tokens_are_deterministic_and_distinct() -> None:
    a = block_tokens([3, 9], 700)
    assert len(a) == 700
    assert a[0] == 3 * BLOCK_TOKENS
    assert a[BLOCK_TOKENS] == 9 * BLOCK_TOKENS
    assert (block_tokens([3, 9], 700) == a).all()
    assert not set(block_tokens([4], 512)) & set(block_tokens([3], 512))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not a request"),
        ('{"input_length": 600, "hash_ids": [1]}', "need 2 hash ids"),
        ('{"input_length": 0, "hash_ids": []}', "positive int"),
        ('{"input_length": 5, "hash_ids": [true]}', "non-negative ints"),
    ],
)
def test_bad_traces_are_config_errors_with_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input_length": 10, "hash_ids": [1]}\n' + line + "\n")
    with pytest.raises(ConfigError, match=message) as caught:
        read_trace(str(path))
    assert "line 2" in str(caught.value)


def test_replay_refuses_bad_capacities_and_policies() -> None:
    requests = read_trace(str(SYNTHETIC))[:10]
    with pytest.raises(ConfigError, match="capacity"):
        replay(requests, 0, "lru")
    with pytest.raises(ConfigError, match="unknown eviction policy"):
        replay(requests, 10, "mru")


def test_the_command_prints_json_and_plots(tmp_path: Path) -> None:
    small = tmp_path / "small.jsonl.gz"
    with gzip.open(small, "wt") as out:
        out.writelines(SYNTHETIC.read_text().splitlines(keepends=True)[:300])
    plot = tmp_path / "hit.png"
    args = [
        sys.executable,
        "-m",
        "lmcache",
        "replay",
        str(small),
        "--capacity",
        "100,400",
        "--policy",
        "default,lru,arc",
    ]
    done = subprocess.run([*args, "--json"], capture_output=True, text=True, check=True)
    rows = json.loads(done.stdout)
    assert [(r["policy"], r["capacity"]) for r in rows] == [
        (p, c) for p in ("adaptive", "lru", "arc") for c in (100, 400)
    ]
    assert all({"token_hit_rate", "block_hit_rate", "requests"} <= set(r) for r in rows)
    assert all(r["requests"] == 300 for r in rows)
    assert "requests" in done.stderr  # progress
    drawn = subprocess.run([*args, "--plot", str(plot)], capture_output=True, text=True)
    if importlib.util.find_spec("matplotlib") is not None:
        assert drawn.returncode == 0
        assert plot.stat().st_size > 1000
    else:  # an optional extra: the message says how to get it
        assert drawn.returncode == 2
        assert "pip install 'lmcache-mempool[plot]'" in drawn.stderr
    bad = subprocess.run([*args[:4], str(tmp_path / "missing.jsonl")], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "cannot read trace" in bad.stderr
