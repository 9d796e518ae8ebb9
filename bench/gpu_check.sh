#!/usr/bin/env bash
# The prepared GPU run: build the extension, run the GPU tests, run the benchmarks.
# Results land in $OUT (default bench/results/gpu_run): run.log plus the benchmark files.
#
#   OUT=/tmp/out GH_COMMIT=$(git rev-parse --short HEAD) bash bench/gpu_check.sh [STAGE]
#
# STAGE: "test" (build + the GPU tests of test_ext.py / test_triton.py: at most about 7 min on
# an H100 with a cold Triton cache), "suites" (build if needed + the per-op suites and the
# property suite on the cuda and triton backends: at most about 6 min), "bench" (build if
# needed + the benchmarks: at most 7 min), or "all" (default; all three, more than one 600 s
# device command may take: run the stages as separate commands).
# GH_COMMIT: the commit the result files name where the copied tree has no .git.
# Exit status 1 when any step failed (all steps run regardless; see run.log).
# Optional: a folder .whl/ of extra wheels (e.g. torchjd, for the torchjd baseline) is
# installed into /tmp/site first. Nothing here uses the network.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-all}
case "$STAGE" in all|test|suites|bench) ;; *) echo "usage: $0 [all|test|suites|bench]" >&2; exit 2 ;; esac
OUT=${OUT:-bench/results/gpu_run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 GRADHARMONY_CUDA_ARCHS=${GRADHARMONY_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16}
export GH_COMMIT=${GH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/run.log"; }
FAIL=0  # exit status: 1 when a build, test or benchmark step failed (every step still runs)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
log "stage $STAGE | $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader) | commit $GH_COMMIT"

# build unless this machine already holds a CUDA build of the extension (a warm rerun)
if python3 -c "import torch, gradharmony._C; torch.ops.gradharmony.solve(torch.randn(1, 2, 3, device='cuda'), 1, None, None)" >/dev/null 2>&1; then
  log "extension already built with CUDA"
else
  log "build"
  GRADHARMONY_FORCE_CUDA=1 python3 -m pip install --no-index --no-deps --no-build-isolation -e . >>"$OUT/run.log" 2>&1 || { log "BUILD FAILED"; FAIL=1; }
fi
python3 -m gradharmony.info 2>&1 | tee -a "$OUT/run.log"

if [ "$STAGE" = all ] || [ "$STAGE" = test ]; then
  # test_ext.py: its GPU tests (the rest is CPU); test_triton.py: all of it, which on a GPU
  # runs the whole table compiled on the device (only two of its tests carry the gpu mark)
  log "gpu tests"
  timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_ext.py 2>&1 \
    | tee "$OUT/gpu_tests_ext.log" | tail -5 | tee -a "$OUT/run.log" || FAIL=1
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_triton.py 2>&1 \
    | tee "$OUT/gpu_tests_triton.log" | tail -10 | tee -a "$OUT/run.log" || FAIL=1
  # no host sync: harmonize under torch.cuda.set_sync_debug_mode("error") on every GPU backend
  timeout 120 python3 -m pytest -q -p no:cacheprovider -k cuda_no_host_sync tests/core/test_core_health.py 2>&1 \
    | tee "$OUT/gpu_tests_sync.log" | tail -5 | tee -a "$OUT/run.log" || FAIL=1
fi
if [ "$STAGE" = all ] || [ "$STAGE" = suites ]; then
  # every op (gram, combine, solve, fused) and the property suite on the GPU backends
  log "per-op and property suites on cuda and triton"
  timeout 360 python3 -m pytest -q -p no:cacheprovider -k "cuda or triton" tests/test_gram.py \
    tests/test_combine.py tests/test_solve.py tests/test_fused.py tests/core/test_core_properties.py 2>&1 \
    | tee "$OUT/gpu_tests_suites.log" | tail -10 | tee -a "$OUT/run.log" || FAIL=1
fi
if [ "$STAGE" = all ] || [ "$STAGE" = bench ]; then
  log "harmonize benchmark float32"
  timeout 240 python3 bench/bench_harmonize.py --dtypes float32 --reps 100 --out "$OUT" --tag cuda 2>&1 | tee -a "$OUT/run.log" || FAIL=1
  log "harmonize benchmark bfloat16"
  timeout 45 python3 bench/bench_harmonize.py --dtypes bfloat16 --no-compile --reps 100 --out "$OUT" --tag cuda_bf16 \
    --sizes 256x2x1024,1024x2x4096,64x2x1048576,256x2x1048576 2>&1 | tee -a "$OUT/run.log" || FAIL=1
  log "triton paths"
  timeout 45 python3 bench/bench_triton_paths.py 2>&1 | tee "$OUT/triton_paths.log" | tail -40 >>"$OUT/run.log" || FAIL=1
  log "train step benchmark"
  timeout 90 python3 bench/bench_train_step.py --devices cuda --out "$OUT" 2>&1 | tail -12 | tee -a "$OUT/run.log" || FAIL=1
fi
log "done (status $FAIL)"
exit $FAIL
