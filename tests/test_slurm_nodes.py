"""Several nodes: `repro submit` of a 2-node study on the namespace nodes of `slurm/local-cluster/up.sh --nodes 2`
(partition `multi`: nodes n1 and n2, each its own hostname and address, one shared filesystem).

Skipped when that partition has no two nodes up, unless REPRO_REQUIRE_SLURM_NODES=2 (the README's test command
sets it after bringing them up), where that is a failure.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from repro.plan import expand, load_study
from test_launch import ROOT, needs_fashion, short_study
from test_slurm import _cli, _failures, _runnable_done, _wait, require

pytestmark = [pytest.mark.slurm, needs_fashion]
STEPS = 30


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


def _study(folder: Path, tasks_per_node: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return short_study(folder, steps=STEPS, log_every=5, stages=("train",),
                       extra=f"resources: {{nodes: 2, tasks_per_node: {tasks_per_node}, gpus_per_node: 0, "
                             f"cpus_per_task: 1, mem_gb: 2, time: '00:20:00', partition: multi}}\n")


def _train(study: Path, root: Path, cluster: str) -> Path:
    profile = ["--profile", "slurm/profiles/localhost.yaml"] if cluster == "slurm" else []
    out = _cli("submit", str(study), "--cluster", cluster, *profile, "--only", "dit", "--results", str(root),
               timeout=600)
    assert out.returncode == 0, out.stderr
    plan = expand(load_study(study))
    _wait(lambda: _runnable_done(root, plan, ("dit",)) or bool(_failures(root, plan)), 600, "the training job")
    assert not _failures(root, plan)
    run = next(r for r in plan.runs if r.step == "dit")
    return root / "runs" / run.id


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The same run trained by one process (submitit's in-process executor)."""
    folder = tmp_path_factory.mktemp("one")
    return _train(_study(folder, 1), folder / "results", "debug")


def _ranks(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train" / "ranks.jsonl").read_text().splitlines()]


def _final(run: Path) -> dict:
    return torch.load(run / "train" / "checkpoints" / f"{STEPS:07d}.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("tasks_per_node", [1, 2], ids=["2x1", "2x2"])
def test_two_node_training_runs_one_rank_per_task_on_two_hosts(tmp_path, one_process, tasks_per_node):
    run = _train(_study(tmp_path, tasks_per_node), tmp_path / "results", "slurm")
    world = 2 * tasks_per_node
    ranks = _ranks(run)
    assert sorted(r["rank"] for r in ranks) == list(range(world)) and {r["world"] for r in ranks} == {world}
    assert sorted({r["host"] for r in ranks}) == ["n1", "n2"]  # two nodes, each with its own hostname
    for host in ("n1", "n2"):
        assert sorted(r["local_rank"] for r in ranks if r["host"] == host) == list(range(tasks_per_node))
    # World-size invariance: the same global batches, noise and timesteps; the gradient all-reduce sums the
    # ranks' means in another order than one process's mean, so weights agree to rounding, not to the bit.
    many, one = _final(run), _final(one_process)
    assert many["world"] == world and one["world"] == 1
    for name, w in one["model"].items():
        torch.testing.assert_close(many["model"][name], w, rtol=0, atol=5e-4)
    losses = [[m["loss"] for m in map(json.loads, (r / "train" / "metrics.jsonl").read_text().splitlines())]
              for r in (run, one_process)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)


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
