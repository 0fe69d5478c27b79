"""`repro pilot`: every model through every stage for minutes, a failure as one line, a projection `repro plan`
shows beside the declared cost."""

import json
from pathlib import Path

import pytest

from repro import pilot
from repro.cli import main
from repro.study import load_study

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(),
                                   reason="Debian package dataset-fashion-mnist is not installed")


@needs_fashion
def test_pilot_of_a_tiny_study_and_the_plan_shows_its_projection(tmp_path, capsys):
    root = tmp_path / "results"
    code = main(["pilot", "experiments/tiny/dic_roadmap.yaml", "--steps", "2", "--only", "gelu,dit",
                 "--sample-budget", "0", "--results", str(root)])
    out = capsys.readouterr().out
    assert code == 0, out
    record = json.loads((root / "pilot" / "tiny_dic_roadmap" / "cpu.json").read_text())
    assert [m["step"] for m in record["models"]] == ["gelu", "dit"] and record["finished"]
    for m in record["models"]:
        assert m["reached"] == "bench" and m["failed"] is None
        assert m["train"]["resumed_at"] == 1 and m["train"]["steps"] == 2  # stopped half-way, then resumed
        assert m["train"]["checkpoint_bytes"] > 0 and m["train"]["checkpoint_write_s"] > 0
        assert m["train"]["switches"]["tf32_matmul"] is True  # DiC's paper's code: TF32 on (no-op on a CPU)
        s = m["sample"][0]
        assert s["images"] == 250 and s["steps"] == 20  # the study's sampling batch and DDIM-20
        assert s["steps_run"] == 2 and s["scaled"]  # over the (zero) budget: two steps timed, scaled to 20
        assert m["extract"]["img_per_s"] > 0 and m["bench"]["img_per_s"] > 0
        assert m["data"]["source"] == "the study's data"
        assert not (root / "pilot" / "tiny_dic_roadmap" / "cpu" / m["step"] / "train" / "checkpoints").exists()
    p = record["projection"]
    assert not p["complete"] and not p["comparable"]  # two of nine steps piloted
    measured = [r for r in p["runs"] if r["measured"]]
    assert [r["step"] for r in measured] == ["gelu", "dit"]
    gelu = measured[0]
    steps = load_study("experiments/tiny/dic_roadmap.yaml").configs["gelu"].train.steps
    assert gelu["train_wall_hours"] == pytest.approx(steps / record["models"][0]["train"]["steps_per_s"] / 3600)
    assert "gelu" in out and "projected cost" in out

    assert main(["plan", "experiments/tiny/dic_roadmap.yaml", "--results", str(root)]) == 0
    plan_out = capsys.readouterr().out
    assert "measured:" in plan_out and "using: declared" not in plan_out
    assert "by `repro pilot` on cpu" in plan_out


@needs_fashion
def test_a_failing_stage_is_one_line_and_the_other_models_go_on(tmp_path, capsys, monkeypatch):
    import repro.train

    real = repro.train.train

    def broken(cfg, run_dir, **kw):
        if "gelu" in str(run_dir):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return real(cfg, run_dir, **kw)

    monkeypatch.setattr(repro.train, "train", broken)
    root = tmp_path / "results"
    code = main(["pilot", "experiments/tiny/dic_roadmap.yaml", "--steps", "2", "--only", "gelu,dit",
                 "--sample-budget", "0", "--results", str(root)])
    out = capsys.readouterr().out
    assert code == 1
    record = json.loads((root / "pilot" / "tiny_dic_roadmap" / "cpu.json").read_text())
    gelu, dit = record["models"]
    assert gelu["reached"] is None
    assert gelu["failed"] == "train of gelu (DiC-XL): RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert dit["reached"] == "bench" and dit["failed"] is None
    assert "failed: train of gelu (DiC-XL)" in out


@pytest.mark.slow
def test_synthetic_latents_and_a_stand_in_vae_when_the_data_is_absent(tmp_path, capsys):
    """A latent study on a machine without its latents or VAE: synthetic latents of its shape and a VAE of
    sd-vae-ft-ema's architecture with random weights, each labelled."""
    study = tmp_path / "latent.yaml"
    study.write_text("""
study: latent_pilot
defaults:
  data: {kind: latents, path: data/absent-latents, resolution: 64, vae: weights/absent-vae}
  train: {steps: 100000, global_batch: 16}
  sample: {num_samples: 50000, sampler: ddpm, steps: "250", per_proc_batch: 2}
samples: [{cfg_scale: 1.5}]
steps:
  - {name: dit, config: {model: {name: DiT-S/2, overrides: {hidden_size: 32, depth: 1, num_heads: 2}}}}
stages: [train, sample, evaluate]
evaluate: {reference: absent.npz, batch_size: 8}
resources: {nodes: 1, gpus_per_node: 8}
cost: {step_seconds: 0.5}
""")
    root = tmp_path / "results"
    code = main(["pilot", str(study), "--steps", "2", "--device", "cpu", "--sample-budget", "600",
                 "--results", str(root)])
    out = capsys.readouterr().out
    assert code == 0, out
    m = json.loads((root / "pilot" / "latent_pilot" / "cpu.json").read_text())["models"][0]
    assert m["batch"] == 2 and m["study_batch"] == 2  # 16 over 8 GPUs
    assert m["data"]["source"].startswith("synthetic") and m["data"]["vae"].startswith("stand-in")
    assert m["train"]["data"]["source"].startswith("synthetic")  # data.json of the run says so too
    s = m["sample"][0]
    assert s["steps"] == 250 and s["steps_run"] == 250 and not s["scaled"]  # within the budget: the full run
    assert s["img_per_s"] == pytest.approx(2 / (s["sampler_s"] + s["decode_s"]), rel=0.02)
    assert m["extract"]["weights"]  # real Inception layers where installed, else the stand-in, labelled
    record = json.loads((root / "pilot" / "latent_pilot" / "cpu.json").read_text())
    notes = record["projection"]["notes"]
    assert any(n.startswith("synthetic data") for n in notes) and any("measured on CPU" in n for n in notes)
    assert main(["plan", str(study), "--results", str(root)]) == 0
    plan_out = capsys.readouterr().out
    assert "declared: 111 GPU-hours" in plan_out and "using: declared; the pilot is not comparable" in plan_out


def test_pilot_options_are_checked():
    with pytest.raises(Exception, match="--steps 1"):
        pilot.PilotOptions(steps=1)
    assert main(["pilot", "experiments/tiny/dic_roadmap.yaml", "--only", "nosuch", "--device", "cpu"]) == 2
