"""Score a sample set: FID, IS, sFID, precision and recall, written with the whole protocol they were measured under.

    eval/<sample protocol>.<eval tag>.json      e.g. eval/ddim50-cfg1-uniform-n1000-seed0.fmnist-train.json

The record holds the numbers, the label each is printed with ("FID-1K (Fashion-MNIST classifier)"), what is
unavailable and why, the protocol (sampler and steps, cfg scale and guided channels, number of samples, label
mode, seed, checkpoint, reference statistics and their hash, extractor and its weights' hash, clean-fid mode,
code commit) and how it departs from the papers' (ADM evaluator, FID-50K, DDPM-250), so that a report never puts
it in a paper column unmarked.

The bench stage of a study is one job: `bench_study` times every run's denoiser interleaved and writes
<results>/bench/<study>.json, with params and GMACs, the ratio to the study's DiT baseline and whether each
figure was measured without contention.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from repro import rundir
from repro.config import (EVALUATOR_VERSION, METRICS, BenchConfig, EvalConfig, SampleConfig, current_eval,
                          protocol_id, sample_stems)
from repro.errors import ConfigError
from repro.metrics import extractors as ex
from repro.metrics.fid import IS_SPLIT_SIZE, PR_NEIGHBOURS, fit, frechet_distance, inception_score, precision_recall
from repro.metrics.reference import Reference, content_hash, load_images, load_reference
from repro.metrics.stats import fid_interval

if TYPE_CHECKING:
    from repro.plan import Run

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
          batch_size: int = 64) -> tuple[dict, dict, ex.Features]:
    """(values, unavailable, features): each requested metric's value, or None and the reason."""
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
    return values, missing, feats


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
                  log=print, features_out: Path | None = None) -> dict:
    """The eval record of one samples npz (its sibling .json, when there, gives the sampling protocol); with
    `features_out`, the samples' pool features are written there too, with the reference's mean and covariance
    (`features_file`: the paired differences between runs resample them)."""
    samples = Path(samples)
    if not samples.exists():
        raise ConfigError(f"{samples}: no such samples file or folder")
    spec = cfg.reference_spec  # a missing reference fails before any weights are loaded
    images = _sample_images(samples)
    sidecar = samples.with_suffix(".json")
    sample = rundir.read_json_file(sidecar, "a sampling protocol") if sidecar.is_file() else {}
    extractor = extractor or build_extractor(cfg, cache, log, ex.classifier_resolution(images))
    reference = load_reference(spec, extractor, cache, set(cfg.metrics), cfg.batch_size, cfg.pr_distances)
    started = time.perf_counter()
    values, missing, feats = score(images, reference, extractor, cfg.metrics, cfg.batch_size)
    n = len(images)
    intervals = {}
    if values.get("fid") is not None and cfg.bootstrap:
        intervals["fid"] = fid_interval(feats.pool, reference.pool, resamples=cfg.bootstrap)
    if features_out is not None:  # with the reference Gaussian: a paired difference needs nothing else
        rundir.atomic_write(features_out, lambda f: np.savez(
            f, pool=np.asarray(feats.pool, dtype=np.float32), reference_mu=reference.pool.mu,
            reference_sigma=reference.pool.sigma))
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
    if features_out is not None:
        protocol["features_file"] = Path(features_out).name
    return {"metrics": values, "intervals": intervals, "labels": labels, "unavailable": missing, "protocol": protocol,
            "paper_protocol": {"comparable": not diffs, "differences": diffs},
            "seconds": round(time.perf_counter() - started, 2),
            "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def features_file(eval_file: Path) -> Path:
    """eval/<stem>.<tag>.features.npz beside eval/<stem>.<tag>.json: the scored samples' pool features (`pool`,
    float32, in sample order) and the reference Gaussian they were scored against (`reference_mu`,
    `reference_sigma`)."""
    return eval_file.with_suffix(".features.npz")


def _sample_images(samples: Path) -> np.ndarray:
    """The images to score; ConfigError naming the file when it holds none (no statistic of 0 images exists)."""
    images = load_images(samples)
    if len(images) == 0:
        raise ConfigError(f"{samples}: holds 0 images (arr_0 has shape {tuple(images.shape)}); nothing to evaluate")
    return images


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
    eval file exists for the same samples is not scored again (a damaged one is scored again and replaced)."""
    from repro.results import read_eval

    run_dir = Path(run_dir)
    out, extractor = [], None
    cfg.reference_spec  # noqa: B018 -- a study without a reference fails here, before any weights are loaded
    for stem in sample_stems(protocol_id(sample), cfg.checkpoints):
        npz = run_dir / "samples" / f"{stem}.npz"
        target = rundir.RunPaths(run_dir).eval_file(stem, cfg.tag)
        if not npz.is_file():
            raise ConfigError(f"{npz}: not sampled yet (the sample stage writes it)")
        if current_eval(target):
            try:
                kept = read_eval(target)["protocol"].get("samples_sha256") == ex.sha256_file(npz)
            except rundir.DamagedFile as e:
                log(f"{e}: scoring again")
                kept = False
            if kept:
                out.append(target)
                continue
        if extractor is None:  # one extractor for the run's sample sets, which share one image size
            extractor = build_extractor(cfg, cache, log, ex.classifier_resolution(_sample_images(npz)))
        record = evaluate_file(npz, cfg, cache, extractor, log, features_out=features_file(target))
        record["protocol"]["eval_config"] = dataclasses.asdict(cfg)
        rundir.atomic_write_text(target, json.dumps(record, indent=2) + "\n")
        out.append(target)
    return out


# ---------------------------------------------------------------------------------------------- bench stage
def bench_baseline(runs: list[Run]) -> Run:
    """The run every ratio is to: the study's first DiT run, else its first run."""
    return next((r for r in runs if r.config.model.name.startswith("DiT") or r.label.startswith("DiT")), runs[0])


def bench_study(root: Path, study: str, runs: list[Run], bench: BenchConfig, alone: dict | None = None,
                job_id: str | None = None, log=print) -> Path:
    """<results>/bench/<study>.json: params, GMACs (the papers' "GFLOPs"), Winograd GMACs and denoiser img/s of
    every run of the study, all timed interleaved in this one process (`measure()`), so that ratios only ever
    compare figures of one measurement (one id). Runs with the same architecture (seeds) are timed once.

    Per run: the figures, the ratio to the baseline (`bench_baseline`), the spread of the repeats, the other
    processes' CPU share during them, and whether the row is reliable and why not; besides: the protocol (settings,
    TF32 flags, environment), the load before and after, and `alone` (whether this job waited for the machine to
    be free of the results folder's other stages, how long, and what still ran: then every row is unreliable).
    """
    import torch

    from repro import models
    from repro.metrics.flops import COUNTING_TOOL, count
    from repro.metrics.throughput import DTYPES, BenchSettings, measure, ratio_reliability, repeat_ratio
    from repro.train import model_spec

    if not runs:
        raise ConfigError(f"study {study}: no run has a bench stage")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    specs, timed, first, built = {}, {}, {}, {}
    for r in runs:
        specs[r.id] = model_spec(r.config, *r.config.data.model_input())
        key = json.dumps(specs[r.id], sort_keys=True, default=str)
        timed[r.id] = first.setdefault(key, r.id)  # the run whose model is timed for this one
    resolutions = {r.config.data.resolution for r in runs}
    settings = BenchSettings(batch=bench.batch, resolution=max(resolutions), device=device, dtype=bench.dtype,
                             flags=bench.flags, attention=bench.attention, warmup=bench.warmup, iters=bench.iters,
                             repeats=bench.repeats, channels_last=bench.channels_last,
                             cpu_threads=bench.cpu_threads, fresh_processes=bench.fresh_processes)
    for r in runs:
        if timed[r.id] == r.id:
            torch.manual_seed(0)
            spec = specs[r.id]
            built[r.id] = models.build(spec["name"], **spec["kwargs"]).to(device, DTYPES[bench.dtype])
    log(f"bench {study}: timing {len(built)} models interleaved on {device}")
    result = measure(built, settings)
    by_id = {row["model"]: row for row in result["results"]}
    label = {r.id: r.label for r in runs}
    reasons = [f"{label[rid]}: {why}" for rid, row in by_id.items() for why in row["reasons"]]
    shared_reasons = []
    if alone is not None and alone.get("checked") and not alone.get("alone"):
        shared_reasons.append(f"not alone: after waiting {alone['waited_s']:.0f} s, other stages still ran on this "
                              f"host ({', '.join(alone['busy'])})")
    base = bench_baseline(runs)
    out_runs, counted = {}, {}
    for r in runs:
        row = by_id[timed[r.id]]
        spec = specs[r.id]
        if timed[r.id] not in counted:
            counted[timed[r.id]] = count(models.build_meta(spec["name"], **spec["kwargs"]))
        counts = counted[timed[r.id]]
        # a reference mixer's speed beside other kernels measures the kernels: said where the figure is shown
        kernel_why = ["ran the exact PyTorch reference of its mixer, not its source's fused kernel"] if (
            result["kernel_note"] and "reference" in row["kernels"]) else []
        why = [*row["reasons"], *shared_reasons, *kernel_why]
        base_row = by_id[timed[base.id]]
        ratio, ratio_spread = repeat_ratio(row["img_per_s_repeats"], base_row["img_per_s_repeats"])
        ratio_why = [*ratio_reliability(row, base_row, ratio_spread), *shared_reasons]
        out_runs[r.id] = {
            "step": r.step, "label": r.label, "model": spec["name"], "model_kwargs": spec["kwargs"],
            "params": counts.params, "gmacs": counts.gmacs, "winograd_gmacs": counts.winograd_gmacs,
            "full_gmacs": counts.full_gmacs if counts.source_kernel_macs else None, "kernels": row["kernels"],
            "img_per_s": row["img_per_s"], "img_per_s_repeats": row["img_per_s_repeats"],
            "repeats": len(row["img_per_s_repeats"]), "input": row["input"], "spread": row["spread"],
            "others_cpu_share": row["others_cpu_share"], "others_cpu_share_repeats": row["others_cpu_share_repeats"],
            "ratio_to_baseline": ratio, "ratio_spread": ratio_spread, "ratio_reliable": not ratio_why,
            "ratio_reasons": ratio_why, "reliable": not why, "reasons": why, "timed_as": timed[r.id]}
    record = {"study": study, "measurement_id": uuid.uuid4().hex, "job_id": job_id, "baseline": base.id,
              "reliable": not reasons and not shared_reasons, "reasons": [*shared_reasons, *reasons],
              "kernel_note": result["kernel_note"],
              "runs": out_runs, "protocol": {**result["protocol"], "counting_tool": COUNTING_TOOL,
                                             "resolutions": sorted(resolutions)},
              "load": result["load"], "alone": alone, **code_commit(),
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return rundir.atomic_write_text(rundir.bench_record(root, study), json.dumps(record, indent=2) + "\n")
