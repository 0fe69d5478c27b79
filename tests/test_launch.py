"""`repro submit / cancel / status` without SLURM: submitit's debug executor (in-process) and local executor
(background processes), the decisions that make submitting idempotent, profiles, and the sbatch text."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from repro.cli import main
from repro.errors import ConfigError
from repro.launch import Profile, decide, load_profile, parse_time, read_state, sbatch_text, stop_local, submit
from repro.plan import expand, load_study

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fashion = pytest.mark.skipif(not FASHION.exists(), reason="Debian package dataset-fashion-mnist is not installed")
GOLDEN_SBATCH = Path(__file__).parent / "golden" / "sbatch_train.txt"


def short_study(folder: Path, steps: int = 6, stages: tuple[str, ...] = ("train", "sample"), extra: str = "",
                **train) -> Path:
    """The tiny DiC roadmap, shortened to seconds per run (same steps, same switches); without evaluation unless
    asked for (it trains the Fashion-MNIST classifier on first use)."""
    tr = {"steps": steps, "global_batch": 8, "ckpt_every": 1000, "log_every": 3, **train}
    text = (f"extends: {ROOT / 'experiments/tiny/dic_roadmap.yaml'}\n"
            f"study: short_roadmap\n"
            f"stages: {json.dumps(list(stages))}\n"
            f"defaults:\n"
            f"  train: {json.dumps(tr)}\n"
            f"  sample: {{num_samples: 8, per_proc_batch: 8, steps: '5'}}\n" + extra)
    path = folder / "short.yaml"
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def _no_pdb(monkeypatch):
    # submitit's debug executor opens pdb on an exception; under pytest that reads stdin
    monkeypatch.setattr("pdb.post_mortem", lambda *a, **k: None)


def test_parse_time():
    assert parse_time("30") == 30
    assert parse_time("01:00:00") == 60
    assert parse_time("72:00:00") == 72 * 60
    assert parse_time("2-00:00:00") == 2880
    assert parse_time("1-12") == 36 * 60
    assert parse_time("10:30") == 11      # MM:SS, rounded up
    with pytest.raises(ValueError):
        parse_time("soon")


def test_profiles_load_and_bad_keys_name_the_line(tmp_path):
    for name in ("localhost", "example"):
        p = load_profile(ROOT / "slurm" / "profiles" / f"{name}.yaml")
        assert p.cluster == "slurm"
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster: slurm\npartiton: debug\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2: partiton: unknown key.*partition"):
        load_profile(bad)
    bad.write_text("cluster: kubernetes\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:1: cluster: one of slurm, local, debug"):
        load_profile(bad)


def test_golden_sbatch_text(tmp_path):
    """The sbatch script of a paper-scale train stage on the example profile (folder fixed for the golden)."""
    plan = expand(load_study(ROOT / "experiments/dic_roadmap.yaml"))
    profile = load_profile(ROOT / "slurm/profiles/example.yaml")
    from repro.launch import _requests

    run = plan.runs[0]
    params = _requests(run.stages[0], run, plan, profile)
    assert params["tasks_per_node"] == 8 and params["gpus_per_node"] == 8 and params["timeout_min"] == 48 * 60
    text = sbatch_text(Path("/shared/results/jobs/%j"), "repro-dic_roadmap-isotropic-train", params, profile)
    text = text.replace(sys.executable, "<python>")  # the interpreter submitting is the one the job runs
    if os.environ.get("REPRO_UPDATE_GOLDEN"):
        GOLDEN_SBATCH.write_text(text)
    assert text == GOLDEN_SBATCH.read_text()
    for line in ("#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --signal=USR2@120",
                 "#SBATCH --time=2880", "#SBATCH --open-mode=append"):
        assert line in text
    # a task that dies ends the whole step; its peers do not wait in a collective for the timeout
    assert re.search(r"^srun .*--kill-on-bad-exit=1", text, re.M)


def test_dry_run_submits_nothing(tmp_path, capsys):
    root = tmp_path / "results"
    code = main(["submit", "experiments/dic_roadmap.yaml", "--cluster", "slurm", "--profile",
                 "slurm/profiles/example.yaml", "--dry-run", "--results", str(root)])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("#!/bin/bash") == 45                 # 9 runs x (train, 2 x (sample, evaluate))
    assert "would queue 45 jobs on slurm" in out
    assert "#SBATCH --dependency='afterok:<train>'" in out and "#SBATCH --kill-on-invalid-dep=yes" in out
    assert not (root / "runs").exists()


def test_unknown_step_and_bad_profile_are_one_line_errors(tmp_path, capsys):
    root = str(tmp_path / "results")
    assert main(["submit", "experiments/tiny/dic_roadmap.yaml", "--only", "gatin", "--results", root]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--only gatin" in err and "did you mean gating?" in err
    assert not (tmp_path / "results" / "runs").exists()
    assert main(["submit", "experiments/tiny/dic_roadmap.yaml", "--profile", str(tmp_path / "none.yaml"),
                 "--results", root]) == 2
    assert "no such profile" in capsys.readouterr().err
    assert main(["submit", "experiments/tiny/dic_roadmap.yaml", "--cluster", "local", "--profile",
                 "slurm/profiles/localhost.yaml", "--results", root]) == 2
    assert "is for cluster slurm" in capsys.readouterr().err


@needs_fashion
def test_debug_submit_runs_every_stage_and_a_second_submit_queues_nothing(tmp_path, capsys):
    study = short_study(tmp_path)
    root = tmp_path / "results"
    assert main(["submit", str(study), "--cluster", "debug", "--only", "isotropic", "dit",
                 "--results", str(root)]) == 0
    assert "queued 4 jobs on debug" in capsys.readouterr().out
    plan = expand(load_study(study))
    for run in plan.runs:
        st = read_state(root, run.id)["stages"]
        if run.step in ("isotropic", "dit"):
            assert {k: v["state"] for k, v in st.items()} == {"train": "done", run.stages[1].name: "done"}
            assert [e["state"] for e in st["train"]["history"]] == ["submitted", "running", "done"]
            assert st["train"]["attempts"] == 1
        else:
            assert st == {}
    assert main(["submit", str(study), "--cluster", "debug", "--only", "isotropic", "dit",
                 "--results", str(root)]) == 0
    assert "queued 0 jobs on debug (4 done)" in capsys.readouterr().out
    assert main(["status", "--json", "--results", str(root)]) == 0   # the last study: submit remembers it
    runs = {r["step"]: r for r in json.loads(capsys.readouterr().out)["runs"]}
    assert runs["dit"]["stages"][0]["job"] == "done" and runs["dit"]["stages"][0]["cluster"] == "debug"


@needs_fashion
def test_a_failed_stage_is_recorded_blocks_its_children_and_is_retried_on_request(tmp_path, capsys, monkeypatch):
    study = short_study(tmp_path)
    root = tmp_path / "results"
    import repro.train

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(repro.train, "train", broken)
    plan = expand(load_study(study))
    submit(plan, root, "debug", only=("dit",))
    run = next(r for r in plan.runs if r.step == "dit")
    st = read_state(root, run.id)["stages"]
    assert st["train"]["state"] == "failed" and "disk full" in st["train"]["error"]
    actions = {d.stage.name.split(":")[0]: d.action for d in decide(plan, root, "debug", only=("dit",))}
    assert actions == {"train": "failed", "sample": "blocked"}
    monkeypatch.undo()
    monkeypatch.setattr("pdb.post_mortem", lambda *a, **k: None)
    assert [d.action for d in decide(plan, root, "debug", retry_failed=True, only=("dit",))][:2] == ["submit"] * 2
    submit(plan, root, "debug", retry_failed=True, only=("dit",))
    assert read_state(root, run.id)["stages"]["train"]["state"] == "done"


def _wait(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "repro.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


@needs_fashion
def test_local_cluster_two_concurrent_submits_queue_each_stage_once(tmp_path):
    study = short_study(tmp_path)
    root = str(tmp_path / "results")
    args = ["submit", str(study), "--cluster", "local", "--only", "isotropic", "unet", "--json", "--results", root]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "repro.cli", *args], stdout=subprocess.PIPE, text=True,
                              env=env, cwd=ROOT) for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    queued = [(j["run"], j["stage"]) for o in outs for j in o["jobs"]]
    assert len(queued) == 4 and len(set(queued)) == 4     # 2 runs x (train, sample), each once
    plan = expand(load_study(study))

    def all_done():
        return all(read_state(Path(root), r.id)["stages"].get(s.name, {}).get("state") == "done"
                   for r in plan.runs if r.step in ("isotropic", "unet") for s in r.stages[:2])

    _wait(all_done, 240, "the local jobs")
    again = json.loads(_cli(*args).stdout)
    assert again["jobs"] == []


@needs_fashion
def test_local_cancel_stops_the_background_job(tmp_path):
    study = short_study(tmp_path, steps=100000)
    root = tmp_path / "results"
    out = _cli("submit", str(study), "--cluster", "local", "--only", "gelu", "--results", str(root))
    try:
        _cancel_and_check(study, root, out)
    finally:  # a job the cancel missed would train 100,000 steps beside every later test
        subprocess.run(["pkill", "-KILL", "-f", str(root)], capture_output=True)


def _cancel_and_check(study: Path, root: Path, out) -> None:
    assert "queued 2 jobs on local" in out.stdout, out.stderr
    plan = expand(load_study(study))
    run = next(r for r in plan.runs if r.step == "gelu")
    _wait(lambda: read_state(root, run.id)["stages"]["train"]["state"] == "running", 60, "the job to start")
    status = _cli("status", "--results", str(root)).stdout
    assert "local" in status and "running" in status
    out = _cli("cancel", "--results", str(root))
    assert "cancelled 2 stages" in out.stdout, out.stderr
    jid = read_state(root, run.id)["stages"]["train"]["job_id"]
    _wait(lambda: not Path(f"/proc/{jid}").exists() or b"zombie" in Path(f"/proc/{jid}/status").read_bytes().lower(),
          30, "the controller to exit")
    assert _running_with(str(root)) == [], "a process of the cancelled job still runs"
    again = _cli("submit", str(study), "--cluster", "local", "--only", "gelu", "--results", str(root))
    assert "queued 0 jobs" in again.stdout and "--retry-failed" in again.stdout


def _running_with(text: str) -> list[int]:
    """Live processes whose command line names `text` (zombies excluded)."""
    out = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc.name.isdigit() and text.encode() in (proc / "cmdline").read_bytes()
                    and (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"):
                out.append(int(proc.name))
        except OSError:
            pass
    return out


# A controller that stops on SIGINT without stopping its task, and a task that ignores SIGINT and SIGTERM: what
# submitit leaves behind when the SIGINT lands while it starts the task, and what its SIGTERM handler does.
_STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell's background job starts with SIGINT ignored
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); signal.signal(signal.SIGTERM, signal.SIG_IGN);"
    " print('ready', flush=True); time.sleep(600)  # {tag}"], stdout=sys.stdout)
time.sleep(600)
"""


