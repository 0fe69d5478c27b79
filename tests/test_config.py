"""Strict run-config loading: every mistake is one line naming file:line: dotted.key."""

import pytest

from repro.config import RunConfig, config_hash, load_run_config
from repro.errors import ConfigError


def _load(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return load_run_config(p)


def test_defaults_are_the_papers_protocol(tmp_path):
    cfg = _load(tmp_path, "model:\n  name: DiC-XL\n")
    assert cfg.train.lr == 1e-4 and cfg.train.betas == (0.9, 0.999) and cfg.train.weight_decay == 0.0
    assert cfg.train.global_batch == 256 and cfg.train.ema_decay == 0.9999
    assert cfg.sample.steps == "250" and cfg.sample.guide_channels == 3 and cfg.sample.labels == "uniform"
    assert cfg.diffusion.noise_schedule == "linear" and cfg.diffusion.diffusion_steps == 1000


def test_values_and_types(tmp_path):
    cfg = _load(tmp_path, "model:\n  name: DiC-S\n  overrides: {width: 16, depths: [2, 2, 1, 2, 2]}\n"
                          "train:\n  lr: 2e-4\n  betas: [0.99, 0.99]\n  grad_clip: 1\nsample:\n  guide_channels: all\n")
    assert cfg.model.overrides == {"width": 16, "depths": (2, 2, 1, 2, 2)}
    assert cfg.train.lr == 2e-4 and cfg.train.betas == (0.99, 0.99) and cfg.train.grad_clip == 1.0
    assert cfg.sample.guide_channels == "all"


@pytest.mark.parametrize("text,message", [
    ("model:\n  nmae: DiC-XL\n", "run.yaml:2: model.nmae: unknown key (did you mean name?)"),
    ("train:\n  steps: 10\n  lr: fast\n", "run.yaml:3: train.lr: expected a number, got 'fast'"),
    ("train:\n  amp: fp8\n", "run.yaml:2: train.amp: 'fp8' is not one of 'off', 'bf16', 'fp16'"),
    ("train:\n  seed: 1.5\n", "run.yaml:2: train.seed: expected an integer, got 1.5"),
    ("train:\n  tf32_matmul: 1\n", "run.yaml:2: train.tf32_matmul: expected true or false, got 1"),
    ("train:\n  betas: [0.9]\n", "run.yaml:2: train.betas: expected a list of 2, got [0.9]"),
    ("sample:\n  guide_channels: two\n", "run.yaml:2: sample.guide_channels: expected an integer"),
    ("train: 5\n", "run.yaml:1: train: expected a mapping, got 5"),
    ("trian:\n  steps: 1\n", "run.yaml:1: trian: unknown key (did you mean train?)"),
    ("train:\n  steps: 0\n", "run.yaml:2: train.steps: must be >= 1, got 0"),
    ("sample:\n  cfg_scale: 0.5\n", "run.yaml:2: sample.cfg_scale: must be >= 1"),
    ("model: [1, 2\n", "run.yaml:2: not valid YAML"),
    ("data:\n  resolution: 28\n", "run.yaml:2: data.resolution: Fashion-MNIST comes at 32 or 16, got 28"),
])
def test_mistakes_are_one_line_with_file_line_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, text)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unsafe_yaml_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        _load(tmp_path, "model: !!python/object/apply:os.system ['true']\n")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: cannot read"):
        load_run_config(tmp_path / "nope.yaml")


def test_hash_is_stable_and_content_based():
    assert config_hash(RunConfig()) == config_hash(RunConfig())
    assert len(config_hash(RunConfig())) == 12


def test_data_config_names_the_model_input_without_reading_data():
    # one answer for the plan's model checks and the bench stage; on-the-fly VAE encoding gives latents too
    from repro.config import DataConfig
    assert DataConfig(kind="fashion_mnist", resolution=16).model_input() == ((1, 16, 16), 10)
    assert DataConfig(kind="latents", resolution=256).model_input() == ((4, 32, 32), 1000)
    assert DataConfig(kind="imagenet_folder", resolution=256, vae="w/vae").model_input() == ((4, 32, 32), 1000)
    assert DataConfig(kind="imagenet_folder", resolution=64).model_input() == ((3, 64, 64), 1000)
