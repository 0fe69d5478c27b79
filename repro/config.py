"""Typed run configuration: what a run is, what it is called, and how its folder records it.

A run is fully described by `RunConfig` (model, diffusion, data, train, sample). Its id hashes only what its
results depend on (`run_identity`), so the same training named by two studies is one run, trained once.
`EvalConfig` and `BenchConfig` are how the evaluate and bench stages score a run; a study sets them, the stages
(and `repro evaluate`) read them, and neither is part of a run's identity.

Config files are read strictly through `repro.yamlio`: a mistake is one line naming file:line: dotted.key.
Defaults are the papers' protocol (`specs/protocol.md`); a study file states only what differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from repro.errors import ConfigError
from repro.yamlio import Where, show_value, check_ranges, check_text, from_dict, read_yaml


# ----------------------------------------------------------------------------------------------- schema
# Bounds of the numbers a config holds. Each is far beyond any real run, and low enough that a typo (an extra
# exponent, a sign) is an error at load instead of a job that trains forever, fills the memory or flips the
# gradients. Every bound is checked in the __post_init__ of the dataclass that holds the field.
MAX_STEPS = 10**9             # training steps (DiT-XL/2's longest run is 7M)
MAX_BATCH = 2**20             # images in one global or per-process batch
MAX_SEED = 2**32 - 1          # seeds are combined into 63-bit seeds (repro.train.seed_for); keep them plain
MAX_SIZE = 2**20              # model widths, depths, heads, classes, ...
MAX_SAMPLES = 10**7           # images of one sample set (FID-50K is the protocol)

# Model switches that count something (channels, blocks, heads, classes, pixels): a zero or negative one is a
# shape error deep inside the constructor, so they are refused at load with the file and line.
POSITIVE_SWITCHES = ("width", "depths", "depth", "hidden_size", "embed_dim", "num_heads", "mlp_ratio", "input_size",
                     "in_channels", "patch_size", "num_classes", "dw_kernel", "se_reduction", "attn_head_dim",
                     "skip_stride", "shared_embed_width")


@dataclass(frozen=True)
class ModelConfig:
    """A preset of `repro.models.PRESETS` and switch overrides (validated by the registry, which builds them; here
    only their form and the counts of `POSITIVE_SWITCHES`)."""

    name: str = "DiT-XL/2"
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        check_text(self.name, "name", limit=64)
        for key, value in self.overrides.items():
            check_text(key, "overrides", limit=64)
            items = value if isinstance(value, tuple) else (value,)
            for v in items:
                if not (v is None or isinstance(v, bool | int | float | str)):
                    raise ConfigError("expected a number, string, true/false or a list of them, got "
                                      f"{show_value(value)}", key=f"overrides.{key}")
                if isinstance(v, str):
                    check_text(v, f"overrides.{key}", limit=64)
                elif isinstance(v, int | float) and not isinstance(v, bool):
                    low = 1 if key in POSITIVE_SWITCHES else 0
                    if not (low <= v <= MAX_SIZE):  # also false for NaN
                        raise ConfigError(f"must be in [{low}, {MAX_SIZE}], got {show_value(value)}",
                                          key=f"overrides.{key}")


@dataclass(frozen=True)
class DiffusionConfig:
    """DiT's Gaussian diffusion: linear betas over 1000 steps, eps prediction, learned-range sigma."""

    noise_schedule: Literal["linear", "squaredcos_cap_v2"] = "linear"
    diffusion_steps: int = 1000
    learn_sigma: bool = True

    def __post_init__(self):
        check_ranges(self, diffusion_steps=(2, 100_000))
        if not self.learn_sigma:  # every model family outputs 2C channels (eps and the sigma interpolation)
            raise ConfigError("false is not supported: every model predicts a learned-range sigma (DiT's 2C "
                              "output channels)", key="learn_sigma")


# 28 px padded to 32, or that 2x2-averaged to 16 (a quarter of the compute, for the CPU demo)
FASHION_MNIST_RESOLUTIONS = (32, 16)


# Horizontal flips when `data.flip` is unset: DiT's ImageNet loader always flips (RandomHorizontalFlip); the
# Fashion-MNIST CPU runs keep a deterministic pixel set (their golden tests); latents hold the flip in the extracted
# set itself (`repro extract-latents`), so the option does not apply to them.
DEFAULT_FLIP = {"fashion_mnist": False, "imagenet_folder": True, "latents": False}


