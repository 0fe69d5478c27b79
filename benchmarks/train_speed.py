"""Training steps/s of models under the precision and speed switches, through the real trainer, side by side.

    python benchmarks/train_speed.py --models DiC-XL,DiT-XL/2 --batch 32 --steps 30 --device cuda

Each (model, variant) trains `--steps` steps of `repro.train.train` on synthetic latents of ImageNet-256's shape
(the step's cost does not depend on the values) in its own process, one after another, and reports the median
steps/s of the logged steps after the first (warm-up, autotune, compile). Variants:

  fp32        the official code's precision: TF32 matmul and cuDNN on (DiT's and DiC's train.py)
  bf16        + bf16 autocast
  bf16-cl     + channels_last
  bf16-cl-c   + torch.compile

Ratios are printed against the first model and against the official figures: DiC issue #6 reports DiC-XL 2.71 and
DiT-XL 1.71 steps/s on an A100-80G with pre-extracted features; DiCo's logs/log-dico-xl-256x256.txt shows DiCo-XL
at about 4.0 steps/s at global batch 256.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "fp32": {},
    "bf16": {"amp": "bf16"},
    "bf16-cl": {"amp": "bf16", "channels_last": True},
    "bf16-cl-c": {"amp": "bf16", "channels_last": True, "compile": True},
}
OFFICIAL = {"DiC-XL": (2.71, "DiC issue #6, A100-80G, features"), "DiT-XL/2": (1.71, "DiC issue #6, A100-80G"),
            "DiCo-XL": (4.0, "DiCo logs/log-dico-xl-256x256.txt, global batch 256")}


def one(model: str, variant: str, batch: int, steps: int, resolution: int, overrides: dict, root: Path) -> dict:
    """Train one (model, variant) in this process; returns its steps/s and the switches in effect."""
    import shutil

    import torch

    from repro.config import RunConfig
    from repro.pilot import _synthetic_latents
    from repro.train import train
    from repro.yamlio import from_dict

    data = _synthetic_latents(root, resolution, max(2 * batch, 16))
    cfg = from_dict(RunConfig, {
        "model": {"name": model, "overrides": overrides},
        "data": {"kind": "latents", "path": str(data), "resolution": resolution},
        "train": {"steps": steps, "global_batch": batch, "ckpt_every": steps, "log_every": 1, "num_workers": 0,
                  "tf32_matmul": True, "tf32_cudnn": True, **VARIANTS[variant]}})
    run_dir = root / "runs" / f"{model.replace('/', '_')}-{variant}"
    started = time.perf_counter()
    train(cfg, run_dir, progress=False)
    wall = time.perf_counter() - started
    lines = [json.loads(s) for s in (run_dir / "train" / "metrics.jsonl").read_text().splitlines() if s.strip()]
    steady = [m["steps_per_s"] for m in lines[2:]] or [m["steps_per_s"] for m in lines]
    shutil.rmtree(run_dir)  # an XL checkpoint is 11 GB
    return {"model": model, "variant": variant, "batch": batch, "steps": steps,
            "steps_per_s": statistics.median(steady), "steps_per_s_spread": (max(steady) - min(steady)) /
            statistics.median(steady), "peak_mem_bytes": max(m["peak_mem_bytes"] for m in lines),
            "switches": lines[-1]["switches"], "wall_s": round(wall, 1), "loss_last": lines[-1]["loss"],
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="DiC-XL,DiT-XL/2")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batch", type=int, default=32, help="per-GPU batch (the papers': 256 over 8 GPUs)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--overrides", default="{}", help="JSON switch overrides for every model (tiny CPU checks)")
    p.add_argument("--out", help="write the JSON here")
    p.add_argument("--one", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args()
    overrides = json.loads(args.overrides)
    if args.one:
        print(json.dumps(one(*args.one, args.batch, args.steps, args.resolution, overrides, Path(args.root))))
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="train-speed-") as root:
        for variant in args.variants.split(","):
            for model in args.models.split(","):
                cmd = [sys.executable, __file__, "--one", model, variant, "--batch", str(args.batch),
                       "--steps", str(args.steps), "--resolution", str(args.resolution),
                       "--overrides", args.overrides, "--root", root]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    tail = (done.stderr.strip().splitlines() or ["?"])[-1]
                    rows.append({"model": model, "variant": variant, "failed": tail})
                    print(f"{model:10s} {variant:10s} failed: {tail}", flush=True)
                    continue
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                ref = OFFICIAL.get(model)
                versus = f"  ({row['steps_per_s'] / ref[0]:.2f}x of {ref[0]} in {ref[1]})" if ref else ""
                print(f"{model:10s} {variant:10s} {row['steps_per_s']:7.3f} steps/s at batch {args.batch}, "
                      f"peak {row['peak_mem_bytes'] / 2**30:.1f} GiB, spread {row['steps_per_s_spread']:.0%}"
                      f"{versus}", flush=True)
    base = args.models.split(",")[0]
    for variant in args.variants.split(","):
        by = {r["model"]: r for r in rows if r["variant"] == variant and "steps_per_s" in r}
        if base in by:
            ratios = ", ".join(f"{m} {r['steps_per_s'] / by[base]['steps_per_s']:.2f}x" for m, r in by.items())
            print(f"{variant}: relative to {base}: {ratios}")
    if "DiC-XL" in args.models and "DiT-XL/2" in args.models:
        print(f"official DiC-XL / DiT-XL: {2.71 / 1.71:.2f}x (DiC issue #6)")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
