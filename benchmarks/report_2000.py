"""`repro report` over about 2,000 run folders: whole-process wall time (goal: under 10 s on the 2-core VM), and
its ratio to `repro plan --json` of the same study (start-up, loading and expansion: the floor of any command).

The study is the tiny DiCo ablation with 182 seeds per step (11 x 182 = 2,002 runs); every run folder holds the
files a finished run leaves (state.json, metrics.jsonl, samples/*.json, eval/*.json; its row of the study's bench
record), written by the test suite's FIXTURE writer with made-up numbers. The first report also fills the
planner's model-check cache, as a researcher's first `repro plan` does; the timed repeats are the reports after it.

    .venv/bin/python benchmarks/report_2000.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_report import fixture_run  # noqa: E402

from repro.plan import expand, load_study  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=182)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        study = tmp / "ablation_2000.yaml"
        study.write_text(f"extends: {ROOT / 'experiments/tiny/dico_ablation.yaml'}\nstudy: ablation_2000\n"
                         f"grid: {{seeds: {list(range(args.seeds))}}}\n")
        plan = expand(load_study(study))
        root = tmp / "results"
        start = time.perf_counter()
        for i, run in enumerate(plan.runs):
            fixture_run(root, run, 40.0 + (i % 97) / 10)
        print(f"{len(plan.runs)} run folders written in {time.perf_counter() - start:.1f} s")
        cmd = [sys.executable, "-m", "repro.cli", "report", str(study), "--results", str(root), "--out",
               str(tmp / "report")]
        subprocess.run(cmd, check=True, capture_output=True)  # first report: fills the model-check cache
        # baseline, same run: `repro plan` of the same study (the same start-up, study loading and expansion)
        plan_cmd = [sys.executable, "-m", "repro.cli", "plan", str(study), "--results", str(root), "--json"]
        times, plan_times = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run(plan_cmd, check=True, capture_output=True)
            plan_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        rows = sum(1 for _ in open(tmp / "report" / "runs.csv")) - 1
        print(f"repro report, {len(plan.runs)} runs ({rows} run rows, "
              f"{sum(1 for _ in open(tmp / 'report' / 'table.csv')) - 1} paper rows): "
              f"median {statistics.median(times):.2f} s over {args.repeats} (runs: "
              f"{', '.join(f'{t:.2f}' for t in times)}); goal < 10 s")
        print(f"baseline `repro plan --json` of the same study: median {statistics.median(plan_times):.2f} s; "
              f"report / plan = {statistics.median(times) / statistics.median(plan_times):.2f}x")


if __name__ == "__main__":
    main()