@dataclass(frozen=True)
class DataConfig:
    """Training data. `kind` picks the dataset; `path` None means the kind's default location; `flip` None means the
    kind's protocol (`DEFAULT_FLIP`), resolved here so a run's identity and config.yaml hold the flag it uses."""

    kind: Literal["fashion_mnist", "imagenet_folder", "latents"] = "fashion_mnist"
    path: str | None = None
    resolution: int = 32
    flip: bool | None = None
    vae: str | None = None  # local diffusers AutoencoderKL folder (sd-vae-ft-ema) for latent data

    def __post_init__(self):
        if self.flip is None:
            object.__setattr__(self, "flip", DEFAULT_FLIP[self.kind])  # frozen: set once, here, at construction
        check_ranges(self, resolution=(8, 4096))
        check_text(self.path, "path")
        check_text(self.vae, "vae")

    def model_input(self) -> tuple[tuple[int, int, int], int]:
        """(C, H, W) and class count of the model's input, from this config alone (no data is read): what the
        trainer will find in the data. Latents, stored or encoded on the fly, are sd-vae-ft-ema's: 4 channels, 8x
        smaller."""
        if self.kind == "fashion_mnist":
            return (1, self.resolution, self.resolution), 10
        if self.kind == "latents" or self.vae:
            return (4, self.resolution // 8, self.resolution // 8), 1000
        return (3, self.resolution, self.resolution), 1000


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser, loop, precision and speed. Defaults: DiT/DiC/DiCo S-XL (AdamW 1e-4, wd 0, batch 256, EMA 0.9999,
    fp32).

    TF32 unset (None) means what the model family's released training code sets (`repro.precision.OFFICIAL_TF32`:
    DiT and DiC both on, DiCo cuDNN only). Studies and run files resolve it when they are read (`resolve_tf32`),
    so a run's identity and config.yaml hold the flags it trains under, and a baseline shared by two papers'
    studies stays one run. The speed switches leave the recipe as it is:
    `channels_last` runs the model NHWC (the layout cuDNN's tensor-core convs want; other conv kernels, so
    float32 rounding differs, even on the CPU), `compile` runs the model through torch.compile, `fused_adamw`
    uses AdamW's fused kernel. Each can change float rounding, so each is part of a run's identity.

    `reduce_shards` (K, a power of two) makes the weights bit-identical on every world size that divides K. Unset,
    each process runs one backward over its share of the batch and DDP all-reduces: on W processes the
    batch-gradient sum is associated in another order than on one, so weights agree across world sizes only to
    float rounding (4e-5 after 30 tiny steps, 2 ranks against 1). Set, the global batch is cut into K equal
    shards, one backward each (the memory of one shard: also gradient accumulation), and their gradients and
    losses are summed over one fixed binary tree, whose aligned subtrees are exactly what each of W processes
    holds. So a job preempted on 4 GPUs may resume on 2 and still end on the bits of a 1-process run.
    """

    steps: int = 400_000
    global_batch: int = 256
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    ema_decay: float = 0.9999
    grad_clip: float | None = None
    amp: Literal["off", "bf16", "fp16"] = "off"
    tf32_matmul: bool | None = None
    tf32_cudnn: bool | None = None
    channels_last: bool = False
    compile: bool = False
    fused_adamw: bool = False
    seed: int = 0
    ckpt_every: int = 50_000
    keep_last: int = 2
    log_every: int = 100
    num_workers: int = 2
    reduce_shards: int | None = None

    def __post_init__(self):
        check_ranges(self, steps=(1, MAX_STEPS), global_batch=(1, MAX_BATCH), betas=(0, 0.999999),
                     weight_decay=(0, 10), warmup_steps=(0, MAX_STEPS), ema_decay=(0, 1), seed=(0, MAX_SEED),
                     ckpt_every=(1, MAX_STEPS), keep_last=(1, 10**6), log_every=(1, MAX_STEPS), num_workers=(0, 1024),
                     reduce_shards=(1, MAX_BATCH))
        k = self.reduce_shards
        if k is not None and (k & (k - 1) or self.global_batch % k):
            raise ConfigError(f"must be a power of two that divides global_batch={self.global_batch}, got {k}",
                              key="reduce_shards")
        if not 0 < self.lr <= 1:  # also false for NaN
            raise ConfigError(f"must be > 0 and <= 1, got {self.lr}", key="lr")
        if self.grad_clip is not None and not 0 < self.grad_clip <= 1e6:  # a negative norm flips the gradients
            raise ConfigError(f"must be > 0 (or absent: no clipping), got {self.grad_clip}", key="grad_clip")


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
    # sample_ddp.py of DiT, DiC and DiCo: `--tf32` on by default (matmul); cuDNN at PyTorch's default (on)
    tf32_matmul: bool = True
    tf32_cudnn: bool = True

    def __post_init__(self):
        check_ranges(self, num_samples=(1, MAX_SAMPLES), cfg_scale=(1, 100), guide_channels=(1, 64),
                     seed=(0, MAX_SEED), per_proc_batch=(1, MAX_BATCH))
        # the spec names the sample files (protocol_id): "250", "25,25,50" or "ddim50", nothing else
        if not (len(self.steps) <= 64 and re.fullmatch(r"(ddim)?[0-9]+(,[0-9]+)*", self.steps)):
            raise ConfigError(f"expected '250', '25,25,50' or 'ddim50', got {show_value(self.steps)}", key="steps")


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run's results."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self):
        # each part checks its own fields' bounds; here only what spans two parts
        if self.data.kind == "fashion_mnist" and self.data.resolution not in FASHION_MNIST_RESOLUTIONS:
            raise ConfigError(f"Fashion-MNIST comes at {' or '.join(map(str, FASHION_MNIST_RESOLUTIONS))}, "
                              f"got {self.data.resolution}", key="data.resolution")


def resolve_tf32(cfg: RunConfig, family: str | None = None) -> RunConfig:
    """`cfg` with its unset TF32 flags taken from its model family's released training code. `family` comes from
    the model check when planning (no torch import); without it the registry is asked."""
    from repro.precision import OFFICIAL_TF32

    t = cfg.train
    if t.tf32_matmul is not None and t.tf32_cudnn is not None:
        return cfg
    if family is None:
        from repro import models  # the registry maps a preset to its family

        try:
            family = models.family(cfg.model.name).name
        except ValueError:  # an unknown model is reported by the model check, with the file and line
            return cfg
    official = OFFICIAL_TF32[family]
    return dataclasses.replace(cfg, train=dataclasses.replace(
        t, tf32_matmul=official["matmul"] if t.tf32_matmul is None else t.tf32_matmul,
        tf32_cudnn=official["cudnn"] if t.tf32_cudnn is None else t.tf32_cudnn))


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
    data, _ = read_yaml(path)  # unreadable or not YAML: ConfigError naming the file and line
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise ConfigError(f"{path}: damaged run record (empty, or no 'config' mapping): `repro train` writes it; "
                          f"restore it from the run's checkpoints or train into a new folder")
    return from_dict(RunConfig, data["config"], Where(str(path)))


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
    """Read a run config file strictly; ConfigError names file:line: dotted.key on any mistake, the model's
    included (it is built on the meta device, as a study's are)."""
    from repro.modelcheck import model_checks  # modelcheck imports this module

    data, lines = read_yaml(path)
    if not data:  # all defaults would train DiT-XL/2 for 400K steps: surely not what was meant
        raise ConfigError(f"{path}: empty run config (name at least its model, data and train settings)")
    where = Where(str(path), lines)
    cfg = from_dict(RunConfig, data, where)
    family = model_checks().check(cfg, where, "model")["model"]["family"]
    return resolve_tf32(cfg, family)


# ----------------------------------------------------------------------------------------------- runs
# Keys that cannot change a run's results, so they are left out of its identity: resume is bit-exact and
# batches do not depend on the loader, so how often a run checkpoints or logs, or how many workers read its
# data, does not matter. Sampling protocols live inside a run (samples/<protocol>.npz), not in its identity.
# Where the data and the VAE live is not what they are (data.json in the run records that): moving a dataset
# must not orphan its runs.
NON_RESULT_KEYS = {"train": ("num_workers", "log_every", "ckpt_every", "keep_last"), "data": ("path", "vae")}
# Keys added after runs were planned, left out of the identity while at their default: a run planned before the
# key existed keeps its id (and its folder), since at the default it trains exactly as it did.
LATER_KEYS = {"train": {"reduce_shards": None}}


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
    kept = {part: {k: v for k, v in d[part].items() if k not in NON_RESULT_KEYS.get(part, ())
                   and not (k in LATER_KEYS.get(part, {}) and v == LATER_KEYS[part][k])}
            for part in ("diffusion", "data", "train")}
    return {"model": model if model is not None else model_identity(cfg), **kept}


def run_id(cfg: RunConfig) -> str:
    """Short stable id of a run's identity: the same training in two studies is one run, trained once."""
    return identity_id(run_identity(cfg))


def identity_id(identity: dict) -> str:
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------------------------- stages
STAGES = ("train", "sample", "evaluate", "bench")

METRICS = ("fid", "is", "sfid", "precision", "recall")


# 2: sFID in ADM's NHWC layout, ADM's precision/recall for ADM batches, FID means in float32. 3: the FID's bootstrap
# interval in the record and the sample features beside it (paired differences between runs). An eval file of
# another version is stale: its evaluate stage is not done, and running it scores the samples again.
EVALUATOR_VERSION = 3


def current_eval(path: Path) -> bool:
    """Whether the eval file at `path` exists and was written by this evaluator version."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return is_current_eval(record)


def is_current_eval(record: object) -> bool:
    """Whether an eval record (parsed) was written by this evaluator version."""
    return isinstance(record, dict) and (record.get("protocol") or {}).get("evaluator_version") == EVALUATOR_VERSION


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
    # precision/recall distances: "adm" = ADM's float16 with a float32 fallback per 10K x 10K block, against every
    # reference image; "float32" = the original k-NN code's float32, against at most 10K; "auto" = adm for an ADM
    # reference batch, float32 otherwise
    pr_distances: Literal["auto", "adm", "float32"] = "auto"
    # resamples of the FID's bootstrap interval over the sample set (repro.metrics.stats; 0: no interval). One
    # number for every run of a study: intervals of two rows are comparable only under one rule. Cost: one D x D
    # eigendecomposition and an N x D^2 product per resample, on the CPU: under a second in all for the toy
    # studies' 64-d features, minutes for Inception's 2048-d (about 1 s per resample on this 2-core VM).
    bootstrap: int = 200

    def __post_init__(self):
        if not self.metrics:
            raise ConfigError("name at least one metric", key="metrics")
        check_ranges(self, batch_size=(1, MAX_BATCH), checkpoints=(1, MAX_STEPS), bootstrap=(0, 100_000))
        if len(self.checkpoints) > 1000:
            raise ConfigError(f"at most 1000 intermediate checkpoints, got {len(self.checkpoints)}", key="checkpoints")
        for name in ("reference", "inception", "classifier"):
            check_text(getattr(self, name), name)

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
    """The bench stage: parameters, GMACs and denoiser throughput under `specs/protocol.md` section 8.

    A study's bench is one job that times all its runs interleaved. On this machine (clusters local and debug) it
    first waits until no other stage of the results folder runs here, at most `alone_wait_s`; after that it
    measures anyway and marks the figures unreliable. On SLURM it takes a node to itself (--exclusive).
    """

    batch: int = 64
    dtype: Literal["fp32", "bf16"] = "fp32"
    flags: Literal["strict_fp32", "torch_default"] = "strict_fp32"
    attention: Literal["fused", "math"] = "fused"
    warmup: int = 20
    iters: int = 20
    repeats: int = 3
    channels_last: bool = False
    # a CPU bench's intra-op threads (None: PyTorch's, one per core). On a shared VM, threads that must meet at
    # every op's end wait for whichever core the hypervisor took: one thread makes ratios repeat
    cpu_threads: int | None = None
    # on a CPU, each repeat in a new process: a process draws one speed per model (where its buffers land) and
    # keeps it, so repeats in one process agree with each other more than with the next job's
    fresh_processes: bool = False
    alone_wait_s: float = 4 * 3600

    def __post_init__(self):
        check_ranges(self, batch=(1, MAX_BATCH), warmup=(0, 10**6), iters=(1, 10**6), repeats=(1, 1000),
                     cpu_threads=(1, 4096), alone_wait_s=(0, 30 * 86400))
