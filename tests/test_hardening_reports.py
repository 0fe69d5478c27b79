"""Issue 16, the readers and the CLI boundary: study text escaped in index.html (in headless Chromium) and drawn as
plain text in the figures, reports written all or nothing, damaged run-folder files named and shown as damaged
without blocking the rest of a study (status, report, submit), a SLURM dry run on a machine without SLURM that
writes nothing, an npz of 0 images, and OSError / YAMLError from user input as one line while our bugs keep
their traceback."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from test_report import CHROMIUM, fixture_run

from repro import rundir
from repro.cli import main
from repro.config import EVALUATOR_VERSION
from repro.launch import decide
from repro.plan import expand, load_study

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")

# each payload, unescaped, changes the page: the test reads the page's DOM after its scripts ran
SCRIPT = "<script>document.body.id='pwned'</script>"
IMG = "\"><img src=x onerror=\"document.body.setAttribute('data-pwned','1')\">"


def small_study(folder: Path, description: str, labels: dict[str, str], name: str = "small") -> Path:
    """Two steps of the tiny DiC roadmap (isotropic DiC and DiT), with the given description and step labels."""
    base = yaml.safe_load((ROOT / "experiments/tiny/dic_roadmap.yaml").read_text())
    steps = [dict(s, label=labels.get(s["name"], s.get("label"))) for s in base["steps"]
             if s["name"] in ("isotropic", "dit")]
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"extends": str(ROOT / "experiments/tiny/dic_roadmap.yaml"), "study": name,
                                    "description": description, "steps": steps}, sort_keys=False))
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("repro: error: ") and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------------- HTML and figures
def reported(tmp_path: Path, description: str, labels: dict[str, str]) -> Path:
    """The report of a small study with this description and these step labels, every run scored."""
    study = small_study(tmp_path, description, labels)
    root = tmp_path / "results"
    for i, run in enumerate(expand(load_study(study)).runs):
        fixture_run(root, run, 50.0 + i)
    out = tmp_path / "report"
    assert main(["report", str(study), "--results", str(root), "--out", str(out)]) == 0
    return out


@pytest.mark.skipif(CHROMIUM is None, reason="Debian package chromium is not installed")
def test_study_text_is_escaped_in_index_html_and_shown_as_text_in_chromium(tmp_path):
    out = reported(tmp_path, f"evil {SCRIPT} {IMG}", {"isotropic": f"iso {SCRIPT}", "dit": f"DiT {IMG}"})
    html = (out / "index.html").read_text()
    assert SCRIPT not in html and "<img src=x" not in html
    assert "&lt;script&gt;document.body.id=" in html  # title, heading and table cells: the text, escaped
    assert SCRIPT in (out / "report.md").read_text()  # Markdown is not HTML: written as the study says
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'u'}",
                           "--virtual-time-budget=3000", "--dump-dom", (out / "index.html").resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    assert "<body" in dom, proc.stderr[-2000:]
    body = dom[dom.index("<body"):dom.index(">", dom.index("<body")) + 1]
    assert "pwned" not in body  # neither the script nor the onerror handler ran
    assert "<img src=\"x\"" not in dom and "<script>document" not in dom  # no element was made of study text
    title = dom[dom.index("<title>") + 7:dom.index("</title>")]
    assert title.startswith("small: evil &lt;script&gt;document.body.id='pwned'&lt;/script&gt;")  # shown literally
    assert dom.count("iso &lt;script&gt;") >= 1 and dom.count("DiT \"&gt;&lt;img src=x onerror=") >= 1


def test_dollar_signs_in_study_text_reach_the_figures_as_plain_text(tmp_path):
    # one `$` pair holding what mathtext cannot parse: before, `repro report` failed with a multi-line error
    out = reported(tmp_path, r"costs $\frac{$ and $5", {"isotropic": r"iso $\undefined$", "dit": "DiT $x^$"})
    for fig in ("roadmap", "fid_vs_step", "frontier", "speedup", "loss"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 1000
    from repro.report import plots

    # every figure function draws its text unparsed (the ticks and legends too, drawn at savefig)
    import matplotlib

    seen = []
    real = plots._save

    def spy(fig, folder, name):
        seen.append((name, matplotlib.rcParams["text.parse_math"]))
        return real(fig, folder, name)

    plots._save = spy
    try:
        frame = pd.DataFrame({"label": ["a $\\frac{$"], "seed": [0], "step": [1], "loss": [1.0], "mse": [1.0]})
        plots.loss(frame, tmp_path)
    finally:
        plots._save = real
    assert seen == [("loss", False)] and matplotlib.rcParams["text.parse_math"] is True  # restored after


def test_a_failing_report_leaves_the_previous_one_and_nothing_half_written(tmp_path, capsys, monkeypatch):
    study = small_study(tmp_path, "fine", {})
    plan = expand(load_study(study))
    root = tmp_path / "results"
    fixture_run(root, plan.runs[0], 50.0)
    out = tmp_path / "reports" / "small"
    assert main(["report", str(study), "--results", str(root), "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")  # a file of the user's in the report folder is left alone
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    fixture_run(root, plan.runs[1], 60.0)  # the next report would differ

    def broken(*args, **kwargs):
        raise ValueError("figure failed")

    from repro.report import plots

    monkeypatch.setattr(plots, "speedup", broken)
    assert main(["report", str(study), "--results", str(root), "--out", str(out)]) == 2
    assert "figure failed" in one_line_error(capsys)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["small"]  # no temp folder left beside it
    fresh = tmp_path / "new" / "deeper" / "report"
    assert main(["report", str(study), "--results", str(root), "--out", str(fresh)]) == 2
    assert not (tmp_path / "new").exists()  # a first report that fails leaves no folder at all
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["report", str(study), "--results", str(root), "--out", str(out)]) == 0
    assert (out / "notes.txt").read_text() == "mine" and "60.00" in (out / "report.md").read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == ["small"]


# ---------------------------------------------------------------------------------------------- damaged files
@pytest.fixture
def damaged(tmp_path):
    """Five runs: a good one, a torn last line of metrics.jsonl, a zeroed state.json, a truncated eval JSON, and an
    eval JSON of the current evaluator version whose numbers are gone (which the files' presence called done)."""
    base = yaml.safe_load((ROOT / "experiments/tiny/dic_roadmap.yaml").read_text())
    path = tmp_path / "five.yaml"
    path.write_text(yaml.safe_dump({"extends": str(ROOT / "experiments/tiny/dic_roadmap.yaml"), "study": "five",
                                    "steps": base["steps"][:5]}, sort_keys=False))
    plan = expand(load_study(path))
    root = tmp_path / "results"
    for i, run in enumerate(plan.runs):
        fixture_run(root, run, 50.0 + i)
    good, torn, state, cut, hollow = plan.runs
    p = {r.step: rundir.RunPaths(root / "runs" / r.id) for r in plan.runs}
    with open(p[torn.step].metrics, "a") as f:
        f.write('{"step": 1000, "loss": 0.0')  # a crash mid-append
    p[state.step].state.write_bytes(b"\0" * 64)
    pid = cut.stages[1].name.split(":", 1)[1]
    ev = p[cut.step].eval_file(pid, cut.evaluation.tag)
    ev.write_text(ev.read_text()[:40])
    ev = p[hollow.step].eval_file(pid, hollow.evaluation.tag)
    ev.write_text(json.dumps({"protocol": {"evaluator_version": EVALUATOR_VERSION}}))
    return path, plan, root, p, pid


def test_status_shows_damaged_runs_names_their_files_and_carries_on(damaged, capsys):
    path, plan, root, p, pid = damaged
    good, torn, state, cut, hollow = plan.runs
    assert main(["status", str(path), "--results", str(root), "--json"]) == 0
    captured = capsys.readouterr()
    runs = {r["step"]: r for r in json.loads(captured.out)["runs"]}
    assert f"repro: warning: {p[torn.step].metrics}:3: torn record skipped" in captured.err
    assert runs[good.step]["status"] != "damaged" and runs[torn.step]["status"] != "damaged"
    train = {s["name"]: s for s in runs[torn.step]["stages"]}["train"]
    assert train["step"] == 1000 and train["loss"] == 0.1  # the last complete record
    assert runs[state.step]["status"] == "damaged"
    assert all(str(p[state.step].state) in s["damaged"] for s in runs[state.step]["stages"])
    for run in (cut, hollow):
        stages = {s["name"]: s for s in runs[run.step]["stages"]}
        assert runs[run.step]["status"] == "damaged" and stages[f"evaluate:{pid}"]["state"] == "damaged"
        assert str(p[run.step].eval_file(pid, run.evaluation.tag)) in stages[f"evaluate:{pid}"]["damaged"]
    assert main(["status", str(path), "--results", str(root)]) == 0  # the table, with one line per damaged file
    out = " ".join(capsys.readouterr().out.split())
    assert out.count("damaged: ") == 3 and str(p[state.step].state) in out


def test_report_shows_damaged_runs_and_the_rest(damaged, capsys):
    path, plan, root, p, pid = damaged
    good, torn, state, cut, hollow = plan.runs
    out = root.parent / "report"
    assert main(["report", str(path), "--results", str(root), "--out", str(out)]) == 0
    assert f"{p[torn.step].metrics}:3: torn record skipped" in capsys.readouterr().err
    runs = pd.read_csv(out / "runs.csv").set_index("step")
    assert runs.loc[good.step, "state"] == "done" and runs.loc[torn.step, "state"] == "done"
    assert runs.loc[torn.step, "steps_trained"] == 1000  # the complete lines count, the torn one is dropped
    assert runs.loc[state.step, "fid"] == pytest.approx(52.0)  # its score is on disk: still shown
    assert str(p[state.step].state) in runs.loc[state.step, "damaged"]
    for run in (cut, hollow):
        assert runs.loc[run.step, "state"] == "damaged" and pd.isna(runs.loc[run.step, "fid"])
        assert str(p[run.step].eval_file(pid, run.evaluation.tag)) in runs.loc[run.step, "damaged"]
    html = (out / "index.html").read_text()
    assert "Damaged run-folder files" in html
    for f in (p[state.step].state, p[cut.step].eval_file(pid, cut.evaluation.tag)):
        assert str(f) in html


def test_submit_redoes_damaged_outputs_and_moves_a_damaged_state_aside(damaged, capsys):
    path, plan, root, p, pid = damaged
    good, torn, state, cut, hollow = plan.runs
    for run in (cut, hollow):  # as a finished job leaves it
        rundir.record_state(p[run.step], f"evaluate:{pid}", "done", cluster="fixture")
    actions = {(d.run.step, d.stage.name): d for d in decide(plan, root, "debug")}
    assert actions[(good.step, f"evaluate:{pid}")].action == "submit"  # fixtures carry no evaluator version
    for run in (cut, hollow):
        d = actions[(run.step, f"evaluate:{pid}")]
        assert d.action == "submit" and str(p[run.step].eval_file(pid, run.evaluation.tag)) in d.damaged
    assert str(p[state.step].state) in actions[(state.step, "train")].damaged
    zeros = p[state.step].state.read_bytes()
    rundir.record_state(p[state.step], "train", "submitted", job_id="7")  # the launcher writes on: never a crash
    aside = list(p[state.step].root.glob("state.json.damaged-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == zeros  # kept, never deleted
    assert rundir.read_state(p[state.step])["stages"]["train"]["job_id"] == "7"
    moved = [ln for ln in capsys.readouterr().err.splitlines() if str(p[state.step].state) in ln]
    assert len(moved) == 1 and aside[0].name in moved[0] and "fresh state.json" in moved[0]


# ---------------------------------------------------------------------------------------------- CLI boundary
def test_slurm_dry_run_previews_without_slurm_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import sys

    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").symlink_to(sys.executable)
    monkeypatch.setenv("PATH", str(bare))  # a laptop: no sbatch, no srun
    root = tmp_path / "results"
    code = main(["submit", "experiments/tiny/dic_roadmap.yaml", "--cluster", "slurm", "--profile",
                 "slurm/profiles/example.yaml", "--dry-run", "--results", str(root)])
    out = capsys.readouterr().out
    assert code == 0 and out.count("#!/bin/bash") == 28 and "srun --unbuffered" in out  # 9 runs x 3 stages + bench
    assert not root.exists()  # not even the model-checks cache


def test_evaluate_an_npz_of_zero_images_names_it(tmp_path, capsys):
    empty = tmp_path / "empty.npz"
    np.savez(empty, arr_0=np.zeros((0, 16, 16, 1), np.uint8))
    assert main(["evaluate", str(empty), "--extractor", "fashion-mnist", "--results", str(tmp_path / "r")]) == 2
    err = one_line_error(capsys)
    assert str(empty) in err and "0 images" in err


def test_os_errors_about_user_files_are_one_line_and_our_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # the results root lies below a file: the folder cannot be made
    assert main(["plan", "experiments/tiny/dic_roadmap.yaml", "--results", str(blocker / "results")]) == 2
    assert str(blocker) in one_line_error(capsys)
    import repro.plan

    for bug in (KeyError("stages"), AttributeError("no attribute"), AssertionError(), OSError(5, "I/O error")):
        def raise_it(*args, bug=bug, **kwargs):
            raise bug

        monkeypatch.setattr(repro.plan, "plan_json", raise_it)
        with pytest.raises(type(bug)):  # not ours to hide: the traceback shows where it came from
            main(["plan", "experiments/tiny/dic_roadmap.yaml", "--results", str(tmp_path / "r")])


def test_a_yaml_error_that_escapes_a_loader_is_one_line(tmp_path, capsys, monkeypatch):
    import repro.plan

    def raise_it(*args, **kwargs):
        return yaml.safe_load("a: [1, 2")

    monkeypatch.setattr(repro.plan, "plan_json", raise_it)
    assert main(["plan", "experiments/tiny/dic_roadmap.yaml", "--results", str(tmp_path / "r")]) == 2
    assert "not valid YAML" in one_line_error(capsys)


@pytest.mark.skipif(not FASHION.exists(), reason="Debian package dataset-fashion-mnist is not installed")
@pytest.mark.parametrize("text", ["", "{{{\n", "run_id: x\n"])
def test_a_damaged_run_folder_config_is_one_line_naming_it(tmp_path, capsys, text):
    run = tmp_path / "run.yaml"
    run.write_text("model: {name: DiT-S/2, overrides: {hidden_size: 32, depth: 2, num_heads: 2}}\n"
                   "data: {kind: fashion_mnist, resolution: 16}\ntrain: {steps: 2, global_batch: 4}\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text(text)
    assert main(["train", str(run), "--out", str(out), "--no-progress"]) == 2
    assert str(out / "config.yaml") in one_line_error(capsys)


def test_an_empty_run_file_is_refused(tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text("# nothing here\n")
    assert main(["train", str(run), "--out", str(tmp_path / "out")]) == 2
    assert str(run) in one_line_error(capsys) and not (tmp_path / "out").exists()
