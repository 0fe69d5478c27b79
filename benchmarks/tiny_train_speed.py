"""Training steps/s of the tiny studies' models, old code against new, side by side in one run, on this machine.

    python benchmarks/tiny_train_speed.py --old 505c9ed            # a representative model of each kind
    python benchmarks/tiny_train_speed.py --old 505c9ed --all      # every step of both tiny studies
    python benchmarks/tiny_train_speed.py --old 505c9ed --chains   # + how to spend 2 cores: 2 chains or 2 threads

The old commit is exported (`git archive`) to a temporary folder. Each (model, arm, repeat) trains `--steps` steps
of `repro.train.train` on Fashion-MNIST in a fresh process, one thread (`OMP_NUM_THREADS=1`, as the demo's
chains), importing `repro` from its arm's tree and reading the study file of that tree, so each arm runs what
its commit would have run. Arms alternate (old first in even repeats, new first in odd ones) so that a drift of
the machine's speed hits both. steps/s is the median over the logged windows after the first (warm-up).

`--chains` then measures the two ways to use two cores with the new code, on the same model: two one-thread
processes at once (the demo's layout, one chain per study) against one process with two threads, as aggregate
steps/s.

Nothing else may run on the machine meanwhile: the ratios are only as good as the quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# one model of each kind the tiny studies train: isotropic conv, hourglass conv, DiT, isotropic DiCo, DiCo U-Net
# with attention, DiCo U-Net (CCA), DiCo with SE
REPRESENTATIVE = [("experiments/tiny/dic_roadmap.yaml", s) for s in ("isotropic", "gelu", "dit")] + \
                 [("experiments/tiny/dico_ablation.yaml", s) for s in ("dico_iso", "dit_ushape", "dico_s", "se")]


def child(root: Path, study: str, step: str, steps: int, log_every: int, threads: int) -> None:
    """Train one run of `study` (read from `root`) for `steps` steps in a scratch folder; print one JSON line."""
    import dataclasses

    import torch

    torch.set_num_threads(threads)
    import repro
    from repro.plan import expand
    from repro.study import load_study
    from repro.train import train

    run = next(r for r in expand(load_study(root / study)).runs if r.step == step)
    cfg = run.config
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps, log_every=log_every,
                                                             ckpt_every=10 * steps))
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, Path(tmp) / "run", progress=False)
        lines = [json.loads(s) for s in (Path(tmp) / "run" / "train" / "metrics.jsonl").read_text().splitlines()]
    print(json.dumps({"steps_per_s": statistics.median(m["steps_per_s"] for m in lines[1:]),
                      "switches": lines[-1]["switches"], "repro": str(Path(repro.__file__).parent.parent)}))


def spawn(root: Path, study: str, step: str, steps: int, log_every: int, threads: int = 1) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, __file__, "--child", str(root), study, step, str(steps),
                             str(log_every), str(threads)], cwd=root, env=env, stdout=subprocess.PIPE, text=True)


def result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"a benchmark child failed (exit {proc.returncode}): {proc.args}")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        root, study, step, steps, log_every, threads = sys.argv[2:8]
        return child(Path(root), study, step, int(steps), int(log_every), int(threads))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, help="the commit to compare with (the code before the change)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--all", action="store_true", help="every step of both tiny studies, not one of each kind")
    ap.add_argument("--chains", action="store_true", help="also: 2 one-thread processes against 1 two-thread one")
    args = ap.parse_args()

    got = subprocess.run(["git", "-C", str(REPO), "archive", args.old], capture_output=True)
    if got.returncode:
        print(f"--old {args.old}: not a commit of {REPO} ({got.stderr.decode().strip().splitlines()[-1]})",
              file=sys.stderr)
        raise SystemExit(2)
    archive = got.stdout
    old = Path(tempfile.mkdtemp(prefix="tiny-speed-old-"))
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    print(f"# tiny training steps/s, old {args.old} against new {head}{' + uncommitted changes' if dirty else ''}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M %Z')}, {platform.node()}, {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}), one thread per process, {args.steps} steps, "
          f"median of the windows of {args.log_every} after the first, {args.repeats} repeats, arms alternating")

    if args.all:
        from repro.plan import expand
        from repro.study import load_study

        models = [(s, r.step) for s in ("experiments/tiny/dic_roadmap.yaml", "experiments/tiny/dico_ablation.yaml")
                  for r in expand(load_study(REPO / s)).runs]
    else:
        models = REPRESENTATIVE
    rows = []
    for study, step in models:
        got: dict[str, list[float]] = {"old": [], "new": []}
        switches = {}
        for rep in range(args.repeats):
            for arm in (("old", "new") if rep % 2 == 0 else ("new", "old")):
                r = result(spawn(old if arm == "old" else REPO, study, step, args.steps, args.log_every))
                got[arm].append(r["steps_per_s"])
                switches[arm] = {k: v for k, v in r["switches"].items() if k in ("channels_last", "fused_adamw")}
        o, n = statistics.median(got["old"]), statistics.median(got["new"])
        rows.append((Path(study).stem, step, o, n))
        on = [k for k, v in switches["new"].items() if v]
        print(f"{Path(study).stem:14s} {step:16s} old {o:6.2f}  new {n:6.2f} steps/s  x{n / o:.3f}   "
              f"(old {' '.join(f'{v:.2f}' for v in got['old'])}; new {' '.join(f'{v:.2f}' for v in got['new'])}; "
              f"new switches: {', '.join(on) or 'none'})", flush=True)
    ratios = [n / o for *_, o, n in rows]
    print(f"geometric mean new/old: x{statistics.geometric_mean(ratios):.3f} over {len(rows)} models "
          f"(min x{min(ratios):.3f}, max x{max(ratios):.3f})")

    if args.chains:
        study, step = REPRESENTATIVE[1]
        two = [spawn(REPO, study, step, args.steps, args.log_every) for _ in range(2)]
        pair = sum(result(p)["steps_per_s"] for p in two)
        alone = result(spawn(REPO, study, step, args.steps, args.log_every, threads=2))["steps_per_s"]
        single = result(spawn(REPO, study, step, args.steps, args.log_every))["steps_per_s"]
        print(f"two cores, {step}: 2 processes x 1 thread {pair:.2f} steps/s in all; 1 process x 2 threads "
              f"{alone:.2f}; 1 process x 1 thread alone {single:.2f} (2x1 / 1x2 = x{pair / alone:.2f})")


if __name__ == "__main__":
    main()
