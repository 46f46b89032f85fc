#!/usr/bin/env bash
# The GPU checks of hw_backend in one prepared run, so that time on a borrowed GPU goes to
# measuring, not installing. Everything lands under one folder:
#
#   env.txt                 card, driver, CUDA and torch versions, CPU
#   device_time/            1. executor device time per layer vs its kernels' GPU time, per plan
#                              kind, eager and graph path side by side (benchmarks/device_time.py)
#   local.yaml (+ .json)    3. hgsim calibrate of this machine (full; --quick if that fails)
#   validate_attention.*    4. hgsim validate, attention-only study (studies/validation.yaml)
#   validate_model.*        4. hgsim validate, whole-model study at Llama-3.1-8B shapes
#   speedups/               5. tokens/s of HybridGen vs every baseline at 32k/64k/128k under an
#                              HBM budget, each beside the simulator's prediction
#   gpu_tests.log           the CUDA-marked tests (tests/test_executor_gpu.py), with what is left
#   <stage>.log, stages.txt, suite.log, summary.md
#
# Usage:
#   bash benchmarks/gpu_suite.sh [OUT]             # on a GPU host (installs with pip first)
#   bash benchmarks/gpu_suite.sh --cpu-smoke [OUT] # this script's plumbing on a CPU-only
#                                                  # machine: tiny models, quick calibration
#   bash benchmarks/gpu_suite.sh --install-only    # install and check the imports, then stop
#   bash benchmarks/gpu_suite.sh --pack=F.tgz OUT  # also pack OUT into one file at the end
#                                                  # (where only a few files can be copied back)
#
# The whole run is capped at SUITE_BUDGET_S seconds (default 470, under 8 minutes): every stage
# has its own limit and gets no more than what is left; a stage cut short keeps what it wrote.
# PYTHON selects the interpreter (default: python, else python3). On a host without network,
# fetch the dependencies it lacks first, where pip works: `bash benchmarks/gpu_wheels.sh`
# writes .gpu_wheels, which the install below uses (GPU_WHEELS names another folder).
set -uo pipefail

