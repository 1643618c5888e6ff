#!/usr/bin/env bash
# Set-up and entry points for a fresh machine (Debian/Ubuntu, Python >= 3.10, run as root or with sudo for
# the S3 server packages):
#   bash scripts/dev.sh test    install everything, then run the whole test suite (what CI runs)
#   bash scripts/dev.sh demo    install, then the torchrun demo: train on 2 ranks, SIGKILL, resume on 3, then 1
#   bash scripts/dev.sh setup   install only
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

setup() {
  # Keep the user's torch. Without one, install 2.13.0 from pip's configured index: on Linux with plain PyPI
  # that is the CUDA build (~20 nvidia-* packages, gigabytes); a CPU-only machine should first run
  #   pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  # (PyTorch's CPU index), which this then keeps. Our dev machines' pip config already serves the CPU wheel.
  if ! $PY -c "import torch" >/dev/null 2>&1; then
    $PY -m pip install -q "torch==2.13.0"
  fi
  # scikit-build-core compiles csrc/ (pybind11, no libtorch); the package falls back to its pure-Python twin,
  # and says so in shardckpt.backend, where no compiler exists.
  $PY -m pip install -q -e ".[test]"
  $PY -c "import shardckpt; print('shardckpt backend:', shardckpt.backend)"
}

s3_setup() {
  # Debian's Ceph (mon + memstore osd + radosgw) for the real-S3 tests; skipped quietly where apt is absent.
  bash scripts/s3-deps.sh || echo "warning: could not install the S3 server packages; S3 tests will skip"
}

run_tests() {
  export SHARDCKPT_REQUIRE_NATIVE=${SHARDCKPT_REQUIRE_NATIVE:-1}
  # 1. the native frame decoder under AddressSanitizer, fed hostile input
  bash scripts/asan.sh 20
  # 2. the data path on the pure-Python twin (same signatures, same files)
  SHARDCKPT_BACKEND=python $PY -m pytest -n 2 -q -p no:cacheprovider \
    tests/test_ext.py tests/test_multirank.py tests/test_errors.py tests/test_golden.py
  # 3. the whole suite on the native backend, two workers
  $PY -m pytest -n 2 -q -p no:cacheprovider tests
}

case "${1:-test}" in
  setup) setup; s3_setup ;;
  test) setup; s3_setup; run_tests ;;
  demo) setup; bash launch/demo.sh ;;
  *) echo "usage: $0 [setup|test|demo]" >&2; exit 2 ;;
esac
