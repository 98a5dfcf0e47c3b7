#!/usr/bin/env bash
# Every GPU measurement of the speed comparison (docs/benchmarks.md) in one run, < 8 min on one H100:
#   training, authors-style vs fast: SiT-B/2 and SiT-XL/2 (REGLUE), batch 32 and 128 per GPU;
#   sampling, SiT-XL/2 batch 64: SDE-250 with CFG 2.8 on the interval [0, 0.9], and ODE-50,
#   fp32 timm-style attention vs bf16 SDPA (+ max/mean-abs difference of the samples).
# Random weights and synthetic data; the fast path is regionally compiled. Results (JSON +
# Markdown) go to $OUT (default benchmarks/results/gpu), in train/ and sample/, rewritten after
# every measurement so that a cut-short run keeps what it measured.
#
#   bash benchmarks/gpu.sh                 # on the GPU machine
#   PYTHON=.venv/bin/python bash benchmarks/gpu.sh --device cpu ...   # extra args go to every run (tests)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
PYTHON="${PYTHON:-python}"

"$PYTHON" benchmarks/compare.py --parts train --models SiT-B/2 SiT-XL/2 --batches 32 128 \
  --warmup 3 --steps 6 --compile --out "$OUT/train" "$@"
"$PYTHON" benchmarks/compare.py --parts sample --sample-model SiT-XL/2 --sample-batch 64 \
  --sde-steps 250 --ode-steps 50 --cfg-scale 2.8 --guidance-interval 0 0.9 --compile --out "$OUT/sample" "$@"
