"""The trainer: bit-exact resume after SIGKILL, world-size invariant DDP, divergence stop, learning on real data."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from repro.config import RunConfig
from repro.errors import ConfigError
from repro.train import StepBatches, TrainingDiverged, train
from repro.yamlio import from_dict

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(),
                                   reason="Debian package dataset-fashion-mnist is not installed")
TINY = {
    "DiC": {"name": "DiC-S", "overrides": {"width": 16, "depths": [2, 2, 1, 2, 2]}},
    "DiCo": {"name": "DiCo-S", "overrides": {"width": 16, "depths": [1, 1, 1, 1, 1]}},
    "DiT": {"name": "DiT-S/4", "overrides": {"hidden_size": 32, "depth": 2, "num_heads": 2}},
}


def _config(tmp_path: Path, family="DiC", **train) -> Path:
    cfg = {"model": TINY[family], "data": {"kind": "fashion_mnist"},
           "train": {"steps": 40, "global_batch": 8, "ckpt_every": 5, "log_every": 1, "keep_last": 2,
                     "num_workers": 0, "seed": 3, **train}}
    path = tmp_path / f"{family}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cmd(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "repro.cli", "train", str(config), "--out", str(out), "--no-progress"]


def _env(**extra) -> dict:
    # CPU facts, also on a GPU machine: bit-exact resume needs deterministic kernels (cuDNN's are not by default),
    # and two ranks on one visible GPU is invalid for NCCL.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "CUDA_VISIBLE_DEVICES": "", **extra}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]


def _kill_after(config: Path, out: Path, step: int) -> None:
    """Start training and SIGKILL it as soon as it has logged `step`."""
    proc = subprocess.Popen(_cmd(config, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = out / "train" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and any(json.loads(ln)["step"] >= step for ln in metrics.read_text().splitlines() if ln):
            break
        if proc.poll() is not None:
            raise AssertionError(f"training ended before step {step}: {proc.stderr.read().decode()}")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _assert_same_final_state(a: Path, b: Path, step: int) -> None:
    sa = torch.load(a / "train" / "checkpoints" / f"{step:07d}.pt", weights_only=False)
    sb = torch.load(b / "train" / "checkpoints" / f"{step:07d}.pt", weights_only=False)
    for key in ("model", "ema"):
        assert sa[key].keys() == sb[key].keys()
        for name in sa[key]:
            assert torch.equal(sa[key][name], sb[key][name]), f"{key}.{name} differs"
    for pa, pb in zip(sa["opt"]["state"].values(), sb["opt"]["state"].values(), strict=True):
        for k in pa:
            assert torch.equal(pa[k], pb[k]), f"optimizer {k} differs"


@needs_fashion
def test_resume_after_sigkill_is_bit_identical(tmp_path):
    config = _config(tmp_path)
    straight, once, twice = tmp_path / "straight", tmp_path / "once", tmp_path / "twice"
    subprocess.run(_cmd(config, straight), env=_env(), check=True, capture_output=True)

    _kill_after(config, once, 17)
    assert (once / "train" / "checkpoints").exists()
    subprocess.run(_cmd(config, once), env=_env(), check=True, capture_output=True)
    _assert_same_final_state(straight, once, 40)

    _kill_after(config, twice, 17)
    _kill_after(config, twice, 29)
    subprocess.run(_cmd(config, twice), env=_env(), check=True, capture_output=True)
    _assert_same_final_state(straight, twice, 40)
    # the log is continuous: one record per step, none duplicated by the restarts
    assert [m["step"] for m in _metrics(twice)] == list(range(1, 41))
    assert [m["loss"] for m in _metrics(twice)] == [m["loss"] for m in _metrics(straight)]
    assert len(list((twice / "train" / "checkpoints").glob("*.pt"))) == 2  # keep_last


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_fashion
def test_ddp_two_processes_match_one(tmp_path):
    config = _config(tmp_path, steps=5, ckpt_every=5)
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_cmd(config, one), env=_env(), check=True, capture_output=True)
    port = str(_free_port())
    procs = [subprocess.Popen(_cmd(config, two), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port)) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    l1 = [m["loss"] for m in _metrics(one)]
    l2 = [m["loss"] for m in _metrics(two)]
    assert len(l1) == len(l2) == 5
    assert l1 == pytest.approx(l2, abs=1e-5)
    assert torch.load(two / "train" / "checkpoints" / "0000005.pt", weights_only=False)["world"] == 2
    # DDP's all-reduce sums the ranks' gradients in another order than one process: close, not equal (what
    # train.reduce_shards is for)
    with pytest.raises(AssertionError, match="differs"):
        _assert_same_final_state(one, two, 5)


def _ranks(config: Path, out: Path, world: int, **extra) -> list[subprocess.Popen]:
    port = str(_free_port())
    return [subprocess.Popen(_cmd(config, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=port, **extra)) for r in range(world)]


@needs_fashion
def test_reduce_shards_make_1_2_and_4_processes_bit_identical(tmp_path):
    """train.reduce_shards=4: the gradient of each quarter of the batch, summed over one fixed tree, whatever
    process holds which quarter; weights, EMA, AdamW moments and logged losses are the same bits, also across a
    resume on another number of processes."""
    config = _config(tmp_path, family="DiT", steps=6, ckpt_every=3, reduce_shards=4)
    outs = {w: tmp_path / f"w{w}" for w in (1, 2, 4)}
    subprocess.run(_cmd(config, outs[1]), env=_env(), check=True, capture_output=True)
    for world in (2, 4):
        for p in _ranks(config, outs[world], world):
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err.decode()
    for world in (2, 4):
        _assert_same_final_state(outs[1], outs[world], 6)
        assert [m["loss"] for m in _metrics(outs[world])] == [m["loss"] for m in _metrics(outs[1])]
        assert torch.load(outs[world] / "train" / "checkpoints" / "0000006.pt", weights_only=True)["world"] == world
    # elastic: the 4-process run resumed from its step-3 checkpoint on 2 processes ends on the same bits
    (outs[4] / "train" / "checkpoints" / "0000006.pt").unlink()
    for p in _ranks(config, outs[4], 2):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    _assert_same_final_state(outs[1], outs[4], 6)
    assert [m["loss"] for m in _metrics(outs[4])] == [m["loss"] for m in _metrics(outs[1])]


@needs_fashion
def test_reduce_shards_that_the_world_cannot_split_is_refused(tmp_path):
    config = _config(tmp_path, family="DiT", steps=2, reduce_shards=2)
    procs = _ranks(config, tmp_path / "w4", 4)
    errs = [p.communicate(timeout=300)[1].decode() for p in procs]
    assert all(p.returncode == 2 for p in procs), errs
    assert "train.reduce_shards=2 cannot be split over 4 processes" in errs[0]


def test_reduce_shards_must_be_a_power_of_two_dividing_the_batch():
    for k in (3, 16):
        with pytest.raises(ConfigError, match="reduce_shards.*power of two that divides global_batch=8"):
            from_dict(RunConfig, {"model": TINY["DiT"], "train": {"global_batch": 8, "reduce_shards": k}})


@needs_fashion
def test_a_hung_peer_ends_the_job_within_the_collective_timeout(tmp_path):
    """Rank 1 stopped (SIGSTOP: alive, silent, as a hung node) after step 2: rank 0 waits in the next collective at
    most REPRO_COLLECTIVE_TIMEOUT_S, then fails, instead of holding its allocation for gloo's 30 minutes."""
    config = _config(tmp_path, family="DiT", steps=10_000, ckpt_every=10_000, log_every=1)
    out = tmp_path / "run"
    procs = _ranks(config, out, 2, REPRO_COLLECTIVE_TIMEOUT_S="5")
    try:
        metrics = out / "train" / "metrics.jsonl"
        deadline = time.time() + 120
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert time.time() < deadline and procs[0].poll() is None, procs[0].stderr.read().decode()
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        waited = time.monotonic() - stopped
    finally:
        for p in procs:
            p.kill()
            p.wait()
    print(f"rank 1 stopped: rank 0 failed {waited:.1f} s later (timeout 5 s)")
    assert procs[0].returncode not in (0, None)
    assert 4 <= waited < 5 + 10, (waited, err.decode()[-2000:])  # the bound, plus the step in flight
    assert "timeout" in err.decode().lower() or "timed out" in err.decode().lower(), err.decode()[-2000:]


