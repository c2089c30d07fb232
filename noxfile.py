# /// script
# dependencies = ["nox>=2024.10"]
# ///
"""The test matrix: one session per set of installed frameworks, plus lint, types, docs and benchmarks.

In a framework's own session a missing framework fails the run (``LMCACHE_REQUIRE_BACKENDS``); it never
skips. torch is pinned to the CPU build this project's CI machines carry; set ``LMCACHE_TORCH_SPEC``
(for example ``"torch==2.11.0"`` or ``"torch --index-url https://download.pytorch.org/whl/cu128"``)
to test another build on a GPU machine.
"""

from __future__ import annotations

import os
import shlex
import shutil

import nox

nox.needs_version = ">=2024.10"
nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True

PYPROJECT = nox.project.load_toml("pyproject.toml")
TORCH = shlex.split(os.environ.get("LMCACHE_TORCH_SPEC", "torch==2.13.0"))
TEST_DEPS = nox.project.dependency_groups(PYPROJECT, "test")
# The real-model tests and the bench's serving scenario build a Llama with transformers: pinned.
TRANSFORMERS = "transformers==5.24.0"


def _pytest(session: nox.Session, required: str, absent: str = "", also_required: str = "") -> None:
    """Run pytest with ``required`` frameworks (and ``also_required`` packages) failing when missing.

    xxhash (the ``disk`` extra) is required in every such session: the disk tier's tests are ordinary
    tests of each install.
    """
    needed = ",".join(name for name in (required, also_required, "xxhash") if name)
    env = {"LMCACHE_REQUIRE_BACKENDS": needed, "LMCACHE_ABSENT_FRAMEWORKS": absent}
    session.run("pytest", *session.posargs, env=env)
    # The main job on this install: its self-check must pass (a short run; figures come from `bench`).
    session.run(
        "python", "-m", "lmcache", "bench", "--quick", *(f"--backend={b}" for b in required.split(","))
    )


@nox.session
def core(session: nox.Session) -> None:
    """Tests with numpy only (and xxhash, for the disk tier): neither torch nor JAX installed."""
    session.install(".[disk]", *TEST_DEPS)
    _pytest(session, "numpy", absent="torch,jax")


@nox.session
def torch(session: nox.Session) -> None:
    """Tests with torch (CPU build) and without JAX."""
    session.install(*TORCH)
    session.install(".[torch,disk]", *TEST_DEPS)
    _pytest(session, "numpy,torch", absent="jax")


@nox.session
def jax(session: nox.Session) -> None:
    """Tests with JAX (CPU) and without torch: bf16 and fp8 views must work with JAX alone."""
    session.install(".[jax,disk]", *TEST_DEPS)
    _pytest(session, "numpy,jax", absent="torch")


@nox.session
def interop(session: nox.Session) -> None:
    """Tests with torch, JAX and transformers installed: every cross-framework view and copy, real models."""
    session.install(*TORCH)
    session.install(".[all,hf,redis,disk]", TRANSFORMERS, *TEST_DEPS)
    _pytest(session, "numpy,torch,jax", also_required="transformers")
    # The GPU tests: here they must import and skip cleanly (no GPU); a lent device runs them.
    session.run("pytest", "tests/gpu", "-o", "addopts=--import-mode=importlib -ra")


@nox.session
def remote(session: nox.Session) -> None:
    """The remote tier against a real redis-server on 127.0.0.1: a missing server or client fails here.

    redis-server comes from the system's packages: installed with apt-get when absent and running as root.
    """
    if shutil.which("redis-server") is None and hasattr(os, "geteuid") and os.geteuid() == 0:
        session.run("apt-get", "update", external=True)
        session.run("apt-get", "install", "-y", "redis-server", external=True)
    if shutil.which("redis-server") is None:
        session.error("redis-server is not installed: apt-get install redis-server (or run as root)")
    session.install(*TORCH)
    session.install(".[all,redis]", *TEST_DEPS)
    env = {"LMCACHE_REQUIRE_BACKENDS": "numpy,torch,jax,redis"}
    remote_tests = ["tests/test_remote_format.py", "tests/test_remote_tier.py", "tests/test_remote_faults.py"]
    session.run("pytest", *remote_tests, "tests/test_remote_cache.py", *session.posargs, env=env)
    session.run("python", "-m", "lmcache", "bench", "--quick", "--backend=numpy")


@nox.session
def policies(session: nox.Session) -> None:
    """The whole Mooncake traces replayed through the real cache: leaf LRU against an independent
    simulator at every capacity from 1k to 50k chunks (minutes; the other sessions replay a sample)."""
    session.install(".", *TEST_DEPS)
    session.run("pytest", "tests/test_replay.py", *session.posargs, env={"LMCACHE_REPLAY_FULL": "1"})


