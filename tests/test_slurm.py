"""`repro submit --cluster slurm` on a real SLURM cluster: the single-node one of slurm/local-cluster/up.sh.

Skipped when no cluster answers, unless REPRO_REQUIRE_SLURM=1 (the README's test command sets it after bringing
the cluster up), where a missing cluster is a failure.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from repro.launch import read_state
from repro.plan import expand, load_study
from test_launch import ROOT, needs_fashion, short_study

pytestmark = [pytest.mark.slurm, needs_fashion]


def _cluster_up() -> str | None:
    if shutil.which("sinfo") is None:
        return "sinfo not found"
    r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0 or not set(r.stdout.split()) & {"idle", "mixed", "allocated", "completing"}:
        return f"no SLURM node up ({(r.stderr or r.stdout).strip()[:200]})"
    return None


def require(why: str | None, variable: str, value: str, command: str) -> None:
    """Skip for `why` (what is not up), or fail when `variable=value` says the test command brought it up."""
    if why:
        if os.environ.get(variable) == value:
            pytest.fail(f"{variable}={value} but {why}: run {command}")
        pytest.skip(f"{why} (bring it up with {command})")


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    require(_cluster_up(), "REPRO_REQUIRE_SLURM", "1", "slurm/local-cluster/up.sh")


def _cli(*args, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "repro.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


def _wait(predicate, timeout: float, what: str, poll: float = 2.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _runnable_done(root: Path, plan, steps=None) -> bool:
    return all(read_state(root, r.id)["stages"].get(s.name, {}).get("state") == "done"
               for r in plan.runs if steps is None or r.step in steps
               for s in r.stages if s.name.split(":")[0] in ("train", "sample"))


def _failures(root: Path, plan) -> list[str]:
    return [f"{r.step} {name}: {e.get('error')}" for r in plan.runs
            for name, e in read_state(root, r.id)["stages"].items() if e.get("state") == "failed"]


def test_tiny_roadmap_on_slurm_concurrent_submits_status_and_resubmit(tmp_path):
    """Two concurrent submits of the (shortened) tiny roadmap queue each stage once; every run ends done on the
    cluster; status says so from the scheduler's records; a third submit queues nothing."""
    study = short_study(tmp_path)
    root = tmp_path / "results"
    args = ["submit", str(study), "--cluster", "slurm", "--profile", "slurm/profiles/localhost.yaml", "--json",
            "--results", str(root)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    procs = [subprocess.Popen([sys.executable, "-m", "repro.cli", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    jobs = [j for o in outs for j in json.loads(o[0])["jobs"]]
    assert len(jobs) == 18 and len({(j["run"], j["stage"]) for j in jobs}) == 18  # 9 runs x (train, sample)
    assert len({j["job_id"] for j in jobs}) == 18
    assert sum("_" in j["job_id"] for j in jobs) == 9     # the train stages went in one job array

    plan = expand(load_study(study))
    _wait(lambda: _runnable_done(root, plan) or bool(_failures(root, plan)), 900, "every stage to finish")
    assert not _failures(root, plan)

    status = json.loads(_cli("status", "--json", "--results", str(root)).stdout)
    for run in status["runs"]:
        for st in run["stages"]:
            if st["name"].split(":")[0] in ("train", "sample"):
                assert st["state"] == "done" and st["job"] == "done" and st["cluster"] == "slurm", st
                assert st.get("scheduler", "COMPLETED") == "COMPLETED", st
    def acct() -> list[str]:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j",
                              ",".join(j["job_id"] for j in jobs)], capture_output=True, text=True).stdout
        return sorted(line.split("|")[1] for line in out.splitlines())

    # a job records `done` just before its process exits: the scheduler may say RUNNING for a moment longer
    _wait(lambda: "RUNNING" not in acct(), 60, "the last job to exit")
    assert acct() == ["COMPLETED"] * 18, acct()

    again = _cli("submit", "--cluster", "slurm", "--profile", "slurm/profiles/localhost.yaml", "--results", str(root))
    assert "queued 0 jobs on slurm (18 done)" in again.stdout, again.stdout + again.stderr


# Slow (43 s): tests/test_slurm_nodes.py preempts a 2-node run through the same partitions and ends it bit-identical
# to one process; this one-node version runs with `-m slow`.
@pytest.mark.slow
def test_preempted_training_is_requeued_resumes_and_ends_with_identical_weights(tmp_path):
    """A training job in the preemptible partition is preempted by a job in `high`: it gets SIGUSR2, checkpoints
    at its current step, is requeued, resumes there, and ends with the weights of an uninterrupted run."""
    steps = 120
    study = short_study(tmp_path, steps=steps, log_every=5)
    profile = ROOT / "slurm/profiles/localhost.yaml"   # one CPU per job: a job in `high` asking for every CPU
    ncpu = os.cpu_count()                              # of the node preempts it
    root = tmp_path / "results"
    plan = expand(load_study(study))
    run = next(r for r in plan.runs if r.step == "dit")
    out = _cli("submit", str(study), "--cluster", "slurm", "--profile", str(profile), "--only", "dit",
               "--results", str(root))
    assert "queued 2 jobs" in out.stdout, out.stdout + out.stderr
    metrics = root / "runs" / run.id / "train" / "metrics.jsonl"
    _wait(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 4, 300, "20 training steps", 0.5)
    high = subprocess.run(["sbatch", "--parsable", "-p", "high", "-c", str(ncpu), "-o", os.devnull,
                           "--wrap", "sleep 1"], capture_output=True, text=True, check=True).stdout.strip()
    _wait(lambda: _runnable_done(root, plan, ("dit",)) or bool(_failures(root, plan)), 600, "the requeued run")
    assert not _failures(root, plan)
    st = read_state(root, run.id)["stages"]["train"]
    states = [e["state"] for e in st["history"]]
    assert states == ["submitted", "running", "requeued", "running", "done"], (states, high)
    assert 20 <= st["interrupted_at"] < steps and st["attempts"] == 2
    log = (root / "runs" / run.id / "train" / "log.txt").read_text()
    assert f"resumed at step {st['interrupted_at']}" in log

    # the uninterrupted run, in this process with the job's thread count
    from repro.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(run.config, tmp_path / "reference", progress=False)
    finally:
        torch.set_num_threads(threads)
    final = f"train/checkpoints/{steps:07d}.pt"
    a = torch.load(root / "runs" / run.id / final, map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "reference" / final, map_location="cpu", weights_only=False)
    for part in ("model", "ema", "opt"):
        flat_a, flat_b = _flat(a[part]), _flat(b[part])
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            assert torch.equal(flat_a[k], flat_b[k]), f"{part}.{k} differs"


def _flat(d, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out
