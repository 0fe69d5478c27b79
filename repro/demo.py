"""`repro demo`: the newcomer's first command. Both tiny studies (the DiC roadmap and the DiCo ablations on
Fashion-MNIST) are planned, run on this machine through the same launcher a cluster uses, evaluated, and
reported, with a progress display. Running it again finds every stage done and only rewrites the reports.

The two studies run side by side, one background chain each, on one CPU thread each: on a 2-core machine two
threads per job under contention run several times slower than one (measured: 0.36 against about 4 steps/s).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from repro.plan import Plan, run_status, stage_states

STUDIES = ("experiments/tiny/dic_roadmap.yaml", "experiments/tiny/dico_ablation.yaml")


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
            result = submit(plan, root, cluster)
            queued[plan.study.study.study] = len(result.jobs)
    finally:
        if saved is None:
            del os.environ["OMP_NUM_THREADS"]
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
    out = {}
    for plan in plans:
        name = plan.study.study.study
        done, total, _ = _progress(plan, root)
        folder = reports / name
        write(plan, root, folder)
        out[name] = {"queued": queued[name], "stages_done": done, "stages": total, "report": folder}
    out["_seconds"] = time.perf_counter() - started
    return out
