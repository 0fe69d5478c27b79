#!/usr/bin/env bash
# A study's bench job (its models timed interleaved in one process, as `repro submit` runs it) twice in a row, each
# in a fresh results folder, and the ratios of the two runs side by side: how well the ratios repeat.
# Usage: bash benchmarks/study_bench_repeat.sh [STUDY]   (default experiments/tiny/dic_roadmap.yaml)
# Run it alone: anything else on the cores is what it measures.
set -euo pipefail
cd "$(dirname "$0")/.."
study="$(realpath "${1:-experiments/tiny/dic_roadmap.yaml}")"
name="$(.venv/bin/python -c "import sys; from repro.study import load_study; print(load_study(sys.argv[1]).study.study)" "$study")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
printf 'extends: %s\nstudy: %s_bench\nstages: [bench]\n' "$study" "$name" > "$work/bench_only.yaml"
for i in 1 2; do
  .venv/bin/repro submit "$work/bench_only.yaml" --cluster debug --results "$work/r$i" > "$work/r$i.log"
done
.venv/bin/python - "$work/r1/bench/${name}_bench.json" "$work/r2/bench/${name}_bench.json" <<'PY'
import json
import sys

a, b = (json.load(open(p)) for p in sys.argv[1:3])
p = a["protocol"]
print("protocol:", {k: p[k] for k in ("batch", "warmup", "iters", "repeats", "dtype", "device", "cpu_threads", "fresh_processes")})
print("statistic:", p["statistic"])
print("machine:", {k: p["environment"].get(k) for k in ("cpu", "cpu_count", "threads", "torch")})
print(f"{'step':18s}{'img/s 1':>9s}{'img/s 2':>9s}{'ratio 1':>9s}{'ratio 2':>9s}{'2/1':>7s}"
      f"{'spread 1':>9s}{'spread 2':>9s}{'others 1':>9s}{'others 2':>9s}")
worst = 0.0
for r in a["runs"].values():
    s = next(x for x in b["runs"].values() if x["step"] == r["step"])
    q = s["ratio_to_baseline"] / r["ratio_to_baseline"]
    worst = max(worst, abs(q - 1))
    print(f"{r['step']:18s}{r['img_per_s']:9.1f}{s['img_per_s']:9.1f}{r['ratio_to_baseline']:9.3f}"
          f"{s['ratio_to_baseline']:9.3f}{q:7.3f}{r['spread']:9.1%}{s['spread']:9.1%}"
          f"{r['others_cpu_share']:9.1%}{s['others_cpu_share']:9.1%}")
print(f"largest ratio change between the two runs: {worst:.1%}; reliable (every row): {a['reliable']} / {b['reliable']}")
print("load (1, 5, 15 min):", a["load"], b["load"])
PY
