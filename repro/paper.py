"""The papers' published numbers: every table row with the protocol it was measured under.

`experiments/paper/dic.yaml` and `dico.yaml` hold every number of the DiC and DiCo result tables (`specs/dic.md`,
`specs/dico.md`), each under its table and row. A row names our model preset when we build that model, and a
protocol states what the paper states; what the spec infers (I) or assumes (A) is listed in `assumptions`, and
the field stays None. Loading is as strict as run configs: a mistake is one line naming file:line: dotted.key.

    dico = load_paper("experiments/paper/dico.yaml")
    dico.number("t4", "dico_iso", "fid")                  # 60.58 (camera-ready v2)
    dico.tables["t1"].row_protocol("dico_xl_cfg").cfg_scale   # 1.4
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from repro.errors import ConfigError, did_you_mean
from repro.modelcheck import model_checks
from repro.yamlio import Where, from_dict, read_yaml

PAPER_DIR = Path(__file__).resolve().parents[1] / "experiments" / "paper"

# The metric columns a row may hold. "gflops" are GMACs (torchprofile, batch 1), as both papers print them.
METRICS = ("fid", "sfid", "is", "precision", "recall", "gflops", "winograd_gflops", "params_m", "img_per_s",
           "train_steps_per_s")

_KEY = re.compile(r"[a-z][a-z0-9_]*")
_POSITIVE = ("train_steps", "batch", "sampling_steps", "num_samples", "throughput_batch")


@dataclass(frozen=True)
class Protocol:
    """How a number was measured. None: the paper does not state it; `assumptions` say what we take instead."""

    resolution: Literal[256, 512, 1024] | None = None
    train_steps: int | None = None
    batch: int | None = None  # global training batch
    sampler: Literal["ddpm", "ddim", "ode", "sde"] | None = None
    sampling_steps: int | None = None
    cfg_scale: float | None = None  # 1.0 = no guidance
    guide_channels: Literal[3, 4] | None = None  # 3 = DiT's legacy guidance of eps channels 0-2 (protocol.md §4)
    num_samples: int | None = None
    labels: Literal["uniform", "balanced"] | None = None
    evaluator: str | None = None  # "adm_tf" = ADM's TensorFlow evaluator (protocol.md §6)
    reference: str | None = None  # reference statistics file
    ema: bool | None = None
    gpu: str | None = None  # throughput fields: device, batch, dtype, attention kernel
    throughput_batch: int | None = None
    throughput_dtype: str | None = None
    attention: str | None = None
    assumptions: tuple[str, ...] = ()  # what the spec marks (A) or (I) for these numbers

    def merged(self, over: Protocol | None) -> Protocol:
        """This protocol with `over`'s stated (non-None) fields on top; assumptions of both are kept."""
        if over is None:
            return self
        stated = {f.name: getattr(over, f.name) for f in fields(Protocol)
                  if f.name != "assumptions" and getattr(over, f.name) is not None}
        extra = tuple(a for a in over.assumptions if a not in self.assumptions)
        return replace(self, **stated, assumptions=self.assumptions + extra)


@dataclass(frozen=True)
class Row:
    """One printed row: its label as printed, our preset (None if we do not build it) and its numbers."""

    label: str
    model: str | None = None
    values: dict[str, float] = field(default_factory=dict)  # metric (one of METRICS) -> printed value
    protocol: Protocol | None = None  # overrides of the table's protocol (another step, cfg, batch, ...)
    notes: str | None = None


@dataclass(frozen=True)
class Table:
    """One result table: its title as printed, where the numbers come from, its protocol and its rows in order."""

    title: str
    source: str
    protocol: Protocol = field(default_factory=Protocol)
    rows: dict[str, Row] = field(default_factory=dict)
    notes: str | None = None

    def row_protocol(self, row: str) -> Protocol:
        """The protocol of row `row`: the table's, with the row's stated fields on top."""
        return self.protocol.merged(_pick(self.rows, row, "row").protocol)


@dataclass(frozen=True)
class Paper:
    """Every published number of one paper, by table key and row key."""

    paper: str  # short name: "DiC", "DiCo"
    citation: str
    tables: dict[str, Table] = field(default_factory=dict)

    def number(self, table: str, row: str, metric: str) -> float | None:
        """The value printed for (table, row, metric); None where that cell is empty. KeyError on a typo."""
        if metric not in METRICS:
            raise KeyError(f"unknown metric {metric!r}{did_you_mean(metric, METRICS)}; valid: {', '.join(METRICS)}")
        return _pick(_pick(self.tables, table, "table").rows, row, f"row of table {table!r}").values.get(metric)


def _pick(mapping: dict, key: str, what: str):
    if key not in mapping:
        raise KeyError(f"unknown {what} {key!r}{did_you_mean(key, mapping)}; valid: {', '.join(mapping)}")
    return mapping[key]


# ----------------------------------------------------------------------------------------------- loading
_LOADED: dict[tuple[str, int], Paper] = {}


def load_paper(path: str | Path) -> Paper:
    """Read one paper file strictly; ConfigError names file:line: dotted.key on any mistake. Parsed once per
    process and file version (planning and reporting both read it)."""
    try:
        key = (str(Path(path).resolve()), Path(path).stat().st_mtime_ns)
    except OSError:
        key = None
    if key in _LOADED:
        return _LOADED[key]
    paper = _load_paper(path)
    if key is not None:
        _LOADED[key] = paper
    return paper