# vLLM's kv_offload code runs on the CPU torch; its wheel's other requirements are a CUDA stack (kernels,
# codecs, the torch it was built against) that kv_offload never imports and that cannot install next to
# the CPU torch. The vllm session installs vLLM with --no-deps, then every requirement but these.
VLLM = "vllm==0.33.0"
VLLM_CUDA_STACK = {
    "torch",
    "torchaudio",
    "torchvision",
    "torchcodec",
    "pynvvideocodec",
    "flashinfer-python",
    "apache-tvm-ffi",
    "tilelang",
    "nvtx",
    "fastsafetensors",
    "instanttensor",
    "quack-kernels",
    "tokenspeed-mla",
    "humming-kernels",
}


@nox.session(default=False)
def vllm(session: nox.Session) -> None:
    """The vLLM adapter (lmcache_vllm) against vLLM 0.33.0 on the CPU torch: vLLM's own manager tests
    with our policies, its worker test and its connector worker with our spec's worker, its factories
    loading our spec and policies, bytes exact through the manager and the worker.

    Not in the default run: the install is about 3.5 GB.
    """
    session.install(*TORCH)
    session.install("--no-deps", VLLM)
    requirements = session.run(
        "python",
        "-c",
        "import importlib.metadata as m; print('\\n'.join(m.requires('vllm') or []))",
        silent=True,
    )
    keep = []
    for line in str(requirements).splitlines():
        name = line.split(";")[0].strip()
        if not name or "extra ==" in line:
            continue
        base = name.split("[")[0]
        for mark in "<>=!~ ":
            base = base.split(mark)[0]
        base = base.lower().replace("_", "-")
        if base in VLLM_CUDA_STACK or base.startswith("nvidia-"):
            continue
        keep.append(line.strip())
    torch_pin = session.create_tmp() + "/torch-constraint.txt"
    with open(torch_pin, "w") as pin:
        pin.write(TORCH[0] + "\n")
    session.install("-c", torch_pin, *keep)
    session.install(".", *TEST_DEPS)
    env = {"LMCACHE_REQUIRE_BACKENDS": "vllm"}
    session.run("pytest", "tests/test_vllm_adapter.py", *session.posargs, env=env)


# SGLang's storage interfaces (hicache_storage, storage.backend_factory) import on the CPU torch; its
# wheel pins a CUDA torch and kernel packages they never import. The sglang session installs SGLang with
# --no-deps, then exactly the packages those imports need (found by importing them in a bare venv).
SGLANG = "sglang==0.5.23"
SGLANG_IMPORT_DEPS = [
    "numpy",
    "orjson",
    "psutil",
    "pybase64",
    "requests",
    "triton",
    "packaging",
    "pillow",
    "starlette",
    "msgspec",
    "pydantic",
    "pyzmq",
    "tqdm",
    "ipython",
    "aiohttp",
]


@nox.session(default=False)
def sglang(session: nox.Session) -> None:
    """The SGLang adapter (lmcache_sglang) against SGLang 0.5.23 on the CPU torch: SGLang's factory
    loading our HiCache storage backend, bytes exact through its v1 and classic calls.

    Not in the default run: SGLang's import-time dependencies include triton.
    """
    session.install(*TORCH)
    session.install("--no-deps", SGLANG)
    torch_pin = session.create_tmp() + "/torch-constraint.txt"
    with open(torch_pin, "w") as pin:
        pin.write(TORCH[0] + "\n")
    session.install("-c", torch_pin, *SGLANG_IMPORT_DEPS)
    session.install("-c", torch_pin, ".", *TEST_DEPS)
    env = {"LMCACHE_REQUIRE_BACKENDS": "sglang"}
    session.run("pytest", "tests/test_sglang_adapter.py", *session.posargs, env=env)


# sglang-jax's host KV pool (sgl_jax.srt.mem_cache.host_kv_pool) is newer than its only PyPI release
# (sglang-jax 0.0.2, October 2025, which has no host pool): the session installs the pinned commit from
# GitHub, or from a checkout named by $SGLANG_JAX_SRC (the repository's python/ folder) where GitHub is out
# of reach. --no-deps: the host pool imports only jax and numpy; sglang-jax's own host-pool, HiCache
# controller and HiCache end-to-end test modules (vendored in tests/sglang_jax_upstream) also import its
# device pool, allocators and UnifiedRadixCache, which need these three.
SGLANG_JAX_COMMIT = "cddbf6f1cc33cbdd453bd8f36ff7051cf46ca176"
SGLANG_JAX_TEST_DEPS = ["psutil~=7.0.0", "pyzmq~=27.0.1", "fastapi~=0.116.1"]  # sglang-jax's own pins
SGLANG_JAX = (
    f"sglang-jax @ git+https://github.com/sgl-project/sglang-jax@{SGLANG_JAX_COMMIT}#subdirectory=python"
)


