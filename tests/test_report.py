"""`repro report` from FIXTURE run folders: the files a finished, a failed and an untouched run leave, written by
`fixture_run` below with made-up numbers (labelled fixtures, not results). Checks the regenerated table against
every paper number of the study, the deltas, pending and failed rows, seeds folded into mean and std, the
golden table.csv, and the HTML in headless Chromium."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from repro import rundir
from repro.cli import main
from repro.paper import load_paper
from repro.plan import expand, load_study
from repro.results import PAPER_METRICS, step_changes

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "report_table.csv"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def fixture_study(folder: Path, base: str = "dico_ablation") -> Path:
    """A tiny study (default: the DiCo ablation, rows of Tables 4 and 5) with two seeds per step."""
    path = folder / f"fixture_{base}.yaml"
    path.write_text(f"extends: {ROOT / 'experiments/tiny' / (base + '.yaml')}\nstudy: fixture_{base}\n"
                    f"grid: {{seeds: [0, 1]}}\n")
    return path


def assert_every_paper_number(plan, table: pd.DataFrame) -> int:
    """Every number the paper prints for the study's rows sits in the table under its table and row."""
    paper = load_paper(plan.study.paper_path)
    ours_name = {v: k for k, v in PAPER_METRICS.items()}
    checked = 0
    for run in {r.step: r for r in plan.runs}.values():  # one run per step (seeds share the paper row)
        for ref in run.rows:
            t, _, row = ref.rpartition("/")
            t = t or plan.study.study.paper.table
            got = table[(table["table"] == t) & (table["row"] == row)]
            assert len(got) == 1, (t, row)
            for metric, value in paper.tables[t].rows[row].values.items():
                assert got[f"paper_{ours_name[metric]}"].iloc[0] == pytest.approx(value), (t, row, metric)
                checked += 1
    return checked


def fixture_bench(root: Path, run, img_per_s: float, reasons: tuple[str, ...] = ()) -> None:
    """FIXTURE: the run's row in its study's bench record (<results>/bench/<study>.json); ratios to the first DiT
    row written, as the bench job computes them."""
    path = rundir.bench_record(root, run.study)
    record = json.loads(path.read_text()) if path.exists() else {
        "study": run.study, "measurement_id": "fixture", "baseline": None, "reliable": True, "reasons": [],
        "protocol": {"flags": {"profile": "strict_fp32"}, "environment": {"cpu": "fixture cpu"}}, "runs": {}}
    record["runs"][run.id] = {"step": run.step, "label": run.label, "model": run.model,
                              "params": 1_000_000 + 1000 * len(run.step), "gmacs": 0.25, "winograd_gmacs": None,
                              "img_per_s": img_per_s, "reliable": not reasons, "reasons": list(reasons)}
    if record["baseline"] is None and run.model.startswith("DiT"):
        record["baseline"] = run.id
    base = record["runs"].get(record["baseline"], next(iter(record["runs"].values())))
    for row in record["runs"].values():
        row["ratio_to_baseline"] = row["img_per_s"] / base["img_per_s"]
    record["reliable"] = all(row["reliable"] for row in record["runs"].values())
    rundir.atomic_write_text(path, json.dumps(record))


