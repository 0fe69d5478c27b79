"""Issue 16, checkpoints and resume: damaged checkpoints fall back or stop in one line, temp files of a killed write
are removed, a torn metrics line is dropped, the log window survives a resume, planted pickles are refused, and
kill -9 at random moments (one of them mid-write) resumes to bit-identical weights and metrics."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from repro import rundir
from repro.cli import main
from repro.config import RunConfig
from repro.errors import ConfigError
from repro.train import Interrupted, train
from repro.yamlio import from_dict

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(),
                                   reason="Debian package dataset-fashion-mnist is not installed")
# ckpt_every is not a multiple of log_every: every resume lands inside a log window (defect 7)
RUN = {"model": {"name": "DiC-S", "overrides": {"width": 16, "depths": [1, 1, 1, 1, 1]}},
       "data": {"kind": "fashion_mnist", "resolution": 16},
       "train": {"steps": 12, "global_batch": 8, "lr": 1e-3, "ckpt_every": 3, "log_every": 4, "keep_last": 2,
                 "num_workers": 0, "seed": 3},
       "sample": {"num_samples": 4, "per_proc_batch": 4, "sampler": "ddim", "steps": "2"}}
LOGGED = ("step", "loss", "mse", "vb", "grad_norm", "lr")  # timing fields may differ


def _config(folder: Path, **train) -> Path:
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump({**RUN, "train": {**RUN["train"], **train}}))
    return path


def _ckpt(run: Path, step: int) -> Path:
    return run / "train" / "checkpoints" / f"{step:07d}.pt"


def _metrics(run: Path) -> list[dict]:
    lines = (run / "train" / "metrics.jsonl").read_text().splitlines()
    return [{k: m[k] for k in LOGGED} for m in map(json.loads, lines)]


def _assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa["step"] == sb["step"]
    for key in ("model", "ema"):
        assert sa[key].keys() == sb[key].keys()
        for name in sa[key]:
            assert torch.equal(sa[key][name], sb[key][name]), f"{key}.{name} differs"
    assert sa["opt"]["state"].keys() == sb["opt"]["state"].keys()
    for pa, pb in zip(sa["opt"]["state"].values(), sb["opt"]["state"].values(), strict=True):
        for k in pa:
            assert torch.equal(pa[k], pb[k]), f"optimizer {k} differs"


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("repro: error: ") and "Traceback" not in err, err
    return lines[0]


class Planted:
    """A pickle that creates `marker` when unpickled: what an attacker would put on a shared filesystem."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


