"""Run folders -> pandas, joined with the papers' numbers.

    df = collect(plan, root)          # one row per (run, sample set): ours, with the protocol and the state
    table = paper_table(df, plan)     # one row per paper row: paper | ours (mean ± std over seeds) | delta | match

A number that is missing is NaN and its row says why (pending, queued, running, failed), never 0. A number
measured under another protocol than the paper's keeps its value but `protocol_match` is False and
`protocol_differences` lists how (FID-1K against FID-50K, DDIM-50 against DDPM-250, another feature network...).

Params, GMACs and img/s come from the study's bench record (<results>/bench/<study>.json: all its runs timed in
one job), with the ratio to its baseline (`bench_ratio`), and `bench_reliable` / `bench_note`: whether the figure
was timed without contention, and if not, why; `bench_ratio_reliable` is the ratio's own (its per-repeat ratios
agree and neither row was contended).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from repro import rundir
from repro.config import is_current_eval, protocol_id, sample_stems
from repro.precision import departures
from repro.plan import Plan, Run, stage_states

METRICS = ("fid", "is", "sfid", "precision", "recall")
BENCH = ("params", "gmacs", "winograd_gmacs", "img_per_s")
# our column -> the paper file's metric name (papers print GMACs as "GFLOPs", parameters in millions)
PAPER_METRICS = {"fid": "fid", "is": "is", "sfid": "sfid", "precision": "precision", "recall": "recall",
                 "gmacs": "gflops", "winograd_gmacs": "winograd_gflops", "params_m": "params_m",
                 "img_per_s": "img_per_s", "train_steps_per_s": "train_steps_per_s"}
COLUMNS = ("study", "step", "label", "model", "switches", "seed", "run_id", "paper_rows", "protocol", "stem",
           "checkpoint_step", "state", "damaged", "steps_trained", "train_steps", "gpu_hours_planned", "wall_hours",
           "gpu_hours_spent", "train_steps_per_s", *METRICS, "params", "params_m", "gmacs", "winograd_gmacs",
           "img_per_s", "fid_label", "fid_se",
           "extractor", "reference", "sampler", "sampling_steps", "cfg_scale", "guide_channels", "num_samples",
           "labels", "paper_comparable", "protocol_differences", "bench_device", "bench_flags", "bench_ratio",
           "bench_baseline", "bench_reliable", "bench_ratio_reliable", "bench_note", "bench_measurement")


def read_eval(path: Path) -> dict:
    """An eval record (eval/<stem>.<tag>.json) holding every part a report reads; DamagedFile naming the file when
    it does not (a torn or zeroed write, or another structure), so that its score is never silently missing."""
    return check_eval(rundir.read_json_file(path, "an eval record"), path)


def check_eval(record: dict, path: Path) -> dict:
    """`record`, read from `path`, if it holds every part a report reads; DamagedFile naming `path` if not."""
    for key in ("metrics", "labels", "protocol", "paper_protocol"):
        if not isinstance(record.get(key), dict):
            raise rundir.DamagedFile(path, f"no {key!r} mapping")
    odd = [m for m, v in record["metrics"].items() if v is not None and (isinstance(v, bool) or
                                                                         not isinstance(v, (int, float)))]
    if odd:
        raise rundir.DamagedFile(path, f"metric {odd[0]!r} is not a number")
    pp = record["paper_protocol"]
    if not isinstance(pp.get("comparable"), bool) or not isinstance(pp.get("differences"), list) or \
            not all(isinstance(d, str) for d in pp["differences"]):
        raise rundir.DamagedFile(path, "'paper_protocol' lacks 'comparable' or its list of 'differences'")
    return record


def damaged_outputs(run: Run, root: Path) -> dict[str, rundir.DamagedFile]:
    """Per stage of the run, the first of its output files that exists but is damaged (eval records): such a stage
    is not done, whatever its files' presence says (`status` shows it damaged, `submit` redoes it)."""
    paths = rundir.RunPaths(root / "runs" / run.id)
    out: dict[str, rundir.DamagedFile] = {}
    if run.evaluation is None or not (paths.root / "eval").is_dir():
        return out
    for stage in run.stages:
        if not stage.name.startswith("evaluate:"):
            continue
        for stem in sample_stems(stage.name.split(":", 1)[1], run.checkpoints):
            path = paths.eval_file(stem, run.evaluation.tag)
            if not path.exists():
                continue
            try:
                record = rundir.read_json_file(path, "an eval record")  # unparseable: damaged, whoever wrote it
                if is_current_eval(record):  # a record of an older evaluator is stale (run again), not damaged
                    check_eval(record, path)
            except rundir.DamagedFile as e:
                out[stage.name] = e
                break
    return out


