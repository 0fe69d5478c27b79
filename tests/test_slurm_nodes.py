"""Several nodes: `repro submit` of a 2-node study on the namespace nodes of `slurm/local-cluster/up.sh --nodes 2`
(partition `multi`: nodes n1 and n2, each its own hostname and address, one shared filesystem).

Skipped when that partition has no two nodes up, unless REPRO_REQUIRE_SLURM_NODES=2 (the README's test command
sets it after bringing them up), where that is a failure.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from repro.launch import read_state
from repro.plan import expand, load_study
from test_launch import ROOT, needs_fashion, short_study
from test_slurm import _cli, _failures, _flat, _runnable_done, _wait, require

pytestmark = [pytest.mark.slurm, needs_fashion]
STEPS = 30
LONG = 150  # long enough that a preemption or a kill lands mid-run
SHARDS = 4  # train.reduce_shards: weights bit-identical on 1, 2 and 4 processes


def _two_nodes_up() -> str | None:
    if shutil.which("sinfo") is None:
        return "sinfo not found"
    r = subprocess.run(["sinfo", "-h", "-p", "multi", "-N", "-o", "%N %T"], capture_output=True, text=True,
                       timeout=30)
    up = [ln.split()[0] for ln in r.stdout.splitlines() if ln.split()[-1] in ("idle", "mixed", "allocated")]
    return None if len(up) >= 2 else f"partition multi has {len(up)} node(s) up ({(r.stderr or r.stdout).strip()})"


@pytest.fixture(scope="module", autouse=True)
def two_nodes():
    require(_two_nodes_up(), "REPRO_REQUIRE_SLURM_NODES", "2", "slurm/local-cluster/up.sh --nodes 2")


def _study(folder: Path, tasks_per_node: int, steps: int = STEPS, **train) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return short_study(folder, steps=steps, log_every=5, stages=("train",), reduce_shards=SHARDS, **train,
                       extra=f"resources: {{nodes: 2, tasks_per_node: {tasks_per_node}, gpus_per_node: 0, "
                             f"cpus_per_task: 1, mem_gb: 2, time: '00:20:00', partition: multi}}\n")


def _plan_run(study: Path):
    plan = expand(load_study(study))
    return plan, next(r for r in plan.runs if r.step == "dit")


def _submit(study: Path, root: Path, *extra: str) -> None:
    out = _cli("submit", str(study), "--cluster", "slurm", "--profile", "slurm/profiles/localhost.yaml",
               "--only", "dit", "--results", str(root), *extra, timeout=600)
    assert out.returncode == 0 and "queued 1 job" in out.stdout, out.stdout + out.stderr


def _wait_done(study: Path, root: Path) -> Path:
    plan, run = _plan_run(study)
    _wait(lambda: _runnable_done(root, plan, ("dit",)) or bool(_failures(root, plan)), 600, "the training job")
    assert not _failures(root, plan)
    return root / "runs" / run.id


def _reference(study: Path, out: Path) -> Path:
    """The same run trained by one process, here, with the tasks' thread count."""
    from repro.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(_plan_run(study)[1].config, out, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("one")
    return _reference(_study(folder, 1), folder / "run")


@pytest.fixture(scope="module")
def one_process_long(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("one_long")
    return _reference(_study(folder, 1, steps=LONG, ckpt_every=25), folder / "run")


def _ranks(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train" / "ranks.jsonl").read_text().splitlines()]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]


def _assert_bit_identical(run: Path, reference: Path, steps: int) -> None:
    """Model, EMA and every AdamW tensor torch.equal to the 1-process run; the logged losses the same floats."""
    final = f"train/checkpoints/{steps:07d}.pt"
    a = torch.load(run / final, map_location="cpu", weights_only=True)
    b = torch.load(reference / final, map_location="cpu", weights_only=True)
    assert b["world"] == 1
    for part in ("model", "ema", "opt"):
        flat_a, flat_b = _flat(a[part]), _flat(b[part])
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            assert torch.equal(flat_a[k], flat_b[k]), f"{part}.{k} differs"
    assert [m["loss"] for m in _metrics(run)] == [m["loss"] for m in _metrics(reference)]


def _sacct(job: str) -> str:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job], capture_output=True, text=True)
    return out.stdout.strip()


# 2x1 is slow (31 s) and runs with `-m slow`: the fault test below trains that layout to the same bits anyway.
@pytest.mark.parametrize("tasks_per_node", [pytest.param(1, marks=pytest.mark.slow), 2], ids=["2x1", "2x2"])
def test_two_node_training_equals_one_process_bit_for_bit(tmp_path, one_process, tasks_per_node):
    study = _study(tmp_path, tasks_per_node)
    _submit(study, tmp_path / "results")
    run = _wait_done(study, tmp_path / "results")
    world = 2 * tasks_per_node
    ranks = _ranks(run)
    assert sorted(r["rank"] for r in ranks) == list(range(world)) and {r["world"] for r in ranks} == {world}
    assert sorted({r["host"] for r in ranks}) == ["n1", "n2"]  # two nodes, each with its own hostname
    for host in ("n1", "n2"):
        assert sorted(r["local_rank"] for r in ranks if r["host"] == host) == list(range(tasks_per_node))
    _assert_bit_identical(run, one_process, STEPS)
    assert torch.load(run / "train" / "checkpoints" / f"{STEPS:07d}.pt", weights_only=True)["world"] == world


def test_preemption_usr2_at_one_node_and_a_killed_task_across_nodes_end_bit_identical(tmp_path, one_process_long):
    """One 2 x 1 run (rank 0 on one node, rank 1 on the other) through three faults, ending on the bits of the
    1-process run.

    1. A real preemption: a multihigh job that needs one whole node. SIGUSR2 reaches both ranks, they stop at one
       step, rank 0 writes one checkpoint and requeues; the job comes back with both tasks on both nodes.
    2. SIGUSR2 to rank 1's process alone, as a warning that reaches one node first: its flag goes through the
       all-reduce, both ranks stop at the same step, rank 0 checkpoints and requeues.
    3. SIGKILL of rank 1's process, as a node that dies: srun --kill-on-bad-exit ends the step, so rank 0 is not
       left waiting in a collective (at worst it would for the profile's collective_timeout_s, 60 s); the job
       fails, and `repro submit --retry-failed` resumes from the last checkpoint.
    """
    study = _study(tmp_path, 1, steps=LONG, ckpt_every=25)
    root = tmp_path / "results"
    _submit(study, root)
    run = _plan_run(study)[1]
    folder = root / "runs" / run.id
    checkpoints = folder / "train" / "checkpoints.jsonl"

    def reach(step: int, what: str) -> None:
        _wait(lambda: (folder / "train" / "metrics.jsonl").exists() and _metrics(folder)[-1]["step"] >= step,
              300, what, 0.2)

    def requeued(attempt: int, events: list[str]) -> int:
        """Both ranks of `attempt` (1-based) started at the step where the previous attempt stopped."""
        _wait(lambda: len(_ranks(folder)) == 2 * attempt, 300, f"attempt {attempt}'s two ranks")
        st = read_state(root, run.id)["stages"]["train"]
        assert [e["state"] for e in st["history"]] == events, st["history"]
        stopped = st["interrupted_at"]
        tasks = _ranks(folder)[-2:]
        assert {r["start_step"] for r in tasks} == {stopped}
        assert sorted((r["rank"], r["host"]) for r in tasks) in ([(0, "n1"), (1, "n2")], [(0, "n2"), (1, "n1")])
        written = [json.loads(ln)["step"] for ln in checkpoints.read_text().splitlines()]
        assert written.count(stopped) == 1  # one checkpoint, at the step the ranks agreed on
        return stopped

    reach(20, "20 training steps")
    high = subprocess.run(["sbatch", "--parsable", "-p", "multihigh", "-N", "1", "-c", str(os.cpu_count()),
                           "-o", os.devnull, "--wrap", "sleep 1"], capture_output=True, text=True, check=True)
    first = requeued(2, ["submitted", "running", "requeued", "running"])
    assert 20 <= first < LONG, high.stdout

    reach(first + 10, "10 steps after the resume")
    os.kill(next(r for r in _ranks(folder)[-2:] if r["rank"] == 1)["pid"], signal.SIGUSR2)
    second = requeued(3, ["submitted", "running", "requeued", "running", "requeued", "running"])
    assert second > first

    reach(second + 40, "40 steps after the second resume")
    victim = next(r for r in _ranks(folder)[-2:] if r["rank"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)
    killed = time.monotonic()
    job = victim["slurm_job"]
    _wait(lambda: _sacct(job) not in ("RUNNING", "COMPLETING", "REQUEUED", ""), 120, "the job to end", 0.2)
    ended = time.monotonic() - killed
    print(f"preempted by job {high.stdout.strip()}: both ranks stopped at step {first}; USR2 to rank 1 only: both "
          f"stopped at step {second}; rank 1 (pid {victim['pid']} on {victim['host']}) killed: job {job} "
          f"{_sacct(job)} after {ended:.1f} s")
    assert _sacct(job) == "FAILED" and ended < 60, (ended, _sacct(job))
    assert not _pids_of(folder), "a rank was left running"
    last = max(json.loads(ln)["step"] for ln in checkpoints.read_text().splitlines())
    assert last > second
    _submit(study, root, "--retry-failed")
    _wait_done(study, root)
    assert len({r["slurm_job"] for r in _ranks(folder)}) == 2  # requeues kept the job; the resubmit is a new one
    assert f"resumed at step {last}" in (folder / "train" / "log.txt").read_text()
    _assert_bit_identical(folder, one_process_long, LONG)


def _pids_of(folder: Path) -> list[int]:
    """Processes still alive among those the ranks logged."""
    alive = []
    for r in _ranks(folder):
        try:
            os.kill(r["pid"], 0)
            cmd = Path(f"/proc/{r['pid']}/cmdline").read_bytes()
        except (ProcessLookupError, FileNotFoundError):
            continue
        if b"submitit" in cmd:
            alive.append(r["pid"])
    return alive


def test_sampling_on_two_nodes_equals_one_process(tmp_path, one_process):
    """`repro sample` as a 2-task srun step on n1 and n2 writes the npz one process writes."""
    two, one = tmp_path / "two", tmp_path / "one"
    for dst in (two, one):
        shutil.copytree(one_process, dst, ignore=shutil.ignore_patterns("samples", "eval"))
    args = ["-m", "repro.cli", "sample", "--num", "12", "--batch", "3", "--steps", "5", "--sampler", "ddim",
            "--no-progress"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    srun = subprocess.run(["srun", "-p", "multi", "-N", "2", "--ntasks-per-node", "1", "--time", "10",
                           sys.executable, *args, str(two)], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert srun.returncode == 0, srun.stderr[-3000:]
    alone = subprocess.run([sys.executable, *args, str(one)], capture_output=True, text=True, env=env, cwd=ROOT,
                           timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    [a] = sorted((two / "samples").glob("*.npz"))
    [b] = sorted((one / "samples").glob("*.npz"))
    assert a.name == b.name
    with np.load(a) as x, np.load(b) as y:
        assert x["arr_0"].shape[0] == 12
        assert np.array_equal(x["arr_0"], y["arr_0"]) and np.array_equal(x["arr_1"], y["arr_1"])
    assert '"world_size": 2' in a.with_suffix(".json").read_text()  # it did run as two ranks
