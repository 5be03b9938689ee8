#!/usr/bin/env bash
# One GPU session in one call: build, GPU tests, benchmarks, sanitizers, plot.
#
#   OUT=/some/dir bash benchmarks/gpu_session.sh            # every step, most valuable first
#   OUT=/some/dir bash benchmarks/gpu_session.sh STEP...    # only these (build is prepended unless SKIP_BUILD=1)
#   DRY_RUN=1 bash benchmarks/gpu_session.sh                # no GPU: the CPU-runnable parts, at toy sizes
#
# Steps, in default order: build gpu_tests tune headline ceilings headline_compile bench_train gpu_tests_wide
# bench_infer sanitize bench_convs bench_ops plot. Every command runs under `timeout`; a failing step does
# not stop the next. A step starts only if its minimum time is left of BUDGET_S (default 570 s, under
# the device's 10 minutes), so a later call can pick up the skipped ones; plot always runs last.
# Triton's compile cache, resnet_fast's tuning cache and inductor's live in build/ (kept on a warm machine), so
# benchmarks reuse what the tests compiled and tuned, and a second call reuses the first's. The tune step uses
# fresh tuning caches of its own: every candidate of every conv and pool shape is validated there (any 8-warp
# miscompile shows up as a discarded candidate in its log) and the first call is timed cold and warm.
# Output in $OUT (9 files at most): log.txt, tuning_<stamp>.json (`resnet-fast tune --json` records: per call
# the survivors' times and every discarded candidate with its reason; first_call_s of each cold and warm run),
# bench_infer_<stamp>.json and bench_train_<stamp>.json (`resnet-fast bench --json` records, every run of the
# call merged), ceilings_*.json, sanitize_*.json, convs_*.json, ops_*.json, bench.png. Exit status: 0 if no
# step failed (skipped steps do not count).
#
# Environment: OUT, BUDGET_S, DRY_RUN, SKIP_BUILD, COMPILE_MODE (torch.compile mode of headline_compile;
# default: the bench's, max-autotune), MAX_JOBS.
# shellcheck disable=SC2317  # the step_* functions are called indirectly, as "step_$name"
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD

DRY_RUN=${DRY_RUN:-0}
BUDGET_S=${BUDGET_S:-570}
RESERVE_S=25  # kept for plot and the summary
STAMP=$(date +%Y%m%d-%H%M%S)
if [[ -z ${OUT:-} ]]; then
  OUT=$(mktemp -d /tmp/gpu-session-out.XXXXXX)
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/log.txt
WORK=$(mktemp -d /tmp/gpu-session-work.XXXXXX)  # per-run bench JSON before merging: not in $OUT
trap 'rm -rf "$WORK"' EXIT

export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=$ROOT/build/triton-cache
export RESNET_FAST_CACHE_DIR=$ROOT/build/resnet-fast-cache  # tuned choices on disk: later processes skip tuning
export TORCHINDUCTOR_CACHE_DIR=$ROOT/build/inductor-cache
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

ALL_STEPS=(build gpu_tests tune headline ceilings headline_compile bench_train gpu_tests_wide bench_infer sanitize
           bench_convs bench_ops plot)
# name -> "limit_s min_s": the most a step may take, and the least worth starting it with.
declare -A LIMITS=(
  [build]="300 60" [gpu_tests]="330 60" [tune]="300 90" [headline]="200 45" [ceilings]="90 25" [headline_compile]="330 150"
  [bench_train]="270 120" [gpu_tests_wide]="330 120" [bench_infer]="420 90" [sanitize]="420 150"
  [bench_convs]="240 60" [bench_ops]="200 60" [plot]="60 0"
)

# Architectures and sizes; DRY_RUN shrinks them so a CPU runs every command line in a few minutes.
HEADLINE=(--arch resnet50 --batch-size 256 --dtype bf16 --channels-last --img-size 224)
ARCHS_ALL=resnet18,resnet50,resnet101,resnet152
ARCHS_REST=resnet18,resnet101,resnet152  # resnet50 bf16 b256 is the headline
TRAIN=(--mode train --arch resnet50 --batch-size 256 --dtype bf16 --channels-last --img-size 224)
SHORT=(--iters 20 --warmup 5)
# `resnet-fast tune` runs: cold then warm on one fresh cache each (the headline first, then batch 1 and ResNet-D).
TUNES=("--arch resnet50 --batch-size 256 --dtype bf16" "--arch resnet18 --batch-size 1 --dtype bf16"
       "--arch resnet50d --batch-size 32 --dtype fp16")