def test_stop_local_kills_a_task_that_outlives_its_controller(tmp_path):
    tag = f"stubborn-{tmp_path.name}"
    out = tmp_path / "out.txt"
    with out.open("w") as f:
        parent = subprocess.Popen([sys.executable, "-c", _STUBBORN.replace("{tag}", tag)], stdout=f)
    try:
        _wait(lambda: "ready" in out.read_text(), 30, "the task to start")
        child = [p for p in _running_with(tag) if p != parent.pid]
        assert len(child) == 1
        started = time.monotonic()
        killed = stop_local(parent.pid, grace_s=1.0)
        assert parent.wait(timeout=10) == -signal.SIGINT
        assert killed == child and time.monotonic() - started < 5
        _wait(lambda: _running_with(tag) == [], 10, "the task to die")
    finally:
        subprocess.run(["pkill", "-KILL", "-f", tag], capture_output=True)


def test_stop_local_leaves_a_job_that_stops_by_itself(tmp_path):
    job = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                            "signal.signal(signal.SIGINT, signal.default_int_handler); print('ready', flush=True);"
                            " time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    assert job.stdout.readline() == "ready\n"  # a SIGINT before its handler is set would be ignored, by design
    started = time.monotonic()
    assert stop_local(job.pid, grace_s=5.0) == []  # SIGINT ends it; nothing left to kill
    assert job.wait(timeout=5) != 0 and time.monotonic() - started < 3
    assert stop_local(job.pid) == []  # gone (a zombie until reaped): nothing to do


