"""Typed run configuration and strict YAML loading.

A run is fully described by `RunConfig` (model, diffusion, data, train, sample). YAML is data: it is read with
the safe loader, every key is checked against the dataclasses, and a mistake is one line naming the file, the
line and the dotted key, with the nearest valid key suggested:

    experiments/x.yaml:7: train.lr: expected a number, got 'fast'
    experiments/x.yaml:3: model.nmae: unknown key (did you mean name?)

Defaults are the papers' protocol (`specs/protocol.md`); a study file states only what differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from repro.errors import did_you_mean


class ConfigError(ValueError):
    """A mistake in a configuration file or value; the message is one line naming where.

    `key` (dotted, relative to the dataclass that raised it) lets the loader add the file and line.
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(f"{key}: {message}" if key else message)
        self.key, self.detail = key, message


# ----------------------------------------------------------------------------------------------- schema
@dataclass(frozen=True)
class ModelConfig:
    """A preset of `repro.models.PRESETS` and switch overrides (validated by the registry)."""

    name: str = "DiT-XL/2"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DiffusionConfig:
    """DiT's Gaussian diffusion: linear betas over 1000 steps, eps prediction, learned-range sigma."""

    noise_schedule: Literal["linear", "squaredcos_cap_v2"] = "linear"
    diffusion_steps: int = 1000
    learn_sigma: bool = True


# 28 px padded to 32, or that 2x2-averaged to 16 (a quarter of the compute, for the CPU demo)
FASHION_MNIST_RESOLUTIONS = (32, 16)


@dataclass(frozen=True)
class DataConfig:
    """Training data. `kind` picks the dataset; `path` None means the kind's default location."""

    kind: Literal["fashion_mnist", "imagenet_folder", "latents"] = "fashion_mnist"
    path: str | None = None
    resolution: int = 32
    flip: bool = False
    vae: str | None = None  # local diffusers AutoencoderKL folder (sd-vae-ft-ema) for latent data


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and loop. Defaults: DiT/DiC/DiCo S-XL (AdamW 1e-4, wd 0, batch 256, EMA 0.9999, fp32)."""

    steps: int = 400_000
    global_batch: int = 256
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    ema_decay: float = 0.9999
    grad_clip: float | None = None
    amp: Literal["off", "bf16", "fp16"] = "off"
    tf32_matmul: bool = False
    tf32_cudnn: bool = False
    seed: int = 0
    ckpt_every: int = 50_000
    keep_last: int = 2
    log_every: int = 100
    num_workers: int = 2


@dataclass(frozen=True)
class SampleConfig:
    """Sampling protocol. Defaults: the papers' 250-step DDPM, EMA weights, uniform random labels, no CFG."""

    num_samples: int = 50_000
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    steps: str = "250"
    cfg_scale: float = 1.0
    guide_channels: int | Literal["all"] = 3
    labels: Literal["uniform", "balanced"] = "uniform"
    seed: int = 0
    per_proc_batch: int = 32
    use_ema: bool = True

    def __post_init__(self):
        if self.cfg_scale < 1:
            raise ConfigError(f"must be >= 1, got {self.cfg_scale}", key="cfg_scale")
        if self.num_samples < 1 or self.per_proc_batch < 1:
            raise ConfigError("num_samples and per_proc_batch must be >= 1", key="num_samples")


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run's results."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self):
        t = self.train
        for name in ("steps", "global_batch", "ckpt_every", "keep_last", "log_every"):
            if getattr(t, name) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(t, name)}", key=f"train.{name}")
        if self.diffusion.diffusion_steps < 2:
            raise ConfigError(f"must be >= 2, got {self.diffusion.diffusion_steps}", key="diffusion.diffusion_steps")
        if t.lr <= 0 or not 0 <= t.ema_decay <= 1 or t.warmup_steps < 0 or t.num_workers < 0:
            raise ConfigError("lr must be > 0, ema_decay in [0, 1], warmup_steps and num_workers >= 0", key="train")
        if self.data.kind == "fashion_mnist" and self.data.resolution not in FASHION_MNIST_RESOLUTIONS:
            raise ConfigError(f"Fashion-MNIST comes at {' or '.join(map(str, FASHION_MNIST_RESOLUTIONS))}, "
                              f"got {self.data.resolution}", key="data.resolution")


# ----------------------------------------------------------------------------------------------- I/O
def to_dict(cfg) -> dict:
    """Plain-data form of a config (tuples as lists), as written to config.yaml."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_hash(cfg) -> str:
    """Stable short hash of a config's content."""
    text = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def dump_run_record(cfg: RunConfig) -> str:
    """The YAML a run folder's config.yaml holds: the run id, the config hash and the resolved config."""
    return yaml.safe_dump({"run_id": run_id(cfg), "config_hash": config_hash(cfg), "config": to_dict(cfg)},
                          sort_keys=False)