def _load_paper(path: str | Path) -> Paper:
    data, lines = read_yaml(path)
    where = Where(str(path), lines)
    data = _mapping(data, where, "", Paper, required=("tables",))
    paper = from_dict(Paper, _without(data, "tables"), where)
    tables = _keyed(data["tables"], where, "tables", _table)
    return replace(paper, tables=tables)


def load_all(folder: str | Path = PAPER_DIR) -> dict[str, Paper]:
    """Every `*.yaml` paper file in `folder`, by the paper's short name."""
    files = sorted(Path(folder).glob("*.yaml"))
    if not files:
        raise ConfigError(f"{folder}: no paper files (*.yaml)")
    papers: dict[str, Paper] = {}
    for file in files:
        paper = load_paper(file)
        if paper.paper in papers:
            raise ConfigError(f"{file}: paper {paper.paper!r} is already defined by another file in {folder}")
        papers[paper.paper] = paper
    return papers


def _table(data: Any, where: Where, prefix: str) -> Table:
    data = _mapping(data, where, prefix, Table, required=("rows",))
    table = from_dict(Table, _without(data, "protocol", "rows"), where, prefix + ".")
    protocol = _protocol(data["protocol"], where, prefix + ".protocol") if "protocol" in data else Protocol()
    rows = _keyed(data["rows"], where, prefix + ".rows", _row)
    return replace(table, protocol=protocol, rows=rows)


def _row(data: Any, where: Where, prefix: str) -> Row:
    data = _mapping(data, where, prefix, Row, required=("values",))
    row = from_dict(Row, _without(data, "values", "protocol"), where, prefix + ".")
    presets = model_checks().presets() if row.model is not None else []
    if row.model is not None and row.model not in presets:
        raise ConfigError(f"{where.at(prefix + '.model')}: unknown model {row.model!r}"
                          f"{did_you_mean(row.model, presets)}; valid models: {', '.join(presets)}"
                          " (or leave model out when we do not build it)")
    protocol = None
    if data.get("protocol") is not None:
        protocol = _protocol(data["protocol"], where, prefix + ".protocol")
    return replace(row, values=_values(data["values"], where, prefix + ".values"), protocol=protocol)


def _protocol(data: Any, where: Where, prefix: str) -> Protocol:
    data = _mapping(data, where, prefix, Protocol)
    protocol = from_dict(Protocol, _without(data, "assumptions"), where, prefix + ".")
    for name in _POSITIVE:
        if getattr(protocol, name) is not None and getattr(protocol, name) < 1:
            raise ConfigError(f"{where.at(f'{prefix}.{name}')}: must be >= 1, got {getattr(protocol, name)}")
    if protocol.cfg_scale is not None and protocol.cfg_scale < 1:
        raise ConfigError(f"{where.at(prefix + '.cfg_scale')}: must be >= 1 (1.0 = no guidance), "
                          f"got {protocol.cfg_scale}")
    assumptions = data.get("assumptions", [])
    if not isinstance(assumptions, list) or not all(isinstance(a, str) and a for a in assumptions):
        raise ConfigError(f"{where.at(prefix + '.assumptions')}: expected a list of non-empty strings, "
                          f"got {assumptions!r}")
    return replace(protocol, assumptions=tuple(assumptions))


def _values(data: Any, where: Where, prefix: str) -> dict[str, float]:
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{where.at(prefix)}: expected a non-empty mapping of metric: number "
                          f"(metrics: {', '.join(METRICS)}), got {data!r}")
    values = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}"
        if key not in METRICS:
            raise ConfigError(f"{where.at(dotted)}: unknown metric{did_you_mean(str(key), METRICS)}; "
                              f"valid metrics: {', '.join(METRICS)}")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{where.at(dotted)}: expected a number >= 0, got {value!r}")
        values[key] = float(value)
    return values


def _keyed(data: Any, where: Where, prefix: str, build) -> dict:
    """A non-empty mapping of snake_case key -> item built by `build(item, where, dotted)`, in file order."""
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{where.at(prefix)}: expected a non-empty mapping, got {data!r}")
    out = {}
    for key, item in data.items():
        dotted = f"{prefix}.{key}"
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ConfigError(f"{where.at(dotted)}: key must be snake_case (a-z, 0-9, _; a letter first)")
        out[key] = build(item, where, dotted)
    return out


def _mapping(data: Any, where: Where, prefix: str, cls, required: tuple[str, ...] = ()) -> dict:
    """`data` checked to be a mapping holding the `required` keys that `from_dict` cannot check (the nested ones)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where.at(prefix or '<top>')}: expected a mapping of {cls.__name__} fields, "
                          f"got {'nothing' if data is None else repr(data)}")
    known = {f.name for f in fields(cls)}
    if all(k in known for k in data):  # an unknown key is reported first (by from_dict): often the misspelt one
        for key in required:
            if key not in data:
                raise ConfigError(f"{where.at(prefix or '<top>')}: missing required key "
                                  f"{f'{prefix}.{key}' if prefix else key}")
    return data


def _without(data: dict, *keys: str) -> dict:
    return {k: v for k, v in data.items() if k not in keys}