def _metrics(paths: rundir.RunPaths) -> list[dict]:
    return rundir.read_metrics(paths.metrics)


def _training(paths: rundir.RunPaths) -> tuple[int, float]:
    """(steps trained, wall hours of training) from train/metrics.jsonl: each logged window's steps / steps/s."""
    step, seconds = 0, 0.0
    for m in _metrics(paths):
        rate = m.get("steps_per_s")
        if rate:
            seconds += (m["step"] - step) / rate
        step = max(step, m.get("step", 0))
    return step, seconds / 3600


def loss_curves(plan: Plan, root: Path) -> pd.DataFrame:
    """Logged training loss of every run: one row per (step label, seed, training step) with loss and mse."""
    rows = [{"label": run.label, "seed": run.seed, "step": m["step"], "loss": m.get("loss"), "mse": m.get("mse")}
            for run in plan.runs for m in _metrics(rundir.RunPaths(root / "runs" / run.id))]
    return pd.DataFrame(rows, columns=["label", "seed", "step", "loss", "mse"])


def _state(run_states: dict, jobs: dict, stages: list[str], done: bool) -> str:
    """One word for a row: done, or why its number is missing (failed / running / queued / pending)."""
    if done:
        return "done"
    for name in stages:
        job = jobs.get(name, {}).get("state")
        if job == "failed" or job == "cancelled":
            return job
        if job == "running":
            return "running"
        if job in ("submitted", "requeued"):
            return "queued"
        if run_states.get(name, {}).get("state") == "partial":
            return "partial"
    return "pending"


def bench_record(plan: Plan, root: Path) -> dict | None:
    """The study's bench record (all its runs timed in one job), or None before its bench has run."""
    path = rundir.bench_record(root, plan.study.study.study)
    if not path.exists():
        return None
    try:
        record = rundir.read_json_file(path, "a bench record")
        if not isinstance(record.get("runs"), dict) or \
                not all(isinstance(r, dict) for r in record["runs"].values()):
            raise rundir.DamagedFile(path, "not a bench record: no 'runs' mapping")
    except rundir.DamagedFile as e:  # the bench stage redoes it (plan.benched_runs finds no run in it)
        rundir.warn(f"{e}; its throughput figures are left out")
        return None
    return record


def _bench_columns(record: dict, run_id: str) -> dict:
    """A run's bench figures from the study record: counts, img/s, ratio to the baseline, and reliability."""
    row = record["runs"][run_id]
    out = {k: row.get(k) for k in BENCH}
    out["params_m"] = row["params"] / 1e6 if row.get("params") else None
    tp = record.get("protocol") or {}
    env = tp.get("environment") or {}
    base = record["runs"].get(record.get("baseline"), {})
    out.update(bench_device=env.get("gpu") or env.get("cpu"), bench_flags=(tp.get("flags") or {}).get("profile"),
               bench_ratio=row.get("ratio_to_baseline"), bench_baseline=base.get("label"),
               bench_reliable=bool(row.get("reliable")), bench_note="; ".join(row.get("reasons") or []),
               # records written before ratios had their own rule: a ratio is as reliable as its img/s
               bench_ratio_reliable=bool(row.get("ratio_reliable", row.get("reliable"))),
               bench_measurement=record.get("measurement_id"))
    return out


