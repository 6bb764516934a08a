#!/usr/bin/env bash
# Every GPU benchmark of the project in one command, nothing fetched at run time (models are random-weight
# Vicuna-7B geometries built on the GPU; data is the shared SlimPajama sample; evaluation reads the local mirror).
#
#   bash bench/gpu/run.sh [OUT_DIR]          # on a GPU machine, in about 10 minutes on one H100
#   SMOKE=1 bash bench/gpu/run.sh            # the same plumbing at tiny sizes on a CPU (checks the script)
#
# Prints each benchmark's table and collects them, with the device line, into OUT_DIR/gpu-benchmarks.md for
# BENCHMARKS.md: training tokens/s and MFU (2.7B and 1.5B geometries, ZeRO-2 vs ZeRO-1, with and without
# activation checkpointing), the distillation step against the plain one (2.7B student, 32-block teacher),
# inline evaluation cost, and generation efficiency original vs pruned.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-bench_out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python}
NPROC=${NPROC:-$($PY -c 'import torch; print(max(1, torch.cuda.device_count()))')}
REPORT="$OUT/gpu-benchmarks.md"
# Progress bars are for people watching; the report keeps only the tables.
export TQDM_DISABLE=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1

if [ "${SMOKE:-0}" = 1 ]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  TRAIN_GEOMETRIES=(tiny); TRAIN_ARGS=(--steps 6 --warmup 2 --grad-accum 2)
  EVAL_ARGS=(--limit 4 --train-steps 3)
  EFFICIENCY=(--tiny-pair --tiny-layers 4 --tiny-hidden 64 --tiny-remove 1 --batch-sizes 1 2 --output-lens 8)
else
  TRAIN_GEOMETRIES=(vicuna-2.7b vicuna-1.5b); TRAIN_ARGS=(--steps 12 --warmup 3 --grad-accum 2)
  EVAL_ARGS=(--layers 26 --hidden 4096 --intermediate 11008 --heads 32 --device cuda --dtype bfloat16
             --micro-batch 2 --seq-len 2048 --grad-accum 32 --every-steps 500 --limit 0)
  $PY bench/gpu/random_models.py --out "$OUT/models" --layers 32 26 12
  EFFICIENCY=(--model "$OUT/models/vicuna-32" --model "$OUT/models/vicuna-26" --model "$OUT/models/vicuna-12"
              --dtype bfloat16 --batch-sizes 1 16 64 256 --output-lens 128 512)
fi

{
  echo "## GPU benchmarks ($(date -u +%Y-%m-%d))"
  echo
  echo "Device: $($PY -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (smoke run)")'), $NPROC rank(s);"
  echo "torch $($PY -c 'import torch; print(torch.__version__)'), deepspeed $($PY -c 'import deepspeed; print(deepspeed.__version__)')."
  echo
} > "$REPORT"

section() {  # section TITLE COMMAND...: run, show, and append the output as a code block
  local title=$1; shift
  echo "==> $title: $*"
  { echo "### $title"; echo; echo '```'; echo "\$ $*"; "$@" 2>&1 | tr '\r' '\n' | grep -v -E '^\[|%\||^ *$' | tee /dev/stderr; echo '```'; echo; } >> "$REPORT"
}

for geometry in "${TRAIN_GEOMETRIES[@]}"; do
  section "Training throughput and MFU, $geometry" \
    $PY bench/train_step.py throughput --geometry "$geometry" --nproc "$NPROC" --out "$OUT/train" "${TRAIN_ARGS[@]}"
done
section "Distillation step (32-block teacher), ${TRAIN_GEOMETRIES[0]}" \
  $PY bench/train_step.py distill --geometry "${TRAIN_GEOMETRIES[0]}" --nproc "$NPROC" --out "$OUT/train" "${TRAIN_ARGS[@]}"
section "Inline evaluation cost" $PY bench/eval_cost.py "${EVAL_ARGS[@]}"
section "Generation efficiency, original vs pruned" $PY bench/efficiency.py "${EFFICIENCY[@]}"
echo "wrote $REPORT"
