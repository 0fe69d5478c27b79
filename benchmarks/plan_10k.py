"""`repro plan` of a generated 10,000-run study (100 steps x 100 seeds), timed as a whole process, interleaved
A/B against the start-up every command pays (a Python process importing torch and `repro.models`), so the
difference is the planner's own cost. Goal: the plan in under 2 s on the 2-core dev machine.

    .venv/bin/python benchmarks/plan_10k.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def make_study(folder: Path) -> Path:
    steps = [{"name": f"lr{i}", "label": f"lr x {1 + i / 100:.2f}",
              "config": {"model": {"name": "DiC-S" if i % 2 else "DiT-S/2"}, "train": {"lr": 1e-4 * (1 + i / 100)}}}
             for i in range(100)]
    study = {"study": "grid10k", "defaults": {"data": {"kind": "fashion_mnist"}, "train": {"steps": 1000}},
             "steps": steps, "grid": {"seeds": list(range(100))}, "cost": {"step_seconds": 0.1}}
    path = folder / "grid10k.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        study = make_study(Path(d))
        repro = [sys.executable, "-m", "repro.cli"]
        plan = repro + ["plan", str(study), "--json", "--results", str(Path(d) / "results")]
        base = [sys.executable, "-c", "import repro.models, repro.plan"]
        a, b = [], []
        for _ in range(args.repeats):
            a.append(timed(plan))
            b.append(timed(base))
    pa, pb = statistics.median(a), statistics.median(b)
    print(f"repro plan (10,000 runs, --json): {' '.join(f'{x:.2f}' for x in a)} s, median {pa:.2f} s")
    print(f"start-up (import torch, repro):   {' '.join(f'{x:.2f}' for x in b)} s, median {pb:.2f} s")
    print(f"plan / start-up: {pa / pb:.2f}x; planner's own time about {pa - pb:.2f} s")


if __name__ == "__main__":
    main()
