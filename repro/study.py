"""The study schema: a paper's table written once, as defaults, steps (+ grid), sampling protocols, stages and
resources.

`load_study` resolves and checks everything before anything runs: every step's config (keys, types, that the
model builds), the paper rows the steps name, and the sampling protocols. `repro.plan` turns the result into runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from repro.config import MAX_SEED, BenchConfig, EvalConfig, RunConfig, SampleConfig, resolve_tf32
from repro.errors import ConfigError, did_you_mean
from repro.modelcheck import model_checks
from repro.paper import load_paper
from repro.yamlio import Where, show_value, check_ranges, check_text, from_dict, plain, read_yaml

# Study and step names become folder names (reports/<study>), job names in sbatch scripts and report text: one
# short word of letters, digits and . _ + -, starting with a letter or digit (so never "..", "/" or a hidden
# character), at most NAME_MAX characters.
NAME_MAX = 64


def check_name(name: str, key: str, extra: str = "._+-") -> None:
    """Refuse a study or step name that is empty, long, or holds anything but ASCII letters, digits and `extra`."""
    if len(name) > NAME_MAX or ".." in name or not re.fullmatch(rf"[A-Za-z0-9][A-Za-z0-9{re.escape(extra)}]*", name):
        allowed = ", ".join(f"'{c}'" for c in extra)
        raise ConfigError(f"use letters, digits and {allowed} only (1 to {NAME_MAX} characters, starting with a "
                          f"letter or digit), got {show_value(name)}", key=key)


@dataclass(frozen=True)
class PaperRef:
    """The paper table a study regenerates: experiments/paper/<file> and a table key in it."""

    file: str
    table: str


@dataclass(frozen=True)
class Step:
    """One row of the study: a name, the label printed in the paper, the paper row, and config changes.

    `extends` names an earlier step whose config this one starts from (the DiC roadmap is cumulative);
    without it a step starts from the study's defaults.
    """

    name: str
    label: str | None = None
    row: str | tuple[str, ...] | None = None  # paper row key(s); "table/row" names another table of the paper
    extends: str | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        check_name(self.name, "name")
        check_text(self.label, "label", limit=200)


@dataclass(frozen=True)
class Grid:
    """Repeats of every step: one run per training seed (empty: the config's own seed)."""

    seeds: tuple[int, ...] = ()

    def __post_init__(self):
        check_ranges(self, seeds=(0, MAX_SEED))
        if len(self.seeds) > 1000:
            raise ConfigError(f"at most 1000 seeds, got {len(self.seeds)}", key="seeds")


@dataclass(frozen=True)
class Resources:
    """What one run's jobs ask the cluster for; never part of a run's identity."""

    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int | None = None  # train and sample processes per node; None: one per GPU (one without GPUs)
    cpus_per_task: int = 8
    mem_gb: int = 64
    time: str = "72:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None

    def __post_init__(self):
        # all of these reach the job script as #SBATCH lines: checked here, with the file and line, not at submit
        check_ranges(self, nodes=(1, 4096), gpus_per_node=(0, 64), cpus_per_task=(1, 4096), mem_gb=(0, 2**20))
        if self.tasks_per_node is not None:
            check_ranges(self, tasks_per_node=(1, 256))
            if self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:  # a process per GPU (local rank)
                raise ConfigError(f"must equal gpus_per_node ({self.gpus_per_node}) on GPU nodes, or be left out, "
                                  f"got {self.tasks_per_node}", key="tasks_per_node")
        for key in ("partition", "account", "qos", "constraint"):
            check_text(getattr(self, key), key, limit=256)
        if self.time:  # empty: the profile's time_min
            check_text(self.time, "time", limit=64)
            try:
                minutes = parse_time(self.time)
            except ValueError as e:
                raise ConfigError(str(e), key="time") from None
            if not 1 <= minutes <= MAX_TIME_MIN:
                raise ConfigError(f"must be between 1 minute and {MAX_TIME_MIN // 1440} days, got {self.time!r}",
                                  key="time")


MAX_TIME_MIN = 366 * 1440  # a year: any longer time limit is a typo


def parse_time(text: str) -> int:
    """SLURM time (`MM`, `HH:MM:SS`, `D-HH:MM:SS`, `D-HH`) in minutes, rounded up."""
    m = re.fullmatch(r"(?:([0-9]{1,6})-)?([0-9]{1,9})(?::([0-9]{1,9}))?(?::([0-9]{1,9}))?", text.strip())
    if not m:
        raise ValueError(f"not a SLURM time (MM, HH:MM:SS, D-HH or D-HH:MM:SS): {show_value(text)}")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if days is None and b is None:
        return a                                   # MM
    if days is not None and b is None:
        seconds = days * 86400 + a * 3600          # D-HH
    elif c is None:
        seconds = (days or 0) * 86400 + (a * 3600 + b * 60 if days is not None else a * 60 + b)  # D-HH:MM or MM:SS
    else:
        seconds = (days or 0) * 86400 + a * 3600 + b * 60 + c
    return -(-seconds // 60)


@dataclass(frozen=True)
class Cost:
    """Declared seconds per training step at the study's resources (for the GPU-hour estimate)."""

    step_seconds: float | None = None

    def __post_init__(self):
        if self.step_seconds is not None and not 0 < self.step_seconds <= 86400:
            raise ConfigError(f"must be > 0 and at most a day, got {self.step_seconds}", key="step_seconds")


@dataclass(frozen=True)
class Study:
    """A paper's table written once: defaults, steps (+ grid), sampling protocols, stages and resources."""

    study: str
    steps: tuple[Step, ...]
    description: str = ""
    paper: PaperRef | None = None
    extends: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    samples: tuple[dict[str, Any], ...] = ({},)
    grid: Grid = field(default_factory=Grid)
    stages: tuple[Literal["train", "sample", "evaluate", "bench"], ...] = ("train", "sample", "evaluate")
    resources: Resources = field(default_factory=Resources)
    cost: Cost = field(default_factory=Cost)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)


@dataclass(frozen=True)
class LoadedStudy:
    """A validated study with its resolved step configs, and where it came from."""

    study: Study
    path: Path
    configs: dict[str, RunConfig]           # step name -> resolved config (seed from the grid applied later)
    samples: tuple[SampleConfig, ...]
    models: dict[str, dict] = field(default_factory=dict)  # step name -> {"model": model_identity, "switches": ...}
    paper_path: Path | None = None          # the paper file, resolved from the study file that names it


def deep_merge(base: dict, top: dict) -> dict:
    """`top` over `base`, recursively for mappings; lists and scalars in `top` replace those in `base`."""
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_study_file(path: Path, chain: tuple[Path, ...]) -> tuple[dict, dict[str, int], dict[str, str]]:
    """A study file's data merged over the file it `extends`, with each key's line and origin file."""
    path = path.resolve()
    data, lines = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: expected a mapping at the top, got {show_value(data)}")
    files = {k: str(path) for k in lines}
    parent = data.get("extends")
    if parent is None:
        return data, lines, files
    at = f"{path}:{lines.get('extends', 1)}: extends"
    if not isinstance(parent, str):
        raise ConfigError(f"{at}: expected a relative file path")
    try:
        check_text(parent, "extends")
    except ConfigError as e:
        raise ConfigError(f"{at}: {e.detail}") from None
    parent_path = path.parent / parent
    if not _is_file(parent_path):
        raise ConfigError(f"{at}: file not found: {plain(str(parent_path))}")
    if parent_path.resolve() in (*chain, path):
        cycle = " -> ".join(str(p) for p in (*chain, path, parent_path.resolve()))
        raise ConfigError(f"{path}:{lines.get('extends', 1)}: extends cycle: {cycle}")
    base, base_lines, base_files = _read_study_file(parent_path, (*chain, path))
    merged = deep_merge(base, {k: v for k, v in data.items() if k != "extends"})
    return merged, {**base_lines, **lines}, {**base_files, **files}


def load_study(path: str | Path) -> LoadedStudy:
    """Read and validate a study strictly: every step's config is resolved and checked before anything runs.

    Models are checked through `model_checks()`; a caller that keeps them in a file saves it once the whole study
    has proved valid.
    """
    path = Path(path)
    checks = model_checks()
    if path.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"{path}: a study is a .yaml file")
    data, lines, files = _read_study_file(path, ())
    where = Where(str(path), lines, files)
    study = from_dict(Study, data, where)
    try:  # the report folder's name: no dots here, so a study name is never mistaken for a file name
        check_name(study.study, "study", extra="_-")
    except ConfigError as e:
        raise ConfigError(f"{where.at('study')}: {e.detail}") from None
    if not study.steps:
        raise ConfigError(f"{where.at('steps')}: a study needs at least one step")
    from_dict(RunConfig, study.defaults, where, "defaults.")
    configs: dict[str, RunConfig] = {}
    checked: dict[str, dict] = {}
    raw: dict[str, dict] = {}
    for i, step in enumerate(study.steps):
        key = f"steps.{i}"
        if step.name in raw:
            raise ConfigError(f"{where.at(key + '.name')}: step name {step.name!r} is used twice")
        if step.extends is not None and step.extends not in raw:
            raise ConfigError(f"{where.at(key + '.extends')}: {step.extends!r} is not an earlier step"
                              f"{did_you_mean(step.extends, raw)}")
        from_dict(RunConfig, step.config, where, f"{key}.config.")  # types and keys, with this step's lines
        start = raw[step.extends] if step.extends is not None else study.defaults
        raw[step.name] = deep_merge(start, step.config)
        configs[step.name] = from_dict(RunConfig, raw[step.name], where, f"{key}.config.")
        checked[step.name] = checks.check(configs[step.name], where, f"{key}.config.model")
        configs[step.name] = resolve_tf32(configs[step.name], checked[step.name]["model"]["family"])
    paper_path = _check_paper_rows(study, path, where) if study.paper is not None else None
    if "evaluate" in study.stages:
        for k in study.evaluate.checkpoints:
            short = [name for name, c in configs.items() if k >= c.train.steps]
            if short:
                raise ConfigError(f"{where.at('evaluate.checkpoints')}: step {k} is not before the end of training "
                                  f"of {', '.join(short)} (the final checkpoint is always evaluated)")
    samples = []
    for i, proto in enumerate(study.samples):
        sample_raw = deep_merge(study.defaults.get("sample", {}), proto)
        samples.append(from_dict(SampleConfig, sample_raw, where, f"samples.{i}."))
    return LoadedStudy(study=study, path=path, configs=configs, samples=tuple(samples), models=checked,
                       paper_path=paper_path)


