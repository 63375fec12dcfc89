#!/usr/bin/env bash
# GPU check for one CUDA GPU (sized for <= 10 minutes on one H100):
#   1. the CUDA-marked tests              (timeout 240 s)
#   2. the projection benchmark on the GPU (timeout 120 s)
#   3. the `shakespeare` preset trained to completion on the GPU (timeout 200 s)
# Results go to $OUT (default ./gpu_check_out), at most 7 files: summary.txt (device, exit code
# and seconds of each step), gpu_check.log (all output), projections.{json,md},
# shakespeare_{final.json,metrics.jsonl,curves.png}. Exits non-zero if any step failed; every
# step runs regardless.
#
#   OUT=/tmp/out LIPSCHITZ_DATA_DIR=/path/to/data bash scripts/gpu_check.sh
#
# Needs torch with CUDA, numpy, matplotlib, pytest, hypothesis and tiktoken (nothing is
# installed). The package is imported from this checkout. Tiny Shakespeare is read from
# $LIPSCHITZ_DATA_DIR (else ../shared/data or ./shared/data; else it is downloaded).
# Smoke test without a GPU: DEVICE=cpu TRAIN_SET="steps=4 eval_every=2" bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
read -r -a TRAIN_SET <<< "${TRAIN_SET:-}"  # extra KEY=VALUE overrides for the training run
SETS=()
for kv in "${TRAIN_SET[@]}"; do SETS+=(--set "$kv"); done
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ -z "${LIPSCHITZ_DATA_DIR:-}" ]; then
  for d in ../shared/data shared/data; do
    if [ -f "$d/tinyshakespeare/input.txt" ]; then
      LIPSCHITZ_DATA_DIR=$(cd "$d" && pwd)
      export LIPSCHITZ_DATA_DIR
      break
    fi
  done
fi
WORK=$(mktemp -d)  # the run directory (its checkpoint is not copied back)
trap 'rm -rf "$WORK"' EXIT
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
: > "$LOG"
{
  echo "date: $(date -u +%FT%TZ)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo none)"
  echo "data dir: ${LIPSCHITZ_DATA_DIR:-none}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
            torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')" ||
    true
} > "$SUMMARY" 2>&1

status=0
step() {  # step NAME SECONDS COMMAND...: append its output to the log, record rc and time
  local name=$1 limit=$2 rc=0 t0=$SECONDS
  shift 2
  echo "===== $name: $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1 || rc=$?
  echo "$name: rc=$rc seconds=$((SECONDS - t0))" | tee -a "$SUMMARY"
  if [ "$rc" -ne 0 ]; then status=1; fi
}

step pytest_cuda 240 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests
step bench_projections 120 "$PY" -m lipschitz bench projections --device "$DEVICE" --budget 1 \
  --out "$WORK/bench"
step train_shakespeare 200 "$PY" -m lipschitz train shakespeare --out "$WORK/shakespeare" \
  --set device="$DEVICE" "${SETS[@]}" ${LIPSCHITZ_DATA_DIR:+--data-dir "$LIPSCHITZ_DATA_DIR"}

for f in bench/projections.json bench/projections.md; do
  if [ -f "$WORK/$f" ]; then cp "$WORK/$f" "$OUT/"; fi
done
for f in final.json metrics.jsonl curves.png; do
  if [ -f "$WORK/shakespeare/$f" ]; then cp "$WORK/shakespeare/$f" "$OUT/shakespeare_$f"; fi
done
if [ -f "$OUT/shakespeare_final.json" ]; then
  { cat "$OUT/shakespeare_final.json"; echo; } >> "$SUMMARY"
fi
echo "gpu_check: status=$status, results in $OUT" | tee -a "$SUMMARY"
exit "$status"