@needs_fashion
def test_local_preemption_checkpoints_requeues_and_ends_with_identical_weights(tmp_path):
    """SIGUSR2 (what SLURM sends before preemption) to a local training job: it checkpoints at the step it is on,
    submitit requeues it, and the final weights equal those of an uninterrupted run."""
    steps = 150
    study = short_study(tmp_path, steps=steps, log_every=5)
    root = tmp_path / "results"
    plan = expand(load_study(study))
    run = next(r for r in plan.runs if r.step == "dit")
    out = _cli("submit", str(study), "--cluster", "local", "--only", "dit", "--results", str(root))
    assert out.returncode == 0, out.stderr
    metrics = root / "runs" / run.id / "train" / "metrics.jsonl"
    _wait(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 4, 120, "20 steps")
    controller = int(read_state(root, run.id)["stages"]["train"]["job_id"])
    task = int(Path(f"/proc/{controller}/task/{controller}/children").read_text().split()[0])
    os.kill(task, signal.SIGUSR2)
    _wait(lambda: read_state(root, run.id)["stages"].get(run.stages[1].name, {}).get("state") == "done", 300,
          "the requeued job to finish")
    st = read_state(root, run.id)["stages"]["train"]
    states = [e["state"] for e in st["history"]]
    assert states == ["submitted", "running", "requeued", "running", "done"], states
    stopped = next(e for e in st["history"] if e["state"] == "requeued")
    assert 20 <= st["interrupted_at"] < steps, stopped
    log = (root / "runs" / run.id / "train" / "log.txt").read_text()
    assert f"resumed at step {st['interrupted_at']}" in log

    # the same run, uninterrupted, in a second results root
    ref_root = tmp_path / "reference"
    out = _cli("submit", str(study), "--cluster", "local", "--only", "dit", "--results", str(ref_root))
    _wait(lambda: read_state(ref_root, run.id)["stages"].get("train", {}).get("state") == "done", 300, "reference")
    final = f"train/checkpoints/{steps:07d}.pt"
    a = torch.load(root / "runs" / run.id / final, map_location="cpu", weights_only=False)
    b = torch.load(ref_root / "runs" / run.id / final, map_location="cpu", weights_only=False)
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"