def test_step_batches_are_world_size_invariant_and_resumable():
    one = list(StepBatches(10, 4, 0, 1, seed=1, start=0, stop=6))
    halves = [list(StepBatches(10, 4, r, 2, seed=1, start=0, stop=6)) for r in range(2)]
    assert [a + b for a, b in zip(*halves, strict=True)] == one
    resumed = list(StepBatches(10, 4, 0, 1, seed=1, start=3, stop=6))
    assert resumed == one[3:]
    first_epoch = [i for batch in one for i, _ in batch][:10]
    assert sorted(first_epoch) == list(range(10))  # every item once per epoch
    assert len({s for batch in one for _, s in batch}) == 24  # a fresh augmentation seed per position


@needs_fashion
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    import repro.train as T

    real = T.create_diffusion
    calls = {"n": 0}

    def poisoned(*args):
        diffusion = real(*args)
        losses = diffusion.training_losses

        def training_losses(model_fn, x, t, noise=None):
            out = losses(model_fn, x, t, noise=noise)
            calls["n"] += 1
            if calls["n"] >= 7:  # steps 7, 8, ... diverge
                out = {k: v * float("nan") for k, v in out.items()}
            return out

        diffusion.training_losses = training_losses
        return diffusion

    monkeypatch.setattr(T, "create_diffusion", poisoned)
    data = yaml.safe_load(_config(tmp_path, steps=20, ckpt_every=2, log_every=4).read_text())
    cfg = from_dict(RunConfig, data)
    with pytest.raises(TrainingDiverged, match="0000006.pt"):
        train(cfg, tmp_path / "run", progress=False)
    steps = sorted(p.name for p in (tmp_path / "run" / "train" / "checkpoints").glob("*.pt"))
    assert steps == ["0000004.pt", "0000006.pt"]