def collect(plan: Plan, root: Path) -> pd.DataFrame:
    """One row per (run, sample set) of the study: ours, the protocol they were measured under and the state."""
    study = plan.study.study
    gpus = study.resources.gpus_per_node * study.resources.nodes
    record = bench_record(plan, root)
    rows = []
    for run in plan.runs:
        paths = rundir.RunPaths(root / "runs" / run.id)
        exists = paths.root.is_dir()
        run_states = stage_states(run, root) if exists else {}
        jobs, damaged = {}, []  # damaged: the run's files that cannot be read, each named; the rest is shown
        if exists:
            try:
                jobs = rundir.read_state(paths)["stages"]
            except rundir.DamagedFile as e:  # which jobs ran is unknown; numbers on disk are still good
                damaged.append(str(e))
        bench = _bench_columns(record, run.id) if record is not None and run.id in record["runs"] else None
        trained, wall = _training(paths) if exists else (0, 0.0)
        rate = trained / (wall * 3600) if wall else None
        base = {"study": study.study, "step": run.step, "label": run.label, "model": run.model,
                "switches": json.dumps(run.switches, sort_keys=True), "seed": run.seed, "run_id": run.id,
                "paper_rows": ",".join(run.rows), "steps_trained": trained, "train_steps": run.config.train.steps,
                "gpu_hours_planned": run.gpu_hours, "wall_hours": wall, "gpu_hours_spent": wall * gpus,
                "train_steps_per_s": rate}
        if bench:
            base.update(bench)
        sets = [(protocol_id(s), stem) for s in run.samples for stem in sample_stems(protocol_id(s), run.checkpoints)]
        if "evaluate" not in study.stages:  # e.g. a throughput study: one row per run, its bench numbers
            done = "bench" not in study.stages or bench is not None
            state = "damaged" if damaged and not done else _state(run_states, jobs, ["bench"], done)
            rows.append({**base, "state": state, "damaged": "; ".join(damaged) or None})
            continue
        for pid, stem in sets:
            ev, bad = None, list(damaged)
            path = paths.eval_file(stem, run.evaluation.tag)
            if exists and path.exists():
                try:
                    ev = read_eval(path)
                except rundir.DamagedFile as e:  # shown as damaged, never as a pending score
                    bad.append(str(e))
            stages = ["train", f"sample:{pid}", f"evaluate:{pid}"]
            precision = departures(run.config.train, plan.study.models[run.step]["model"]["family"])
            state = "damaged" if bad and ev is None else _state(run_states, jobs, stages, ev is not None)
            row = {**base, "protocol": pid, "stem": stem, "state": state, "damaged": "; ".join(bad) or None}
            ckpt = stem[len(pid) + len("-ckpt"):] if stem != pid else None
            row["checkpoint_step"] = int(ckpt) if ckpt else run.config.train.steps
            if ev:
                p = ev["protocol"]
                row.update({m: ev["metrics"].get(m) for m in METRICS})
                # the FID's standard error over the sample set (bootstrap; records before evaluator 3 have none)
                row["fid_se"] = ((ev.get("intervals") or {}).get("fid") or {}).get("std")
                row.update(fid_label=ev["labels"].get("fid"), extractor=p.get("extractor_label"),
                           reference=p.get("reference"), sampler=p.get("sampler"), sampling_steps=p.get("steps"),
                           cfg_scale=p.get("cfg_scale"), guide_channels=p.get("guide_channels"),
                           num_samples=p.get("num_evaluated"), labels=p.get("labels"),
                           paper_comparable=ev["paper_protocol"]["comparable"] and not precision,
                           protocol_differences="; ".join([*ev["paper_protocol"]["differences"], *precision]))
                if p.get("checkpoint_step") is not None:
                    row["checkpoint_step"] = p["checkpoint_step"]
            rows.append(row)
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    for col in (*METRICS, *BENCH, "params_m", "gpu_hours_planned", "train_steps_per_s", "bench_ratio", "fid_se"):
        df[col] = pd.to_numeric(df[col], errors="coerce")  # missing is NaN, never 0
    return df


