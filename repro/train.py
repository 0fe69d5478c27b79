"""The one trainer, for every model of every study (DiT's `train.py`, made resumable and world-size invariant).

Run it again with the same run folder and it continues from the newest checkpoint as if nothing happened:
everything random is a function of (seed, step) -- which samples form the batch, their augmentation, the
diffusion timesteps and noise, and the label dropout -- so a killed and restarted run is bit-identical on the
CPU to an uninterrupted one, and a run on W processes sees the same global batches as on one (and, with
`train.reduce_shards`, ends on the same bits).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import resource
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from repro import distributed, models, rundir
from repro.config import (RunConfig, config_hash, dump_run_record, load_run_record, resolve_tf32, run_id,
                          run_identity, to_dict)
from repro.data import LATENT_SCALE, VAE, build_dataset
from repro.diffusion import create_diffusion
from repro.errors import ConfigError
from repro.models.layers import to_memory_format
from repro.precision import set_tf32, tf32_flags


class Interrupted(Exception):
    """Training stopped early on request (preemption, time limit) after writing a checkpoint at `step`."""

    def __init__(self, step: int):
        super().__init__(f"interrupted at step {step}; checkpoint written")
        self.step = step


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the run stops and keeps its last good checkpoint."""


def seed_for(*parts) -> int:
    """A 63-bit seed from any tuple of ints and strings (stable across processes, machines and versions)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class StepBatches(Sampler):
    """Keys (dataset index, augmentation seed) of this rank's share of each global batch, from `start` on.

    Global sample position p = step * global_batch + i walks through one seeded permutation of the dataset per
    epoch; rank r takes positions [r*b, (r+1)*b) of every global batch. The data position is thus the step.
    """

    def __init__(self, n_items: int, global_batch: int, rank: int, world: int, seed: int, start: int, stop: int):
        self.n, self.global_batch, self.seed, self.start, self.stop = n_items, global_batch, seed, start, stop
        self.local = global_batch // world
        self.offset = rank * self.local
        self._perm: tuple[int, torch.Tensor] | None = None

    def _index(self, position: int) -> int:
        epoch, i = divmod(position, self.n)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(seed_for(self.seed, "epoch", epoch))
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return int(self._perm[1][i])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.stop):
            base = step * self.global_batch + self.offset
            yield [(self._index(p), seed_for(self.seed, "item", p)) for p in range(base, base + self.local)]

    def __len__(self) -> int:
        return self.stop - self.start


@torch.no_grad()
def update_ema(ema_params: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * param, over the parameters (buffers excluded), as DiT."""
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def model_spec(cfg: RunConfig, sample_shape: tuple[int, ...], num_classes: int) -> dict:
    """Preset name and build kwargs of the run's model, its input geometry taken from the data.

    Stored in every checkpoint, so sampling rebuilds the model without the training data.
    """
    channels, size = sample_shape[0], sample_shape[-1]
    implied = {"in_channels": channels, "input_size": size, "num_classes": num_classes}
    for key, value in implied.items():
        if key in cfg.model.overrides and cfg.model.overrides[key] != value:
            raise ConfigError(f"model.overrides.{key}={cfg.model.overrides[key]} contradicts the data ({value})")
    return {"name": cfg.model.name, "kwargs": {**cfg.model.overrides, **implied}}


def make_dataset(cfg: RunConfig):
    d = cfg.data
    options = {"fashion_mnist": {"flip": d.flip, "resolution": d.resolution},
               "imagenet_folder": {"resolution": d.resolution, "flip": d.flip}, "latents": {}}
    return build_dataset(d.kind, **({"root": d.path} if d.path else {}), **options[d.kind])


def check_run_dir(paths: rundir.RunPaths, cfg: RunConfig) -> bool:
    """True if the folder already holds this run; ConfigError if it holds another (never mix two runs).

    Runs are compared by identity (`config.run_identity`): how often a run logs or checkpoints may change
    between launches, what it trains may not.
    """
    existing = load_run_record(paths.config)
    if existing is None:
        return False
    if run_identity(existing) != run_identity(cfg):
        raise ConfigError(f"{paths.config}: the run folder holds another run "
                          f"({run_id(existing)}, this config is {run_id(cfg)}); use a new --out")
    return True


