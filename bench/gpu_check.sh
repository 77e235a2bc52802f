#!/usr/bin/env bash
# make gpu-check: one command for a day a GPU is at hand. On a machine with a CUDA GPU it
#   1. builds the extension in place for the visible GPU (every core; nvcc's register and
#      spill report per kernel kept in the build log),
#   2. runs the tests on CUDA tensors: every test parametrized over the CUDA C++ and compiled
#      Triton backends (pytest -k cuda), results as JUnit XML,
#   3. runs the optimizer benchmark for every optimizer at 1M, 10M and 100M params, and the
#      Triton Gram kernel against x @ x.mT at 1024-8192 (Muon's Newton-Schulz) (JSON),
# writing everything to bench/results/. It uses the machine's own python3 and torch, not the
# Makefile's venv: the GPU machines have their own torch and no network. PY=... overrides.
# The exit status is the tests'; the benchmark runs either way.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=bench/results
STAMP=$(date -u +%Y-%m-%dT%H-%M-%S)

"$PY" - <<'PYEOF' || exit 2
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu-check: no CUDA GPU is visible to {sys.executable} (torch {torch.__version__}); "
             "run it on a machine with one")
print(f"gpu-check: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PYEOF
mkdir -p "$OUT"

build_log="$OUT/gpu-build-$STAMP.log"
echo "gpu-check: building for the visible GPU (log: $build_log)"
if ! CATAPULT_PTXAS_VERBOSE=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" setup.py build_ext --inplace >"$build_log" 2>&1; then
    tail -n 30 "$build_log"
    echo "gpu-check: the build failed; the whole log is $build_log" >&2
    exit 1
fi
grep -E "Compiling entry function|Used [0-9]+ registers|spill" "$build_log" >"$OUT/gpu-registers-$STAMP.txt" || true
echo "gpu-check: kernels with spills: $(grep -cE '[1-9][0-9]* bytes spill' "$OUT/gpu-registers-$STAMP.txt")" \
     "(registers per kernel: $OUT/gpu-registers-$STAMP.txt)"

workers=()
if "$PY" -c "import xdist" 2>/dev/null; then workers=(-n "${TEST_WORKERS:-8}"); fi
"$PY" -m pytest -q -k cuda "${workers[@]}" -p no:cacheprovider --junitxml="$OUT/gpu-tests-$STAMP.xml" tests
tests_status=$?

"$PY" -m bench.optim_step --device cuda --sizes 1M,10M,100M --out "$OUT"
"$PY" -m bench.gram --out "$OUT"
exit $tests_status
