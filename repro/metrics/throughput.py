"""Denoiser throughput (img/s) under a stated protocol (`specs/protocol.md` section 8).

One forward of the denoiser per image: no VAE, no sampler loop, no CFG doubling; eval mode, inference mode,
inputs pre-allocated on the device, t and y full-batch. Warm-up first, clocks read after a device synchronise,
and the models of one comparison are timed interleaved (repeat 1 of every model, then repeat 2, ...) so that
drift of the machine hits every arm alike; each model's figure is the median of its repeats.

How a repeat is timed depends on the device (recorded as `statistic`). On a GPU, kernels queue asynchronously, so
each model's `iters` forwards are one block timed between two synchronisations. On a CPU a forward returns when it
is done, so the models take turns forward by forward and every forward is timed alone; a repeat's figure is the
model's median forward. A forward stalled by a daemon or by the hypervisor moves a sum by the stall but leaves a
median alone, and a neighbour on the host slowing the memory bus for a few seconds slows every model's forwards
of those seconds, not one model's block. With each repeat in a fresh process and ratios taken repeat by repeat
(`repeat_ratio`), the demo's ratios repeated within 6.0% and 8.3% between two runs on the 2-core VM, against
10.6-17.5% with blocks of 10 forwards in one process (`benchmarks/results/*-bench-repeat-*`).

TF32 flags are always set explicitly and recorded. Profiles: "strict_fp32" (matmul and cuDNN TF32 off, the
default) and "torch_default" (matmul off, cuDNN on; what DiCo's unpinned code ran under).

Interleaving evens out drift, not contention: a figure timed while other processes share the machine is noise.
So measure() also records what else ran: the load average before and after, and during every timed repeat the
share of the machine's CPU used by other processes (busy jiffies of /proc/stat minus this process's own CPU time,
over wall time x CPUs). One rule for every row: it is unreliable when others used more than MAX_OTHERS_CPU_SHARE
of the machine during its repeats or its repeats spread more than MAX_SPREAD ((max - min) / median); the
measurement is reliable only when every row is, and the reasons are recorded beside the figures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from repro.distributed import synchronize

FLAG_PROFILES = {"strict_fp32": dict(matmul_tf32=False, cudnn_tf32=False),
                 "torch_default": dict(matmul_tf32=False, cudnn_tf32=True)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ATTENTION = ("fused", "math")  # SDPA's default dispatch, or the math kernel (no fused attention)
# a row is unreliable above either: other processes' share of the machine's CPU during its repeats, and the
# spread of its repeats ((max - min) / median img/s)
MAX_OTHERS_CPU_SHARE = 0.10
MAX_SPREAD = 0.10


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
    channels_last: bool = False  # model and inputs in torch.channels_last (NHWC) memory format
    cpu_threads: int | None = None  # torch's intra-op threads while timing on a CPU; None: PyTorch's default
    fresh_processes: bool = False  # on a CPU, each repeat in a new process (see _repeats_in_fresh_processes)

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
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError("cpu_threads must be >= 1")
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
    env = dict(torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads(),
               host=platform.node())
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


def _attention_context(kind: str):
    if kind == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (/proc/loadavg); None where the system has none."""
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except (OSError, ValueError):
        return None


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_busy() -> tuple[float, int] | None:
    """(CPU-seconds the whole machine has been busy, number of CPUs) from /proc/stat; None without one."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    cpus = sum(1 for ln in lines if ln.startswith("cpu") and ln[3:4].isdigit())
    head = lines[0].split() if lines else []
    if not cpus or not head or head[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal (guest is already counted in user); steal is CPU the
    # hypervisor gave to someone else while this machine wanted it: contention too
    v = [int(x) for x in head[1:9]] + [0] * max(0, 9 - len(head))
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / _TICK, cpus


def _own_cpu() -> float:
    """CPU-seconds used by this process, all its threads (getrusage: exact, not sampled in ticks)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class _Others:
    """CPU-seconds used by other processes over one timed window, and the window's capacity (wall x CPUs)."""

    def __init__(self):
        self.machine = _machine_busy()
        self.own = _own_cpu()

    def stop(self, wall: float) -> tuple[float, float] | None:
        end = _machine_busy()
        if self.machine is None or end is None:
            return None
        others = (end[0] - self.machine[0]) - (_own_cpu() - self.own)
        return max(0.0, others), wall * end[1]


def repeat_ratio(rates: list[float], base_rates: list[float]) -> tuple[float, float]:
    """The ratio of two rows of one measurement and its spread: the median over repeats of the two figures'
    ratio in that repeat. A repeat's two figures were timed in the same process and the same seconds, so what a
    process or a minute of the machine does to both cancels; a ratio of the two medians would mix figures of
    different repeats."""
    per = [a / b for a, b in zip(rates, base_rates, strict=True)]
    median = statistics.median(per)
    return median, (max(per) - min(per)) / median if median > 0 else float("inf")