@needs_fashion
# DiC and DiCo take about 3 minutes each on 2 cores: slow (-m slow); DiT keeps the default run's check
@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in ("DiC", "DiCo") else f
                                    for f in TINY])
def test_tiny_models_learn_fashion_mnist(tmp_path, family):
    cfg = from_dict(RunConfig, yaml.safe_load(_config(tmp_path, family, steps=300, global_batch=32, lr=1e-3,
                                                          ckpt_every=300, log_every=10, ema_decay=0.999).read_text()))
    train(cfg, tmp_path / family, progress=False)
    losses = [m["loss"] for m in _metrics(tmp_path / family)]
    assert losses[-1] < 0.5 * losses[0], losses


GOLDEN = Path(__file__).parent / "golden" / "loss_curves.json"


@needs_fashion
def test_golden_20_step_loss_curves(tmp_path, monkeypatch):
    # recorded on CPU: a CUDA generator draws other noise, and cuDNN's TF32 convs round differently
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    got = {}
    for family in TINY:
        cfg = from_dict(RunConfig, yaml.safe_load(_config(tmp_path, family, steps=20, ckpt_every=20).read_text()))
        train(cfg, tmp_path / family, progress=False)
        got[family] = [m["loss"] for m in _metrics(tmp_path / family)]
    if os.environ.get("REPRO_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    want = json.loads(GOLDEN.read_text())
    for family in TINY:
        assert got[family] == pytest.approx(want[family], rel=1e-4), family


@needs_fashion
def test_run_folder_refuses_another_config(tmp_path):
    cfg = from_dict(RunConfig, yaml.safe_load(_config(tmp_path, steps=2, ckpt_every=2).read_text()))
    train(cfg, tmp_path / "run", progress=False)
    other = from_dict(RunConfig, yaml.safe_load(_config(tmp_path, steps=3, ckpt_every=3).read_text()))
    with pytest.raises(ValueError, match="holds another run"):
        train(other, tmp_path / "run", progress=False)
    train(cfg, tmp_path / "run", progress=False)  # the same config again: nothing to do, no error


@needs_fashion
@pytest.mark.parametrize("amp,clip", [("bf16", None), ("fp16", 1.0), ("off", 0.5)])
def test_amp_and_grad_clip_paths(tmp_path, amp, clip):
    data = yaml.safe_load(_config(tmp_path, "DiT", steps=3, ckpt_every=3, amp=amp, grad_clip=clip,
                                  warmup_steps=2).read_text())
    last = train(from_dict(RunConfig, data), tmp_path / "run", progress=False)
    m = _metrics(tmp_path / "run")
    assert [r["step"] for r in m] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in m)
    assert [r["lr"] for r in m] == pytest.approx([5e-5, 1e-4, 1e-4])  # linear warm-up over 2 steps
    if clip is not None:
        assert all(r["grad_norm"] >= 0 for r in m)
    assert last["step"] == 3


@needs_fashion
def test_bad_input_writes_nothing(tmp_path, capsys):
    from repro.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"name": "DiC-S", "overrides": {"widht": 16}}}))
    assert main(["train", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "unknown switch 'widht' (did you mean width?)" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