def train(cfg: RunConfig, run_dir: str | Path, progress: bool | None = None,
          stop: Callable[[], bool] | None = None, keep_steps: tuple[int, ...] = ()) -> dict:
    """Train the run in `run_dir` to `cfg.train.steps`, resuming from its newest checkpoint; returns last metrics.

    `stop` is asked after every step (the launcher sets it on SIGUSR2, SLURM's warning before preemption or the
    time limit); when any rank says yes, every rank stops at that same step, a checkpoint is written and
    `Interrupted` is raised, so the requeued job resumes exactly there.

    `keep_steps` are also checkpointed and never pruned (a study evaluates them: FID against training step);
    resume is bit-exact, so extra checkpoints do not change the run.
    """
    cfg = resolve_tf32(cfg)  # unset TF32 flags: the model family's released code
    t = cfg.train
    # ---------------------------------------------------------------- set-up: processes, precision, folder
    env = distributed.init()
    device = env.device
    if t.global_batch % env.world:
        raise ConfigError(f"train.global_batch={t.global_batch} is not divisible by {env.world} processes")
    if t.reduce_shards and t.reduce_shards % env.world:
        raise ConfigError(f"train.reduce_shards={t.reduce_shards} cannot be split over {env.world} processes "
                          f"(use a power of two up to {t.reduce_shards})")
    set_tf32(t.tf32_matmul, t.tf32_cudnn)
    amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[t.amp]
    paths = rundir.RunPaths(run_dir)

    # ---------------------------------------------------------------- data (fails fast, before the model)
    dataset = make_dataset(cfg)
    sample_x, _ = dataset[(0, 0)]
    described = dataset.describe()
    num_classes = described["num_classes"]
    vae = None
    if cfg.data.kind == "imagenet_folder" and cfg.data.vae:  # DiT's on-the-fly encoding: fresh VAE noise each step
        vae = VAE(cfg.data.vae, device)
        sample_x = torch.zeros(vae.latent_shape(cfg.data.resolution))
        described = {**described, **vae.describe()}

    # ---------------------------------------------------------------- model, EMA, optimiser, diffusion
    torch.manual_seed(t.seed)  # identical initial weights on every rank
    spec = model_spec(cfg, tuple(sample_x.shape), num_classes)
    model = models.build(spec["name"], **spec["kwargs"]).to(device)
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    model = to_memory_format(model, t.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # starts as an exact copy
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=t.betas, eps=1e-8, weight_decay=t.weight_decay,
                            **({"fused": True} if t.fused_adamw else {}))
    scaler = torch.amp.GradScaler(device.type, enabled=t.amp == "fp16")
    diffusion = create_diffusion("", cfg.diffusion.noise_schedule, cfg.diffusion.learn_sigma,
                                 cfg.diffusion.diffusion_steps)

    # ---------------------------------------------------------------- run folder (only once the inputs are valid)
    exists = check_run_dir(paths, cfg)  # on every rank, so a mismatch stops them all rather than hang one
    distributed.barrier(env)
    if env.is_main and not exists:
        rundir.atomic_write_text(paths.config, dump_run_record(cfg))
    if env.is_main:  # which data, and pixels / pre-extracted / on-the-fly latents: a confound between arms
        rundir.atomic_write_text(paths.train / "data.json", json.dumps(described, indent=2) + "\n")
    distributed.barrier(env)

    # ---------------------------------------------------------------- resume from the newest good checkpoint
    if env.is_main:  # no writer runs yet: what a kill mid-write left behind is garbage
        for folder in (paths.checkpoints, paths.train):
            if removed := rundir.remove_temp_files(folder):
                _note(paths, f"{folder}: removed {len(removed)} temp file(s) of a write that was killed: "
                             f"{', '.join(removed)}")
    step, window = 0, None
    state = _load_newest_good(paths, env)
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        scaler.load_state_dict(state["scaler"])
        step = state["step"]
        _set_rng_state(state["rng"])
        window = state.get("log_window")  # absent from checkpoints written before it was stored
        del state
    # Where each rank runs, from the rank itself: the job's layout is in the run folder, not in a guess.
    rundir.append_line(paths.train / "ranks.jsonl", json.dumps({
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(), "pid": os.getpid(),
        "rank": env.rank, "local_rank": env.local_rank, "world": env.world, "device": str(device),
        "start_step": step, "slurm_job": os.environ.get("SLURM_JOB_ID")}))
    if env.is_main and (torn := rundir.truncate_jsonl(paths.metrics, step)):
        _note(paths, f"{paths.metrics}: dropped {torn} line(s) that are not a JSON record (a torn append); "
                     f"the steps after {step} are logged again")
    exact = t.reduce_shards is not None  # gradients summed over a fixed tree of shards: no DDP
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if env.world > 1 and not exact else model
    if t.compile:  # the wrapper, not the module: checkpoints and the EMA keep the module's own parameter names
        net = torch.compile(net)
    model.train()
    switches = {"device": device.type, "amp": t.amp, **tf32_flags(), "channels_last": t.channels_last,
                "compile": t.compile, "fused_adamw": t.fused_adamw}
    ema_params = [p for _, p in sorted(ema.named_parameters())]
    live_params = [p for _, p in sorted(model.named_parameters())]

    batches = StepBatches(len(dataset), t.global_batch, env.rank, env.world, t.seed, step, t.steps)
    if t.num_workers == 0 and hasattr(dataset, "batch"):  # in memory: one gather per step, no collate
        loader = (dataset.batch(keys) for keys in batches)
    else:
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=t.num_workers,
                            pin_memory=device.type == "cuda")
    log = _Logger(paths, env, t.steps, step, progress)
    local = t.global_batch // env.world
    null_class = model.num_classes
    step_gen = torch.Generator(device=device)
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss, mse, vb over the log window
    # the window's sums over ranks: already the same bits on every rank where the shards' losses were tree-summed
    over_ranks = (lambda v: v) if exact else (lambda v: distributed.all_mean(v, env))
    window_steps = 0
    if window is not None:  # a resume between log steps: the window goes on where it stopped (metrics bit-exact)
        sums.copy_(window["sums"])
        window_steps = window["steps"]
    window_start, timed_steps, last = time.perf_counter(), 0, {}  # throughput: the steps this process timed
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def backward(x, timesteps, noise, y) -> torch.Tensor:
        """Loss and backward of one batch (this rank's share, or a shard of it); its (loss, mse, vb) means."""

        def model_fn(xt, tt):
            with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
                # Only the model sees NHWC: the diffusion's reductions (loss, VLB) sum in the same order whatever
                # layout the model ran in.
                return net(xt.to(memory_format=memory_format), tt, y).float().contiguous()

        losses = diffusion.training_losses(model_fn, x, timesteps, noise=noise)
        loss = losses["loss"].mean()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        return torch.stack([loss.detach(), losses["mse"].mean().detach(), losses["vb"].mean().detach()]).double()

    # ---------------------------------------------------------------- loop
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        # Randomness of the global batch, drawn identically on every rank and sliced: world-size invariant.
        step_gen.manual_seed(seed_for(t.seed, "step", step))
        sl = slice(env.rank * local, (env.rank + 1) * local)
        if vae is not None:
            mean, std = vae.posterior(x)  # a posterior sample, its noise from the global stream as the rest
            eps = torch.randn((t.global_batch, *mean.shape[1:]), generator=step_gen, device=device)[sl]
            x = (mean + std * eps) * LATENT_SCALE
        shape = (t.global_batch, *x.shape[1:])
        timesteps = torch.randint(0, diffusion.num_timesteps, (t.global_batch,), generator=step_gen,
                                  device=device)[sl]
        noise = torch.randn(shape, generator=step_gen, device=device)[sl]
        drop = (torch.rand(t.global_batch, generator=step_gen, device=device) < model.class_dropout_prob)[sl]
        y = torch.where(drop, torch.full_like(y, null_class), y)

        lr = t.lr * min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else t.lr
        for group in opt.param_groups:
            group["lr"] = lr

        if not exact:
            torch.manual_seed(seed_for(t.seed, "rank", env.rank, step))  # anything else random inside the step
            stats = backward(x, timesteps, noise, y)
        else:  # TrainConfig.reduce_shards: a backward per shard, summed over one tree whatever rank holds which
            grads, parts = distributed.PairwiseSum(), distributed.PairwiseSum()
            size = t.global_batch // t.reduce_shards
            for k in range(local // size):
                torch.manual_seed(seed_for(t.seed, "shard", env.rank * (local // size) + k, step))
                part = slice(k * size, (k + 1) * size)
                parts.add(backward(x[part], timesteps[part], noise[part], y[part]))
                with_grad = [p for p in live_params if p.grad is not None]
                grads.add(torch.cat([p.grad.reshape(-1) for p in with_grad]))
            total = distributed.tree_sum(grads.total(), env) / t.reduce_shards  # a power of two: exact
            offset = 0
            for p in with_grad:  # into the last shard's gradient tensors, which have the parameters' layout
                p.grad.copy_(total[offset:offset + p.numel()].view(p.shape))
                offset += p.numel()
            stats = distributed.tree_sum(parts.total(), env) / t.reduce_shards
        grad_norm = None
        if t.grad_clip is not None:
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        scaler.step(opt)
        scaler.update()
        update_ema(ema_params, live_params, t.ema_decay)
        step += 1
        sums += stats
        window_steps += 1
        timed_steps += 1

        if step % t.log_every == 0 or step == t.steps:
            if grad_norm is None:  # measured at log steps only when not clipping (it costs a pass)
                grad_norm = torch.linalg.vector_norm(
                    torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
            distributed.synchronize(device)
            elapsed = time.perf_counter() - window_start
            mean = over_ranks(sums / window_steps)
            if not torch.isfinite(mean).all():
                raise TrainingDiverged(f"non-finite loss between steps {step - window_steps} and {step}; "
                                       f"last good checkpoint: {rundir.latest_checkpoint(paths) or 'none'}")
            last = {"step": step, "loss": mean[0].item(), "mse": mean[1].item(), "vb": mean[2].item(),
                    "grad_norm": float(grad_norm), "lr": lr, "steps_per_s": timed_steps / elapsed,
                    "img_per_s": timed_steps * t.global_batch / elapsed, "peak_mem_bytes": _peak_memory(device),
                    "switches": switches}
            log.metrics(last)
            sums.zero_()
            window_start, window_steps, timed_steps = time.perf_counter(), 0, 0
        else:
            log.advance(step)

        stopping = stop is not None and step < t.steps and _anyone(stop(), env, device)
        if step % t.ckpt_every == 0 or step == t.steps or stopping or step in keep_steps:
            # The open log window's sums, averaged over ranks (a collective: on every rank), go into the
            # checkpoint, so a resume at a step that is not a log step logs the same numbers as no resume.
            window = over_ranks(sums)
            if window_steps and not torch.isfinite(window).all():
                raise TrainingDiverged(f"non-finite loss before step {step}; the checkpoint was not written; "
                                       f"last good checkpoint: {rundir.latest_checkpoint(paths) or 'none'}")
            if env.is_main:
                writing = time.perf_counter()
                rundir.save_atomic({
                    "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "scaler": scaler.state_dict(), "step": step, "data_position": step * t.global_batch,
                    "rng": _rng_state(), "world": env.world, "config_hash": config_hash(cfg), "model_spec": spec,
                    "config": to_dict(cfg), "log_window": {"sums": window.cpu().clone(), "steps": window_steps},
                }, paths.checkpoint(step))
                # how long a checkpoint takes is what a preemption warning (signal_delay_s) must cover
                rundir.append_line(paths.train / "checkpoints.jsonl", json.dumps({
                    "step": step, "bytes": paths.checkpoint(step).stat().st_size,
                    "write_s": round(time.perf_counter() - writing, 3)}))
                rundir.prune_checkpoints(paths, t.keep_last, keep_steps)
            distributed.barrier(env)
        if stopping:
            log.close()
            raise Interrupted(step)
    log.close()
    return last or {"step": step}


# -------------------------------------------------------------------------------------------- helpers
# What resuming reads from a checkpoint: a file without these, or of other types, is damaged.
RESUME_NEEDS = {"model": dict, "ema": dict, "opt": dict, "scaler": dict, "step": int, "rng": dict}
RESUME_OPTIONAL = {"log_window": dict}


def _load_newest_good(paths: rundir.RunPaths, env) -> dict | None:
    """The newest checkpoint that loads and holds what resuming needs; damaged ones are moved aside with a line each.

    Every rank reads the same files and so reaches the same verdict (an error stops all ranks, none hangs in a
    barrier); rank 0 moves files only once every rank has read them. None if there is no checkpoint; ConfigError
    if there were some and none was good, rather than silently starting over in the same call.
    """
    steps = rundir.checkpoint_steps(paths)
    distributed.barrier(env)  # every rank has listed the folder before rank 0 moves anything out of it
    state, damaged = None, []
    for s in reversed(steps):
        path = paths.checkpoint(s)
        try:  # to the CPU first: no GPU-0 memory spike
            state = rundir.load_checkpoint(path, RESUME_NEEDS, optional=RESUME_OPTIONAL)
        except rundir.DamagedCheckpoint as e:
            damaged.append((path, e))
            continue
        if state["step"] != s:  # a file copied or renamed by hand: resuming would mislabel every later step
            damaged.append((path, f"{path}: damaged checkpoint: it holds step {state['step']}, its name says {s}"))
            state = None
            continue
        break
    distributed.barrier(env)  # ... and has read the damaged ones before they move
    if env.is_main:
        for path, e in damaged:
            aside = rundir.set_aside(path)
            resuming = "" if state is None else f", resuming from {paths.checkpoint(state['step']).name}"
            _note(paths, f"{e}; moved aside to {aside.name}{resuming}")
    if damaged and state is None:
        raise ConfigError(f"{paths.checkpoints}: all {len(damaged)} checkpoint(s) were damaged and were moved aside "
                          f"(*.pt.damaged); run train again to start from step 0")
    return state


def _note(paths: rundir.RunPaths, text: str) -> None:
    """A line of rank 0 about the run folder itself (files repaired or set aside), to log.txt and stdout."""
    rundir.append_line(paths.log, text)
    print(text, flush=True)


def _rng_state() -> dict:
    import random

    import numpy as np

    # numpy's state as a tensor, not the ndarray get_state() returns: a checkpoint holds only what
    # torch.load(weights_only=True) reads without allowing numpy's pickles
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]  # keys: a tensor, or an ndarray in checkpoints written before
    np.random.set_state((name, np.asarray(keys).astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _anyone(flag: bool, env, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any (signals reach ranks at different steps)."""
    if env.world == 1:
        return flag
    return distributed.all_mean(torch.tensor([float(flag)], device=device), env).item() > 0


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class _Logger:
    """metrics.jsonl and log.txt on rank 0; a rich progress bar on a terminal, DiT-style lines otherwise."""

    def __init__(self, paths: rundir.RunPaths, env, total: int, start: int, progress: bool | None):
        self.paths, self.enabled, self.total = paths, env.is_main, total
        self.bar = None
        if self.enabled and (sys.stdout.isatty() if progress is None else progress):
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[status]}"))
            self.task = self.bar.add_task("train", total=total, completed=start, status="")
            self.bar.start()
        if self.enabled and start:
            self._line(f"resumed at step {start} from {rundir.latest_checkpoint(paths)}")

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step)

    def metrics(self, m: dict) -> None:
        if not self.enabled:
            return
        rundir.append_line(self.paths.metrics, json.dumps(m))
        # DiT's line format, so logs of DiT, DiC, DiCo and ours parse alike
        text = f"(step={m['step']:07d}) Train Loss: {m['loss']:.4f}, Train Steps/Sec: {m['steps_per_s']:.2f}"
        if self.bar is not None:
            self.bar.update(self.task, completed=m["step"], status=f"loss {m['loss']:.4f}")
            rundir.append_line(self.paths.log, text)
        else:
            self._line(text)

    def _line(self, text: str) -> None:
        rundir.append_line(self.paths.log, text)
        if self.bar is None:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


__all__ = ["Interrupted", "StepBatches", "TrainingDiverged", "model_spec", "seed_for", "train", "update_ema"]
