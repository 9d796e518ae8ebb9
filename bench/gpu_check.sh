#!/usr/bin/env bash
# One prepared GPU run: build the extension, run the GPU tests, run the benchmarks.
# Results land in $OUT (default bench/results/gpu_run): run.log plus the benchmark files.
#   OUT=/tmp/out bash bench/gpu_check.sh
# Optional: a folder .whl/ of extra wheels (e.g. torchjd, for the torchjd baseline) is
# installed into /tmp/site first. Needs about 8 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 GRADHARMONY_CUDA_ARCHS=${GRADHARMONY_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16}
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/run.log"; }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
log "$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader) | commit $(git rev-parse --short HEAD 2>/dev/null)"
log "build"
GRADHARMONY_FORCE_CUDA=1 python3 -m pip install --no-deps --no-build-isolation -e . >>"$OUT/run.log" 2>&1 || log "BUILD FAILED"
python3 -m gradharmony.info 2>&1 | tee -a "$OUT/run.log"
log "gpu tests"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_ext.py tests/test_triton.py 2>&1 | tail -15 | tee -a "$OUT/run.log"
log "harmonize benchmark float32"
timeout 300 python3 bench/bench_harmonize.py --dtypes float32 --reps 100 --out "$OUT" --tag cuda 2>&1 | tee -a "$OUT/run.log"
log "harmonize benchmark bfloat16"
timeout 120 python3 bench/bench_harmonize.py --dtypes bfloat16 --no-compile --reps 100 --out "$OUT" --tag cuda_bf16 \
  --sizes 256x2x1024,1024x2x4096,64x2x1048576,256x2x1048576 2>&1 | tee -a "$OUT/run.log"
log "train step benchmark"
timeout 150 python3 bench/bench_train_step.py --devices cuda --out "$OUT" 2>&1 | tail -12 | tee -a "$OUT/run.log"
log "done"
