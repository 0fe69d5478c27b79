"""Denoiser throughput (img/s) under a stated protocol (`specs/protocol.md` section 8).

One forward of the denoiser per image: no VAE, no sampler loop, no CFG doubling; eval mode, inference mode,
inputs pre-allocated on the device, t and y full-batch. Warm-up first, clocks read after a device synchronise,
and the models of one comparison are timed interleaved (repeat 1 of every model, then repeat 2, ...) so that
drift of the machine hits every arm alike; each model's figure is the median of its repeats.

TF32 flags are always set explicitly and recorded. Profiles: "strict_fp32" (matmul and cuDNN TF32 off, the
default) and "torch_default" (matmul off, cuDNN on; what DiCo's unpinned code ran under).
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

FLAG_PROFILES = {"strict_fp32": dict(matmul_tf32=False, cudnn_tf32=False),
                 "torch_default": dict(matmul_tf32=False, cudnn_tf32=True)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ATTENTION = ("fused", "math")  # SDPA's default dispatch, or the math kernel (no fused attention)


@dataclass(frozen=True)
class BenchSettings:
    """Everything a throughput figure depends on; recorded beside it."""

    batch: int = 64
    resolution: int = 256
    device: str = "cpu"
    dtype: str = "fp32"
    flags: str = "strict_fp32"
    attention: str = "fused"
    cudnn_benchmark: bool = False
    warmup: int = 20
    iters: int = 20
    repeats: int = 3

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.flags not in FLAG_PROFILES:
            raise ValueError(f"flags={self.flags!r}: choose one of {', '.join(FLAG_PROFILES)}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention={self.attention!r}: choose one of {', '.join(ATTENTION)}")
        if self.resolution % 8:
            raise ValueError(f"resolution={self.resolution} must be a multiple of 8 (the VAE's factor)")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device={self.device!r}: choose cpu or cuda[:N]")
        for name in ("batch", "iters", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.warmup < 0:
            raise ValueError("warmup must be >= 0")

    @property
    def latent_size(self) -> int:
        return self.resolution // 8


def apply_flags(settings: BenchSettings) -> dict:
    """Pin TF32 and cuDNN flags for the run and return what was set."""
    profile = FLAG_PROFILES[settings.flags]
    torch.backends.cuda.matmul.allow_tf32 = profile["matmul_tf32"]
    torch.backends.cudnn.allow_tf32 = profile["cudnn_tf32"]
    torch.backends.cudnn.benchmark = settings.cudnn_benchmark
    return dict(profile=settings.flags, **profile, cudnn_benchmark=settings.cudnn_benchmark)


def environment(device: str) -> dict:
    """The machine a figure was measured on."""
    env = dict(torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads())
    if device.startswith("cuda"):
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    else:
        env.update(cpu=_cpu_name(), cpu_count=_cpu_count())
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_count() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _attention_context(kind: str):
    if kind == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def measure(models: dict[str, nn.Module], settings: BenchSettings) -> dict:
    """Time each model's forward, interleaved; returns per-model img/s (median and repeats) and the protocol.

    Models must already be on `settings.device` in `settings.dtype`; the first model is the ratio's baseline.
    """
    flags = apply_flags(settings)
    dev, dtype, n = settings.device, DTYPES[settings.dtype], settings.batch
    inputs = {}
    for name, model in models.items():
        model.eval()
        # the model's own input side: latent models are built at resolution / 8, pixel models at the resolution
        x = torch.randn(n, model.in_channels, model.input_size, model.input_size, device=dev, dtype=dtype)
        t = torch.randint(0, 1000, (n,), device=dev)
        y = torch.randint(0, model.num_classes, (n,), device=dev)
        inputs[name] = (x, t, y)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode(), _attention_context(settings.attention):
        for name, model in models.items():
            for _ in range(settings.warmup):
                model(*inputs[name])
        _sync(dev)
        for _ in range(settings.repeats):
            for name, model in models.items():
                _sync(dev)
                start = time.perf_counter()
                for _ in range(settings.iters):
                    model(*inputs[name])
                _sync(dev)
                times[name].append(time.perf_counter() - start)
    rows = []
    for name in models:
        rates = [settings.iters * n / s for s in times[name]]
        rows.append(dict(model=name, img_per_s=statistics.median(rates), img_per_s_repeats=rates,
                         input=list(inputs[name][0].shape[1:])))
    base = rows[0]["img_per_s"]
    for row in rows:
        row["ratio_to_first"] = row["img_per_s"] / base
    return dict(protocol=dict(asdict(settings), timed="denoiser forward, t and y full-batch, inference_mode",
                              flags=flags, environment=environment(dev)), results=rows)
