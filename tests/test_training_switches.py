"""Precision and speed switches of training and sampling: each trains the same loss curve as the plain fp32 run
(bit for bit where it must be), each is recorded where its numbers land, and TF32 follows each paper's code."""

import json
from pathlib import Path

import pytest
import torch

from repro.config import RunConfig, resolve_tf32
from repro.sample import sample
from repro.study import load_study
from repro.train import train
from repro.yamlio import from_dict

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(),
                                   reason="Debian package dataset-fashion-mnist is not installed")
TINY_DIC = {"name": "DiC-S", "overrides": {"width": 16, "depths": [1, 1, 1, 1, 1]}}
TINY_DIT = {"name": "DiT-S/4", "overrides": {"hidden_size": 32, "depth": 2, "num_heads": 2}}
STEPS = 12


def _run(tmp_path: Path, name: str, model=TINY_DIC, steps: int = STEPS, stop=None,
         **switches) -> tuple[list[dict], dict]:
    cfg = from_dict(RunConfig, {
        "model": model, "data": {"kind": "fashion_mnist", "resolution": 16},
        "train": {"steps": steps, "global_batch": 8, "lr": 1e-3, "ckpt_every": steps, "log_every": 1,
                  "num_workers": 0, "seed": 1, **switches},
        "sample": {"num_samples": 4, "per_proc_batch": 4, "sampler": "ddim", "steps": "2"}})
    out = tmp_path / name
    train(cfg, out, progress=False, stop=stop)
    lines = [json.loads(s) for s in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    state = torch.load(out / "train" / "checkpoints" / f"{steps:07d}.pt", map_location="cpu", weights_only=False)
    return lines, state


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The plain fp32 run every switch is compared with (trained once for the module)."""
    return _run(tmp_path_factory.mktemp("plain"), "plain")


def _losses(lines: list[dict]) -> torch.Tensor:
    return torch.tensor([m["loss"] for m in lines], dtype=torch.float64)


@needs_fashion
def test_channels_last_follows_the_same_loss_curve(tmp_path, plain):
    """Not bit for bit, even in fp32 on the CPU: oneDNN picks other conv kernels for NHWC, which sum in another
    order (measured: the forward of trained weights differs in the last bit, the loss by 1 ulp at step 10 of 12).
    Within float32 rounding it is the same computation."""
    plain, a = plain
    nhwc, _ = _run(tmp_path, "nhwc", channels_last=True)
    torch.testing.assert_close(_losses(nhwc), _losses(plain), rtol=1e-5, atol=1e-7)
    assert nhwc[-1]["switches"]["channels_last"] is True and plain[-1]["switches"]["channels_last"] is False

    from repro import models

    model = models.build("DiC-S", input_size=16, in_channels=1, num_classes=10, **TINY_DIC["overrides"]).eval()
    model.load_state_dict(a["ema"])  # trained weights: the zero-initialised gates and output are not zero
    fast = models.build("DiC-S", input_size=16, in_channels=1, num_classes=10, **TINY_DIC["overrides"]).eval()
    fast.load_state_dict(a["ema"])
    fast = fast.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(8, 1, 16, 16, generator=g), torch.randint(0, 1000, (8,), generator=g), torch.arange(8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x.to(memory_format=torch.channels_last), t, y), model(x, t, y),
                                   rtol=1e-5, atol=1e-7)


@needs_fashion
def test_fused_adamw_follows_the_same_loss_curve(tmp_path, plain):
    plain, _ = plain
    fused, _ = _run(tmp_path, "fused", fused_adamw=True)
    # same maths, another kernel: rounding-level differences that grow slowly with the steps
    torch.testing.assert_close(_losses(fused), _losses(plain), rtol=1e-4, atol=1e-6)
    assert fused[-1]["switches"]["fused_adamw"] is True


@needs_fashion
def test_the_tiny_studies_switches_keep_resume_bit_exact(tmp_path):
    """Fused AdamW and NHWC (the tiny studies' speed switches): stopped at step 3 and resumed from its checkpoint, a
    run ends on the bits of the straight run, and logs the same losses."""
    from repro.train import Interrupted

    switches = {"fused_adamw": True, "channels_last": True}
    straight, a = _run(tmp_path, "straight", steps=6, **switches)
    asked = iter(range(1, 100))
    with pytest.raises(Interrupted):
        _run(tmp_path, "resumed", steps=6, stop=lambda: next(asked) == 3, **switches)
    resumed, b = _run(tmp_path, "resumed", steps=6, **switches)
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight] and len(resumed) == 6
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][n], b[key][n]) for n in a[key])
    for pa, pb in zip(a["opt"]["state"].values(), b["opt"]["state"].values(), strict=True):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)


@needs_fashion
def test_bf16_autocast_against_fp32_on_the_loss(tmp_path, plain):
    """bf16 changes the numbers: the curve stays within 2% per logged step on this model (a study defaults to it
    only with this shown at its own scale; benchmarks/precision_switches.py measures the longer curve)."""
    plain, _ = plain
    bf16, _ = _run(tmp_path, "bf16", amp="bf16")
    rel = (_losses(bf16) - _losses(plain)).abs() / _losses(plain)
    assert rel.max() < 0.02, rel
    assert 0 < rel.max()  # it does change them: not a no-op switch
    assert bf16[-1]["switches"]["amp"] == "bf16"


@needs_fashion
@pytest.mark.slow
def test_compile_follows_the_same_loss_curve(tmp_path):
    """torch.compile (inductor) fuses kernels, so not bit for bit: the same curve within float32 rounding."""
    plain, a = _run(tmp_path, "plain", model=TINY_DIT, steps=6)
    compiled, b = _run(tmp_path, "compiled", model=TINY_DIT, steps=6, compile=True)
    torch.testing.assert_close(_losses(compiled), _losses(plain), rtol=1e-4, atol=1e-6)
    assert set(a["model"]) == set(b["model"])  # checkpoints keep the module's own names
    assert compiled[-1]["switches"]["compile"] is True


@needs_fashion
def test_metrics_and_sample_protocol_record_the_flags(tmp_path):
    lines, _ = _run(tmp_path, "flags", steps=2, tf32_matmul=True, tf32_cudnn=False)
    assert lines[-1]["switches"] == {"device": "cpu", "amp": "off", "tf32_matmul": True, "tf32_cudnn": False,
                                     "channels_last": False, "compile": False, "fused_adamw": False}
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    npz = sample(tmp_path / "flags", {"tf32_matmul": False, "tf32_cudnn": True})
    record = json.loads(npz.with_suffix(".json").read_text())
    assert record["flags_in_effect"] == {"tf32_matmul": False, "tf32_cudnn": True}
    assert record["tf32_matmul"] is False
    assert record["timing"]["images"] == 4 and record["timing"]["sampler_s"] > 0
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before  # restored


def test_tf32_defaults_follow_each_familys_code():
    """DiT's and DiC's train.py set both flags; DiCo's code leaves PyTorch's defaults (cuDNN on, matmul off). A run
    trains as its model's released code does, so a DiT baseline is one run whichever paper's study names it."""
    expected = {"DiT": (True, True), "DiC": (True, True), "DiCo": (False, True), "DiG": (True, True)}
    for path in ("experiments/dic_roadmap.yaml", "experiments/tiny/dic_roadmap.yaml", "experiments/dico_ablation.yaml",
                 "experiments/tiny/dico_ablation.yaml", "experiments/dico_main.yaml", "experiments/dic_main.yaml"):
        for name, cfg in load_study(path).configs.items():
            family = cfg.model.name.split("-")[0]
            assert (cfg.train.tf32_matmul, cfg.train.tf32_cudnn) == expected[family], (path, name)
    assert RunConfig().train.tf32_matmul is None  # unset until resolved
    assert (resolve_tf32(RunConfig()).train.tf32_matmul, resolve_tf32(RunConfig()).train.tf32_cudnn) == (True, True)
    dico = resolve_tf32(from_dict(RunConfig, {"model": {"name": "DiCo-S"}}))
    assert (dico.train.tf32_matmul, dico.train.tf32_cudnn) == (False, True)
    stated = from_dict(RunConfig, {"model": {"name": "DiCo-S"}, "train": {"tf32_matmul": True}})
    assert resolve_tf32(stated).train.tf32_matmul is True
    # sampling: sample_ddp.py's --tf32 default (matmul on), cuDNN at PyTorch's default
    assert (RunConfig().sample.tf32_matmul, RunConfig().sample.tf32_cudnn) == (True, True)


def test_a_study_can_state_its_own_precision(tmp_path):
    study = tmp_path / "own.yaml"
    study.write_text(f"extends: {Path('experiments/tiny/dico_ablation.yaml').resolve()}\nstudy: own\n"
                     "defaults: {train: {tf32_matmul: true, tf32_cudnn: false}}\n")
    for cfg in load_study(study).configs.values():
        assert (cfg.train.tf32_matmul, cfg.train.tf32_cudnn) == (True, False)


def test_a_precision_other_than_the_familys_code_is_a_protocol_difference():
    from repro.precision import departures

    official = resolve_tf32(from_dict(RunConfig, {"model": {"name": "DiCo-S"}})).train
    assert departures(official, "DiCo") == []
    bf16 = resolve_tf32(from_dict(RunConfig, {"model": {"name": "DiCo-S"}, "train": {"amp": "bf16",
                                                                                        "tf32_matmul": True}})).train
    assert departures(bf16, "DiCo") == ["trained with bf16 autocast; the DiCo code trains in fp32",
                                        "TF32 matmul on, cuDNN on; the DiCo code: matmul off, cuDNN on"]


def test_every_family_states_its_tf32_source():
    """Planning resolves a run's TF32 flags from its family's entry: a family without one could not be planned."""
    from repro import models
    from repro.precision import OFFICIAL_TF32

    assert set(models.FAMILIES) <= set(OFFICIAL_TF32)
    assert all(entry["source"] for entry in OFFICIAL_TF32.values())


@needs_fashion
@pytest.mark.parametrize("model", [{"name": "DiG-S/2", "overrides": {"hidden_size": 32, "depth": 2, "num_heads": 2}},
                                   {"name": "DiS-S/2", "overrides": {"hidden_size": 32, "depth": 2}}],
                         ids=["DiG", "DiS"])
def test_reference_mixers_train_and_resume_bit_exact(tmp_path, model):
    """The comparison systems' exact PyTorch mixers (chunked gated linear attention, selective scan) through the
    trainer: stopped at step 2 and resumed, a run ends on the bits of the straight run."""
    from repro.train import Interrupted

    straight, a = _run(tmp_path, "straight", model=model, steps=4)
    asked = iter(range(1, 100))
    with pytest.raises(Interrupted):
        _run(tmp_path, "resumed", model=model, steps=4, stop=lambda: next(asked) == 2)
    resumed, b = _run(tmp_path, "resumed", model=model, steps=4)
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight] and len(resumed) == 4
    assert all(torch.equal(a["model"][n], b["model"][n]) for n in a["model"])
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in straight)
