#!/usr/bin/env bash
# Forward throughput of DiC-XL, DiCo-XL and DiT-XL/2 at 256 px, measured interleaved in one run, with the
# ratios to the DiT-XL/2 baseline, the papers' ratios (DiC-XL / DiT-XL/2 = 4.70x; DiCo-XL / DiT-XL/2 = 2.71x, A100 batch 64).
# Usage: benchmarks/throughput_xl.sh DEVICE BATCH DTYPE [extra repro bench options]
#   CPU (this machine):  benchmarks/throughput_xl.sh cpu 8 fp32 --warmup 1 --iters 2 --repeats 3
#   GPU:                 benchmarks/throughput_xl.sh cuda 64 bf16
# Output: benchmarks/results/throughput-xl-<device>-b<batch>-<dtype>-<host>.{json,txt}
set -euo pipefail
cd "$(dirname "$0")/.."
device=$1 batch=$2 dtype=$3; shift 3
repro=${REPRO:-.venv/bin/repro}
stem="benchmarks/results/throughput-xl-${device%%:*}-b${batch}-${dtype}-$(hostname -s)"
"$repro" bench --models DiT-XL/2,DiC-XL,DiCo-XL --resolution 256 --batch "$batch" --device "$device" \
    --dtype "$dtype" --out "$stem.json" "$@" | tee "$stem.txt"
