"""Overhead of our trainer's step over a bare PyTorch loop: same model, batch, diffusion loss, AdamW and EMA.

A: `repro.train.train` (deterministic batch keys, per-step seeded randomness, label dropout, metrics).
B: a bare loop over the same Fashion-MNIST images held in memory as one float tensor.
Both are timed over their second half only (steady state), interleaved A, B, A, B, ... over repeats.
Prints each repeat, the medians and the overhead (goal: at most 3%).

    .venv/bin/python benchmarks/train_overhead.py [--steps 200] [--repeats 3] [--batch 32] [--width 32]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time

import torch

from repro import models
from repro.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from repro.data import build_dataset
from repro.diffusion import create_diffusion
from repro.metrics.throughput import environment
from repro.train import train, update_ema


def run_ours(cfg: RunConfig) -> float:
    with tempfile.TemporaryDirectory() as d:
        train(cfg, d, progress=False)  # prints its DiT-style log lines
        with open(f"{d}/train/metrics.jsonl") as f:
            windows = [json.loads(line) for line in f]
    return windows[-1]["steps_per_s"]  # second half: log_every = steps // 2


def run_bare(cfg: RunConfig, images: torch.Tensor, labels: torch.Tensor) -> float:
    t = cfg.train
    torch.manual_seed(t.seed)
    model = models.build(cfg.model.name, **cfg.model.overrides, in_channels=1, input_size=32, num_classes=10)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=t.betas, eps=1e-8, weight_decay=t.weight_decay)
    diffusion = create_diffusion("", "linear", True, 1000)
    ema_p = [p for _, p in sorted(ema.named_parameters())]
    live_p = [p for _, p in sorted(model.named_parameters())]
    model.train()
    start = None
    for step in range(t.steps):
        if step == t.steps // 2:
            start = time.perf_counter()
        idx = torch.randint(0, len(images), (t.global_batch,))
        x, y = images[idx], labels[idx]
        y = torch.where(torch.rand(len(y)) < model.class_dropout_prob, torch.full_like(y, 10), y)
        tt = torch.randint(0, 1000, (len(x),))
        loss = diffusion.training_losses(lambda a, b, y=y: model(a, b, y), x, tt)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema(ema_p, live_p, t.ema_decay)
    return (t.steps - t.steps // 2) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--width", type=int, default=32)
    args = ap.parse_args()
    cfg = RunConfig(model=ModelConfig("DiC-S", {"width": args.width, "depths": (2, 2, 1, 2, 2)}),
                    data=DataConfig(kind="fashion_mnist"),
                    train=TrainConfig(steps=args.steps, global_batch=args.batch, log_every=args.steps // 2,
                                      ckpt_every=10 * args.steps, num_workers=0))
    ds = build_dataset("fashion_mnist")
    items = [ds[(i, 0)] for i in range(len(ds))]
    images = torch.stack([x for x, _ in items])
    labels = torch.tensor([y for _, y in items])
    ours, bare = [], []
    for _ in range(args.repeats):
        ours.append(run_ours(cfg))
        bare.append(run_bare(cfg, images, labels))
    a, b = statistics.median(ours), statistics.median(bare)
    env = environment("cpu")
    print(f"machine: {env['cpu']} ({env['cpu_count']} cores), {env['threads']} threads, torch {env['torch']}")
    print(f"model: DiC-S width {args.width} depths [2,2,1,2,2], Fashion-MNIST 32x32x1, batch {args.batch}, "
          f"{args.steps} steps (second half timed), {args.repeats} interleaved repeats")
    print("trainer steps/s: " + " ".join(f"{v:.2f}" for v in ours) + f"  median {a:.3f}")
    print("bare    steps/s: " + " ".join(f"{v:.2f}" for v in bare) + f"  median {b:.3f}")
    print(f"trainer time per step / bare: {b / a:.4f}  (overhead {100 * (b / a - 1):+.2f}%)")


if __name__ == "__main__":
    main()