@nox.session(python="3.12", default=False)
def sglang_jax(session: nox.Session) -> None:
    """The sglang-jax adapter (lmcache_sglang_jax) against sglang-jax's HostKVPool ABC at a pinned commit.

    Not in the default run: sglang-jax's host pool is only on GitHub, not on PyPI.
    """
    session.install(".[jax]", *SGLANG_JAX_TEST_DEPS, *TEST_DEPS)
    source = os.environ.get("SGLANG_JAX_SRC", SGLANG_JAX)
    env = {"SETUPTOOLS_SCM_PRETEND_VERSION_FOR_SGLANG_JAX": "0.0.0+g" + SGLANG_JAX_COMMIT[:8]}
    session.install("--no-deps", source, env=env)
    env = {"LMCACHE_REQUIRE_BACKENDS": "jax,sgl_jax"}
    session.run("pytest", "tests/test_sglang_jax_adapter.py", *session.posargs, env=env)


# LMCache 0.5.6's L2 adapter interface and plugin loader import on the CPU torch; its wheel requires a CUDA
# stack (cupy, cufile, nvtx) and servers' clients they never import. The lmcache_l2 session installs the
# packages those imports need (found by importing them in a bare venv; LMCache's own pins where it has
# them), then lmcache-mempool, then LMCache with --no-deps and last: both install a package named
# `lmcache`, and LMCache's __init__.py must be the one kept (see docs/engines-lmcache.md).
LMCACHE = "lmcache==0.5.6"
LMCACHE_IMPORT_DEPS = [
    "numpy<=2.2.6",
    "numba",
    "prometheus_client>=0.18.0,<=0.24.1",
    "py-cpuinfo",
    "psutil",
    "aiohttp",
    "requests",
    "cachetools",
    "pyyaml",
    "cryptography",
]
# What `lmcache server` imports besides (its HTTP frontend, ZMQ transport, token hasher, telemetry): the
# session starts one with our adapter.
LMCACHE_SERVER_DEPS = [
    "fastapi",
    "uvicorn",
    "httpx",
    "msgspec",
    "pyzmq>=25.0.0",
    "blake3",
    "opentelemetry-api>=1.20.0,<=1.40.0",
    "opentelemetry-sdk>=1.20.0",
    "opentelemetry-exporter-otlp>=1.20.0",
    "opentelemetry-exporter-prometheus>=0.50b0,<=0.61b0",
]


@nox.session(default=False)
def lmcache_l2(session: nox.Session) -> None:
    """The LMCache adapter (lmcache_mempool_l2) against LMCache 0.5.6 on the CPU torch: LMCache's own
    MockL2Adapter and reference-plugin cases with our adapter, its plugin loader building ours, bytes exact
    through its L2 adapter interface, and `lmcache server` started with it.

    Not in the default run: LMCache's import-time dependencies include numba.
    """
    session.install(*TORCH)
    torch_pin = session.create_tmp() + "/torch-constraint.txt"
    with open(torch_pin, "w") as pin:
        pin.write(TORCH[0] + "\n")
    session.install("-c", torch_pin, *LMCACHE_IMPORT_DEPS, *LMCACHE_SERVER_DEPS, *TEST_DEPS)
    session.install("-c", torch_pin, ".")
    session.install("--no-deps", "--force-reinstall", LMCACHE)
    env = {"LMCACHE_REQUIRE_BACKENDS": "lmcache.v1"}
    session.run("pytest", "tests/test_lmcache_l2_adapter.py", *session.posargs, env=env)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over lmcache, lmcache_torch and lmcache_jax (with both frameworks installed)."""
    session.install(*TORCH)
    session.install("-e", ".[all,redis]", *nox.project.dependency_groups(PYPROJECT, "typecheck"))
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the Sphinx docs with warnings as errors, then run every example in them (doctest)."""
    session.install(*TORCH)
    session.install(".[all,hf,redis]", TRANSFORMERS, *nox.project.dependency_groups(PYPROJECT, "docs"))
    common = ["-W", "--keep-going", "docs"]
    session.run("sphinx-build", "-b", "html", *common, "docs/_build/html")
    session.run("sphinx-build", "-b", "doctest", *common, "docs/_build/doctest")


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Benchmarks: the pytest-benchmark suite and ``python -m lmcache bench`` (not in the default run)."""
    session.install(*TORCH)
    session.install(".[all,hf,redis]", TRANSFORMERS, *nox.project.dependency_groups(PYPROJECT, "bench"))
    session.run("pytest", "tests/bench", "--benchmark-only", "-o", "addopts=--import-mode=importlib")
    session.run("python", "-m", "lmcache", "bench", *session.posargs)