# ---------------------------------------------------------------------------------------------- in-process runs
@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run (in this process, so in-process resumes compare bit for bit with it)."""
    root = tmp_path_factory.mktemp("straight")
    assert main(["train", str(_config(root)), "--out", str(root / "run"), "--no-progress"]) == 0
    return root / "run"


def _copy(straight: Path, tmp_path: Path) -> tuple[Path, Path]:
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    return run, _config(tmp_path)


def _damage(path: Path, how: str) -> None:
    size = path.stat().st_size
    if how == "half":
        os.truncate(path, size // 2)
    else:
        path.write_bytes(bytes(size))


def test_listing_and_pruning_ignore_damaged_and_temp_files(tmp_path):
    paths = rundir.RunPaths(tmp_path)
    for name in ("0000003.pt", "0000006.pt", "0000009.pt.damaged", ".0000012.pt.k2j3.tmp"):
        (paths.checkpoints / name).parent.mkdir(parents=True, exist_ok=True)
        (paths.checkpoints / name).write_bytes(b"x")
    assert rundir.checkpoint_steps(paths) == [3, 6]
    rundir.prune_checkpoints(paths, keep=1)
    assert sorted(p.name for p in paths.checkpoints.iterdir()) == [".0000012.pt.k2j3.tmp", "0000006.pt",
                                                                    "0000009.pt.damaged"]
    assert rundir.set_aside(paths.checkpoint(6)).name == "0000006.pt.damaged"
    (paths.checkpoints / "0000009.pt").write_bytes(b"y")
    assert rundir.set_aside(paths.checkpoint(9)).name == "0000009.pt.damaged.2"  # never overwrites the first
    assert rundir.remove_temp_files(paths.checkpoints) == [".0000012.pt.k2j3.tmp"]
    assert rundir.checkpoint_steps(paths) == []


@needs_fashion
@pytest.mark.parametrize("how", ["half", "zeros"])
def test_damaged_newest_checkpoint_falls_back_to_the_older_one(straight, tmp_path, capsys, how):
    run, config = _copy(straight, tmp_path)
    newest = _ckpt(run, 12)
    _damage(newest, how)
    damaged_bytes = newest.read_bytes()
    capsys.readouterr()
    assert main(["train", str(config), "--out", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"{newest}: damaged checkpoint, it does not load (" in out
    assert "moved aside to 0000012.pt.damaged, resuming from 0000009.pt" in out
    assert (run / "train" / "checkpoints" / "0000012.pt.damaged").read_bytes() == damaged_bytes  # kept, not deleted
    _assert_same_weights(newest, _ckpt(straight, 12))  # step 12 written again from step 9
    assert _metrics(run) == _metrics(straight)  # step 12 re-logged over the same 4-step window


@needs_fashion
def test_all_checkpoints_damaged_stops_in_one_line_then_restarts(straight, tmp_path, capsys):
    run, config = _copy(straight, tmp_path)
    for step in (9, 12):
        _damage(_ckpt(run, step), "zeros")
    capsys.readouterr()
    assert main(["train", str(config), "--out", str(run), "--no-progress"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == (f"repro: error: {run / 'train' / 'checkpoints'}: all 2 checkpoint(s) were damaged and were moved "
                    f"aside (*.pt.damaged); run train again to start from step 0")
    assert sorted(p.name for p in (run / "train" / "checkpoints").glob("*.pt*")) == ["0000009.pt.damaged",
                                                                                      "0000012.pt.damaged"]
    assert main(["train", str(config), "--out", str(run), "--no-progress"]) == 0  # from scratch, as it said
    _assert_same_weights(_ckpt(run, 12), _ckpt(straight, 12))
    assert _metrics(run) == _metrics(straight)


@needs_fashion
def test_sample_refuses_a_damaged_checkpoint_and_train_rebuilds_it(straight, tmp_path, capsys):
    run, config = _copy(straight, tmp_path)
    _damage(_ckpt(run, 12), "half")
    capsys.readouterr()
    assert main(["sample", str(run), "--no-progress"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"repro: error: {_ckpt(run, 12)}: damaged checkpoint, it does not load (")
    assert line.endswith("moved aside to 0000012.pt.damaged; re-run the train stage: it resumes from the newest good "
                         "checkpoint and writes this step again")
    assert not (run / "samples").exists() or not any((run / "samples").glob("*.npz"))
    assert main(["train", str(config), "--out", str(run), "--no-progress"]) == 0
    _assert_same_weights(_ckpt(run, 12), _ckpt(straight, 12))
    assert main(["sample", str(run), "--no-progress"]) == 0
    protocol = json.loads(next((run / "samples").glob("*.json")).read_text())
    assert protocol["checkpoint_step"] == 12


@needs_fashion
def test_temp_files_of_a_killed_write_are_removed_at_start(straight, tmp_path, capsys):
    run, config = _copy(straight, tmp_path)
    stale = [run / "train" / "checkpoints" / ".0000012.pt.a1b2c3.tmp", run / "train" / ".metrics.jsonl.x9y8.tmp"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    capsys.readouterr()
    assert main(["train", str(config), "--out", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert not any(p.exists() for p in stale)
    assert f"{run / 'train' / 'checkpoints'}: removed 1 temp file(s) of a write that was killed: " \
           f".0000012.pt.a1b2c3.tmp" in out
    assert ".metrics.jsonl.x9y8.tmp" in out
    assert "removed 1 temp file(s)" in (run / "train" / "log.txt").read_text()


@needs_fashion
def test_torn_metrics_line_is_dropped_on_resume(straight, tmp_path, capsys):
    """Killed while appending step 12's record, before its checkpoint: the file ends in half a line."""
    run, config = _copy(straight, tmp_path)
    _ckpt(run, 12).unlink()
    lines = (run / "train" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 12
    (run / "train" / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines[:-1]) + lines[-1][:25])
    capsys.readouterr()
    assert main(["train", str(config), "--out", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"{run / 'train' / 'metrics.jsonl'}: dropped 1 line(s) that are not a JSON record (a torn append); " \
           f"the steps after 9 are logged again" in out
    assert _metrics(run) == _metrics(straight)
    _assert_same_weights(_ckpt(run, 12), _ckpt(straight, 12))


@needs_fashion
def test_resume_between_log_steps_logs_the_same_window(straight, tmp_path):
    """A SIGUSR2 checkpoint at step 5 (log steps 4, 8, 12): step 8 still averages steps 5-8, bit for bit."""
    cfg = from_dict(RunConfig, RUN)
    calls = iter(range(100))
    with pytest.raises(Interrupted):
        train(cfg, tmp_path / "run", progress=False, stop=lambda: next(calls) == 4)  # asked after step 5
    assert rundir.checkpoint_steps(rundir.RunPaths(tmp_path / "run")) == [3, 5]
    state = torch.load(_ckpt(tmp_path / "run", 5), weights_only=True)
    assert state["log_window"]["steps"] == 1 and state["log_window"]["sums"].dtype == torch.float64
    train(cfg, tmp_path / "run", progress=False)
    assert _metrics(tmp_path / "run") == _metrics(straight)
    _assert_same_weights(_ckpt(tmp_path / "run", 12), _ckpt(straight, 12))


@needs_fashion
def test_checkpoints_of_the_previous_format_still_resume(straight, tmp_path):
    """No log window, numpy's RNG state as the ndarray np.random.get_state() returns (a pickled numpy global)."""
    run, config = _copy(straight, tmp_path)
    _ckpt(run, 12).unlink()
    state = torch.load(_ckpt(run, 9), weights_only=True)
    del state["log_window"]
    name, keys, *rest = state["rng"]["numpy"]
    state["rng"]["numpy"] = (name, keys.numpy().astype(np.uint32), *rest)
    torch.save(state, _ckpt(run, 9))
    assert main(["train", str(config), "--out", str(run), "--no-progress"]) == 0
    _assert_same_weights(_ckpt(run, 12), _ckpt(straight, 12))


@needs_fashion
def test_planted_pickle_is_refused_and_never_runs(straight, tmp_path, capsys):
    marker = tmp_path / "pwned"
    run, config = _copy(straight, tmp_path)
    torch.save({"model_spec": Planted(marker), "step": 12}, _ckpt(run, 12))
    capsys.readouterr()
    assert main(["sample", str(run), "--no-progress"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"repro: error: {_ckpt(run, 12)}: refused checkpoint: it holds a pickled object "
                           f"({open.__module__}.open) beyond weights and plain values")
    assert not marker.exists()

    torch.save({"model_spec": Planted(marker), "step": 12}, _ckpt(run, 12))  # training sets it aside too
    assert main(["train", str(config), "--out", str(run), "--no-progress"]) == 0
    assert "0000012.pt: refused checkpoint" in capsys.readouterr().out
    _assert_same_weights(_ckpt(run, 12), _ckpt(straight, 12))
    assert not marker.exists()

    from repro.metrics.extractors import FashionClassifier

    weights = tmp_path / "classifier.pt"
    torch.save({"model": Planted(marker), "width": 8, "test_accuracy": 0.9}, weights)
    with pytest.raises(ConfigError, match=f"^{weights}: refused classifier weights: .*[.]open") as e:
        FashionClassifier(weights)
    assert "\n" not in str(e.value) and not marker.exists()


# ---------------------------------------------------------------------------------------------- kill -9
# A driver that trains through the CLI; with SLOW_CKPT_STEP set, that checkpoint is written half, flushed, and then
# the writer sleeps: the test kills it while the temp file holds part of a checkpoint.
DRIVER = '''
import io, os, sys, time
import torch
from repro import rundir
from repro.cli import main

slow, real = int(os.environ.get("SLOW_CKPT_STEP", "0")), rundir.save_atomic

def save_slowly(obj, path):
    if int(path.stem) != slow:
        return real(obj, path)
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()

    def write(f):
        f.write(data[:len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        time.sleep(300)
        f.write(data[len(data) // 2:])

    rundir.atomic_write(path, write)

rundir.save_atomic = save_slowly
sys.exit(main(sys.argv[1:]))
'''
KILL_RUN = {"steps": 30}


def _env(**extra) -> dict:
    # one thread: the same kernels' summation order in every process, hence bit-identical runs (see test_train)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "CUDA_VISIBLE_DEVICES": "", **extra}


def _driver(folder: Path, run: Path, **env) -> subprocess.Popen:
    driver = folder / "driver.py"
    if not driver.exists():
        driver.write_text(DRIVER)
    config = folder / "run.yaml"
    if not config.exists():
        _config(folder, **KILL_RUN)
    return subprocess.Popen([sys.executable, str(driver), "train", str(config), "--out", str(run), "--no-progress"],
                            env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(folder: Path, run: Path) -> str:
    out, err = _driver(folder, run).communicate(timeout=300)
    assert "Traceback" not in err, err
    return out


def _progress(run: Path) -> int:
    """The newest step this run has logged or checkpointed (0 before either)."""
    steps = [0]
    for name in ("metrics.jsonl", "checkpoints.jsonl"):
        path = run / "train" / name
        if path.exists():
            steps += [json.loads(ln)["step"] for ln in path.read_text().splitlines() if ln.endswith("}")]
    return max(steps)


def _kill_when(proc: subprocess.Popen, ready, what: str) -> None:
    deadline = time.time() + 120
    while not ready():
        if proc.poll() is not None:
            return  # it finished (or failed) first: the final run below tells which
        assert time.time() < deadline, f"never reached: {what}"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _kill_mid_write(folder: Path, run: Path, step: int) -> None:
    """Kill while checkpoint `step` is half written: its temp file holds bytes, its final name does not exist."""
    ckpts = run / "train" / "checkpoints"

    def writing() -> list[Path]:
        return [p for p in ckpts.glob(f".{step:07d}.pt.*.tmp") if p.stat().st_size > 0] if ckpts.exists() else []

    proc = _driver(folder, run, SLOW_CKPT_STEP=str(step))
    _kill_when(proc, writing, f"a non-empty temp file of checkpoint {step}")
    assert writing() and not _ckpt(run, step).exists()


@pytest.fixture(scope="module")
def straight_subprocess(tmp_path_factory):
    folder = tmp_path_factory.mktemp("straight-kill")
    _finish(folder, folder / "run")
    return folder / "run"


def _assert_identical_to(run: Path, straight: Path) -> None:
    _assert_same_weights(_ckpt(run, 30), _ckpt(straight, 30))
    assert _metrics(run) == _metrics(straight)
    assert [m["step"] for m in _metrics(run)] == [4, 8, 12, 16, 20, 24, 28, 30]
    assert not [p for p in run.rglob("*.tmp")], "a temp file remains"


@needs_fashion
def test_kill_during_checkpoint_write_resumes_bit_identical(straight_subprocess, tmp_path):
    run = tmp_path / "run"
    _kill_mid_write(tmp_path, run, 15)
    out = _finish(tmp_path, run)
    assert "removed 1 temp file(s) of a write that was killed: .0000015.pt." in out
    assert "resumed at step 12" in out
    _assert_identical_to(run, straight_subprocess)


@needs_fashion
@pytest.mark.slow
def test_kill_at_random_moments_resumes_bit_identical(straight_subprocess, tmp_path):
    """SIGKILL at seeded random moments: at start-up, after a random step plus a random delay, twice in a row, and
    once in the middle of a checkpoint's bytes."""
    rng = random.Random(16)
    run = tmp_path / "run"
    proc = _driver(tmp_path, run)  # during start-up (imports, data), before any step
    time.sleep(rng.uniform(0.2, 1.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    landed = []
    for target in sorted(rng.sample(range(2, 21), 4)):
        if _progress(run) >= target:
            continue
        delay = rng.uniform(0.0, 0.03)
        proc = _driver(tmp_path, run)
        _kill_when(proc, lambda t=target, d=delay: _progress(run) >= t and (time.sleep(d) or True), f"step {target}")
        landed.append(_progress(run))
    assert len(set(landed)) >= 3 and max(landed) < 27, landed  # kills landed at distinct steps, mid-run
    proc = _driver(tmp_path, run)  # a resume killed while it loads its checkpoint: a double kill
    time.sleep(rng.uniform(0.2, 1.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _kill_mid_write(tmp_path, run, 27)
    _finish(tmp_path, run)
    _assert_identical_to(run, straight_subprocess)


def test_classifier_weights_as_written_load_weights_only(tmp_path):
    """The record `train_classifier` writes (state dict, ints, floats, strings) loads with weights_only."""
    from repro.metrics.extractors import FashionClassifier, FashionNet

    net = FashionNet(4)
    path = tmp_path / "clf.pt"
    rundir.save_atomic({"model": net.state_dict(), "width": 4, "resolution": 16, "epochs": 1, "seed": 0,
                        "test_accuracy": 0.5, "trained_on": "Fashion-MNIST train (60,000)"}, path)
    clf = FashionClassifier(path)
    assert clf.resolution == 16 and clf.test_accuracy == 0.5
    for name, value in net.state_dict().items():
        assert torch.equal(clf.net.state_dict()[name], value)