def load_run_record(path: Path) -> RunConfig | None:
    """The config a run folder's config.yaml holds, or None when the folder holds no run yet."""
    if not path.exists():
        return None
    return from_dict(RunConfig, yaml.safe_load(path.read_text())["config"], Where(str(path)))


def protocol_id(s: SampleConfig) -> str:
    """File stem naming everything that changes a sample set (samples/<id>.npz, eval/<id>.json)."""
    guide = f"-g{s.guide_channels}" if s.cfg_scale > 1 else ""
    return f"{s.sampler}{s.steps.replace(',', '_')}-cfg{s.cfg_scale:g}{guide}-{s.labels}-n{s.num_samples}-seed{s.seed}"


def sample_stem(pid: str, step: int | None = None) -> str:
    """samples/<stem>.npz of protocol `pid`: the newest checkpoint's, or an intermediate step's (`-ckpt<step>`)."""
    return pid if step is None else f"{pid}-ckpt{step}"


def sample_stems(pid: str, checkpoints: tuple[int, ...] = ()) -> list[str]:
    """The sample sets of one protocol: the newest checkpoint's, then each listed intermediate step's."""
    return [pid, *(sample_stem(pid, k) for k in sorted(set(checkpoints)))]


def load_run_config(path: str | Path) -> RunConfig:
    """Read a run config file strictly; ConfigError names file:line: dotted.key on any mistake."""
    data, lines = read_yaml(path)
    return from_dict(RunConfig, data, Where(str(path), lines))


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the same safe loader, about 10x faster


def read_yaml(path: str | Path) -> tuple[Any, dict[str, int]]:
    """Safe-load a YAML file and map every dotted key to its line number."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x})") from None
    try:
        node = yaml.compose(text, Loader=_LOADER)
        data = yaml.load(text, Loader=_LOADER)  # the safe loader (libyaml's when present)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    lines: dict[str, int] = {}
    _index_lines(node, "", lines, path)
    return ({} if data is None else data), lines


def _index_lines(node, prefix: str, lines: dict[str, int], path: Path) -> None:
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            dotted = f"{prefix}{key_node.value}"
            if key_node.value in seen:  # PyYAML keeps the last silently; a typo'd copy would win unnoticed
                raise ConfigError(f"{path}:{key_node.start_mark.line + 1}: {dotted}: duplicate key")
            seen.add(key_node.value)
            lines[dotted] = key_node.start_mark.line + 1
            _index_lines(value_node, dotted + ".", lines, path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[f"{prefix}{i}"] = item.start_mark.line + 1
            _index_lines(item, f"{prefix}{i}.", lines, path)


@dataclass(frozen=True)
class Where:
    """Where values come from, for error messages: a file, its key -> line map, and the other files that
    keys inherited through `extends:` come from."""

    file: str = "<config>"
    lines: dict[str, int] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def at(self, dotted: str) -> str:
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):  # the key's own line, else its nearest parent's
            key = ".".join(parts[:n])
            line = self.lines.get(key)
            if line:
                return f"{self.files.get(key, self.file)}:{line}: {dotted}"
        return f"{self.file}: {dotted}"


def from_dict(cls, data: Any, where: Where = Where(), prefix: str = ""):
    """Build dataclass `cls` from plain data, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where.at(prefix.rstrip('.') or '<top>')}: expected a mapping, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{where.at(dotted)}: unknown key{did_you_mean(str(key), fields)}; "
                              f"valid keys: {', '.join(fields)}")
        kwargs[key] = _convert(hints[key], value, where, dotted)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where.at(prefix.rstrip('.') or '<top>')}: missing required key {prefix}{name}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if e.key is not None:
            raise ConfigError(f"{where.at(prefix + e.key)}: {e.detail}") from None
        raise ConfigError(f"{where.at(prefix.rstrip('.')) if prefix else where.file}: {e}") from None


def _convert(tp, value, where: Where, dotted: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, dotted + ".")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where.at(dotted)}: {_show(value)} is not one of "
                              f"{', '.join(repr(a) for a in args)}{did_you_mean(str(value), map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _convert(option, value, where, dotted)
            except ConfigError as e:
                errors.append(str(e).split(": ", 2)[-1])
        raise ConfigError(f"{where.at(dotted)}: {' or '.join(errors)}")
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where.at(dotted)}: expected a list, got {_show(value)}")
        return tuple(_convert(args[0], v, where, f"{dotted}.{i}") for i, v in enumerate(value))
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{where.at(dotted)}: expected a list of {len(args)}, got {_show(value)}")
        return tuple(_convert(a, v, where, f"{dotted}.{i}") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where.at(dotted)}: expected a mapping, got {_show(value)}")
        return {str(k): (tuple(v) if isinstance(v, list) else v) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where.at(dotted)}: expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where.at(dotted)}: expected an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where.at(dotted)}: expected a number, got {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where.at(dotted)}: expected a string, got {_show(value)}")
        return value
    raise AssertionError(f"unsupported config type {tp} at {dotted}")


