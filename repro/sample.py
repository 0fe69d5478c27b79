"""Samples of a trained run, the papers' way: EMA weights, DDPM-250, uniform random labels, an ADM-style npz.

Sample p's label and starting noise come from seeds derived from (seed, p) alone, so with DDIM (eta 0) the set
does not depend on the batch size or the number of processes. The ancestral (DDPM) sampler's fresh noise at
each step is drawn per shard, so its samples depend on the per-process batch and the world size, as in DiT;
both are recorded, and shards are kept apart by them so that a resumed job never mixes two layouts.

Output: `samples/<protocol>.npz` with uint8 NHWC images under `arr_0` and labels under `arr_1`,
`samples/<protocol>.json` with the protocol, and a PNG grid. Sampling resumes shard by shard.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from repro import distributed, models, rundir
from repro.config import RunConfig, SampleConfig, config_hash, load_run_record, protocol_id, sample_stem
from repro.data import VAE, to_uint8
from repro.diffusion import cfg_model_fn, create_diffusion
from repro.errors import ConfigError
from repro.precision import tf32
from repro.train import seed_for


def load_run(run_dir: Path) -> RunConfig:
    paths = rundir.RunPaths(run_dir)
    cfg = load_run_record(paths.config)
    if cfg is None:
        raise ConfigError(f"{paths.config}: no run here (train it first: repro train RUN.yaml --out {run_dir})")
    return cfg


def sample_labels(s: SampleConfig, num_classes: int, total: int) -> torch.Tensor:
    """Labels of positions 0..total-1: uniform random (the papers) or exactly balanced over classes."""
    g = torch.Generator().manual_seed(seed_for(s.seed, "labels"))
    if s.labels == "uniform":
        return torch.randint(0, num_classes, (total,), generator=g)
    return (torch.arange(total) % num_classes)[torch.randperm(total, generator=g)]


def sample(run_dir: str | Path, overrides: dict | None = None, progress: bool = False,
           step: int | None = None) -> Path:
    """Sample the run in `run_dir` with its sample config plus `overrides`; returns the npz path (resumable).

    `step` samples an intermediate checkpoint instead of the newest, into samples/<protocol>-ckpt<step>.npz.
    """
    run_dir = Path(run_dir)
    cfg = load_run(run_dir)
    s = dataclasses.replace(cfg.sample, **(overrides or {}))
    paths = rundir.RunPaths(run_dir)
    ckpt = rundir.latest_checkpoint(paths) if step is None else paths.checkpoint(step)
    if ckpt is None:
        raise ConfigError(f"{paths.checkpoints}: no checkpoint to sample from")
    if not ckpt.is_file():
        raise ConfigError(f"{ckpt}: no checkpoint at step {step} (list it in evaluate.checkpoints before training "
                          f"so that it is kept)")
    env = distributed.init()
    device = env.device
    state = _load_checkpoint(paths, ckpt, "ema" if s.use_ema else "model", env)
    spec = state["model_spec"]
    model = models.build(spec["name"], **spec["kwargs"])
    model.load_state_dict(state["ema" if s.use_ema else "model"])
    model = model.to(device).eval()
    diffusion = create_diffusion(s.steps if s.sampler == "ddpm" else f"ddim{s.steps}", cfg.diffusion.noise_schedule,
                                 cfg.diffusion.learn_sigma, cfg.diffusion.diffusion_steps)
    if s.cfg_scale > 1 and model.class_dropout_prob <= 0:
        raise ConfigError("sample.cfg_scale > 1 needs a model trained with label dropout")
    vae = None
    if cfg.data.kind == "latents":
        if not cfg.data.vae:
            raise ConfigError("data.vae: a latent model needs the VAE folder to decode its samples")
        vae = VAE(cfg.data.vae, device)

    stem = sample_stem(protocol_id(s), step)
    npz = paths.samples / f"{stem}.npz"
    done = npz.with_suffix(".json")
    if npz.exists() and done.exists():
        record = json.loads(done.read_text())
        if (record.get("checkpoint_step"), record.get("per_proc_batch"), record.get("world_size"),
                record.get("tf32_matmul", True), record.get("tf32_cudnn", True)) == \
                (state["step"], s.per_proc_batch, env.world, s.tf32_matmul, s.tf32_cudnn):
            return npz  # this exact sample set is already there
    shard_dir = paths.samples / f".{stem}.b{s.per_proc_batch}x{env.world}.shards"
    per_shard = s.per_proc_batch * env.world
    n_shards = -(-s.num_samples // per_shard)  # rounded up to whole global batches, extras dropped at the end
    labels = sample_labels(s, model.num_classes, n_shards * per_shard)
    shape = (model.in_channels, model.input_size, model.input_size)
    gen = torch.Generator(device=device)
    timing = {"shards": 0, "images": 0, "sampler_s": 0.0, "decode_s": 0.0}  # this call's shards (pilot, cost)
    with tf32(s.tf32_matmul, s.tf32_cudnn) as flags:
        for k in range(n_shards):
            out = shard_dir / f"{k:06d}-rank{env.rank}.npz"
            if not out.exists():  # else done before an interruption
                _sample_shard(k, out, s, labels, per_shard, env, shape, device, gen, model, diffusion, vae, progress,
                              timing)
    distributed.barrier(env)
    if env.is_main:
        arrays, ys = [], []
        for k in range(n_shards):
            for r in range(env.world):
                with np.load(shard_dir / f"{k:06d}-rank{r}.npz") as f:
                    arrays.append(f["arr_0"])
                    ys.append(f["arr_1"])
        images = np.concatenate(arrays)[:s.num_samples]
        _save_npz_atomic(npz, images, np.concatenate(ys)[:s.num_samples])
        protocol = {**dataclasses.asdict(s), "protocol_id": stem, "checkpoint": ckpt.name,
                    "checkpoint_step": state["step"], "weights": "ema" if s.use_ema else "raw",
                    "world_size": env.world, "config_hash": config_hash(cfg), "model": spec["name"],
                    "decode": "vae" if vae is not None else "pixels", "clip_denoised": False,
                    "flags_in_effect": flags, "timing": {**timing, "device": device.type}}
        rundir.atomic_write_text(npz.with_suffix(".json"), json.dumps(protocol, indent=2) + "\n")
        _save_grid(images[:64], npz.with_suffix(".png"))
        shutil.rmtree(shard_dir)  # the npz holds them all now
    distributed.barrier(env)
    return npz


def _load_checkpoint(paths: rundir.RunPaths, ckpt: Path, weights: str, env) -> dict:
    """The checkpoint to sample, verified; a damaged one is moved aside and sampling stops (one line).

    Sampling an older checkpoint instead would report its numbers under the step that was asked for. Once the
    damaged file is out of the way, re-running train resumes from the newest good checkpoint and writes it again.
    """
    try:  # mmap: reads only the weights used
        return rundir.load_checkpoint(ckpt, {"model_spec": dict, weights: dict, "step": int}, mmap=True)
    except rundir.DamagedCheckpoint as e:
        damaged = e
    newer = [s for s in rundir.checkpoint_steps(paths) if s > int(ckpt.stem)]
    distributed.barrier(env)  # every rank has read it before rank 0 moves it
    aside = rundir.set_aside(ckpt) if env.is_main else ckpt.with_name(ckpt.name + ".damaged")
    if newer:  # resuming continues from the newest: it never passes this step again
        advice = (f"step {int(ckpt.stem)} cannot be rebuilt by resuming (step {newer[-1]} is newer); train the run "
                  f"again into a new --out to sample it")
    else:
        advice = "re-run the train stage: it resumes from the newest good checkpoint and writes this step again"
    raise ConfigError(f"{damaged}; moved aside to {aside.name}; {advice}")


def _sample_shard(k: int, out: Path, s: SampleConfig, labels: torch.Tensor, per_shard: int, env, shape: tuple,
                  device: torch.device, gen: torch.Generator, model, diffusion, vae, progress: bool,
                  timing: dict) -> None:
    """Shard k of this rank: its labels and starting noise from (seed, position), the sampler loop, the decode."""
    lo = k * per_shard + env.rank * s.per_proc_batch
    y = labels[lo:lo + s.per_proc_batch].to(device)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed_for(s.seed, "z", p)))
                         for p in range(lo, lo + s.per_proc_batch)]).to(device)
    gen.manual_seed(seed_for(s.seed, "shard", k, env.rank))
    model_fn = cfg_model_fn(model, y, s.cfg_scale, s.guide_channels)
    loop = diffusion.p_sample_loop if s.sampler == "ddpm" else diffusion.ddim_sample_loop
    started = time.perf_counter()
    with torch.no_grad():
        z = loop(model_fn, noise.shape, noise=noise, clip_denoised=False, generator=gen, device=device,
                 progress=progress and env.is_main)
        distributed.synchronize(device)
        decoding = time.perf_counter()
        images = vae.decode(z) if vae is not None else to_uint8(z)
        distributed.synchronize(device)
    timing["sampler_s"] += decoding - started
    timing["decode_s"] += time.perf_counter() - decoding
    timing["shards"] += 1
    timing["images"] += len(y)
    _save_npz_atomic(out, images.cpu().numpy(), y.cpu().numpy())


def _save_npz_atomic(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    rundir.atomic_write(path, lambda f: np.savez(f, arr_0=images, arr_1=labels))


def _save_grid(images: np.ndarray, path: Path) -> None:
    """A square PNG grid of uint8 NHWC images."""
    from PIL import Image

    n, h, w, c = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    rundir.atomic_write(path, lambda f: Image.fromarray(grid[..., 0] if c == 1 else grid).save(f, format="PNG"))
