"""`repro plan` of a generated 10,000-run study (100 steps x 100 seeds), timed as a whole process. Goal: under 2 s on
the 2-core dev machine.

Two cases, interleaved: cold (a fresh results root: the models are built on the meta device to validate them, which
imports torch) and warm (the results root already remembers those checks in .cache/model-checks.json, keyed by the
source of repro/models and the torch version, so torch is never imported). The start-up of a Python process
importing torch is printed beside them for scale.

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

        def plan(root: str) -> list[str]:
            return repro + ["plan", str(study), "--json", "--results", root]

        warm_root = str(Path(d) / "warm")
        subprocess.run(plan(warm_root), check=True, stdout=subprocess.DEVNULL)
        cold, warm, torch_start = [], [], []
        for i in range(args.repeats):
            cold.append(timed(plan(str(Path(d) / f"cold{i}"))))
            warm.append(timed(plan(warm_root)))
            torch_start.append(timed([sys.executable, "-c", "import torch"]))
    for name, xs in (("cold (fresh results root)", cold), ("warm (model checks remembered)", warm),
                     ("python -c 'import torch'", torch_start)):
        print(f"{name:32s} {' '.join(f'{x:.2f}' for x in xs)} s, median {statistics.median(xs):.2f} s")
    print(f"warm / cold: {statistics.median(warm) / statistics.median(cold):.2f}x")


if __name__ == "__main__":
    main()