def _show(value) -> str:
    return "nothing" if value is None else repr(value)


# ----------------------------------------------------------------------------------------------- runs
# Keys that cannot change a run's results, so they are left out of its identity: resume is bit-exact and
# batches do not depend on the loader, so how often a run checkpoints or logs, or how many workers read its
# data, does not matter. Sampling protocols live inside a run (samples/<protocol>.npz), not in its identity.
# Where the data and the VAE live is not what they are (data.json in the run records that): moving a dataset
# must not orphan its runs.
NON_RESULT_KEYS = {"train": ("num_workers", "log_every", "ckpt_every", "keep_last"), "data": ("path", "vae")}


def model_identity(cfg: RunConfig) -> dict:
    """The resolved model: its family and every constructor argument (preset + overrides)."""
    from repro import models  # the registry resolves preset names into the constructor's arguments

    family = models.family(cfg.model.name)
    resolved = {k: list(v) if isinstance(v, tuple) else v
                for k, v in {**family.presets[cfg.model.name], **cfg.model.overrides}.items()}
    return {"family": family.name, **dict(sorted(resolved.items()))}


def run_identity(cfg: RunConfig, model: dict | None = None) -> dict:
    """What a run's results depend on: the resolved model (`model_identity`, computed unless given), diffusion,
    data and training."""
    d = to_dict(cfg)
    kept = {part: {k: v for k, v in d[part].items() if k not in NON_RESULT_KEYS.get(part, ())}
            for part in ("diffusion", "data", "train")}
    return {"model": model if model is not None else model_identity(cfg), **kept}


def run_id(cfg: RunConfig) -> str:
    """Short stable id of a run's identity: the same training in two studies is one run, trained once."""
    return identity_id(run_identity(cfg))


def identity_id(identity: dict) -> str:
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------------------------- studies
STAGES = ("train", "sample", "evaluate", "bench")


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


METRICS = ("fid", "is", "sfid", "precision", "recall")


@dataclass(frozen=True)
class EvalConfig:
    """How a study's samples are scored (never part of a run's identity; it names the eval file instead).

    Defaults are the papers' metrics through clean-fid's Inception in `legacy_tensorflow` mode (the mode closest to
    the ADM evaluator); Inception needs a reference (e.g. ADM's VIRTUAL_imagenet256_labeled.npz), checked when the
    evaluate stage runs.
    The CPU studies use `extractor: fashion-mnist`, whose reference defaults to the training split.
    """

    extractor: Literal["inception", "fashion-mnist"] = "inception"
    reference: str | None = None
    mode: Literal["legacy_tensorflow", "clean"] = "legacy_tensorflow"
    metrics: tuple[Literal["fid", "is", "sfid", "precision", "recall"], ...] = METRICS
    inception: str | None = None        # inception-2015-12-05.pt (default $REPRO_INCEPTION, then clean-fid's /tmp)
    classifier: str | None = None       # default <results>/.cache/extractors/fashion-mnist-classifier.pt
    allow_download: bool = False        # compute nodes are usually offline: never download unless asked
    checkpoints: tuple[int, ...] = ()   # intermediate training steps also sampled and scored (FID against step)
    batch_size: int = 64

    def __post_init__(self):
        if not self.metrics:
            raise ConfigError("name at least one metric", key="metrics")
        if self.batch_size < 1 or any(c < 1 for c in self.checkpoints):
            raise ConfigError("batch_size and checkpoint steps must be >= 1", key="checkpoints")

    @property
    def reference_spec(self) -> str:
        """The reference to load; the Inception extractor has no default (ImageNet statistics are a download)."""
        if self.reference:
            return self.reference
        if self.extractor == "fashion-mnist":
            return "fashion-mnist:train"
        raise ConfigError("evaluate.reference: not set; the inception extractor needs one (e.g. ADM's "
                          "VIRTUAL_imagenet256_labeled.npz, an image folder or an npz of images)")

    @property
    def tag(self) -> str:
        """Names the eval file beside the sample protocol: extractor, mode and reference."""
        ref = self.reference or ("fashion-mnist:train" if self.extractor == "fashion-mnist" else "noref")
        ref = ref.split(":", 1)[1] if ref.startswith("fashion-mnist:") else Path(ref.rstrip("/")).stem
        ref = "".join(c if c.isalnum() or c in "_-" else "_" for c in ref)
        if self.extractor == "fashion-mnist":
            return f"fmnist-{ref}"
        return f"inception_{'tf' if self.mode == 'legacy_tensorflow' else 'clean'}-{ref}"


