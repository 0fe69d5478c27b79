#!/usr/bin/env bash
# Issue 15's GPU checks in one run (about 10 minutes on one H200), every output under $OUT:
#   1. forward img/s of DiT-XL/2, DiC-XL and DiCo-XL in bf16, NCHW and channels_last (recorded: 1.10x / 0.51x)
#   2. training steps/s of DiC-XL and DiT-XL/2 at batch 32 per GPU: fp32 with the official TF32 flags, bf16,
#      bf16 + channels_last, bf16 + channels_last + compile (against DiC issue #6 and DiCo's log)
#   3. `repro pilot experiments/dic_roadmap.yaml --steps 50` on DiC-XL and DiT-XL/2, synthetic latents,
#      stand-in VAE and Inception where the weights are absent
# Each step writes its own files, so a run cut short keeps what finished. Outputs go to
# benchmarks/results/gpu-pilot-<device>/ once fetched.
#
# The device image has torch but not diffusers, submitit or clean-fid. Once, here, in the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl diffusers==0.36.0 submitit==1.5.3 clean-fid==0.1.35 \
#     importlib-metadata zipp
# then run with carry [".whl"]:  bash benchmarks/gpu_pilot.sh
# A CPU rehearsal of the same script with tiny models:  SMOKE=1 bash benchmarks/gpu_pilot.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu-pilot-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export REPRO_RESULTS=${REPRO_RESULTS:-/tmp/gpu-pilot-results}

if [ "${SMOKE:-0}" = 1 ]; then
  DEVICE=cpu
  BENCH_MODELS=DiT-S/2,DiC-S,DiCo-S
  # bf16 convolutions crawl on a CPU without AVX512-BF16: the rehearsal checks the plumbing in fp32
  DTYPE=fp32
  BENCH_ARGS="--batch 4 --warmup 1 --iters 2 --repeats 2"
  TRAIN_ARGS="--models DiC-S,DiT-S/2 --batch 4 --steps 4 --variants fp32"
  PILOT_ARGS="experiments/tiny/dic_roadmap.yaml --steps 2 --only gelu,dit --device cpu --sample-budget 0"
else
  DEVICE=cuda
  DTYPE=bf16
  BENCH_MODELS=DiT-XL/2,DiC-XL,DiCo-XL
  BENCH_ARGS="--batch 64 --warmup 10 --iters 20 --repeats 3"
  TRAIN_ARGS="--models DiC-XL,DiT-XL/2 --batch 32 --steps 30"
  PILOT_ARGS="experiments/dic_roadmap.yaml --steps 50 --only gelu,dit_xl2 --device cuda"
fi

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
  git rev-parse HEAD 2>/dev/null; date -u +%FT%TZ; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

echo "== 1. forward img/s, bf16, NCHW and channels_last"
$PY -m repro.cli bench --models $BENCH_MODELS --device $DEVICE --dtype $DTYPE $BENCH_ARGS \
  --out "$OUT/bench-$DTYPE.json" 2>&1 | tee "$OUT/bench.txt"
$PY -m repro.cli bench --models $BENCH_MODELS --device $DEVICE --dtype $DTYPE --channels-last $BENCH_ARGS \
  --out "$OUT/bench-$DTYPE-channels-last.json" 2>&1 | tee -a "$OUT/bench.txt"

echo "== 2. training steps/s under the precision and speed switches"
$PY benchmarks/train_speed.py $TRAIN_ARGS --out "$OUT/train-speed.json" 2>&1 | tee "$OUT/train-speed.txt"

echo "== 3. pilot"
$PY -m repro.cli pilot $PILOT_ARGS 2>&1 | tee "$OUT/pilot.txt"
cp "$REPRO_RESULTS"/pilot/*/"$DEVICE".json "$OUT/pilot.json" 2>/dev/null || true
echo "done: $(ls "$OUT")"