def by_step(df: pd.DataFrame) -> pd.DataFrame:
    """Seeds of one step folded: mean, std and count of every number, per (step, sample set)."""
    keys = ["step", "label", "model", "protocol", "stem", "checkpoint_step"]
    numbers = [c for c in (*METRICS, *BENCH, "params_m", "train_steps_per_s", "bench_ratio", "fid_se") if c in df]
    g = df.groupby(keys, dropna=False, sort=False)
    out = g[numbers].mean()
    std = g[numbers].std(ddof=1).add_suffix("_std")
    count = g["fid"].count().rename("seeds_done")
    first = g[["paper_rows", "fid_label", "extractor", "sampler", "sampling_steps", "num_samples", "cfg_scale",
               "paper_comparable", "protocol_differences", "train_steps", "bench_baseline"]].first()
    states = g["state"].agg(lambda s: "done" if (s == "done").all() else ", ".join(sorted(set(s) - {"done"})))
    seeds = g["seed"].count().rename("seeds")
    reliable = g["bench_reliable"].agg(_all_reliable).rename("bench_reliable")
    ratio_reliable = g["bench_ratio_reliable"].agg(_all_reliable).rename("bench_ratio_reliable")
    notes = g["bench_note"].agg(lambda s: "; ".join(dict.fromkeys(n for n in s if isinstance(n, str) and n)))
    return pd.concat([out, std, count, seeds, first, states, reliable, ratio_reliable, notes], axis=1).reset_index()