def ratio_reliability(row: dict, base: dict, spread: float) -> list[str]:
    """Why a ratio is unreliable (empty: it is reliable): other processes during either row's repeats, or a
    spread of its per-repeat ratios over MAX_SPREAD. The machine's drift, which the img/s rule counts, cancels."""
    def contended(r: dict) -> list[str]:
        return [why for why in r["reasons"] if why.startswith("other processes")]

    reasons = contended(row) + ([f"its baseline: {why}" for why in contended(base)] if base is not row else [])
    if spread > MAX_SPREAD:
        reasons.append(f"its per-repeat ratios spread {spread:.0%} ((max - min) / median; limit {MAX_SPREAD:.0%})")
    return reasons


def _row_reliability(rates: list[float], windows: list[tuple[float, float] | None]) -> dict:
    """Spread of the repeats, others' CPU share over them, and whether the row passes the one rule."""
    median = statistics.median(rates)
    spread = (max(rates) - min(rates)) / median if median > 0 else float("inf")
    reasons = []
    if None in windows:
        share, per_repeat = None, None
        reasons_unknown = "others' CPU share not recorded (no /proc/stat)"
    else:
        # over all its repeats: a single short repeat is a few ticks of /proc/stat, too coarse to judge alone
        share = sum(o for o, _ in windows) / max(sum(c for _, c in windows), 1e-12)
        per_repeat = [o / c if c > 0 else None for o, c in windows]
        reasons_unknown = None
    if share is not None and share > MAX_OTHERS_CPU_SHARE:
        reasons.append(f"other processes used {share:.0%} of the machine's CPU during its repeats "
                       f"(limit {MAX_OTHERS_CPU_SHARE:.0%})")
    if spread > MAX_SPREAD:
        reasons.append(f"its repeats spread {spread:.0%} ((max - min) / median; limit {MAX_SPREAD:.0%})")
    out = dict(spread=spread, others_cpu_share=share, others_cpu_share_repeats=per_repeat, reliable=not reasons,
               reasons=reasons)
    if reasons_unknown:
        out["note"] = reasons_unknown
    return out


def _repeat_in_blocks(models, inputs, settings: BenchSettings, rates: dict, windows: dict) -> None:
    """One repeat on a GPU: each model's `iters` forwards as one block between two synchronisations."""
    for name, model in models.items():
        synchronize(settings.device)
        others = _Others()
        start = time.perf_counter()
        for _ in range(settings.iters):
            model(*inputs[name])
        synchronize(settings.device)
        wall = time.perf_counter() - start
        windows[name].append(others.stop(wall))
        rates[name].append(settings.iters * settings.batch / wall)


def _repeat_forward_by_forward(models, inputs, settings: BenchSettings, rates: dict, windows: dict) -> None:
    """One repeat on a CPU: `iters` rounds of one forward of every model, each timed alone; a model's figure is
    its median forward. Every model samples the same seconds of the machine, so what a neighbour on the host
    does to the caches or the memory bus falls on all of them alike."""
    forwards: dict[str, list[float]] = {name: [] for name in models}
    others = _Others()
    start = time.perf_counter()
    for _ in range(settings.iters):
        for name, model in models.items():
            tick = time.perf_counter()
            model(*inputs[name])
            forwards[name].append(time.perf_counter() - tick)
    window = others.stop(time.perf_counter() - start)
    for name in models:
        windows[name].append(window)
        rates[name].append(settings.batch / statistics.median(forwards[name]))


def measure(models: dict[str, nn.Module], settings: BenchSettings) -> dict:
    """Time each model's forward, interleaved; returns per-model img/s (median and repeats), the contention each
    row was timed under and whether it is reliable, the load before and after, and the protocol.

    Models must already be on `settings.device` in `settings.dtype`; the first model is the ratio's baseline.
    """
    load_before = load_average()
    if settings.fresh_processes and not settings.device.startswith("cuda"):
        timed = _repeats_in_fresh_processes(models, settings)
    else:
        timed = _timed_here(models, settings)
    return _result(settings, timed, load_before, load_average())


def _timed_here(models: dict[str, nn.Module], settings: BenchSettings) -> dict:
    """Every repeat in this process: {rates, windows, input shapes, flags, environment}."""
    threads = torch.get_num_threads()
    if settings.cpu_threads is not None and not settings.device.startswith("cuda"):
        torch.set_num_threads(settings.cpu_threads)
    try:
        flags = apply_flags(settings)
        rates, windows, shapes, kernels = _time(models, settings)
        return dict(rates=rates, windows=windows, shapes=shapes, kernels=kernels, flags=flags,
                    environment=environment(settings.device))
    finally:
        torch.set_num_threads(threads)