def test_profile_caps_requests():
    plan = expand(load_study(ROOT / "experiments/dic_roadmap.yaml"))
    from repro.launch import _requests

    run = plan.runs[0]
    p = _requests(run.stages[0], run, plan, Profile(cpus_per_task=2, mem_gb=4, gpus_per_node=0, partition="debug"))
    assert p["tasks_per_node"] == 1 and "gpus_per_node" not in p
    assert p["cpus_per_task"] == 2 and p["mem_gb"] == 4 and p["slurm_partition"] == "debug"


def test_slurm_without_its_commands_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without SLURM's commands
    code = main(["submit", "experiments/tiny/dic_roadmap.yaml", "--cluster", "slurm", "--results",
                 str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "sbatch not found on PATH" in err
    assert not (tmp_path / "results" / "runs").exists()


@needs_fashion
def test_evaluate_and_bench_stages_write_their_records_with_the_protocol(tmp_path, classifier, stats_cache, capsys):
    """train -> sample (final and an intermediate checkpoint) -> evaluate, and the study's bench, through the
    launcher."""
    extra = (f"evaluate: {{extractor: fashion-mnist, classifier: '{classifier}', checkpoints: [3]}}\n"
             f"bench: {{batch: 4, warmup: 1, iters: 2, repeats: 1}}\n")
    study = short_study(tmp_path, stages=("train", "sample", "evaluate", "bench"), extra=extra)
    root = tmp_path / "results"
    root.mkdir()
    (root / ".cache").symlink_to(stats_cache, target_is_directory=True)
    stats_cache.mkdir(parents=True, exist_ok=True)
    assert main(["submit", str(study), "--cluster", "debug", "--only", "dit", "--results", str(root)]) == 0
    assert "queued 4 jobs on debug" in capsys.readouterr().out
    plan = expand(load_study(study))
    run = next(r for r in plan.runs if r.step == "dit")
    states = read_state(root, run.id)["stages"]
    assert {k: v["state"] for k, v in states.items()} == {s.name: "done" for s in run.stages}, states
    pid = run.stages[1].name.split(":", 1)[1]
    folder = root / "runs" / run.id
    for stem, step in ((pid, 6), (f"{pid}-ckpt3", 3)):
        record = json.loads((folder / "eval" / f"{stem}.fmnist-train.json").read_text())
        p = record["protocol"]
        for key in ("sampler", "steps", "cfg_scale", "guide_channels", "num_samples", "labels", "seed",
                    "reference", "reference_sha256", "extractor", "extractor_sha256", "cleanfid_mode",
                    "code_commit", "checkpoint_step", "samples_sha256"):
            assert key in p, key
        assert p["checkpoint_step"] == step and p["num_samples"] == 8 and p["sampler"] == "ddim"
        assert p["reference"] == "fashion-mnist:train" and p["extractor"] == "fashion-mnist"
        assert len(p["extractor_sha256"]) == 64 and len(p["code_commit"]) in (40, 7)
        assert set(record["metrics"]) == {"fid", "is", "sfid", "precision", "recall"}
        assert all(v is not None and v == v for v in record["metrics"].values())
        assert record["labels"]["fid"] == "FID-8 (Fashion-MNIST classifier)"
        assert "8 samples, not 50K" in record["paper_protocol"]["differences"]
        # the FID's interval over the sample set, and the features a paired difference resamples
        iv = record["intervals"]["fid"]
        assert iv["lo"] < record["metrics"]["fid"] < iv["hi"] and iv["n"] == 8 and iv["resamples"] == 200
        with np.load(folder / "eval" / p["features_file"]) as f:
            assert f["pool"].shape[0] == 8 and f["reference_sigma"].shape == (f["pool"].shape[1],) * 2
    # the study's bench is one job timing every run of the study, whichever --only selected
    record = json.loads((root / "bench" / f"{plan.study.study.study}.json").read_text())
    assert set(record["runs"]) == {r.id for r in plan.runs}
    bench = record["runs"][run.id]
    assert bench["params"] > 0 and bench["gmacs"] > 0 and bench["img_per_s"] > 0
    assert record["protocol"]["batch"] == 4 and record["protocol"]["flags"]["profile"]
    # everything is done: a second submit queues nothing, and status says so
    assert main(["submit", str(study), "--cluster", "debug", "--only", "dit", "--results", str(root)]) == 0
    assert "queued 0 jobs on debug (4 done)" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["no weights", "no reference"])
def test_an_evaluate_stage_without_weights_fails_with_one_line(tmp_path, case):
    missing = tmp_path / "weights" / "inception-2015-12-05.pt"
    reference = f"'{tmp_path / 'ref.npz'}'" if case == "no weights" else "null"  # null: not the tiny study's
    extra = f"evaluate: {{extractor: inception, reference: {reference}, inception: '{missing}'}}\n"
    study = short_study(tmp_path, stages=("evaluate",), extra=extra)
    root = tmp_path / "results"
    # the samples exist (as if sampled elsewhere), the Inception weights do not
    plan = expand(load_study(study))
    run = next(r for r in plan.runs if r.step == "dit")
    pid = run.stages[0].name.split(":", 1)[1]
    import numpy as np

    (root / "runs" / run.id / "samples").mkdir(parents=True)
    np.savez(root / "runs" / run.id / "samples" / f"{pid}.npz", arr_0=np.zeros((8, 32, 32, 1), np.uint8))
    submit(plan, root, "debug", only=("dit",))
    st = read_state(root, run.id)["stages"][run.stages[0].name]
    assert st["state"] == "failed"
    assert "\n" not in st["error"]
    if case == "no weights":
        assert str(missing) in st["error"] and "Inception weights not found" in st["error"]
    else:
        assert "evaluate.reference: not set" in st["error"]
