"""Sampling a trained run: ADM-style npz, protocol record, labels modes, resumable shards, world-size invariance."""

import json
from pathlib import Path

import numpy as np
import pytest

from repro.cli import main
from repro.config import RunConfig, SampleConfig
from repro.sample import protocol_id, sample, sample_labels
from repro.train import train
from repro.yamlio import from_dict

FASHION = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(),
                                reason="Debian package dataset-fashion-mnist is not installed")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    cfg = {"model": {"name": "DiT-S/4", "overrides": {"hidden_size": 32, "depth": 2, "num_heads": 2}},
           "data": {"kind": "fashion_mnist"},
           "train": {"steps": 4, "global_batch": 8, "ckpt_every": 4, "log_every": 2, "num_workers": 0},
           "sample": {"num_samples": 10, "sampler": "ddim", "steps": "5", "per_proc_batch": 4}}
    train(from_dict(RunConfig, cfg), root / "run", progress=False)
    return root / "run"


def test_npz_is_adm_style_with_labels_and_protocol(run):
    npz = sample(run)
    with np.load(npz) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (10, 32, 32, 1)  # 12 drawn (3 batches of 4), 10 kept
    assert labels.shape == (10,) and labels.min() >= 0 and labels.max() < 10
    protocol = json.loads(npz.with_suffix(".json").read_text())
    assert protocol["sampler"] == "ddim" and protocol["steps"] == "5" and protocol["cfg_scale"] == 1.0
    assert protocol["labels"] == "uniform" and protocol["weights"] == "ema" and protocol["num_samples"] == 10
    assert protocol["checkpoint_step"] == 4 and protocol["world_size"] == 1 and protocol["config_hash"]
    assert npz.with_suffix(".png").exists()


def test_interrupted_sampling_resumes_to_the_same_samples(run, monkeypatch):
    import repro.sample as S

    clean = sample(run, {"seed": 5})
    first = np.load(clean)["arr_0"].copy()
    assert sample(run, {"seed": 5}) == clean  # done: returns at once
    clean.unlink()
    real, written = S._save_npz_atomic, []

    def killed_after_two(path, images, labels):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        written.append(path)
        real(path, images, labels)

    monkeypatch.setattr(S, "_save_npz_atomic", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        sample(run, {"seed": 5})
    monkeypatch.setattr(S, "_save_npz_atomic", real)
    again = sample(run, {"seed": 5})  # reuses the two finished shards
    assert np.array_equal(np.load(again)["arr_0"], first)
    assert not any(again.parent.glob(".*.shards"))
    assert not np.array_equal(np.load(sample(run, {"seed": 6}))["arr_0"], first)


def test_ddim_sample_set_does_not_depend_on_the_batch(run):
    a_npz = sample(run, {"per_proc_batch": 4, "num_samples": 8, "seed": 9})
    a = np.load(a_npz)["arr_0"].astype(int)
    b_npz = sample(run, {"per_proc_batch": 8, "num_samples": 8, "seed": 9})  # same protocol id, new layout
    b = np.load(b_npz)["arr_0"].astype(int)
    assert a.shape == b.shape == (8, 32, 32, 1)
    assert np.abs(a - b).max() <= 1  # equal up to float reassociation across batch sizes
    assert json.loads(b_npz.with_suffix(".json").read_text())["per_proc_batch"] == 8


def test_balanced_labels_and_cfg(run):
    labels = sample_labels(SampleConfig(labels="balanced", seed=1), 10, 40)
    assert np.bincount(labels.numpy(), minlength=10).tolist() == [4] * 10
    npz = sample(run, {"cfg_scale": 1.5, "guide_channels": "all", "num_samples": 4})
    assert "cfg1.5-gall" in npz.name
    with pytest.raises(ValueError, match="guide_channels"):
        sample(run, {"cfg_scale": 1.5, "guide_channels": 3, "num_samples": 4})  # 1-channel data


def test_cli_sample(run, capsys):
    assert main(["sample", str(run), "--num", "4", "--sampler", "ddpm", "--steps", "10", "--no-progress"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.endswith(".npz") and Path(out).exists()
    assert main(["sample", str(run.parent / "nope")]) == 2
    assert "no run here" in capsys.readouterr().err


def test_protocol_id_names_what_changes_samples():
    assert protocol_id(SampleConfig()) == "ddpm250-cfg1-uniform-n50000-seed0"
    assert protocol_id(SampleConfig(cfg_scale=1.5)) == "ddpm250-cfg1.5-g3-uniform-n50000-seed0"


def test_two_processes_sample_the_same_set_as_one(run, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    def cli(*extra, env=None):
        return [sys.executable, "-m", "repro.cli", "sample", str(run), "--num", "8", "--sampler", "ddim",
                "--steps", "3", "--seed", "21", "--no-progress", *extra]

    base = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # two ranks cannot share one GPU
    one = subprocess.run(cli("--batch", "4"), env=base, check=True, capture_output=True, text=True)
    npz = Path(one.stdout.strip().splitlines()[-1])
    single = np.load(npz)["arr_0"].astype(int)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen(cli("--batch", "2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    double = np.load(npz)["arr_0"].astype(int)
    assert json.loads(npz.with_suffix(".json").read_text())["world_size"] == 2
    assert double.shape == single.shape == (8, 32, 32, 1)
    assert np.abs(double - single).max() <= 1
    assert np.array_equal(np.load(npz)["arr_1"], sample_labels(SampleConfig(seed=21), 10, 8).numpy())
