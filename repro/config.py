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
    """A mistake in a configuration file or value; the message is one line naming where."""


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
                raise ConfigError(f"train.{name}: must be >= 1, got {getattr(t, name)}")
        if self.diffusion.diffusion_steps < 2:
            raise ConfigError(f"diffusion.diffusion_steps: must be >= 2, got {self.diffusion.diffusion_steps}")
        if t.lr <= 0 or not 0 <= t.ema_decay <= 1 or t.warmup_steps < 0 or t.num_workers < 0:
            raise ConfigError("train: lr must be > 0, ema_decay in [0, 1], warmup_steps and num_workers >= 0")
        if self.sample.cfg_scale < 1:
            raise ConfigError(f"sample.cfg_scale: must be >= 1, got {self.sample.cfg_scale}")


# ----------------------------------------------------------------------------------------------- I/O
def to_dict(cfg) -> dict:
    """Plain-data form of a config (tuples as lists), as written to config.yaml."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_hash(cfg) -> str:
    """Stable short hash of a config's content."""
    text = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def load_run_config(path: str | Path) -> RunConfig:
    """Read a run config file strictly; ConfigError names file:line: dotted.key on any mistake."""
    data, lines = read_yaml(path)
    return from_dict(RunConfig, data, Where(str(path), lines))


def read_yaml(path: str | Path) -> tuple[Any, dict[str, int]]:
    """Safe-load a YAML file and map every dotted key to its line number."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    lines: dict[str, int] = {}
    _index_lines(node, "", lines)
    return ({} if data is None else data), lines


def _index_lines(node, prefix: str, lines: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            dotted = f"{prefix}{key_node.value}"
            lines[dotted] = key_node.start_mark.line + 1
            _index_lines(value_node, dotted + ".", lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[f"{prefix}{i}"] = item.start_mark.line + 1
            _index_lines(item, f"{prefix}{i}.", lines)


@dataclass(frozen=True)
class Where:
    """Where values come from, for error messages: a file and its key -> line map."""

    file: str = "<config>"
    lines: dict[str, int] = field(default_factory=dict)

    def at(self, dotted: str) -> str:
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):  # the key's own line, else its nearest parent's
            line = self.lines.get(".".join(parts[:n]))
            if line:
                return f"{self.file}:{line}: {dotted}"
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
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where.file}: {e}") from None


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
