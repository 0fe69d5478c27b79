#!/usr/bin/env bash
# Forward throughput of the comparison systems beside DiT-XL/2, DiC-XL and DiCo-XL, interleaved in one run, with
# the ratios to DiT-XL/2 and the token-mixer kernel each model ran (issue 19). The papers' A100 figures (batch 64,
# fp32, img/s): DiT-XL/2 66.8 (DiC's poster) / 76.90 (DiCo T1), DiC-XL 313.7, DiCo-XL 208.47, DiG-XL/2 71.74 (with
# Flash Linear Attention), PixArt-α-XL/2 64.1, DiffiT-XL/2 64.1.
# Usage: benchmarks/throughput_comparison.sh DEVICE BATCH [-- extra repro bench options]
#   CPU (this machine):  benchmarks/throughput_comparison.sh cpu 8 -- --warmup 1 --iters 2 --repeats 3
#   GPU:                 benchmarks/throughput_comparison.sh cuda 64
# On the CPU, and on a GPU without the `dig` extra, DiG runs the exact PyTorch reference of its gated linear
# attention: the table's kernel column and its note say so, and its ratio measures that kernel, not DiG.
# Output: benchmarks/results/throughput-comparison-<device>-256-b<batch>-fp32-<host>.{json,txt}
set -euo pipefail
cd "$(dirname "$0")/.."
device=$1 batch=$2; shift 2
if [[ $# -gt 0 && $1 == -- ]]; then shift; fi
repro=${REPRO:-.venv/bin/repro}
flags=strict_fp32
[[ $device == cuda* ]] && flags=torch_default
# MODELS and NAME let another comparison reuse this script (benchmarks/table5_throughput.sh)
models=${MODELS:-"DiT-XL/2,DiC-XL,DiCo-XL,DiG-XL/2,PixArt-α-XL/2,DiffiT-XL/2"}
stem="benchmarks/results/${NAME:-throughput-comparison}-${device%%:*}-256-b${batch}-fp32-$(hostname -s)"
"$repro" bench --models "$models" --resolution 256 \
    --batch "$batch" --device "$device" --dtype fp32 --flags "$flags" --out "$stem.json" "$@" | tee "$stem.txt"