@dataclass(frozen=True)
class BenchConfig:
    """The bench stage: parameters, GMACs and denoiser throughput under `specs/protocol.md` section 8."""

    batch: int = 64
    dtype: Literal["fp32", "bf16"] = "fp32"
    flags: Literal["strict_fp32", "torch_default"] = "strict_fp32"
    attention: Literal["fused", "math"] = "fused"
    warmup: int = 20
    iters: int = 20
    repeats: int = 3

    def __post_init__(self):
        if min(self.batch, self.iters, self.repeats) < 1 or self.warmup < 0:
            raise ConfigError("batch, iters and repeats must be >= 1, warmup >= 0", key="batch")


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
    from repro.paper import load_paper

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


class ModelChecks:
    """Outcomes of building (preset, switches) on the meta device: the error, or, when it builds, the resolved
    model (`model_identity`) and the switches that differ from the preset (the paper's model).

    Building needs torch, whose import is most of a plan's time (about 1.9 s of 3.2 s for a 10,000-run study on a
    2-core machine). With a `cache` file, outcomes persist keyed by the source of `repro/models` and the torch
    version, so re-planning, or planning a study whose models were checked before, never imports torch.
    """

    def __init__(self, cache: Path | None = None):
        self.cache = cache
        self.fingerprint = self._fingerprint() if cache is not None else ""
        self.known: dict[str, dict] = {}
        self.preset_names: list[str] | None = None
        self.new = False
        if cache is not None and cache.is_file():
            try:
                data = json.loads(cache.read_text())
                if data.get("fingerprint") == self.fingerprint:
                    self.known, self.preset_names = dict(data["checks"]), list(data["presets"])
            except (ValueError, KeyError, TypeError, OSError):
                pass  # a damaged cache is only a slower plan

    def presets(self) -> list[str]:
        """Every preset name of every family."""
        if self.preset_names is None:
            from repro import models

            self.preset_names, self.new = list(models.PRESETS), True
        return self.preset_names

    @staticmethod
    def _fingerprint() -> str:
        from importlib import metadata

        h = hashlib.sha256(b"model-checks v3")
        for f in sorted((Path(__file__).parent / "models").glob("*.py")):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        try:
            h.update(metadata.version("torch").encode())
        except metadata.PackageNotFoundError:
            pass
        return h.hexdigest()[:16]

    def check(self, cfg: RunConfig, where: Where, dotted: str) -> dict:
        """{"model": resolved model, "switches": differing switches}; ConfigError naming `dotted` if it does not
        build."""
        key = json.dumps([cfg.model.name, to_dict(cfg)["model"]["overrides"]], sort_keys=True)
        if key not in self.known:
            from repro import models

            try:
                models.build_meta(cfg.model.name, **cfg.model.overrides)
                self.known[key] = {"error": None, "model": model_identity(cfg),
                                   "switches": _differing(models.PRESETS[cfg.model.name], cfg)}
            except (ValueError, TypeError) as e:
                self.known[key] = {"error": str(e)}
            self.new = True
        if self.known[key]["error"] is not None:
            raise ConfigError(f"{where.at(dotted)}: {self.known[key]['error']}")
        return {"model": self.known[key]["model"], "switches": self.known[key]["switches"]}

    def save(self) -> None:
        if self.cache is not None and self.new:
            from repro.rundir import atomic_write_text

            atomic_write_text(self.cache, json.dumps({"fingerprint": self.fingerprint, "presets": self.presets(),
                                                      "checks": self.known}))
            self.new = False


_MODEL_CHECKS = ModelChecks()


def model_checks(cache: Path | None = None) -> ModelChecks:
    """This process's ModelChecks; with `cache`, first switch to one remembered in that file (the CLI does, under
    the results root)."""
    global _MODEL_CHECKS
    if cache is not None and _MODEL_CHECKS.cache != cache:
        _MODEL_CHECKS = ModelChecks(cache)
    return _MODEL_CHECKS


def _differing(preset: dict, cfg: RunConfig) -> dict:
    out = {}
    for k, v in cfg.model.overrides.items():
        if preset.get(k) != v and not (isinstance(v, tuple) and tuple(preset.get(k, ())) == v):
            out[k] = list(v) if isinstance(v, tuple) else v
    return out