def fixture_run(root: Path, run, fid: float, state: str = "done") -> None:
    """FIXTURE: the files a run's stages leave (state.json, metrics.jsonl, its row of the study's bench record,
    samples and eval records)."""
    paths = rundir.RunPaths(root / "runs" / run.id)
    pid = run.stages[1].name.split(":", 1)[1]
    rundir.record_state(paths, "train", "done", cluster="fixture")
    if state == "failed":
        rundir.record_state(paths, f"sample:{pid}", "failed", cluster="fixture", error="fixture failure")
        return
    steps = run.config.train.steps
    for step in (steps // 2, steps):
        rundir.append_line(paths.metrics, json.dumps({"step": step, "loss": 0.1, "steps_per_s": 2.0}))
    fixture_bench(root, run, 100.0 + len(run.step))
    record = {"metrics": {"fid": fid, "is": 2.0, "sfid": fid * 2, "precision": 0.5, "recall": 0.4},
              "intervals": {"fid": {"fid": fid, "std": fid / 20, "level": 0.95, "resamples": 200, "n": 1000}},
              "labels": {"fid": "FID-1K (Fashion-MNIST classifier)"}, "unavailable": {},
              "protocol": {"sampler": "ddim", "steps": "50", "cfg_scale": 1.0, "guide_channels": 3,
                           "num_evaluated": 1000, "labels": "uniform", "checkpoint_step": steps,
                           "reference": "fashion-mnist:train", "extractor_label": "Fashion-MNIST classifier"},
              "paper_protocol": {"comparable": False, "differences": [
                  "features from the Fashion-MNIST classifier, not Inception", "1K samples, not 50K"]}}
    rundir.atomic_write_text(paths.eval_file(pid, run.evaluation.tag), json.dumps(record))
    (paths.samples).mkdir(parents=True, exist_ok=True)
    (paths.samples / f"{pid}.json").write_text("{}")


@pytest.fixture
def reported(tmp_path):
    study = fixture_study(tmp_path)
    plan = expand(load_study(study))
    root = tmp_path / "results"
    fids = {}
    for i, run in enumerate(plan.runs):
        if run.step in ("se", "no_cca"):          # untouched: pending
            continue
        if run.step == "dw7" and run.seed == 1:   # one seed failed
            fixture_run(root, run, 0, state="failed")
            continue
        fids[(run.step, run.seed)] = 40.0 + i
        fixture_run(root, run, fids[(run.step, run.seed)])
    out = tmp_path / "report"
    assert main(["report", str(study), "--results", str(root), "--out", str(out)]) == 0
    return plan, out, fids


def test_report_holds_every_paper_number_deltas_and_pending_rows(reported):
    plan, out, fids = reported
    for name in ("index.html", "report.md", "table.csv", "table.tex", "runs.csv"):
        assert (out / name).is_file(), name
    for fig in ("roadmap", "fid_vs_step", "frontier", "speedup", "loss"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 1000 and (out / "figures" / f"{fig}.svg").exists()
    table = pd.read_csv(out / "table.csv")
    paper = load_paper(plan.study.paper_path)
    assert assert_every_paper_number(plan, table) == 91  # 13 rows of Tables 4 and 5, 7 numbers each
    rows = table.set_index(["table", "row"])
    # two seeds folded: mean and std; delta = ours - paper
    dico_iso = rows.loc[("t4", "dico_iso")]
    seeds = [fids[("dico_iso", 0)], fids[("dico_iso", 1)]]
    assert dico_iso["ours_fid"] == pytest.approx(sum(seeds) / 2)
    assert dico_iso["ours_fid_std"] == pytest.approx(pd.Series(seeds).std())
    assert dico_iso["delta_fid"] == pytest.approx(sum(seeds) / 2 - paper.number("t4", "dico_iso", "fid"))
    assert dico_iso["state"] == "done" and not dico_iso["protocol_match"]
    # pending rows: no number (not 0), the state says why
    se = rows.loc[("t5", "se")]
    assert se["state"] == "pending" and pd.isna(se["ours_fid"])
    assert se["paper_fid"] == pytest.approx(paper.number("t5", "se", "fid"))
    dw7 = rows.loc[("t5", "dw7")]
    assert dw7["state"] == "failed" and dw7["ours_fid"] == pytest.approx(fids[("dw7", 0)])  # the seed that ran
    md = (out / "report.md").read_text()
    assert "Spearman" in md and "| t5 | w/o CCA ‡ |" in md and "pending" in md
    # one rank correlation per paper table, and one over the study's steps with each step once
    from scipy.stats import spearmanr

    md = " ".join(md.split())  # the template wraps lines
    done = table.dropna(subset=["ours_fid"])
    for t, n in (("t4", 6), ("t5", 5)):
        part = done[done["table"] == t]
        assert len(part) == n
        rho = spearmanr(part["paper_fid"], part["ours_fid"])[0]
        title = part["table_title"].iloc[0]
        assert f"Spearman ρ = {rho:.3f}" in md and f"over {n} rows ({title})" in md
    steps = done.drop_duplicates("step")
    assert len(steps) == 9  # dico_s and dit_ushape stand in both tables; se, no_cca pending
    rho = spearmanr(steps["paper_fid"], steps["ours_fid"])[0]
    assert f"Spearman ρ = {rho:.3f}" in md and "over 9 rows (every step of the study, once)" in md


def test_roadmap_report_holds_every_paper_number(tmp_path):
    study = fixture_study(tmp_path, "dic_roadmap")
    plan = expand(load_study(study))
    for i, run in enumerate(plan.runs):
        if run.seed == 0:
            fixture_run(tmp_path / "results", run, 70.0 - i)
    out = tmp_path / "report"
    assert main(["report", str(study), "--results", str(tmp_path / "results"), "--out", str(out)]) == 0
    table = pd.read_csv(out / "table.csv")
    assert assert_every_paper_number(plan, table) == 14  # DiC Figure 1: 9 FIDs, GFLOPs of steps 1-3, 8 and DiT
    assert list(table["paper_label"])[-1] == "DiT-XL/2" and table["ours_fid"].notna().all()
    from scipy.stats import spearmanr

    rho = spearmanr(table["paper_fid"], table["ours_fid"])[0]
    assert f"Spearman ρ = {rho:.3f}" in (out / "report.md").read_text()


def test_golden_table_csv(reported):
    plan, out, _ = reported
    text = (out / "table.csv").read_text()
    if os.environ.get("REPRO_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_one_seed_fid_shows_its_sample_set_interval_and_rho_its_interval(reported):
    """A step with one seed: FID [FID - 1.96 SE, FID + 1.96 SE] (SE: the eval record's bootstrap over samples);
    Spearman's rho with its bootstrap interval over rows; the rule stated once under the protocol."""
    plan, out, _ = reported
    table = pd.read_csv(out / "table.csv")
    md = (out / "report.md").read_text()
    row = table[table["ours_fid_std"].isna() & table["ours_fid"].notna()].iloc[0]  # one seed done
    assert row["ours_fid_se"] == pytest.approx(row["ours_fid"] / 20)
    lo, hi = row["ours_fid"] - 1.959964 * row["ours_fid_se"], row["ours_fid"] + 1.959964 * row["ours_fid_se"]
    assert f"[{lo:.2f}, {hi:.2f}]" in md
    assert re.search(r"Spearman ρ = -?[0-9.]+ \[-?[0-9.]+, -?[0-9.]+\] \(95%, bootstrap over rows\)", md)
    assert "the 95% interval of its FID over the sample set" in md


def test_report_of_a_study_never_run_and_a_bad_format(tmp_path, capsys):
    study = fixture_study(tmp_path)
    out = tmp_path / "r"
    assert main(["report", str(study), "--results", str(tmp_path / "none"), "--out", str(out)]) == 0
    table = pd.read_csv(out / "table.csv")
    assert set(table["state"]) == {"pending"} and table["ours_fid"].isna().all()
    assert main(["report", str(study), "--results", str(tmp_path / "none"), "--format", "pdf"]) == 2
    assert "--format: unknown format 'pdf'" in capsys.readouterr().err


def render(html: Path, tmp: Path) -> tuple[Path, str]:
    """Open a page in headless Chromium: a screenshot, and what the page logged to its console."""
    shot = tmp / "shot.png"
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp / 'u'}",
                           "--enable-logging=stderr", "--v=0", "--window-size=1200,1600", f"--screenshot={shot}",
                           html.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    console = "\n".join(ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln)
    return shot, console


@pytest.mark.skipif(CHROMIUM is None, reason="Debian package chromium is not installed")
def test_html_renders_in_headless_chromium_without_console_errors(reported, tmp_path):
    from PIL import Image

    _, out, _ = reported
    shot, console = render(out / "index.html", tmp_path)
    assert console == "", console
    img = Image.open(shot).convert("L")
    lo, hi = img.getextrema()
    levels = np.unique(np.asarray(img.resize((64, 64))))
    assert hi - lo > 100 and len(levels) > 20  # text, tables and figures, not blank
    # the check can fail: a page that logs an error is caught
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><p>x</p><script>console.error('fixture error')</script></body></html>")
    _, console = render(bad, tmp_path / "bad")
    assert "fixture error" in console


def _features(root: Path, run, pool: np.ndarray) -> None:
    """FIXTURE: the sample features evaluator 3 stores beside a run's eval record (reference: N(0, I))."""
    from repro.evaluate import features_file

    pid = run.stages[1].name.split(":", 1)[1]
    path = features_file(rundir.RunPaths(root / "runs" / run.id).eval_file(pid, run.evaluation.tag))
    np.savez(path, pool=pool.astype(np.float32), reference_mu=np.zeros(pool.shape[1]),
             reference_sigma=np.eye(pool.shape[1]))


def test_step_change_is_resolved_only_when_larger_than_its_noise(reported, tmp_path):
    """A step's paired FID change to the step it extends: resolved when the child's samples differ clearly from
    the parent's, not resolved (with an estimate of what would resolve it) when the difference is below the noise."""
    plan, out, _ = reported
    root = tmp_path / "results"
    child = next(s for s in plan.study.study.steps if s.extends and s.name == "relu")
    runs = {(r.step, r.seed): r for r in plan.runs}
    seeds = sorted({r.seed for r in plan.runs if r.step == child.name})

    def write(shift: float, same_noise: bool) -> pd.Series:
        for seed in seeds:
            noise = np.random.default_rng(seed).normal(size=(400, 6))
            _features(root, runs[(child.extends, seed)], noise)
            other = noise if same_noise else np.random.default_rng(seed + 100).normal(size=(400, 6))
            _features(root, runs[(child.name, seed)], other + shift)
        changes = step_changes(plan, root)
        return changes[changes["step"] == child.name].iloc[0]

    far = write(0.3, same_noise=True)
    assert far["resolved"] and far["lo"] > 0 and far["seeds"] == len(seeds) == 2 and far["over"] == "seeds"
    near = write(0.001, same_noise=False)
    assert not near["resolved"] and near["lo"] < 0 < near["hi"] and near["seeds_to_resolve"] > 2
    assert main(["report", str(plan.study.path), "--results", str(root), "--out", str(tmp_path / "again")]) == 0
    md = (tmp_path / "again" / "report.md").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {near['label']} |"))
    assert "not resolved at this budget" in line and f"| {len(seeds)} seeds |" in line
    assert f"~{int(near['seeds_to_resolve']):,} seeds" in line


def test_no_delta_between_protocols_ranks_and_changes_instead(reported):
    """Every fixture row was measured under another protocol than the paper's: no Δ column in either table, ranks
    within each paper table instead; a row whose protocol matched would get its Δ, and only that row."""
    from repro.report import display_rows, other_rows

    plan, out, _ = reported
    md = (out / "report.md").read_text()
    tables = [ln for ln in md.splitlines() if ln.startswith("| table |")]
    assert len(tables) == 2 and not any("Δ" in ln for ln in tables)
    assert tables[0].split(" | ")[3:9] == ["FID paper", "rank", "FID ours", "rank", "change, paper", "change, ours"]
    table = pd.read_csv(out / "table.csv")
    head, rows = display_rows(table)
    t4 = [r for r in rows if r[0] == "t4" and r[6]]
    paper_order = [r[1] for r in sorted(t4, key=lambda r: int(r[4]))]
    ours_order = [r[1] for r in sorted(t4, key=lambda r: int(r[6]))]
    done = table[(table["table"] == "t4") & table["ours_fid"].notna()]
    assert paper_order == list(done.sort_values("paper_fid")["paper_label"])
    assert ours_order == list(done.sort_values("ours_fid")["paper_label"])
    table.loc[0, "protocol_match"] = True
    head, rows = display_rows(table)
    at = head.index("FID Δ")
    assert rows[0][at] == f"{table.loc[0, 'delta_fid']:.2f}" and not any(r[at] for r in rows[1:])
    other_head, other = other_rows(table)
    assert "IS Δ" in other_head and not any(r[other_head.index("IS Δ")] for r in other[1:])
    # our throughput and params are shown where the paper printed none (as in DiC's roadmap figure)
    bare = table.assign(paper_img_per_s=float("nan"), paper_params_m=float("nan"), ours_params_m=1.5)
    other_head, other = other_rows(bare)
    assert {"img/s ours", "Params (M) ours"} <= set(other_head) and other[0][other_head.index("Params (M) ours")]
    other_head, _ = other_rows(bare.assign(ours_params_m=float("nan")))
    assert "Params (M) ours" not in other_head  # neither side has it: no empty column
