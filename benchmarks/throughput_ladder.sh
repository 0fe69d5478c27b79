#!/usr/bin/env bash
# DiCo against DiT at each size (S, B, L, XL), 256 px, each pair timed interleaved in its own run. The paper's
# ratios (DiCo Table 1, A100, batch 64, fp32): 1.37x, 2.17x, 2.52x, 2.71x.
# Usage: benchmarks/throughput_ladder.sh DEVICE BATCH DTYPE FLAGS [extra repro bench options]
#   GPU: benchmarks/throughput_ladder.sh cuda 64 fp32 torch_default
# Output: benchmarks/results/throughput-ladder-<device>-b<batch>-<dtype>-<flags>-<host>.txt
set -euo pipefail
cd "$(dirname "$0")/.."
device=$1 batch=$2 dtype=$3 flags=$4; shift 4
repro=${REPRO:-.venv/bin/repro}
out="benchmarks/results/throughput-ladder-${device%%:*}-b${batch}-${dtype}-${flags}-$(hostname -s).txt"
: > "$out.tmp"
for size in S B L XL; do
    dit="DiT-$size/2"
    "$repro" bench --models "$dit,DiCo-$size" --resolution 256 --batch "$batch" --device "$device" --dtype "$dtype" \
        --flags "$flags" "$@" | tee -a "$out.tmp"
done
mv "$out.tmp" "$out"
