"""Score a sample set: FID, IS, sFID, precision and recall, written with the whole protocol they were measured under.

    eval/<sample protocol>.<eval tag>.json      e.g. eval/ddim50-cfg1-uniform-n1000-seed0.fmnist-train.json

The record holds the numbers, the label each is printed with ("FID-1K (Fashion-MNIST classifier)"), what is
unavailable and why, the protocol (sampler and steps, cfg scale and guided channels, number of samples, label
mode, seed, checkpoint, reference statistics and their hash, extractor and its weights' hash, clean-fid mode,
code commit) and how it departs from the papers' (ADM evaluator, FID-50K, DDPM-250), so that a report never puts
it in a paper column unmarked.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from repro import rundir
from repro.config import (EVALUATOR_VERSION, METRICS, BenchConfig, EvalConfig, RunConfig, SampleConfig, current_eval,
                          protocol_id, sample_stems)
from repro.errors import ConfigError
from repro.metrics import extractors as ex
from repro.metrics.fid import IS_SPLIT_SIZE, PR_NEIGHBOURS, fit, frechet_distance, inception_score, precision_recall
from repro.metrics.reference import Reference, content_hash, load_images, load_reference

NAMES = {"fid": "FID", "is": "IS", "sfid": "sFID", "precision": "Precision", "recall": "Recall"}
PAPER_SAMPLES = 50_000


def count_label(n: int) -> str:
    """50000 -> '50K', 1000 -> '1K', 1234 -> '1234' (the suffix of FID-50K)."""
    return f"{n // 1000}K" if n % 1000 == 0 else str(n)


def code_commit() -> dict:
    """The commit of the code that computed a number, and whether the tree had uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"code_commit": "unknown", "code_dirty": None}
    if head.returncode:
        return {"code_commit": "unknown", "code_dirty": None}
    return {"code_commit": head.stdout.strip(), "code_dirty": bool(dirty.stdout.strip())}


def score(images: np.ndarray, reference: Reference, extractor: ex.Extractor, metrics: tuple[str, ...],
          batch_size: int = 64) -> tuple[dict, dict]:
    """(values, unavailable): each requested metric's value, or None and the reason."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"unknown metric {unknown[0]!r}: choose from {', '.join(METRICS)}")
    feats = extractor.extract(images, batch_size=batch_size, probs="is" in metrics, spatial="sfid" in metrics)
    values: dict = {}
    missing: dict = {}
    if "fid" in metrics:
        values["fid"] = frechet_distance(fit(feats.pool), reference.pool)
    if "is" in metrics:
        if feats.probs is None:
            missing["is"] = extractor.is_note or "the extractor gives no class probabilities"
        else:
            values["is"] = inception_score(feats.probs)
    if "sfid" in metrics:
        if feats.spatial is None:
            missing["sfid"] = extractor.sfid_note or "the extractor gives no spatial features"
        elif reference.spatial is None:
            missing["sfid"] = f"the reference {reference.id} has no spatial statistics (mu_s, sigma_s)"
        else:
            values["sfid"] = frechet_distance(fit(feats.spatial), reference.spatial)
    if {"precision", "recall"} & set(metrics):
        if reference.pr_features is None:
            for m in ("precision", "recall"):
                missing[m] = f"the reference {reference.id} holds statistics only, no images"
        else:
            p, r = precision_recall(reference.pr_features, feats.pool, distances=reference.pr_distances,
                                    device=getattr(extractor, "device", "cpu"))
            values.update({m: v for m, v in (("precision", p), ("recall", r)) if m in metrics})
    for m in metrics:
        values.setdefault(m, None)
    return values, missing


def paper_differences(sample: dict, extractor: ex.Extractor, n: int) -> list[str]:
    """How this measurement departs from the papers' protocol (ADM evaluator, 50K samples, DDPM-250)."""
    out = []
    if extractor.name != "inception":
        out.append(f"features from the {extractor.label}, not Inception")
    else:
        out.append(f"clean-fid Inception ({extractor.mode}), not ADM's TF evaluator: ADM-approx")
    if n != PAPER_SAMPLES:
        out.append(f"{count_label(n)} samples, not 50K")
    sampler, steps = sample.get("sampler"), str(sample.get("steps"))
    if sampler is not None and (sampler, steps) != ("ddpm", "250"):
        out.append(f"{sampler.upper()}-{steps} sampling, not DDPM-250")
    if sample.get("labels") not in (None, "uniform"):
        out.append(f"{sample['labels']} labels, not uniform random")
    return out


