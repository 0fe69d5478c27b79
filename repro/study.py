"""The study schema: a paper's table written once, as defaults, steps (+ grid), sampling protocols, stages and
resources.

`load_study` resolves and checks everything before anything runs: every step's config (keys, types, that the
model builds), the paper rows the steps name, and the sampling protocols. `repro.plan` turns the result into runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from repro.config import BenchConfig, EvalConfig, RunConfig, SampleConfig, resolve_tf32
from repro.errors import ConfigError, did_you_mean
from repro.modelcheck import model_checks
from repro.paper import load_paper
from repro.yamlio import Where, _show, from_dict, read_yaml


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


@dataclass(frozen=True)
class Grid:
    """Repeats of every step: one run per training seed (empty: the config's own seed)."""

    seeds: tuple[int, ...] = ()


@dataclass(frozen=True)
class Resources:
    """What one run's jobs ask the cluster for; never part of a run's identity."""

    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: int = 8
    mem_gb: int = 64
    time: str = "72:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None


@dataclass(frozen=True)
class Cost:
    """Declared seconds per training step at the study's resources (for the GPU-hour estimate)."""

    step_seconds: float | None = None


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
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"{chain[-1]}: extends cycle: {cycle}")
    data, lines = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: expected a mapping at the top, got {_show(data)}")
    files = {k: str(path) for k in lines}
    parent = data.get("extends")
    if parent is None:
        return data, lines, files
    if not isinstance(parent, str):
        raise ConfigError(f"{path}:{lines.get('extends', 1)}: extends: expected a relative file path")
    parent_path = path.parent / parent
    if not parent_path.is_file():
        raise ConfigError(f"{path}:{lines.get('extends', 1)}: extends: file not found: {parent_path}")
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
    if not study.study.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"{where.at('study')}: use letters, digits, '_' and '-' only, got {study.study!r}")
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
    if not paper_path.is_file():
        raise ConfigError(f"{where.at('paper.file')}: file not found: {paper_path}")
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


def step_rows(step: Step) -> tuple[str, ...]:
    """The paper rows a step reproduces (one run can stand for rows of two tables, e.g. DiCo's DiT (U-shape))."""
    if step.row is None:
        return ()
    return (step.row,) if isinstance(step.row, str) else step.row
