#!/usr/bin/env bash
# Every GPU measurement of the speed comparison (docs/benchmarks.md) in one run, < 8 min on one H100:
#   1. training, isolated step, authors-style vs fast (compare.py): SiT-B/2 and SiT-XL/2 (REGLUE),
#      batch 32 and 128 per GPU;
#   2. the real training loop (train_loop.py: `reglue train`'s trainer, compiled, bf16) on an
#      ImageNet-shaped dataset with cached semantics: SiT-B/2 and SiT-XL/2 at batch 32 per GPU,
#      images/s, MFU and peak memory from the run's metrics.jsonl, beside part 1's isolated step;
#   3. sampling, SiT-XL/2 batch 64: SDE-250 with CFG 2.8 on the interval [0, 0.9], and ODE-50,
#      fp32 timm-style attention vs bf16 SDPA (+ max/mean-abs difference of the samples).
# Random weights and synthetic data; the fast path is regionally compiled. Results (JSON +
# Markdown) go to $OUT (default benchmarks/results/gpu), in train/, train_loop/ and sample/,
# rewritten after every measurement so that a cut-short run keeps what it measured.
#
#   bash benchmarks/gpu.sh                 # on the GPU machine
#   bash benchmarks/gpu.sh [ARGS...] [-- LOOP_ARGS...]   # extra arguments (the tests: tiny CPU sizes)
# ARGS go to every compare.py run (parts 1 and 3), LOOP_ARGS to train_loop.py (part 2); for both,
# argparse keeps the last value of an option, so they override the settings below.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
PYTHON="${PYTHON:-python}"
compare_args=()
while (($#)) && [[ $1 != -- ]]; do
  compare_args+=("$1")
  shift
done
if (($#)); then shift; fi  # the --
loop_args=("$@")

"$PYTHON" benchmarks/compare.py --parts train --models SiT-B/2 SiT-XL/2 --batches 32 128 \
  --warmup 3 --steps 6 --compile --out "$OUT/train" "${compare_args[@]}"
# ≈ 2-3 min: 1,282 shards × 2 rows (1.5 GB: 70 steps of 32 images stay in one epoch), then per run
# start-up, compilation, 70 steps and the last checkpoint (SiT-XL/2: ≈ 11 GB with AdamW, + 2.7 GB EMA
# export), deleted once read.
"$PYTHON" benchmarks/train_loop.py --models SiT-B/2 SiT-XL/2 --batches 32 --rows-per-shard 2 \
  --warmup 10 --steps 60 --log-every 10 --compile --isolated "$OUT/train/compare.json" --out "$OUT/train_loop" \
  "${loop_args[@]}"
"$PYTHON" benchmarks/compare.py --parts sample --sample-model SiT-XL/2 --sample-batch 64 \
  --sde-steps 250 --ode-steps 50 --cfg-scale 2.8 --guidance-interval 0 0.9 --compile --out "$OUT/sample" \
  "${compare_args[@]}"