def evaluate_file(samples: Path, cfg: EvalConfig, cache: Path, extractor: ex.Extractor | None = None,
                  log=print) -> dict:
    """The eval record of one samples npz (its sibling .json, when there, gives the sampling protocol)."""
    samples = Path(samples)
    if not samples.exists():
        raise ConfigError(f"{samples}: no such samples file or folder")
    spec = cfg.reference_spec  # a missing reference fails before any weights are loaded
    images = load_images(samples)
    extractor = extractor or build_extractor(cfg, cache, log, ex.classifier_resolution(images))
    reference = load_reference(spec, extractor, cache, set(cfg.metrics), cfg.batch_size, cfg.pr_distances)
    started = time.perf_counter()
    values, missing = score(images, reference, extractor, cfg.metrics, cfg.batch_size)
    sidecar = samples.with_suffix(".json")
    sample = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    n = len(images)
    labels = {m: f"{NAMES[m]}-{count_label(n)}" if m in ("fid", "sfid") else NAMES[m] for m in cfg.metrics}
    labels = {m: f"{v} ({extractor.label})" for m, v in labels.items()}
    keep = ("sampler", "steps", "cfg_scale", "guide_channels", "num_samples", "labels", "seed", "per_proc_batch",
            "world_size", "weights", "checkpoint", "checkpoint_step", "model", "decode", "config_hash", "protocol_id")
    protocol = {
        **{k: sample.get(k) for k in keep},
        "samples_file": str(samples), "samples_sha256": content_hash(samples), "num_evaluated": n,
        **reference.protocol(), **extractor.protocol(),
        "evaluator": f"repro.metrics via clean-fid {_version('clean-fid')}",
        "evaluator_version": EVALUATOR_VERSION,
        "fid_implementation": "cleanfid.fid.frechet_distance (scipy sqrtm); mean in the features' float32, "
                              "np.cov in float64 (as ADM)",
        "is_split_size": IS_SPLIT_SIZE, "pr_k": PR_NEIGHBOURS, "eval_batch": cfg.batch_size,
        "torch": _version("torch"), **code_commit(),
    }
    diffs = paper_differences(sample, extractor, n)
    return {"metrics": values, "labels": labels, "unavailable": missing, "protocol": protocol,
            "paper_protocol": {"comparable": not diffs, "differences": diffs},
            "seconds": round(time.perf_counter() - started, 2),
            "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def build_extractor(cfg: EvalConfig, cache: Path, log=print, resolution: int = 32) -> ex.Extractor:
    """The configured extractor; `resolution` picks the Fashion-MNIST classifier trained at the samples' size."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return ex.build(cfg.extractor, mode=cfg.mode, inception=cfg.inception, classifier=cfg.classifier, cache=cache,
                    allow_download=cfg.allow_download, device=device, resolution=resolution, log=log)


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------- runs
def evaluate_run(run_dir: Path, sample: SampleConfig, cfg: EvalConfig, cache: Path, log=print) -> list[Path]:
    """Score every sample set of `sample` in the run (final and intermediate checkpoints); resumable: a set whose
    eval file exists for the same samples is not scored again."""
    run_dir = Path(run_dir)
    out, extractor = [], None
    cfg.reference_spec  # noqa: B018 -- a study without a reference fails here, before any weights are loaded
    for stem in sample_stems(protocol_id(sample), cfg.checkpoints):
        npz = run_dir / "samples" / f"{stem}.npz"
        target = rundir.RunPaths(run_dir).eval_file(stem, cfg.tag)
        if not npz.is_file():
            raise ConfigError(f"{npz}: not sampled yet (the sample stage writes it)")
        if current_eval(target):
            if json.loads(target.read_text())["protocol"].get("samples_sha256") == ex.sha256_file(npz):
                out.append(target)
                continue
        if extractor is None:  # one extractor for the run's sample sets, which share one image size
            extractor = build_extractor(cfg, cache, log, ex.classifier_resolution(load_images(npz)))
        record = evaluate_file(npz, cfg, cache, extractor, log)
        record["protocol"]["eval_config"] = dataclasses.asdict(cfg)
        rundir.atomic_write_text(target, json.dumps(record, indent=2) + "\n")
        out.append(target)
    return out


# ---------------------------------------------------------------------------------------------- bench stage
def data_geometry(cfg: RunConfig) -> tuple[tuple[int, int, int], int]:
    """(C, H, W) and class count of the model's input, from the data config alone (no data is read)."""
    d = cfg.data
    if d.kind == "fashion_mnist":
        return (1, d.resolution, d.resolution), 10
    if d.kind == "latents":
        return (4, d.resolution // 8, d.resolution // 8), 1000
    return (3, d.resolution, d.resolution), 1000


def bench_run(run_dir: Path, cfg: RunConfig, bench: BenchConfig) -> Path:
    """bench.json: params, GMACs (the papers' "GFLOPs"), Winograd GMACs and denoiser img/s of the run's model,
    with the device, dtype, batch, flags and attention kernel they were measured under."""
    import torch

    from repro import models
    from repro.metrics.flops import COUNTING_TOOL, count
    from repro.metrics.throughput import DTYPES, BenchSettings, measure
    from repro.train import model_spec

    shape, classes = data_geometry(cfg)
    spec = model_spec(cfg, shape, classes)
    counts = count(models.build_meta(spec["name"], **spec["kwargs"]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = BenchSettings(batch=bench.batch, resolution=cfg.data.resolution, device=device, dtype=bench.dtype,
                             flags=bench.flags, attention=bench.attention, warmup=bench.warmup, iters=bench.iters,
                             repeats=bench.repeats)
    torch.manual_seed(0)
    model = models.build(spec["name"], **spec["kwargs"]).to(device, DTYPES[bench.dtype])
    timed = measure({spec["name"]: model}, settings)
    record = {"model": spec["name"], "model_kwargs": spec["kwargs"], "params": counts.params,
              "gmacs": counts.gmacs, "winograd_gmacs": counts.winograd_gmacs, "counting_tool": COUNTING_TOOL,
              "img_per_s": timed["results"][0]["img_per_s"],
              "img_per_s_repeats": timed["results"][0]["img_per_s_repeats"],
              "throughput_protocol": timed["protocol"], **code_commit(),
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = rundir.RunPaths(run_dir).bench
    rundir.atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path
