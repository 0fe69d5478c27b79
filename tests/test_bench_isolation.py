"""Throughput measured side by side and alone: a study's bench is one job that times all its runs interleaved
(ratios from one measurement; re-benching one run times all again), waits on this machine until no other stage
of the results folder runs here, asks SLURM for a node of its own, records the contention each row was timed under,
and the report marks what is unreliable. Tiny models (DiT-S/2 at width 32, 16 px) keep it to seconds."""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from repro import models, rundir
from repro.cli import main
from repro.launch import decide, read_state, running_here, submit, wait_alone
from repro.metrics.throughput import (MAX_OTHERS_CPU_SHARE, BenchSettings, kernel_note, measure,
                                     ratio_reliability, repeat_ratio)
from repro.plan import expand, load_study
from repro.results import collect

ROOT = Path(__file__).resolve().parents[1]


def bench_study(folder: Path, wait_s: float = 600, stages: str = "[bench]") -> Path:
    """Two tiny DiT steps, two seeds each: four runs, two architectures."""
    tiny = "{hidden_size: 32, depth: %d, num_heads: 2}"
    path = folder / f"bench_{stages.strip('[]').replace(', ', '_')}.yaml"
    path.write_text(f"""study: bench_isolation
defaults:
  data: {{kind: fashion_mnist, resolution: 16}}
  train: {{steps: 10, global_batch: 8}}
steps:
  - {{name: dit, label: DiT-S/2 tiny, config: {{model: {{name: DiT-S/2, overrides: {tiny % 1}}}}}}}
  - {{name: deeper, label: deeper, config: {{model: {{name: DiT-S/2, overrides: {tiny % 2}}}}}}}
grid: {{seeds: [0, 1]}}
stages: {stages}
bench: {{batch: 4, warmup: 1, iters: 2, repeats: 2, alone_wait_s: {wait_s}}}
resources: {{nodes: 1, gpus_per_node: 0, cpus_per_task: 1, mem_gb: 2, time: "00:10:00"}}
""")
    return path


