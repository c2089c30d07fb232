#!/usr/bin/env bash
# Every GPU check and benchmark in one run, for a lent device (see ../shared/DEVICE.md).
# Installs nothing: it runs from the source tree with the machine's python3 (torch, JAX, pytest).
# Results go to $OUT (the device tool's folder) or to the folder given as $1.
# tests/gpu/test_gpu_shared.py (the shared cache: a torch client's mapping pinned at exact size, device
# tensors through it, JAX device_put of leased chunks) runs with the other GPU tests below, and
# bench_gpu.py times host-to-device copies of a shared-cache lease against torch's pinned copy.
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-${1:-gpu-results}}"
mkdir -p "$out"
export PYTHONPATH="$PWD:$PWD/adapters${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi";
  python3 -c "import torch, jax; print('torch', torch.__version__, 'jax', jax.__version__, jax.devices())" ; } \
  2>&1 | tee "$out/env.txt"
python3 -m pytest tests/gpu -o addopts="" -p no:cacheprovider -rs -q -s --junitxml "$out/gpu-tests.xml" \
  2>&1 | tee "$out/gpu-tests.log"
tests=${PIPESTATUS[0]}
python3 tests/gpu/bench_gpu.py --out "$out/gpu-bench.json" 2>&1 | tee "$out/gpu-bench.md"
bench=${PIPESTATUS[0]}
echo "gpu tests exit $tests, bench exit $bench"
exit $(( tests != 0 || bench != 0 ))
