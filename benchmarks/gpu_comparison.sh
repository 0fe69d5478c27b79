#!/usr/bin/env bash
# The GPU checks of issue 19, as one script for a lent device (about 6 minutes on an H100/H200):
# 1. which fused kernels are installed (flash-linear-attention for DiG; mamba_ssm and causal_conv1d for DiS, DiM);
# 2. each installed kernel against the exact PyTorch reference (tests/test_models_dig.py, test_models_mamba.py:
#    skipped where a kernel is absent);
# 3. the comparison bench at batch 64 on CUDA (benchmarks/throughput_comparison.sh), kernels named per row;
# 4. DiM-H and DiS-H/2 beside DiCo-XL at 256, the DiCo Table 1 state-space rows.
# Everything lands in $OUT (or benchmarks/results/ when OUT is unset). Rehearsal on a CPU (no kernels, tiny timing):
#   DEVICE=cpu BATCH=1 TIMING="--warmup 1 --iters 1 --repeats 1" OUT=/tmp bash benchmarks/gpu_comparison.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
py=${PYTHON:-.venv/bin/python}
repro=${REPRO:-.venv/bin/repro}
device=${DEVICE:-cuda} batch=${BATCH:-64}
flags=torch_default
[[ $device == cpu ]] && flags=strict_fp32
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$py" - <<'PY'
import importlib
for mod in ("fla", "mamba_ssm", "causal_conv1d", "selective_scan_cuda"):
    try:
        m = importlib.import_module(mod)
        print(f"{mod}: {getattr(m, '__version__', 'installed')}")
    except Exception as e:
        print(f"{mod}: absent ({type(e).__name__})")
PY
  "$py" -m pytest -q -p no:cacheprovider tests/test_models_dig.py tests/test_models_mamba.py -k "cuda or fla or mamba_ssm" -rs
} 2>&1 | tee "$out/gpu-comparison-kernels-$(hostname -s).txt"
# shellcheck disable=SC2086  # TIMING is a list of options
benchmarks/throughput_comparison.sh "$device" "$batch" -- ${TIMING:---warmup 3 --iters 10 --repeats 3}
[[ $out != benchmarks/results ]] && mv benchmarks/results/throughput-comparison-"$device"-256-b"$batch"-fp32-"$(hostname -s)".* "$out/"
stem="$out/throughput-ssm-$device-256-b$batch-fp32-$(hostname -s)"
# shellcheck disable=SC2086
"$repro" bench --models "DiCo-XL,DiM-H,DiS-H/2,DiG-XL/2" --resolution 256 --batch "$batch" --device "$device" \
    --dtype fp32 --flags "$flags" ${TIMING:---warmup 2 --iters 5 --repeats 3} --out "$stem.json" | tee "$stem.txt"
