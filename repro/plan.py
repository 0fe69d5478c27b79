"""Study -> runs and stages. A run is identified by what its results depend on, so a run named by several
studies (the DiT-XL/2 baseline of the DiC roadmap and of the DiCo ablation, at the same protocol) is one run,
trained once, in results/runs/<run-id>/. Its bench stage alone is per study: a study's runs are timed together
in one job (results/bench/<study>.json), so the shared baseline is timed beside each study's other models.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from repro import rundir
from repro.config import (EvalConfig, RunConfig, SampleConfig, current_eval, identity_id, protocol_id, run_identity,
                          sample_stems, to_dict)
from repro.errors import ConfigError
from repro.study import LoadedStudy, load_study, step_rows

RESULTS_ENV = "REPRO_RESULTS"
LAST_STUDY = ".last_study"


def results_root(explicit: str | Path | None = None) -> Path:
    """--results, else $REPRO_RESULTS, else ./results (on SLURM it must be on a shared filesystem)."""
    return Path(explicit or os.environ.get(RESULTS_ENV) or "results")


@dataclass(frozen=True)
class Stage:
    """One job of a run: what it does, what it waits for, and what it asks the cluster for."""

    name: str                      # train | sample:<protocol> | evaluate:<protocol> | bench
    after: tuple[str, ...]
    gpus: int
    nodes: int


@dataclass(frozen=True)
class Run:
    """One training run of a study, with its sampling protocols and stages."""

    id: str
    step: str
    label: str
    rows: tuple[str, ...]
    seed: int
    config: RunConfig
    config_dict: dict                  # to_dict(config), computed once per step (plans can hold 10^4 runs)
    samples: tuple[SampleConfig, ...]
    stages: tuple[Stage, ...]
    switches: dict
    gpu_hours: float | None
    evaluation: EvalConfig | None = None   # the study's evaluate section (names the eval files)
    study: str = ""                        # the study planning it: its bench is done per study (bench_done)

    @property
    def checkpoints(self) -> tuple[int, ...]:
        """Intermediate training steps that are sampled and scored besides the last."""
        return self.evaluation.checkpoints if self.evaluation is not None else ()

    @property
    def model(self) -> str:
        return self.config.model.name


@dataclass(frozen=True)
class Plan:
    """The runs of one study, in the study's step order (grid seeds within a step)."""

    study: LoadedStudy
    runs: tuple[Run, ...]


def expand(loaded: LoadedStudy) -> Plan:
    """Study -> runs: each step x grid seed, with resolved configs, ids, stages and a GPU-hour estimate."""
    s = loaded.study
    runs = []
    for step in s.steps:
        base = loaded.configs[step.name]
        checked = loaded.models[step.name]
        base_identity, base_dict, switches = run_identity(base, checked["model"]), to_dict(base), checked["switches"]
        for seed in s.grid.seeds or (base.train.seed,):
            cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, seed=seed))
            identity = {**base_identity, "train": {**base_identity["train"], "seed": seed}}
            cfg_dict = {**base_dict, "train": {**base_dict["train"], "seed": seed}}
            stages = []
            if "train" in s.stages:
                stages.append(Stage("train", (), s.resources.gpus_per_node, s.resources.nodes))
            for proto in loaded.samples:
                pid = protocol_id(proto)
                if "sample" in s.stages:
                    stages.append(Stage(f"sample:{pid}", ("train",) if "train" in s.stages else (),
                                        s.resources.gpus_per_node, 1))
                if "evaluate" in s.stages:
                    stages.append(Stage(f"evaluate:{pid}", (f"sample:{pid}",) if "sample" in s.stages else (),
                                        1, 1))
            if "bench" in s.stages:
                stages.append(Stage("bench", (), 1, 1))
            hours = None
            if s.cost.step_seconds is not None and "train" in s.stages:
                gpus = s.resources.gpus_per_node * s.resources.nodes
                hours = cfg.train.steps * s.cost.step_seconds * gpus / 3600
            runs.append(Run(id=identity_id(identity), step=step.name, label=step.label or step.name,
                            rows=step_rows(step), seed=seed, config=cfg, config_dict=cfg_dict, samples=loaded.samples,
                            stages=tuple(stages), switches=switches, gpu_hours=hours, evaluation=s.evaluate,
                            study=s.study))
    ids = [r.id for r in runs]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        names = [f"{r.step} (seed {r.seed})" for r in runs if r.id in dup]
        raise ConfigError(f"{loaded.path}: steps {', '.join(names)} are the same run ({', '.join(dup)}); "
                          f"a study must not list one configuration twice")
    return Plan(study=loaded, runs=tuple(runs))


