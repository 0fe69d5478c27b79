#!/usr/bin/env bash
# Forward throughput of DiC-XL, DiCo-XL and DiT-XL/2, measured interleaved in one run, with the ratios to the
# DiT-XL/2 baseline. The papers' ratios (A100, batch 64, fp32): DiC-XL / DiT-XL/2 = 4.70x (256 px), 5.2x (512 px);
# DiCo-XL / DiT-XL/2 = 2.71x (256 px), 3.1x (512 px).
# Usage: benchmarks/throughput_xl.sh DEVICE BATCH DTYPE [FLAGS [RESOLUTION]] [-- extra repro bench options]
#   CPU (this machine):  benchmarks/throughput_xl.sh cpu 8 fp32 strict_fp32 256 -- --warmup 1 --iters 2 --repeats 3
#   GPU:                 benchmarks/throughput_xl.sh cuda 64 fp32 torch_default 256
# FLAGS is the TF32 profile (strict_fp32: both TF32 off; torch_default: cuDNN TF32 on, as DiCo's unpinned code ran).
# Output: benchmarks/results/throughput-xl-<device>-<res>-b<batch>-<dtype>-<flags>[-math]-<host>.{json,txt}
set -euo pipefail
cd "$(dirname "$0")/.."
device=$1 batch=$2 dtype=$3; shift 3
flags=strict_fp32 res=256
if [[ $# -gt 0 && $1 != -- ]]; then flags=$1; shift; fi
if [[ $# -gt 0 && $1 != -- ]]; then res=$1; shift; fi
if [[ $# -gt 0 && $1 == -- ]]; then shift; fi
repro=${REPRO:-.venv/bin/repro}
attn=""
for a in "$@"; do [[ $a == math ]] && attn=-math; done
stem="benchmarks/results/throughput-xl-${device%%:*}-${res}-b${batch}-${dtype}-${flags}${attn}-$(hostname -s)"
"$repro" bench --models DiT-XL/2,DiC-XL,DiCo-XL --resolution "$res" --batch "$batch" --device "$device" \
    --dtype "$dtype" --flags "$flags" --out "$stem.json" "$@" | tee "$stem.txt"
