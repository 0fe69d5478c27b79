"""`repro demo`: the newcomer's first command. Both tiny studies (the DiC roadmap and the DiCo ablations on
Fashion-MNIST) are planned, run on this machine through the same launcher a cluster uses, evaluated, and
reported, with a progress display. Running it again finds every stage done and only rewrites the reports.

The two studies run side by side, one background chain each, on one CPU thread each: on a 2-core machine two
threads per job under contention run several times slower than one (measured: 0.36 against about 4 steps/s).
Each chain ends with its study's bench, which waits until the other chain's stages have ended and never runs beside
the other bench (repro.launch.StudyBench), so throughput is timed alone.

One training seed per step is what fits the half-hour budget on 2 cores: the 20 runs are 56 minutes of chain time
per seed (measured 2026-12-03), and the tiny step is mostly oneDNN convolution, so no switch doubles it
(benchmarks/tiny_train_speed.py). `repro demo --seeds N` trains N seeds per step (seed 0 reused) and the reports
give each step's mean and standard deviation.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from repro.plan import Plan, run_status, stage_states

STUDIES = ("experiments/tiny/dic_roadmap.yaml", "experiments/tiny/dico_ablation.yaml")


def seeded_study(study: Path, seeds: int, root: Path) -> Path:
    """A study file under <results>/demo/ that extends `study` with training seeds 0..seeds-1 on every step.

    Written to a file rather than changed in memory so that `repro status` and `repro report`, which re-read the
    remembered study, see the runs the demo ran. Seed 0 is the study's own run: the same run id, trained once.
    """
    import json

    from repro import rundir
    from repro.yamlio import read_yaml

    name = read_yaml(study)[0]["study"]
    path = root / "demo" / f"{study.stem}-{seeds}seeds.yaml"
    text = (f"# written by `repro demo --seeds {seeds}`: {study.name} with {seeds} training seeds per step\n"
            f"extends: {json.dumps(str(study.resolve()))}\n"
            f"study: {name}_{seeds}seeds\n"
            f"grid: {{seeds: {json.dumps(list(range(seeds)))}}}\n")
    if not path.is_file() or path.read_text() != text:
        rundir.atomic_write_text(path, text)
    return path


def _classifier_early(plans: list[Plan], root: Path):
    """Start training the Fashion-MNIST classifier the evaluate stages need, in a thread of this process, while the
    first runs train; else the first evaluate stage trains it and the other chain idles on its lock. Returns the
    thread (None when nothing is missing)."""
    import threading

    from repro.metrics import extractors as ex

    wanted = {r.config.data.resolution for p in plans for r in p.runs
              if r.evaluation is not None and r.evaluation.extractor == "fashion-mnist"
              and r.evaluation.classifier is None and r.config.data.kind == "fashion_mnist"
              and any(st.name.startswith("evaluate") for st in r.stages)}
    cache = root / ".cache"
    missing = [res for res in sorted(wanted) if not ex.classifier_path(None, cache, res).is_file()]
    if not missing:
        return None

    def work():
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # beside the two one-thread chains; this process does nothing else meanwhile
        try:
            for res in missing:  # under the evaluate stages' lock: whichever comes first trains it
                ex.build("fashion-mnist", cache=cache, resolution=res, log=lambda *_: None)
        finally:
            torch.set_num_threads(threads)

    thread = threading.Thread(target=work, name="fashion-mnist-classifier", daemon=True)
    thread.start()
    return thread


def _progress(plan: Plan, root: Path) -> tuple[int, int, str]:
    """(stages done, stages in all, what is running now) of a plan, from its run folders."""
    done = total = 0
    now = ""
    for run in plan.runs:
        states = stage_states(run, root)
        total += len(states)
        done += sum(s["state"] == "done" for s in states.values())
        if not now and run_status(states) != "done":
            train = states.get("train", {})
            if train.get("state") != "done" and train.get("step"):
                now = f"{run.step}: step {train['step']}/{train['total']}"
            elif any(s["state"] != "new" for s in states.values()):
                now = f"{run.step}: " + next(n for n, s in states.items() if s["state"] != "done").split(":")[0]
    return done, total, now


def _live(plan: Plan, root: Path, cluster: str) -> bool:
    """Is any stage of the plan still queued or running (per state.json and the scheduler)?"""
    from repro.launch import ACTIVE, LIVE, _live_jobs, read_state

    states = {r.id: read_state(root, r.id) for r in plan.runs}
    sched = _live_jobs(states, cluster, tolerant=True)
    return any(e.get("state") in LIVE and sched.get(e.get("job_id")) in ACTIVE
               for st in states.values() for e in st["stages"].values())


def run(plans: list[Plan], root: Path, reports: Path, cluster: str = "local", poll_s: float = 5.0,
        console=None) -> dict:
    """Submit every plan, wait with a progress display until nothing is left running, then write each report.
    Returns, per study, the queued job count, the final stage counts and the report folder."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from repro.launch import submit
    from repro.report import write

    started = time.perf_counter()
    queued = {}
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the background chains: one thread per job
    try:
        for plan in plans:
            # a demo cut short (Ctrl-C, a closed terminal) left its stages "running": running it again takes them up
            result = submit(plan, root, cluster, retry_failed=True)
            queued[plan.study.study.study] = len(result.jobs)
    finally:
        if saved is None:
            del os.environ["OMP_NUM_THREADS"]
    early = _classifier_early(plans, root) if cluster == "local" else None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[now]}"))
    with Progress(*columns, console=console, transient=False) as progress:
        tasks = {p.study.study.study: progress.add_task(p.study.study.study, total=None, now="") for p in plans}
        while True:
            busy = False
            for plan in plans:
                done, total, now = _progress(plan, root)
                progress.update(tasks[plan.study.study.study], completed=done, total=total, now=now)
                busy |= done < total and _live(plan, root, cluster)
            if not busy:
                break
            time.sleep(poll_s)
    if early is not None:
        early.join()
    out = {}
    for plan in plans:
        name = plan.study.study.study
        done, total, _ = _progress(plan, root)
        folder = reports / name
        write(plan, root, folder)
        out[name] = {"queued": queued[name], "stages_done": done, "stages": total, "report": folder}
    out["_seconds"] = time.perf_counter() - started
    return out