@pytest.fixture(autouse=True)
def _one_thread_no_pdb(monkeypatch):
    # submitit's debug executor opens pdb on an exception; under pytest that reads stdin
    monkeypatch.setattr("pdb.post_mortem", lambda *a, **k: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: one thread keeps the tiny timings short
    yield
    torch.set_num_threads(threads)


def _record(root: Path, plan) -> dict:
    return json.loads(rundir.bench_record(root, plan.study.study.study).read_text())


def test_one_job_times_every_run_and_rebenching_one_run_times_all_again(tmp_path):
    plan = expand(load_study(bench_study(tmp_path)))
    root = tmp_path / "results"
    ids = {r.id for r in plan.runs}
    jobs = submit(plan, root, "debug").jobs
    assert len(jobs) == 1 and jobs[0]["stage"] == "bench" and set(jobs[0]["runs"]) == ids  # one job for the study
    record = _record(root, plan)
    assert set(record["runs"]) == ids and len(record["measurement_id"]) == 32
    states = {rid: read_state(root, rid)["stages"]["bench"] for rid in ids}
    assert {s["state"] for s in states.values()} == {"done"} and len({s["job_id"] for s in states.values()}) == 1
    assert all(s["study"] == "bench_isolation" and s["pid"] == os.getpid() for s in states.values())
    rows = record["runs"]
    base = rows[record["baseline"]]
    assert base["step"] == "dit" and base["ratio_to_baseline"] == 1.0
    for row in rows.values():
        per_repeat = [a / b for a, b in zip(row["img_per_s_repeats"], base["img_per_s_repeats"], strict=True)]
        assert row["ratio_to_baseline"] == pytest.approx(statistics.median(per_repeat))  # repeat by repeat
        assert row["repeats"] == 2 and row["params"] > 0 and row["gmacs"] > 0
        assert row["ratio_reliable"] == (not row["ratio_reasons"]) and row["ratio_spread"] >= 0
        for key in ("spread", "others_cpu_share", "others_cpu_share_repeats", "reliable", "reasons"):
            assert key in row, key
        twin = rows[row["timed_as"]]  # seeds share an architecture: timed once, the same figure
        assert twin["img_per_s_repeats"] == row["img_per_s_repeats"] and twin["step"] == row["step"]
    assert len({r["timed_as"] for r in rows.values()}) == 2
    p = record["protocol"]
    assert p["batch"] == 4 and p["channels_last"] is False and p["flags"]["profile"] == "strict_fp32"
    assert p["reliability_rule"]["max_others_cpu_share"] == MAX_OTHERS_CPU_SHARE and p["environment"]["host"]
    assert len(record["load"]["before"]) == 3 and record["alone"]["checked"] is True
    # the report's columns come from the record, one measurement for every row
    df = collect(plan, root)
    assert set(df["bench_measurement"]) == {record["measurement_id"]}
    assert list(df["img_per_s"]) == [rows[r.id]["img_per_s"] for r in plan.runs]
    assert list(df["bench_ratio"]) == [rows[r.id]["ratio_to_baseline"] for r in plan.runs]
    assert set(df["bench_baseline"]) == {"DiT-S/2 tiny"} and df["bench_reliable"].map(type).eq(bool).all()
    # done: a second submit queues nothing
    assert submit(plan, root, "debug").jobs == []
    # one run's bench is due again (as for a step added to the study): every run is timed again, in one new job
    again = plan.runs[1].id
    del record["runs"][again]
    rundir.atomic_write_text(rundir.bench_record(root, "bench_isolation"), json.dumps(record))
    decisions = {d.run.id: d for d in decide(plan, root, "debug")}
    assert {d.action for d in decisions.values()} == {"submit"}
    assert decisions[plan.runs[0].id].detail == "timed again beside the study's other runs"
    submit(plan, root, "debug")
    new = _record(root, plan)
    assert set(new["runs"]) == ids and new["measurement_id"] != record["measurement_id"]
    assert all(new["runs"][r]["img_per_s_repeats"] != record["runs"][r]["img_per_s_repeats"] for r in record["runs"])
    for rid in ids:
        history = [e["state"] for e in read_state(root, rid)["stages"]["bench"]["history"]]
        assert history == ["submitted", "running", "done"] * 2, history


def _two_tiny_dits() -> dict:
    built = {}
    for depth in (1, 2):
        torch.manual_seed(0)
        built[f"depth{depth}"] = models.build("DiT-S/2", input_size=16, in_channels=1, num_classes=10, hidden_size=32,
                                              depth=depth, num_heads=2)
    return built


def test_a_cpu_hog_beside_the_bench_marks_every_row_unreliable():
    built = _two_tiny_dits()
    settings = BenchSettings(batch=4, resolution=16, warmup=1, iters=4, repeats=2, channels_last=True)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # past the interpreter's start: spinning
        result = measure(built, settings)
    finally:
        hog.kill()
        hog.wait()
    assert result["reliable"] is False and len(result["load"]["before"]) == 3 and len(result["load"]["after"]) == 3
    assert result["protocol"]["channels_last"] is True and result["protocol"]["flags"]["profile"] == "strict_fp32"
    for row in result["results"]:
        assert row["others_cpu_share"] > MAX_OTHERS_CPU_SHARE and not row["reliable"], row
        assert any(r.startswith("other processes used") for r in row["reasons"]), row["reasons"]
        assert len(row["others_cpu_share_repeats"]) == 2 and row["spread"] >= 0
        assert any(r.startswith(f"{row['model']}: other processes used") for r in result["reasons"])


def test_on_a_cpu_the_models_take_turns_forward_by_forward_on_the_threads_asked_for():
    calls, threads = [], []
    built = _two_tiny_dits()
    for name, model in built.items():
        model.register_forward_hook(
            lambda m, i, o, name=name: (calls.append(name), threads.append(torch.get_num_threads())))
    before = torch.get_num_threads()
    settings = BenchSettings(batch=2, resolution=16, warmup=1, iters=3, repeats=2, cpu_threads=1)
    result = measure(built, settings)
    assert calls[:2] == ["depth1", "depth2"]  # warm-up, model by model
    assert calls[2:] == ["depth1", "depth2"] * 6  # then 2 repeats x 3 rounds of one forward each
    assert set(threads) == {1} and torch.get_num_threads() == before  # restored afterwards
    assert result["protocol"]["cpu_threads"] == 1 and result["protocol"]["environment"]["threads"] == 1
    assert "forward by forward" in result["protocol"]["statistic"]
    assert all(len(r["img_per_s_repeats"]) == 2 for r in result["results"])
    with pytest.raises(ValueError, match="cpu_threads"):
        BenchSettings(cpu_threads=0)


def test_a_ratio_is_the_median_of_its_repeats_ratios_and_has_its_own_rule():
    # the machine ran 30% slower in repeat 2: the img/s spread, the ratio does not
    ratio, spread = repeat_ratio([200.0, 140.0, 202.0], [100.0, 70.0, 100.0])
    assert ratio == pytest.approx(2.0) and spread == pytest.approx(0.02 / 2.0)
    row = {"reasons": ["its repeats spread 31% ((max - min) / median; limit 10%)"]}
    base = {"reasons": ["other processes used 42% of the machine's CPU during its repeats (limit 10%)"]}
    assert ratio_reliability(row, row, spread) == []  # drift alone: the img/s are unreliable, the ratio is not
    assert ratio_reliability(row, base, spread) == [f"its baseline: {base['reasons'][0]}"]
    assert "ratios spread 50%" in ratio_reliability(row, row, 0.5)[0]


def test_fresh_processes_time_each_repeat_in_a_new_process():
    built = _two_tiny_dits()
    settings = BenchSettings(batch=2, resolution=16, warmup=1, iters=2, repeats=2, cpu_threads=1, fresh_processes=True)
    result = measure(built, settings)
    assert "each repeat in a fresh process" in result["protocol"]["statistic"]
    assert result["protocol"]["fresh_processes"] is True and result["protocol"]["environment"]["threads"] == 1
    for row in result["results"]:
        assert len(row["img_per_s_repeats"]) == 2 and len(row["others_cpu_share_repeats"]) == 2
    assert result["results"][0]["ratio_to_first"] == 1.0


def test_a_study_bench_with_zero_threads_is_a_one_line_error(tmp_path, capsys):
    study = tmp_path / "s.yaml"
    study.write_text(f"extends: {ROOT / 'experiments/tiny/dic_roadmap.yaml'}\nstudy: t\n"
                     "bench: {batch: 64, cpu_threads: 0}\n")
    assert main(["plan", str(study)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cpu_threads" in err and "s.yaml" in err, err


def _fake_stage(root: Path, run: str, stage: str, pid: int, host: str | None = None, **extra) -> None:
    """A state.json entry as a running job leaves it."""
    paths = rundir.RunPaths(root / "runs" / run)
    rundir.record_state(paths, stage, "running", cluster="local", job_id="1", host=host or os.uname().nodename,
                        pid=pid, **extra)


def _wait_for(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_the_local_bench_waits_for_other_stages_on_this_host_then_marks_it_not_alone(tmp_path):
    plan = expand(load_study(bench_study(tmp_path, wait_s=1.5)))
    root = tmp_path / "results"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _fake_stage(root, "other1", "train", sleeper.pid)
        _fake_stage(root, "other2", "bench", sleeper.pid)  # a bench (waiting for the lock) is never "running"
        _fake_stage(root, "other3", "train", sleeper.pid, host="another-node")
        _fake_stage(root, "other4", "train", sleeper.pid, pid_start=1)  # the pid reused by another process
        _fake_stage(root, "other5", "train", os.getpid())  # this process
        assert running_here(root) == [f"other1 train (pid {sleeper.pid})"]
        started = time.monotonic()
        submit(plan, root, "debug")
        assert time.monotonic() - started >= 1.5
    finally:
        sleeper.kill()
        sleeper.wait()
    record = _record(root, plan)
    alone = record["alone"]
    assert alone["alone"] is False and alone["waited_s"] >= 1.5
    assert alone["busy"] == [f"other1 train (pid {sleeper.pid})"]
    assert record["reliable"] is False and record["reasons"][0].startswith("not alone: after waiting")
    for row in record["runs"].values():
        assert not row["reliable"] and any(r.startswith("not alone") for r in row["reasons"])
    assert not collect(plan, root)["bench_reliable"].any()
    # the entry still says running, but its process is gone: nothing to wait for
    assert running_here(root) == []
    started = time.monotonic()
    assert wait_alone(root, 60)["alone"] is True and time.monotonic() - started < 5
    # a stage queued in another live local chain: that chain runs it next, so the machine is not free
    controller = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "submitit.local._local"])
    try:
        _wait_for(lambda: b"submitit.local._local" in Path(f"/proc/{controller.pid}/cmdline").read_bytes())
        rundir.record_state(rundir.RunPaths(root / "runs" / "other7"), "sample:x", "submitted", cluster="local",
                            job_id=str(controller.pid))
        assert running_here(root) == [f"other7 sample:x (queued in local job {controller.pid})"]
    finally:
        controller.kill()
        controller.wait()
    assert running_here(root) == []
    # a stage that ends while the bench waits: it measures then, alone
    short = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    _fake_stage(root, "other6", "sample:x", short.pid)
    waited = wait_alone(root, 60, poll_s=0.2)
    short.wait()
    assert waited["alone"] is True and 0 < waited["waited_s"] < 30 and waited["busy"] == []


def test_the_slurm_bench_job_asks_for_a_node_of_its_own(tmp_path, capsys):
    study = bench_study(tmp_path, stages="[train, bench]")
    code = main(["submit", str(study), "--cluster", "slurm", "--profile", "slurm/profiles/example.yaml", "--dry-run",
                 "--results", str(tmp_path / "results")])
    out = capsys.readouterr().out
    assert code == 0 and out.count("#!/bin/bash") == 5     # 4 runs x train, and one bench for the study
    assert out.count("#SBATCH --exclusive") == 1 and "would queue 5 jobs on slurm" in out
    plan = expand(load_study(study))
    jobs = submit(plan, tmp_path / "results", "slurm", dry_run=True).jobs
    bench = [j for j in jobs if j["stage"] == "bench"]
    assert len(bench) == 1 and "#SBATCH --exclusive" in bench[0]["sbatch"].splitlines()
    assert "#SBATCH --job-name=repro-bench_isolation-bench" in bench[0]["sbatch"]
    assert all("--exclusive" not in j["sbatch"] for j in jobs if j["stage"] != "bench")
    assert not (tmp_path / "results" / "runs").exists()


def test_the_report_marks_an_unreliable_figure_and_plots_it_hatched(tmp_path, monkeypatch):
    from test_report import fixture_bench, fixture_run, fixture_study

    from repro.report import plots

    plan = expand(load_study(fixture_study(tmp_path)))
    root = tmp_path / "results"
    for i, run in enumerate(plan.runs):
        fixture_run(root, run, 40.0 + i)
    hot = next(r for r in plan.runs if r.step == "dico_iso" and r.seed == 1)
    why = "other processes used 42% of the machine's CPU during its repeats (limit 10%)"
    fixture_bench(root, hot, 60.0, reasons=(why,))
    figures = {}
    save = plots._save

    def keep(fig, out, name):
        fig.canvas.draw()
        ax = fig.axes[0]
        figures[name] = {"title": ax.get_title(), "ticks": [t.get_text() for t in ax.get_yticklabels()],
                         "widths": [p.get_width() for p in ax.patches], "hatches": [p.get_hatch() for p in ax.patches],
                         "texts": [t.get_text() for t in ax.texts]}
        return save(fig, out, name)

    monkeypatch.setattr(plots, "_save", keep)
    out = tmp_path / "report"
    assert main(["report", str(plan.study.path), "--results", str(root), "--out", str(out)]) == 0
    table = pd.read_csv(out / "table.csv").set_index(["table", "row"])
    assert not table.loc[("t4", "dico_iso"), "bench_reliable"] and why in table.loc[("t4", "dico_iso"), "bench_note"]
    assert table.loc[("t4", "dit_iso"), "bench_reliable"]
    md = (out / "report.md").read_text()
    other = md.split("### Other metrics")[1]  # img/s is in the second table, with its own unit
    row = next(ln for ln in other.splitlines() if ln.startswith("| t4 | DiCo (iso.) |"))
    assert "(unreliable)" in row and sum("(unreliable)" in ln for ln in md.splitlines() if ln.startswith("|")) == 1
    assert f"- DiCo (iso.): {why}" in md
    html = (out / "index.html").read_text()
    assert "(unreliable)" in html and "42% of the machine" in html
    runs = pd.read_csv(out / "runs.csv")
    assert list(runs.loc[~runs["bench_reliable"], "run_id"].unique()) == [hot.id]
    speed = figures["speedup"]
    assert "unreliable (1)" in speed["title"] and "DiCo (iso.) (unreliable)" in speed["ticks"]
    assert speed["hatches"][speed["ticks"].index("DiCo (iso.) (unreliable)")] == "///"
    record = json.loads(rundir.bench_record(root, plan.study.study.study).read_text())
    steps = {}
    for r in plan.runs:
        if r.id in record["runs"]:
            steps.setdefault(r.label, []).append(record["runs"][r.id]["ratio_to_baseline"])
    ratios = {lab.replace(" (unreliable)", ""): w for lab, w in zip(speed["ticks"], speed["widths"], strict=True)}
    assert ratios == {lab: pytest.approx(sum(v) / len(v)) for lab, v in steps.items()}  # the record's, seeds folded
    assert "img/s unreliable (1)" in figures["frontier"]["title"]
    assert "DiCo (iso.) (img/s unreliable)" in figures["frontier"]["texts"]


def test_a_reference_mixer_beside_other_kernels_is_named_in_the_rows_and_the_note():
    """Each row says which token-mixer kernel ran; a reference kernel beside others gets a note, never silently."""
    from conftest import tiny

    built = {"dit": tiny("DiT-S/2"), "dig": tiny("DiG-S/2")}
    settings = BenchSettings(batch=2, resolution=16, warmup=1, iters=2, repeats=1, cpu_threads=1)
    result = measure(built, settings)
    kernels = {r["model"]: r["kernels"] for r in result["results"]}
    assert kernels == {"dit": [], "dig": ["reference"]}
    assert "dig ran the exact PyTorch reference" in result["kernel_note"]
    assert kernel_note([{"model": "a", "kernels": ["reference"]}, {"model": "b", "kernels": ["reference"]}]) is None
    assert kernel_note([{"model": "a", "kernels": ["reference"]}, {"model": "b", "kernels": ["fla"]}])
    assert kernel_note([{"model": "a", "kernels": []}, {"model": "b", "kernels": ["fla"]}]) is None