# ---------------------------------------------------------------------------------------------- status
def stage_states(run: Run, root: Path) -> dict[str, dict]:
    """What the run folder says about each stage: state (new / partial / done) and progress."""

    paths = rundir.RunPaths(root / "runs" / run.id)
    if not paths.root.exists():  # most runs of a fresh plan: no need to look further
        return {stage.name: _new(stage, run) for stage in run.stages}
    out = {}
    for stage in run.stages:
        if stage.name == "train":
            steps = rundir.checkpoint_steps(paths)
            done_step = steps[-1] if steps else 0
            last = _last_metrics(paths.metrics)
            state = "done" if done_step >= run.config.train.steps else ("partial" if steps or last else "new")
            info = {"state": state, "step": max(done_step, last.get("step", 0)), "total": run.config.train.steps,
                    "loss": last.get("loss")}
            rate = last.get("steps_per_s")
            if state != "done" and rate:
                info["eta_s"] = (run.config.train.steps - info["step"]) / rate
            out["train"] = info
        elif stage.name.startswith("sample:"):
            stems = sample_stems(stage.name.split(":", 1)[1], run.checkpoints)
            done = sum(paths.samples_file(stem).with_suffix(".json").exists() for stem in stems)
            shards = list(paths.samples.glob(f".{stems[0]}*.shards/*.npz")) if paths.samples.is_dir() else []
            out[stage.name] = {"state": "done" if done == len(stems) else ("partial" if shards or done else "new")}
        elif stage.name.startswith("evaluate:"):
            stems = sample_stems(stage.name.split(":", 1)[1], run.checkpoints)
            done = sum(current_eval(paths.eval_file(stem, run.evaluation.tag)) for stem in stems) \
                if run.evaluation is not None else 0
            out[stage.name] = {"state": "done" if done == len(stems) else ("partial" if done else "new")}
        elif stage.name == "bench":
            out[stage.name] = {"state": "done" if run.id in benched_runs(root, run.study) else "new"}
    assert set(out) == {s.name for s in run.stages}
    return out


_BENCHED: dict[Path, tuple[tuple[int, int, int], frozenset[str]]] = {}


def benched_runs(root: Path, study: str) -> frozenset[str]:
    """Run ids in the study's bench record (<results>/bench/<study>.json): a run's bench stage is done per study,
    since its throughput is only comparable with the figures of the job that timed it. Read once per version of
    the file: status asks for every run of a plan."""
    path = rundir.bench_record(root, study)
    try:
        st = path.stat()
    except OSError:
        return frozenset()
    key = (st.st_ino, st.st_mtime_ns, st.st_size)  # written by rename: a new record is a new inode
    hit = _BENCHED.get(path)
    if hit is not None and hit[0] == key:
        return hit[1]
    try:
        ids = frozenset(json.loads(path.read_text()).get("runs") or {})
    except (OSError, ValueError, AttributeError):
        ids = frozenset()
    _BENCHED[path] = (key, ids)
    return ids


def _new(stage: Stage, run: Run) -> dict:
    if stage.name == "train":
        return {"state": "new", "step": 0, "total": run.config.train.steps, "loss": None}
    return {"state": "new"}


def run_status(states: dict[str, dict]) -> str:
    values = {s["state"] for s in states.values()}
    return "done" if values == {"done"} else ("new" if values == {"new"} else "partial")


def _last_metrics(path: Path) -> dict:
    """The last complete record of train/metrics.jsonl ({} before the first; torn lines skipped with a warning)."""
    return (rundir.read_metrics(path) or [{}])[-1]


def remember(study_path: Path, root: Path) -> None:
    """Record the study planned last, for `repro submit/status/report` with no study named."""
    rundir.atomic_write_text(root / LAST_STUDY, str(study_path.resolve()) + "\n")


def last_study(root: Path) -> Path:
    marker = root / LAST_STUDY
    if not marker.exists():
        raise ConfigError(f"no study named and none planned yet under {root} (run `repro plan STUDY.yaml` first)")
    return Path(marker.read_text().strip())


def plan_json(plan: Plan, root: Path) -> dict:
    """The plan as plain data (`repro plan --json`)."""
    runs = []
    samples = [to_dict(p) for p in plan.study.samples]
    for r in plan.runs:
        states = stage_states(r, root)
        runs.append({"id": r.id, "step": r.step, "label": r.label, "rows": list(r.rows), "seed": r.seed,
                     "model": r.model, "switches": r.switches, "config": r.config_dict, "samples": samples,
                     "stages": [{"name": s.name, "after": list(s.after), "gpus": s.gpus, "nodes": s.nodes,
                                 **states[s.name]} for s in r.stages],
                     "status": run_status(states), "gpu_hours": r.gpu_hours})
    s = plan.study.study
    return {"study": s.study, "file": str(plan.study.path), "paper": dataclasses.asdict(s.paper) if s.paper else None,
            "results": str(root), "runs": runs}


__all__ = ["Plan", "Run", "Stage", "benched_runs", "expand", "last_study", "load_study", "plan_json", "remember",
           "results_root", "run_status", "stage_states"]