TUNE_DEVICE=(--device cuda --img-size 224)
if [[ $DRY_RUN == 1 ]]; then
  TUNES=("--arch resnet18 --batch-size 1 --dtype fp32")
  TUNE_DEVICE=(--device cpu --img-size 16)
  HEADLINE=(--arch resnet18 --dtype bf16 --channels-last)
  TRAIN=(--mode train --arch resnet18 --dtype bf16 --channels-last)
  ARCHS_ALL=resnet18
  ARCHS_REST=resnet18
fi

START=$(date +%s)
STEP=""
STEP_END=0
NRUN=0
SUMMARY=()
FAILED=0

now() { date +%s; }

log_header() {
  echo "=== $(date -u +%FT%TZ) $*"
}

# tb CMD...: run CMD time-boxed to the current step's deadline; its exit status (124: timed out).
tb() {
  local left=$((STEP_END - $(now)))
  if ((left < 3)); then
    echo "[step $STEP: no time left for: $*]"
    return 124
  fi
  echo "+ [${left}s] $*"
  timeout --signal=TERM --kill-after=15 "$left" "$@"
}

# merge_json DEST SRC: append the records of SRC (a JSON list) to the list in DEST.
merge_json() {
  python - "$1" "$2" <<'PY'
import json, os, sys
dest, src = sys.argv[1:3]
records = json.load(open(dest)) if os.path.exists(dest) else []
records += json.load(open(src))
with open(dest, "w") as f:
    json.dump(records, f, indent=1)
PY
}

# bench_run KIND ARGS...: one `resnet-fast bench` run; its records are merged into $OUT/bench_KIND_<stamp>.json.
bench_run() {
  local kind=$1
  shift
  NRUN=$((NRUN + 1))
  local tmp=$WORK/bench_$NRUN.json
  if [[ $DRY_RUN == 1 ]]; then  # argparse: the last value of a flag wins
    set -- "$@" --device cpu --batch-size 2 --img-size 32 --iters 1 --warmup 0
  fi
  tb python -m resnet_fast bench "$@" --json "$tmp"
  local rc=$?
  if [[ -s $tmp ]]; then
    merge_json "$OUT/bench_${kind}_$STAMP.json" "$tmp"
  fi
  return "$rc"
}

# --- steps ------------------------------------------------------------------------------------

step_build() {
  if [[ $DRY_RUN == 1 ]]; then
    echo "DRY_RUN: not running pip install --no-build-isolation --no-deps -e ."
    tb python -m resnet_fast info
    return
  fi
  nvidia-smi -L || true
  tb python -m pip install --no-build-isolation --no-deps -e . ||
    { echo "pip install failed; building in place instead"; tb python setup.py build_ext --inplace; }
  tb python -m resnet_fast info
  tb python -c "
import torch
from resnet_fast.ops import ext
ok = ext.available(torch.device('cuda'))
print('extension CUDA kernels usable here:', ok, '-', ext.status()[1])
raise SystemExit(0 if ok else 1)"
}

step_gpu_tests() {
  local where=tests
  [[ $DRY_RUN == 1 ]] && where=tests/test_gpu_models.py  # on CPU they all skip; collect just this file
  tb env RESNET_FAST_GPU_TIER=quick RESNET_FAST_REQUIRE_EXT=1 python -m pytest -v --tb=short -m gpu -p no:cacheprovider \
    --continue-on-collection-errors -rfEs --durations=25 "$where"
}

step_tune() {
  local rc=0 args cache run tmp interp=()
  [[ $DRY_RUN == 1 ]] && interp=(TRITON_INTERPRET=1)
  for args in "${TUNES[@]}"; do
    cache=$(mktemp -d "$WORK/tune-cache.XXXXXX")
    for run in cold warm; do  # the warm run must tune nothing: its last line says "tuned 0 keys"
      NRUN=$((NRUN + 1))
      tmp=$WORK/tune_${NRUN}_$run.json
      # shellcheck disable=SC2086  # $args holds several flags
      tb env RESNET_FAST_CACHE_DIR="$cache" "${interp[@]}" python -m resnet_fast tune $args "${TUNE_DEVICE[@]}" \
        --channels-last --json "$tmp" || rc=1
      [[ -s $tmp ]] && merge_json "$OUT/tuning_$STAMP.json" "$tmp"
    done
  done
  return "$rc"
}

step_headline() {
  bench_run infer "${HEADLINE[@]}" --no-compile
}

step_ceilings() {
  if [[ $DRY_RUN == 1 ]]; then
    tb python benchmarks/ceilings.py --device cpu --arch resnet18,resnet50 --reps 3 --out "$OUT"
  else
    tb python benchmarks/ceilings.py --out "$OUT"
  fi
}

step_headline_compile() {
  bench_run infer "${HEADLINE[@]}" --impls resnet_fast,torch_compile ${COMPILE_MODE:+--compile-mode "$COMPILE_MODE"}
}

step_bench_train() {
  bench_run train "${TRAIN[@]}"
}

