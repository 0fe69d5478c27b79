#!/usr/bin/env bash
# Forward throughput of DiCo Table 5's eleven rows, interleaved in one run, ratios to DiCo-S (issue 20). Timed as
# the paper timed them: batch 64, fp32, attention without FlashAttention-2 (SDPA's math kernel). The paper's A100
# img/s and ratios to DiCo-S (1695.73): ReLU 1695.68 (1.00), DWC 5x5 1628.59 (0.96), DWC 7x7 1469.45 (0.87), w/o CCA
# 1731.13 (1.02), SE 1657.10 (0.98), channel self-attention 1569.51 (0.93), self-attention 1140.93 (0.67), window
# 1165.22 (0.69), focused linear 971.49 (0.57), agent 1160.89 (0.68).
# Usage: benchmarks/table5_throughput.sh DEVICE BATCH [-- extra repro bench options]
#   CPU (this machine):  benchmarks/table5_throughput.sh cpu 8 -- --warmup 1 --iters 3 --repeats 3 --cpu-threads 1
#   GPU:                 benchmarks/table5_throughput.sh cuda 64
# Output: benchmarks/results/table5-throughput-math-<device>-256-b<batch>-fp32-<host>.{json,txt}
set -euo pipefail
cd "$(dirname "$0")/.."
device=$1 batch=$2; shift 2
if [[ $# -gt 0 && $1 == -- ]]; then shift; fi
rows="DiCo-S,DiCo-S-relu,DiCo-S-dw5,DiCo-S-dw7,DiCo-S-noCCA,DiCo-S-SE,DiCo-S-channelSA,DiCo-S-attn,DiCo-S-window"
MODELS="$rows,DiCo-S-focused,DiCo-S-agent" NAME=table5-throughput-math \
    benchmarks/throughput_comparison.sh "$device" "$batch" -- --attention math "$@"