def _check_paper_rows(study: Study, path: Path, where: Where) -> Path:
    """The paper table exists and every step's row is in it (experiments/paper/*.yaml); returns the paper file."""
    # relative to the file that names it, which may be a study this one extends
    declared_in = Path(where.files.get("paper.file") or where.files.get("paper") or path)
    paper_path = declared_in.parent / study.paper.file
    if not _is_file(paper_path):
        raise ConfigError(f"{where.at('paper.file')}: file not found: {plain(str(paper_path))}")
    paper = load_paper(paper_path)
    if study.paper.table not in paper.tables:
        raise ConfigError(f"{where.at('paper.table')}: no table {study.paper.table!r} in {paper_path}"
                          f"{did_you_mean(study.paper.table, paper.tables)}")
    for i, step in enumerate(study.steps):
        for ref in step_rows(step):
            table, _, row = ref.rpartition("/")
            table = table or study.paper.table
            if table not in paper.tables:
                raise ConfigError(f"{where.at(f'steps.{i}.row')}: no table {table!r} in {paper_path}"
                                  f"{did_you_mean(table, paper.tables)}")
            if row not in paper.tables[table].rows:
                raise ConfigError(f"{where.at(f'steps.{i}.row')}: no row {row!r} in {paper_path} table "
                                  f"{table!r}{did_you_mean(row, paper.tables[table].rows)}")
    return paper_path


def _is_file(path: Path) -> bool:
    """Path.is_file, also False for a path the system refuses (too long a name, a NUL byte): a user's typo."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def step_rows(step: Step) -> tuple[str, ...]:
    """The paper rows a step reproduces (one run can stand for rows of two tables, e.g. DiCo's DiT (U-shape))."""
    if step.row is None:
        return ()
    return (step.row,) if isinstance(step.row, str) else step.row
