#!/usr/bin/env bash
# Every GPU benchmark of the project in one command, nothing fetched at run time (models are random-weight
# Vicuna-7B geometries built on the GPU; data is the shared SlimPajama sample; evaluation reads the local mirror).
#
#   bash bench/gpu/run.sh [OUT_DIR]          # on a GPU machine
#   ONLY=kernels bash bench/gpu/run.sh       # one section: kernels, throughput, eval, efficiency (space-separated)
#   SMOKE=1 bash bench/gpu/run.sh            # the same plumbing at tiny sizes on a CPU (checks the script)
# A lent GPU machine has no network: bench/gpu/wheels.sh builds the wheels here, bench/gpu/install_and_run.sh runs this.
#
# Prints each benchmark's table and collects them, with the device line, into OUT_DIR/gpu-benchmarks.md for
# BENCHMARKS.md. kernels (issue 24's table, about 10 minutes on one H100): the 2.7B geometry on each GPU at the
# recipes' accumulation (16 micro-steps of 2 x 2048 tokens per step, so the optimizer step weighs what it weighs in
# training), side by side: eager / compiled / Liger, ZeRO-2 / ZeRO-1, document mask off / on, plain / KD (32-block
# teacher): tokens/s per GPU, MFU, peak memory, KD's step ratio against its FLOP bound. Liger needs
# `pip install -e '.[gpu]'`; without it its row says why it did not run. throughput: the 1.5B geometry, ZeRO-2 vs
# ZeRO-1 with and without activation checkpointing. eval: inline evaluation cost. efficiency: generation, original
# vs pruned.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-bench_out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python}
NPROC=${NPROC:-$($PY -c 'import torch; print(max(1, torch.cuda.device_count()))')}
ONLY=${ONLY:-kernels throughput eval efficiency}
REPORT="$OUT/gpu-benchmarks.md"
# Progress bars are for people watching; the report keeps only the tables.
export TQDM_DISABLE=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1

if [ "${SMOKE:-0}" = 1 ]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  # fp32: a CPU without AVX-512 emulates bf16 several times slower; Liger's row shows its refusal on a CPU
  KERNEL_ARGS=(--geometry tiny --steps 4 --warmup 1 --grad-accum 16 --set train.precision=fp32
               --variants eager,compiled,liger,zero1,mask,kd)
  TRAIN_GEOMETRY=tiny; TRAIN_ARGS=(--steps 4 --warmup 1 --grad-accum 2)
  EVAL_ARGS=(--limit 4 --train-steps 3)
  EFFICIENCY=(--tiny-pair --tiny-layers 4 --tiny-hidden 64 --tiny-remove 1 --batch-sizes 1 2 --output-lens 8)
else
  # 2 steps of warm-up (the compiled rows compile in the first), 4 measured, each 16 micro-steps per GPU
  KERNEL_ARGS=(--geometry vicuna-2.7b --steps 6 --warmup 2 --grad-accum 16)
  TRAIN_GEOMETRY=vicuna-1.5b; TRAIN_ARGS=(--steps 6 --warmup 2 --grad-accum 16)
  EVAL_ARGS=(--layers 26 --hidden 4096 --intermediate 11008 --heads 32 --device cuda --dtype bfloat16
             --micro-batch 2 --seq-len 2048 --grad-accum 32 --every-steps 500 --limit 0)
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

wanted() { [[ " $ONLY " == *" $1 "* ]]; }

if wanted kernels; then
  section "The fast path: kernels, ZeRO stage, document mask, distillation" \
    $PY bench/train_step.py kernels --nproc "$NPROC" --out "$OUT/train" "${KERNEL_ARGS[@]}"
fi
if wanted throughput; then
  section "Training throughput and MFU, $TRAIN_GEOMETRY" \
    $PY bench/train_step.py throughput --geometry "$TRAIN_GEOMETRY" --nproc "$NPROC" --out "$OUT/train" "${TRAIN_ARGS[@]}"
fi
if wanted eval; then section "Inline evaluation cost" $PY bench/eval_cost.py "${EVAL_ARGS[@]}"; fi
if wanted efficiency; then
  # the saved geometries only this section reads (30 GB): built here so that ONLY=kernels does not write them
  [ "${SMOKE:-0}" = 1 ] || $PY bench/gpu/random_models.py --out "$OUT/models" --layers 32 26 12
  section "Generation efficiency, original vs pruned" $PY bench/efficiency.py "${EFFICIENCY[@]}"
fi
echo "wrote $REPORT"