step_gpu_tests_wide() {
  if [[ $DRY_RUN == 1 ]]; then
    tb env RESNET_FAST_GPU_TIER=wide python -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_models.py \
      -k "wide-" --co
    return
  fi
  tb env RESNET_FAST_GPU_TIER=wide python -m pytest -v --tb=short -m gpu -p no:cacheprovider -rfEs --durations=25 \
    tests/test_gpu_models.py -k "wide-"
}

step_bench_infer() {
  local rc=0
  bench_run infer --arch "$ARCHS_REST" --batch-size 256 --dtype bf16 --channels-last "${SHORT[@]}" --no-compile || rc=1
  for batch in 1 32; do
    bench_run infer --arch "$ARCHS_ALL" --batch-size "$batch" --dtype bf16 --channels-last "${SHORT[@]}" \
      --no-compile || rc=1
  done
  bench_run infer --arch "$ARCHS_ALL" --batch-size 256 --dtype fp16 --channels-last "${SHORT[@]}" --no-compile || rc=1
  return "$rc"
}

step_sanitize() {
  if [[ $DRY_RUN == 1 ]]; then
    python -c "import sys; sys.path.insert(0, 'benchmarks'); import sanitize; \
print('compute-sanitizer here:', sanitize.find_sanitizer())"
    tb python benchmarks/sanitize.py --workload ext --device cpu &&
      tb python benchmarks/sanitize.py --workload triton --device cpu
    return
  fi
  tb python benchmarks/sanitize.py --out "$OUT" --timeout 150
}

step_bench_convs() {
  if [[ $DRY_RUN == 1 ]]; then
    echo "DRY_RUN: bench_convs needs CUDA; checking its flags only"
    tb python benchmarks/bench_convs.py --help >/dev/null
    return
  fi
  tb python benchmarks/bench_convs.py --no-compile --out "$OUT"
}

step_bench_ops() {
  if [[ $DRY_RUN == 1 ]]; then
    tb python benchmarks/bench_ops.py --device cpu --shapes 2x8x4x4 --rounds 1 --min-time 0.001 --no-compile \
      --out "$OUT"
    return
  fi
  tb python benchmarks/bench_ops.py --device cuda --no-compile --out "$OUT"
}

step_plot() {
  if ! compgen -G "$OUT/bench_*.json" >/dev/null; then
    echo "no bench results in this call: nothing to plot"
    return
  fi
  tb python benchmarks/plot_results.py "$OUT" --out "$OUT/bench.png"
}

# --- driver -----------------------------------------------------------------------------------

run_step() {
  local name=$1 limit min left t0 rc status
  read -r limit min <<<"${LIMITS[$name]}"
  left=$((BUDGET_S - RESERVE_S - ($(now) - START)))
  if [[ $name != plot ]]; then  # plot always runs, on the reserve
    if ((left < min)); then
      SUMMARY+=("$(printf '%-17s SKIPPED  (%ss left, needs %ss)' "$name" "$left" "$min")")
      log_header "skip $name: ${left}s left, needs ${min}s"
      return
    fi
    ((limit > left)) && limit=$left
  fi
  STEP=$name
  t0=$(now)
  STEP_END=$((t0 + limit))
  log_header "step $name (limit ${limit}s)"
  "step_$name"
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMEOUT" ;;
    *) status="FAILED rc=$rc" ;;
  esac
  [[ $rc != 0 ]] && FAILED=1
  SUMMARY+=("$(printf '%-17s %-8s %4ss' "$name" "$status" "$(($(now) - t0))")")
  log_header "end $name: $status"
}

main() {
  local steps=("$@") s
  if ((${#steps[@]} == 0)); then
    steps=("${ALL_STEPS[@]}")
  fi
  for s in "${steps[@]}"; do
    [[ -n ${LIMITS[$s]:-} ]] || { echo "unknown step '$s'; steps: ${ALL_STEPS[*]}"; return 2; }
  done
  if [[ ${SKIP_BUILD:-0} != 1 && " ${steps[*]} " != *" build "* ]]; then
    steps=(build "${steps[@]}")
  fi
  if [[ " ${steps[*]} " != *" plot "* ]]; then
    steps+=(plot)
  fi
  log_header "gpu_session: steps ${steps[*]}; budget ${BUDGET_S}s; DRY_RUN=$DRY_RUN; OUT=$OUT"
  python -c "import torch, platform; print('python', platform.python_version(), 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  for s in "${steps[@]}"; do
    run_step "$s"
  done
  echo
  log_header "summary ($(($(now) - START))s of ${BUDGET_S}s)"
  printf '%s\n' "${SUMMARY[@]}"
  echo "files in $OUT:"
  ls -l "$OUT"
  return $FAILED
}

main "$@" 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