SMOKE=0
INSTALL_ONLY=0
PACK=""
OUT=""
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) SMOKE=1 ;;
    --install-only) INSTALL_ONLY=1 ;;
    --pack=*) PACK=${arg#--pack=} ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) OUT="$arg" ;;
  esac
done
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-$(command -v python > /dev/null && echo python || echo python3)}
OUT=${OUT:-gpu_suite_out/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
BUDGET_S=${SUITE_BUDGET_S:-470}
START=$(date +%s)
: > "$OUT/stages.txt"

log() { echo "[suite +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/suite.log"; }
remaining() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# stage NAME LIMIT_S COMMAND...: run with a time limit (never past the suite's budget)
stage() {
  local name=$1 limit=$2
  shift 2
  local left
  left=$(remaining)
  if (( left < 15 )); then
    log "SKIP $name (out of time)"
    echo "$name rc=skipped seconds=0" >> "$OUT/stages.txt"
    return 1
  fi
  (( limit > left - 5 )) && limit=$(( left - 5 ))
  log "START $name (limit ${limit}s)"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  log "END $name rc=$rc in $(( $(date +%s) - t0 ))s"
  echo "$name rc=$rc seconds=$(( $(date +%s) - t0 ))" >> "$OUT/stages.txt"
  return $rc
}

# ------------------------------------------------------------------ 0. environment, install
{
  echo "date: $(date -Is)"
  echo "host: $(uname -n) $(uname -r)"
  echo "mode: $([ $SMOKE = 1 ] && echo cpu-smoke || echo gpu)"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv
    nvidia-smi | head -n 12
  else
    echo "nvidia-smi: not found"
  fi
  command -v lscpu > /dev/null && lscpu | grep -E "Model name|^CPU\(s\)|NUMA node\(s\)|Thread"
  free -g 2> /dev/null | head -n 2
} > "$OUT/env.txt" 2>&1

# build in place and import from the checkout: for when pip cannot install it (an old setuptools
# without bdist_wheel, no network for an isolated build)
build_in_place() {
  stage build_in_place 120 $PY setup.py build_ext --inplace \
    && export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
}
if [ $SMOKE = 0 ]; then
  WHEELS=${GPU_WHEELS:-.gpu_wheels}
  if [ -d "$WHEELS" ]; then
    # A host without network: the dependencies it lacks from wheels fetched beforehand
    # (benchmarks/gpu_wheels.sh), never from an index (pip's retries would eat the budget).
    stage deps 60 $PY -m pip install --no-index --find-links "$WHEELS" simpy pydantic
    stage install 90 $PY -m pip install --no-index --no-build-isolation --no-deps -e . \
      || build_in_place
  elif $PY -c "import torch" 2> /dev/null; then  # keep the CUDA torch this machine has
    stage install 90 $PY -m pip install --no-build-isolation -e . \
      || stage install-isolated 90 $PY -m pip install -e . || build_in_place
  else
    stage install 200 $PY -m pip install -e ".[hw]"
  fi
fi
# What every stage needs, checked once: a missing package is one line here, not five failures.
if ! $PY -c "import simpy, pydantic, torch, hgsim, hw_backend.executor" > "$OUT/imports.log" 2>&1
then
  log "STOP: hgsim does not import ($(tail -n 1 "$OUT/imports.log")); see install.log. A host" \
    "without network needs the wheels of benchmarks/gpu_wheels.sh (fetched where pip works," \
    "in .gpu_wheels or GPU_WHEELS)"
  echo "imports rc=1 seconds=0" >> "$OUT/stages.txt"
  $PY benchmarks/gpu_suite_summary.py "$OUT" > /dev/null 2>> "$OUT/suite.log"
  [ -n "$PACK" ] && tar czf "$PACK" -C "$OUT" .
  exit 1
fi
if [ $INSTALL_ONLY = 1 ]; then
  log "installed; hgsim imports (--install-only: no stage run)"
  exit 0
fi
$PY - >> "$OUT/env.txt" 2>&1 <<'EOF'
import platform, torch
print(f"python {platform.python_version()}; torch {torch.__version__}; CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.total_memory / 1e9:.1f} GB, "
          f"{props.multi_processor_count} SMs, capability {props.major}.{props.minor}")
else:
    print("device: none (CPU stand-in)")
try:
    import hw_backend._cpu_attention  # noqa: F401
    from hw_backend import cpu_attention
    print(f"C kernel: built, SIMD {cpu_attention.simd_level()}")
except ImportError as exc:
    print(f"C kernel: NOT built ({exc})")
EOF
log "environment: $(grep -E '^(torch|device|C kernel)' "$OUT/env.txt" | tr '\n' ';')"

# ------------------------------------------------------------------ 1..5
if [ $SMOKE = 1 ]; then
  stage device_time 60 $PY benchmarks/device_time.py --cpu-smoke --steps 2 --warmup 1 \
    --out "$OUT/device_time"
  stage calibrate 90 $PY -m hgsim calibrate --quick --out "$OUT/local.yaml" --no-progress
  stage validate_attention 60 $PY -m hgsim validate --profile "$OUT/local.yaml" \
    --max-context 4k --steps 2 --threshold 1000000 --out "$OUT/validate_attention" --no-progress
  stage validate_model 60 $PY -m hgsim validate --profile "$OUT/local.yaml" \
    --study studies/validation_model_standin.yaml --max-context 8k --steps 2 \
    --threshold 1000000 --out "$OUT/validate_model" --no-progress
  stage speedups 60 $PY benchmarks/speedups.py --cpu-smoke --profile "$OUT/local.yaml" \
    --contexts 1k 2k --gen 2 --warmup 1 --out "$OUT/speedups"
else
  stage device_time 55 $PY benchmarks/device_time.py --out "$OUT/device_time"
  stage calibrate 140 $PY -m hgsim calibrate --out "$OUT/local.yaml" --no-progress \
    || stage calibrate_quick 45 $PY -m hgsim calibrate --quick --out "$OUT/local.yaml" \
      --no-progress
  stage validate_attention 55 $PY -m hgsim validate --profile "$OUT/local.yaml" \
    --max-context 64k --steps 6 --threshold 10 --out "$OUT/validate_attention" --no-progress
  stage validate_model 80 $PY -m hgsim validate --profile "$OUT/local.yaml" \
    --study studies/validation_model.yaml --threshold 10 --out "$OUT/validate_model" \
    --no-progress
  stage speedups 120 $PY benchmarks/speedups.py --profile "$OUT/local.yaml" --gen 6 \
    --out "$OUT/speedups"
fi
# last, with whatever time is left: the CUDA tests (on the stand-in they skip, which checks
# only that they collect)
stage gpu_tests 90 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_executor_gpu.py

$PY benchmarks/gpu_suite_summary.py "$OUT" > /dev/null 2>> "$OUT/suite.log"
log "done in $(( $(date +%s) - START ))s; summary: $OUT/summary.md"
[ -n "$PACK" ] && tar czf "$PACK" -C "$OUT" . && log "packed into $PACK"
cat "$OUT/summary.md"