def _all_reliable(values: pd.Series):
    """Seeds folded: False if any seed's figure is unreliable, None if none was measured, else True."""
    known = [bool(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return None if not known else all(known)


def paper_table(df: pd.DataFrame, plan: Plan) -> pd.DataFrame:
    """Every paper row the study's steps stand for: paper value, ours (seed mean, std), delta, protocol match."""
    from repro.paper import load_paper

    study = plan.study.study
    if study.paper is None or plan.study.paper_path is None:
        return pd.DataFrame()
    paper = load_paper(plan.study.paper_path)
    steps = by_step(df) if len(df) else df
    out = []
    for run in _first_seed(plan.runs):
        for ref in run.rows:
            table, _, row_key = ref.rpartition("/")
            table = table or study.paper.table
            t = paper.tables[table]
            prow = t.rows[row_key]
            proto = t.row_protocol(row_key)
            ours = steps[steps["step"] == run.step] if len(steps) else steps
            ours = _matching_checkpoint(ours, proto.train_steps, run)
            for _, o in (ours.iterrows() if len(ours) else [(None, None)]):
                rec = {"paper": paper.paper, "table": table, "table_title": t.title, "row": row_key,
                       "paper_label": prow.label, "step": run.step, "our_label": run.label, "model": run.model}
                for ours_col, pcol in PAPER_METRICS.items():
                    pv = prow.values.get(pcol)
                    ov = None if o is None else o.get(ours_col)
                    ov = None if ov is None or (isinstance(ov, float) and math.isnan(ov)) else float(ov)
                    if pv is None and ov is None:
                        continue
                    rec[f"paper_{ours_col}"] = pv
                    rec[f"ours_{ours_col}"] = ov
                    rec[f"ours_{ours_col}_std"] = None if o is None else _nan_none(o.get(f"{ours_col}_std"))
                    rec[f"delta_{ours_col}"] = None if pv is None or ov is None else ov - pv
                rec["protocol"] = None if o is None else o.get("stem")
                rec["state"] = "pending" if o is None else o["state"]
                rec["seeds"] = 0 if o is None else int(o["seeds"])
                rec["ours_fid_se"] = None if o is None else _nan_none(o.get("fid_se"))  # mean over seeds
                diffs = _protocol_differences(proto, o)
                rec["protocol_match"] = not diffs
                rec["protocol_differences"] = "; ".join(diffs)
                measured = o is not None and _nan_none(o.get("img_per_s")) is not None
                rec["bench_reliable"] = o.get("bench_reliable") if measured else None  # of the img/s
                rec["bench_note"] = (o.get("bench_note") or None) if measured else None
                out.append(rec)
    return pd.DataFrame(out)


def _first_seed(runs: tuple[Run, ...]) -> list[Run]:
    seen, out = set(), []
    for r in runs:
        if r.step not in seen:
            seen.add(r.step)
            out.append(r)
    return out


def _matching_checkpoint(ours: pd.DataFrame, paper_steps: int | None, run: Run) -> pd.DataFrame:
    """The sample sets of the training step the paper row reports (its train_steps, else the end of training)."""
    if not len(ours):
        return ours
    target = run.config.train.steps
    if paper_steps is not None and paper_steps in set(ours["checkpoint_step"]):
        target = paper_steps
    return ours[ours["checkpoint_step"] == target]


def _nan_none(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _protocol_differences(proto, ours) -> list[str]:
    """How our measurement departs from the protocol the paper row states."""
    if ours is None:
        return ["not measured yet"]
    out = []
    if isinstance(ours.get("protocol_differences"), str) and ours["protocol_differences"]:
        out.extend(ours["protocol_differences"].split("; "))
    if proto.train_steps is not None and ours.get("checkpoint_step") != proto.train_steps:
        out.append(f"trained {int(ours['checkpoint_step']):,} steps, paper {proto.train_steps:,}")
    if proto.cfg_scale is not None and _nan_none(ours.get("cfg_scale")) not in (None, proto.cfg_scale):
        out.append(f"cfg {ours['cfg_scale']:g}, paper {proto.cfg_scale:g}")
    return out


def step_changes(plan: Plan, root: Path) -> pd.DataFrame:
    """Each step that `extends` another, against it, per sample protocol: our FID change (a paired difference:
    same training seeds, same sampling noise and labels), its interval, whether it is resolved, and the paper's
    change between the same rows. One row per (step, protocol); seeds folded (`repro.metrics.stats.over_seeds`).
    Only sample sets whose features were stored (evaluator 3) count; the others are listed as missing."""
    import numpy as np

    from repro.evaluate import features_file
    from repro.metrics.fid import Gaussian
    from repro.metrics.stats import fid_difference, over_seeds

    parents = {s.name: s.extends for s in plan.study.study.steps if s.extends}
    runs = {(r.step, r.seed): r for r in plan.runs}
    paper_fid = _paper_fids(plan)
    out = []
    for step, parent in parents.items():
        mine = [r for r in plan.runs if r.step == step]
        if not mine:
            continue
        for sample in mine[0].samples:
            pid = protocol_id(sample)
            diffs, missing = [], []
            for run in mine:
                base = runs.get((parent, run.seed))
                sets = []
                for r in (run, base):
                    path = None if r is None else features_file(rundir.RunPaths(root / "runs" / r.id).eval_file(
                        pid, r.evaluation.tag))
                    sets.append(path if path is not None and path.is_file() else None)
                if None in sets:
                    missing.append(f"seed {run.seed}")
                    continue
                with np.load(sets[0]) as a, np.load(sets[1]) as b:
                    if len(a["pool"]) != len(b["pool"]):
                        missing.append(f"seed {run.seed} (sample sets of {len(a['pool'])} and {len(b['pool'])})")
                        continue
                    reference = Gaussian(b["reference_mu"], b["reference_sigma"])
                    diffs.append(fid_difference(a["pool"], b["pool"], reference))
            row = {"step": step, "label": mine[0].label, "extends": parent,
                   "extends_label": next((r.label for r in plan.runs if r.step == parent), parent),
                   "protocol": pid, "missing": ", ".join(missing) or None,
                   "paper_change": (paper_fid[step] - paper_fid[parent]
                                    if paper_fid.get(step) is not None and paper_fid.get(parent) is not None
                                    else None)}
            if diffs:
                folded = over_seeds(diffs)
                row.update({k: folded.get(k) for k in ("diff", "lo", "hi", "resolved", "seeds", "over", "n",
                                                       "samples_to_resolve", "seeds_to_resolve")})
            out.append(row)
    return pd.DataFrame(out)


def _paper_fids(plan: Plan) -> dict[str, float | None]:
    """Step -> the paper's FID of the first row it stands for (None where the paper prints none)."""
    from repro.paper import load_paper

    study = plan.study.study
    if study.paper is None or plan.study.paper_path is None:
        return {}
    paper = load_paper(plan.study.paper_path)
    out = {}
    for run in _first_seed(plan.runs):
        if not run.rows:
            continue
        table, _, key = run.rows[0].rpartition("/")
        row = paper.tables[table or study.paper.table].rows.get(key)
        out[run.step] = None if row is None else row.values.get("fid")
    return out
