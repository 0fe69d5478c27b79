"""`repro pilot STUDY`: every stage of a study, for minutes, on this machine, before a cluster is paid for.

For each distinct model of the study the pilot runs the code the real jobs run, in a throw-away run folder
(`results/pilot/<study>/<device>/<step>/`):

  train     N steps at the study's per-GPU batch, stopped half-way as a preemption stops it, then resumed
  sample    one batch per sampling protocol, with the study's sampler; the full step count when two timed
            steps say it fits the budget, else those two respaced steps' time scaled (and labelled so)
  extract   the study's feature network on those samples (the same architecture with random weights, labelled,
            where the real weights are absent)
  bench     the denoiser's forward, all models interleaved in one process (a few iterations: the study's bench
            job gives the ratios of record)

It records steps/s, sampling img/s, extractor img/s, peak memory and the checkpoint's size and write time, and
projects the whole study: training, 50K samples per protocol and checkpoint, and their evaluation, in GPU-hours
and in wall-clock hours at the study's resources. Data that is absent is replaced by synthetic data of the
study's shape, labelled so. A stage that fails is one line naming the stage and the model; the models after it
still run. `results/pilot/<study>/<device>.json` holds it all; `repro plan` shows the projection beside the
declared cost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from repro import rundir
from repro.config import DataConfig, RunConfig, SampleConfig, protocol_id
from repro.errors import ConfigError
from repro.study import LoadedStudy

STAGES = ("train", "sample", "extract", "bench")
SAMPLE_BUDGET_S = 30.0
PROBE_STEPS = 2  # a full sampling run is made only when one timed step says it fits in this
# sd-vae-ft-ema's architecture (diffusers AutoencoderKL config), for a stand-in decoder of the same cost
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
              act_fn="silu", block_out_channels=[128, 256, 512, 512], sample_size=256,
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


@dataclass(frozen=True)
class PilotOptions:
    steps: int = 20
    device: str = "cuda"
    batch: int | None = None          # per-process training batch; None: the study's per-GPU batch
    only: tuple[str, ...] = ()        # steps of the study to pilot; empty: every distinct model
    sample_budget_s: float = SAMPLE_BUDGET_S

    def __post_init__(self):
        if self.steps < 2:
            raise ConfigError(f"--steps {self.steps}: needs at least 2 (the pilot stops and resumes half-way)")
        if self.batch is not None and self.batch < 1:
            raise ConfigError(f"--batch {self.batch}: must be >= 1")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigError(f"--device {self.device}: choose cpu or cuda")


class StageFailed(Exception):
    """One stage of one model failed; the message is the one line the table shows."""


def per_gpu_batch(loaded: LoadedStudy, cfg: RunConfig) -> int:
    """The per-process batch of the study's training jobs (global batch over its GPUs; one process on a CPU study)."""
    r = loaded.study.resources
    processes = max(1, r.gpus_per_node) * r.nodes
    return max(1, cfg.train.global_batch // processes)


def folder(root: Path, study: str, device: str) -> Path:
    return root / "pilot" / study / device.split(":")[0]


def record_path(root: Path, study: str, device: str) -> Path:
    return root / "pilot" / study / f"{device.split(':')[0]}.json"


# ---------------------------------------------------------------------------------------------- the pilot
def run(loaded: LoadedStudy, root: Path, options: PilotOptions, log=print) -> dict:
    """Pilot every distinct model of the study; returns (and writes) the record with its projection."""
    import torch

    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {options.device}: no CUDA device here (use --device cpu)")
    study = loaded.study
    steps = [s for s in study.steps if not options.only or s.name in options.only]
    unknown = [n for n in options.only if n not in {s.name for s in study.steps}]
    if unknown:
        raise ConfigError(f"--only {unknown[0]}: no such step in {loaded.path}; steps: "
                          f"{', '.join(s.name for s in study.steps)}")
    distinct: dict[str, str] = {}  # model identity -> first step naming it
    for s in steps:
        distinct.setdefault(json.dumps(loaded.models[s.name]["model"], sort_keys=True), s.name)
    base = folder(root, study.study, options.device)
    started = time.perf_counter()
    models, built = [], {}

    def write(complete: bool) -> dict:
        # after every model too: a pilot cut short (a time limit, a killed shell) keeps the models it finished
        record = {"study": study.study, "file": str(loaded.path), "device": options.device,
                  "device_name": _device_name(options.device), "options": dataclasses.asdict(options),
                  "models": models, "finished": complete, "seconds": round(time.perf_counter() - started, 1),
                  "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        record["projection"] = project(loaded, record)
        rundir.atomic_write_text(record_path(root, study.study, options.device), json.dumps(record, indent=2) + "\n")
        return record

    for name in distinct.values():
        cfg = loaded.configs[name]
        log(f"pilot {study.study} / {name} ({cfg.model.name}) on {options.device}")
        result, model = _pilot_model(loaded, name, cfg, base / name, root, options, log)
        models.append(result)
        if model is not None:
            built[name] = model
        write(complete=False)
    _bench_all(loaded, models, built, options, log)
    return write(complete=True)


def _pilot_model(loaded: LoadedStudy, name: str, cfg: RunConfig, run_dir: Path, root: Path,
                 options: PilotOptions, log) -> tuple[dict, object]:
    """Every stage of one model; a failure ends this model's stages and is kept as one line."""
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a pilot measures afresh: nothing of an earlier pilot is resumed
    batch = options.batch or per_gpu_batch(loaded, cfg)
    out: dict = {"step": name, "model": cfg.model.name, "model_identity": loaded.models[name]["model"],
                 "batch": batch, "study_batch": per_gpu_batch(loaded, cfg), "reached": None, "failed": None}
    model = None
    stage = "data"
    try:
        data, labels = _data(cfg, batch, root, log)
        out["data"] = labels
        pilot_cfg = dataclasses.replace(
            cfg, data=data,
            train=dataclasses.replace(cfg.train, steps=options.steps, global_batch=batch, ckpt_every=options.steps,
                                      log_every=1, keep_last=1, num_workers=0),
            sample=dataclasses.replace(cfg.sample, num_samples=batch, per_proc_batch=batch))
        stage = "train"
        out["train"] = _train(pilot_cfg, run_dir, options)
        out["reached"] = "train"
        stage = "sample"
        out["sample"] = [_sample(run_dir, proto, options.batch or proto.per_proc_batch, options)
                         for proto in loaded.samples]
        out["reached"] = "sample"
        stage = "extract"
        out["extract"] = _extract(loaded, run_dir, out["sample"][-1]["file"], root, options, log)
        out["reached"] = "extract"
        model = _model_for_bench(run_dir)
        shutil.rmtree(run_dir / "train" / "checkpoints")  # measured; an XL checkpoint is 11 GB of disk
    except Exception as e:  # noqa: BLE001 -- any failure is the stage's result, reported on one line
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        out["failed"] = f"{stage} of {name} ({cfg.model.name}): {type(e).__name__}: {text}"[:400]
        log(f"pilot: {out['failed']}")
    return out, model


# ---------------------------------------------------------------------------------------------- data
def _data(cfg: RunConfig, batch: int, root: Path, log) -> tuple[DataConfig, dict]:
    """The study's data when it is here, else synthetic data of its shape (and a stand-in VAE for decoding)."""
    d = cfg.data
    labels: dict = {"kind": d.kind}
    if d.kind == "fashion_mnist":
        from repro.data import FASHION_MNIST_ROOT

        if not (Path(d.path or FASHION_MNIST_ROOT) / "train-images-idx3-ubyte.gz").is_file():
            raise ConfigError(f"Fashion-MNIST is not at {d.path or FASHION_MNIST_ROOT} "
                              f"(apt-get install dataset-fashion-mnist)")
        return d, {**labels, "source": "the study's data"}
    if d.kind == "imagenet_folder":
        if not d.path or not Path(d.path).is_dir():
            raise ConfigError(f"data.path {d.path}: not here, and the pilot makes synthetic data for latent "
                              f"studies only")
        return d, {**labels, "source": "the study's data"}
    path = Path(d.path) if d.path else None
    if path is not None and (path / "meta.json").is_file():
        labels["source"] = "the study's data"
    else:
        path = _synthetic_latents(root, d.resolution, max(2 * batch, 16))
        labels["source"] = f"synthetic: N(0, 1) latents of the study's shape ({d.path} is not here)"
    vae = Path(d.vae) if d.vae else None
    if vae is not None and (vae / "config.json").is_file():
        labels["vae"] = f"the study's ({vae})"
    else:
        vae = _standin_vae(root, log)
        labels["vae"] = f"stand-in: sd-vae-ft-ema's architecture, random weights ({d.vae} is not here)"
    return dataclasses.replace(d, path=str(path), vae=str(vae)), labels


def _synthetic_latents(root: Path, resolution: int, count: int) -> Path:
    """A latent folder LatentDataset reads: N(0, 1) x 0.18215-scale latents, uniform labels, meta marking them."""
    out = root / "pilot" / ".synthetic" / f"latents{resolution}-n{count}"
    if (out / "meta.json").is_file():
        return out
    rng = np.random.default_rng(0)
    shape = (4, resolution // 8, resolution // 8)
    rundir.atomic_write(out / "latents.npy", lambda f: np.save(f, rng.standard_normal((count, 1, *shape),
                                                                                       dtype=np.float32)))
    rundir.atomic_write(out / "labels.npy", lambda f: np.save(f, rng.integers(0, 1000, count, dtype=np.int64)))
    meta = {"mode": "pre_extracted_single", "count": count, "latent_shape": list(shape), "num_classes": 1000,
            "resolution": resolution, "source": "synthetic (repro pilot): N(0, 1), not images"}
    rundir.atomic_write_text(out / "meta.json", json.dumps(meta, indent=1) + "\n")
    return out


def _standin_vae(root: Path, log) -> Path:
    out = root / "pilot" / ".synthetic" / "vae-sd-ft-ema-architecture"
    if (out / "config.json").is_file():
        return out
    import torch
    from diffusers import AutoencoderKL

    log("pilot: writing a stand-in VAE (sd-vae-ft-ema's architecture, random weights) for decoding")
    torch.manual_seed(0)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    AutoencoderKL(**SD_VAE).save_pretrained(str(tmp))
    if out.exists():  # another pilot wrote it meanwhile
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------- stages
def _train(cfg: RunConfig, run_dir: Path, options: PilotOptions) -> dict:
    """N steps through the trainer, stopped half-way as SIGUSR2 stops a job, then resumed."""

    from repro.train import Interrupted, train

    half = options.steps // 2
    calls = itertools.count(1)
    # the trainer's DiT-style lines go to the run's log.txt; here they would bury the table
    with _device(options.device), contextlib.redirect_stdout(io.StringIO()):
        try:
            train(cfg, run_dir, progress=False, stop=lambda: next(calls) >= half)
            raise StageFailed(f"the trainer did not stop at step {half} when asked")
        except Interrupted as e:
            resumed_at = e.step
        first = time.perf_counter()
        train(cfg, run_dir, progress=False)
        resumed_s = time.perf_counter() - first
    lines = [json.loads(s) for s in (run_dir / "train" / "metrics.jsonl").read_text().splitlines() if s.strip()]
    # the first step of each launch pays for warm-up (cuDNN autotune, compile, allocator): timed apart
    steady = [m["steps_per_s"] for m in lines if m["step"] not in (1, resumed_at + 1)] or \
        [m["steps_per_s"] for m in lines]
    paths = rundir.RunPaths(run_dir)
    writes = [json.loads(s) for s in (paths.train / "checkpoints.jsonl").read_text().splitlines() if s.strip()]
    return {"steps": options.steps, "resumed_at": resumed_at, "resume_launch_s": round(resumed_s, 2),
            "steps_per_s": float(np.median(steady)), "img_per_s": float(np.median(steady)) * cfg.train.global_batch,
            "loss_first": lines[0]["loss"], "loss_last": lines[-1]["loss"],
            "peak_mem_bytes": max(m.get("peak_mem_bytes") or 0 for m in lines),
            "peak_mem_kind": "CUDA max allocated" if options.device.startswith("cuda") else "process peak RSS",
            "checkpoint_bytes": writes[-1]["bytes"], "checkpoint_write_s": max(w["write_s"] for w in writes),
            "switches": lines[-1].get("switches"), "data": json.loads((paths.train / "data.json").read_text())}


def _sample(run_dir: Path, proto: SampleConfig, batch: int, options: PilotOptions) -> dict:
    """One batch of protocol `proto`: two respaced steps timed first (DDIM's respacing has no one-step stride); the
    full count when they say it fits the budget, else their time scaled to the study's steps."""
    full = len(_timesteps(proto))
    overrides = {**dataclasses.asdict(proto), "num_samples": batch, "per_proc_batch": batch}
    with _device(options.device):
        probe = _timed_sample(run_dir, {**overrides, "steps": str(PROBE_STEPS)}, options.device)
        if full > PROBE_STEPS and probe["sampler_s"] / PROBE_STEPS * full <= options.sample_budget_s:
            timing = _timed_sample(run_dir, overrides, options.device)
            ran = full
        else:
            timing, ran = probe, min(PROBE_STEPS, full)
    sampler_s = timing["sampler_s"] * full / ran
    return {"protocol": protocol_id(proto), "sampler": proto.sampler, "steps": full, "steps_run": ran,
            "cfg_scale": proto.cfg_scale, "images": timing["images"], "sampler_s": round(timing["sampler_s"], 3),
            "decode_s": round(timing["decode_s"], 3),
            "img_per_s": timing["images"] / (sampler_s + timing["decode_s"]),
            "scaled": ran != full, "peak_mem_bytes": timing.get("peak_mem_bytes"), "file": timing["file"],
            "flags": timing.get("flags")}


def _timesteps(proto: SampleConfig) -> list[int]:
    from repro.diffusion.respace import space_timesteps

    return sorted(space_timesteps(1000, proto.steps if proto.sampler == "ddpm" else f"ddim{proto.steps}"))


def _timed_sample(run_dir: Path, overrides: dict, device: str) -> dict:
    import torch

    from repro.sample import sample

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    npz = sample(run_dir, overrides, progress=False)
    record = json.loads(npz.with_suffix(".json").read_text())
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return {**record["timing"], "file": str(npz), "peak_mem_bytes": peak, "flags": record.get("flags_in_effect")}


def _extract(loaded: LoadedStudy, run_dir: Path, npz: str, root: Path, options: PilotOptions, log) -> dict:
    """The study's feature network on the pilot's samples, timed (stand-in weights where the real are absent)."""
    from repro.distributed import synchronize
    from repro.metrics import extractors as ex
    from repro.metrics.reference import load_images

    cfg = loaded.study.evaluate
    images = load_images(Path(npz))
    reps = -(-cfg.batch_size // len(images))  # at least one full evaluation batch
    images = np.concatenate([images] * reps)
    device = options.device
    net, weights = _extractor(cfg, root, device, ex.classifier_resolution(images), log)
    with _device(device):
        net.extract(images[:cfg.batch_size], batch_size=cfg.batch_size)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        net.extract(images, batch_size=cfg.batch_size)
        synchronize(device)
        seconds = time.perf_counter() - start
    return {"extractor": cfg.extractor, "weights": weights, "images": len(images), "batch": cfg.batch_size,
            "img_per_s": len(images) / seconds}


def _extractor(cfg, root: Path, device: str, resolution: int, log):
    """(extractor, what its weights are): the real one when its weights are here, else the same architecture."""
    from repro.metrics import extractors as ex

    if cfg.extractor == "fashion-mnist":
        path = ex.classifier_path(cfg.classifier, root / ".cache", resolution)
        if path.is_file():
            return ex.FashionClassifier(path, device), f"real ({path})"
        return _StandIn(ex.FashionNet(), device, (resolution, resolution), grey=True), \
            "stand-in: FashionNet, random weights (the classifier is trained at the first evaluate stage)"
    try:
        return ex.Inception(ex.inception_path(cfg.inception, allow_download=False), cfg.mode, device), "real"
    except ConfigError:
        import torchvision

        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
        return _StandIn(net, device, (299, 299)), \
            "stand-in: torchvision Inception-v3, random weights (the Inception weights are not here: " \
            "`repro weights install`)"


class _StandIn:
    """A feature network of the real one's architecture and input size, random weights: timing only."""

    def __init__(self, net, device: str, size: tuple[int, int], grey: bool = False):
        self.net, self.device, self.size, self.grey = net.eval().to(device), device, size, grey

    def extract(self, images: np.ndarray, batch_size: int = 64):
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            for i in range(0, len(images), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).to(self.device)
                x = x.permute(0, 3, 1, 2).float()
                x = x[:, :1] if self.grey else (x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)
                x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False) / 127.5 - 1
                self.net(x)


def _model_for_bench(run_dir: Path):
    """The pilot run's denoiser rebuilt from its checkpoint's spec (random weights would time the same)."""
    from repro import models

    state = rundir.load_checkpoint(rundir.latest_checkpoint(rundir.RunPaths(run_dir)),
                                   {"model_spec": dict, "ema": dict}, mmap=True)
    spec = state["model_spec"]
    model = models.build(spec["name"], **spec["kwargs"])
    model.load_state_dict(state["ema"])
    return model


def _bench_all(loaded: LoadedStudy, models: list[dict], built: dict, options: PilotOptions, log) -> None:
    """Every built model's forward, interleaved in one measurement (few iterations: a pilot, not the bench job)."""
    if not built:
        return

    from repro.metrics.throughput import DTYPES, BenchSettings, measure

    b = loaded.study.bench
    batch = options.batch or b.batch
    resolution = next(iter(loaded.configs.values())).data.resolution
    settings = BenchSettings(batch=batch, resolution=resolution, device=options.device, dtype=b.dtype,
                             flags=b.flags, attention=b.attention, warmup=min(b.warmup, 2), iters=min(b.iters, 3),
                             repeats=1, cpu_threads=b.cpu_threads)
    try:
        with _device(options.device):
            timed = measure({n: m.to(options.device, DTYPES[b.dtype]) for n, m in built.items()}, settings)
    except Exception as e:  # noqa: BLE001
        for m in models:
            if m["step"] in built:
                m["failed"] = f"bench of {m['step']}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return
    rows = {r["model"]: r for r in timed["results"]}
    for m in models:
        if m["step"] in rows:
            m["bench"] = {"img_per_s": rows[m["step"]]["img_per_s"], "batch": batch,
                          "protocol": {k: timed["protocol"][k] for k in ("dtype", "flags", "warmup", "iters",
                                                                         "repeats")}}
            m["reached"] = "bench"


# ---------------------------------------------------------------------------------------------- projection
def project(loaded: LoadedStudy, record: dict) -> dict:
    """The whole study's cost from the pilot's rates: per run and in all, GPU-hours and wall-clock hours at the
    study's resources. Training: steps / steps/s on every GPU of the job (data parallel: a GPU's step at the
    per-GPU batch is the job's step, all-reduce not counted); sampling: 50K (the protocol's count) per protocol
    and evaluated checkpoint on one node; evaluation: the same images through the feature network on one GPU."""
    from repro.plan import expand

    study = loaded.study
    r = study.resources
    gpus_node = max(1, r.gpus_per_node)
    gpus = gpus_node * r.nodes
    by_identity = {json.dumps(m["model_identity"], sort_keys=True): m for m in record["models"]}
    runs, notes = [], set()
    for run in expand(loaded).runs:
        m = by_identity.get(json.dumps(loaded.models[run.step]["model"], sort_keys=True))
        if m is None or m.get("failed") or "train" not in m:
            runs.append({"step": run.step, "seed": run.seed, "measured": False})
            continue
        row = {"step": run.step, "seed": run.seed, "measured": True}
        hours = {"train": 0.0, "sample": 0.0, "evaluate": 0.0}
        wall = dict(hours)
        if "train" in study.stages:
            wall["train"] = run.config.train.steps / m["train"]["steps_per_s"] / 3600
            hours["train"] = wall["train"] * gpus
        checkpoints = 1 + len(study.evaluate.checkpoints if "evaluate" in study.stages else ())
        for proto, s in zip(loaded.samples, m.get("sample", []), strict=False):
            n = proto.num_samples * checkpoints
            if "sample" in study.stages:
                hours["sample"] += n / s["img_per_s"] / 3600
                wall["sample"] += n / s["img_per_s"] / 3600 / gpus_node
            if "evaluate" in study.stages and "extract" in m:
                hours["evaluate"] += n / m["extract"]["img_per_s"] / 3600
                wall["evaluate"] += n / m["extract"]["img_per_s"] / 3600
            if s.get("scaled"):
                notes.add("sampling time scaled from two timed steps of the respaced schedule")
        row.update({f"{k}_gpu_hours": v for k, v in hours.items()})
        row.update({f"{k}_wall_hours": v for k, v in wall.items()})
        row["gpu_hours"] = sum(hours.values())
        row["wall_hours"] = sum(wall.values())
        runs.append(row)
        if m["batch"] != m["study_batch"]:
            notes.add(f"measured at batch {m['batch']}, not the study's per-GPU batch {m['study_batch']}")
        if str(m.get("data", {}).get("source", "")).startswith("synthetic"):
            notes.add("synthetic data (same shapes and step cost; the loss means nothing)")
    measured = [x for x in runs if x["measured"]]
    device_kind = "cuda" if record["device"].startswith("cuda") else "cpu"
    study_kind = "cuda" if r.gpus_per_node > 0 else "cpu"
    if device_kind != study_kind:
        notes.add(f"measured on {device_kind.upper()}, the study runs on {study_kind.upper()}")
    comparable = bool(measured) and len(measured) == len(runs) and not any(
        n.startswith(("measured at batch", "measured on")) for n in notes)
    total = {k: sum(x.get(k, 0.0) for x in measured) for k in
             ("gpu_hours", "train_gpu_hours", "sample_gpu_hours", "evaluate_gpu_hours", "wall_hours")}
    return {"runs": runs, "total": total, "complete": len(measured) == len(runs), "comparable": comparable,
            "notes": sorted(notes), "gpus": gpus, "gpus_per_node": gpus_node,
            "unit": "GPU-hours" if r.gpus_per_node > 0 else "CPU job-hours"}


def projection_for_plan(loaded: LoadedStudy, root: Path) -> dict | None:
    """The pilot projection `repro plan` uses beside the declared cost: a GPU pilot first, then a CPU one."""
    for device in ("cuda", "cpu"):
        path = record_path(root, loaded.study.study, device)
        if path.is_file():
            try:
                record = json.loads(path.read_text())
            except ValueError:
                continue
            return {"device": record["device"], "device_name": record.get("device_name"),
                    "measured_at": record.get("measured_at"), "file": str(path), **record["projection"]}
    return None


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device)
    from repro.metrics.throughput import _cpu_name

    return f"{_cpu_name()} ({os.cpu_count()} cores)"


@contextlib.contextmanager
def _device(device: str):
    """The stages pick CUDA when they see it: `--device cpu` hides it from them for the block."""
    from repro.distributed import DEVICE_ENV

    saved = os.environ.get(DEVICE_ENV)
    os.environ[DEVICE_ENV] = "cpu" if device == "cpu" else "cuda"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(DEVICE_ENV, None)
        else:
            os.environ[DEVICE_ENV] = saved