def _repeats_in_fresh_processes(models: dict[str, nn.Module], settings: BenchSettings) -> dict:
    """Each repeat (its own warm-up, then `iters` rounds) in a new process, one after another.

    On a CPU a process keeps one speed for a model: where its buffers land (cache sets, pages) is drawn once per
    process, and on the 2-core VM the tiny DiT ran its forward in 84 ms in one process and 105-117 ms in others,
    steady within each. Repeats inside one process share that draw; repeats in fresh processes sample it.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    one = dataclasses.replace(settings, repeats=1, fresh_processes=False)
    parts = []
    for _ in range(settings.repeats):
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts.append(pool.submit(_timed_here, models, one).result())
    first = parts[0]
    return dict(rates={n: [p["rates"][n][0] for p in parts] for n in models},
                windows={n: [p["windows"][n][0] for p in parts] for n in models},
                shapes=first["shapes"], kernels=first["kernels"], flags=first["flags"],
                environment=first["environment"])


def _time(models: dict[str, nn.Module], settings: BenchSettings) -> tuple[dict, dict, dict, dict]:
    from repro.models.layers import kernels_used, to_memory_format

    dev, dtype, n = settings.device, DTYPES[settings.dtype], settings.batch
    kernels: dict[str, list[str]] = {}
    fmt = torch.channels_last if settings.channels_last else torch.contiguous_format
    inputs = {}
    for name, model in models.items():
        model.eval()
        if settings.channels_last:
            to_memory_format(model, True)  # 4-D weights (convolutions) only; linear layers are unchanged
        # the model's own input side: latent models are built at resolution / 8, pixel models at the resolution
        x = torch.randn(n, model.in_channels, model.input_size, model.input_size, device=dev, dtype=dtype)
        t = torch.randint(0, 1000, (n,), device=dev)
        y = torch.randint(0, model.num_classes, (n,), device=dev)
        inputs[name] = (x.contiguous(memory_format=fmt), t, y)
    rates: dict[str, list[float]] = {name: [] for name in models}
    windows: dict[str, list] = {name: [] for name in models}
    with torch.inference_mode(), _attention_context(settings.attention):
        for name, model in models.items():
            for _ in range(settings.warmup):
                model(*inputs[name])
            kernels[name] = kernels_used(model)  # what the warm-up ran is what the timed forwards run
        synchronize(dev)
        for _ in range(settings.repeats):
            if dev.startswith("cuda"):
                _repeat_in_blocks(models, inputs, settings, rates, windows)
            else:
                _repeat_forward_by_forward(models, inputs, settings, rates, windows)
    return rates, windows, {name: list(inputs[name][0].shape[1:]) for name in models}, kernels


def kernel_note(rows: list[dict]) -> str | None:
    """A warning when a model timed on a reference mixer stands beside models that are not: the reference
    implementations are exact but slow, so the ratio measures the kernels, not the architectures."""
    reference = [r["model"] for r in rows if "reference" in r.get("kernels", [])]
    if not reference or len(reference) == len(rows):
        return None
    return (f"kernels differ: {', '.join(reference)} ran the exact PyTorch reference of their token mixer "
            f"(slow), not their source's fused kernel; compare their speed with the other rows only as that")


def _result(settings: BenchSettings, timed: dict, load_before, load_after) -> dict:
    dev = settings.device
    rates, windows = timed["rates"], timed["windows"]
    rows = []
    for name in rates:
        rows.append(dict(model=name, img_per_s=statistics.median(rates[name]), img_per_s_repeats=rates[name],
                         input=timed["shapes"][name], kernels=timed["kernels"][name],
                         **_row_reliability(rates[name], windows[name])))
    for row in rows:
        row["ratio_to_first"], row["ratio_spread"] = repeat_ratio(row["img_per_s_repeats"],
                                                                  rows[0]["img_per_s_repeats"])
    reasons = [f"{r['model']}: {why}" for r in rows for why in r["reasons"]]
    statistic = ("per repeat: batch / the median of the model's forwards, each timed alone, the models taking "
                 "turns forward by forward" if not dev.startswith("cuda") else
                 "per repeat: iters x batch / the time of the model's block of iters forwards between two "
                 "synchronisations, the models taking turns block by block")
    if settings.fresh_processes and not dev.startswith("cuda"):
        statistic += "; each repeat in a fresh process, after its own warm-up"
    return dict(protocol=dict(asdict(settings), timed="denoiser forward, t and y full-batch, inference_mode",
                              statistic=statistic,
                              flags=timed["flags"], environment=timed["environment"],
                              reliability_rule=dict(max_others_cpu_share=MAX_OTHERS_CPU_SHARE,
                                                    max_spread=MAX_SPREAD)),
                results=rows, kernel_note=kernel_note(rows), reliable=not reasons, reasons=reasons,
                load=dict(before=load_before, after=load_after))
