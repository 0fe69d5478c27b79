"""`repro demo` end to end on two small studies (two steps each, seconds per run) through the local launcher:
both reports written, and a second run queues nothing and trains nothing."""

import json
from pathlib import Path

import pytest

from repro.cli import main
from repro.report.plots import FIGURES

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def small_study(folder: Path, base: str, steps: list[str], classifier: Path) -> Path:
    """A tiny study cut to `steps`, trained for 6 steps and sampled 8 times (same models and switches)."""
    import yaml

    data = yaml.safe_load((ROOT / "experiments/tiny" / f"{base}.yaml").read_text())
    data["paper"]["file"] = str(ROOT / "experiments/paper" / Path(data["paper"]["file"]).name)
    data["study"] = f"small_{base}"
    data["steps"] = [s for s in data["steps"] if s["name"] in steps]
    data["defaults"]["train"].update(steps=6, global_batch=8, ckpt_every=1000, log_every=3)
    data["defaults"]["sample"].update(num_samples=8, per_proc_batch=8, steps="5")
    data["evaluate"]["classifier"] = str(classifier)
    data["bench"] = {"batch": 4, "warmup": 1, "iters": 2, "repeats": 1}
    path = folder / f"small_{base}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.slow  # about 3 minutes on 2 cores; the default run must stay under 15 (-m slow runs it)
@pytest.mark.skipif(not FASHION.exists(), reason="Debian package dataset-fashion-mnist is not installed")
def test_demo_runs_both_studies_reports_them_and_a_second_run_trains_nothing(tmp_path, classifier, stats_cache,
                                                                              capsys):
    studies = [small_study(tmp_path, "dic_roadmap", ["isotropic", "dit"], classifier),
               small_study(tmp_path, "dico_ablation", ["dit_iso", "dico_iso"], classifier)]
    root = tmp_path / "results"
    root.mkdir()
    stats_cache.mkdir(parents=True, exist_ok=True)
    (root / ".cache").symlink_to(stats_cache, target_is_directory=True)
    args = ["demo", "--studies", *map(str, studies), "--results", str(root), "--reports", str(tmp_path / "reports"),
            "--poll", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    # 2 runs x (train, sample, evaluate), and one bench job per study timing both runs
    assert "small_dic_roadmap: queued 7 jobs; 8/8 stages done" in out, out
    assert "small_dico_ablation: queued 7 jobs; 8/8 stages done" in out, out
    for name in ("small_dic_roadmap", "small_dico_ablation"):
        # each bench waited for the other chain's stages, then timed alone (the wait is hours: never reached)
        bench = json.loads((root / "bench" / f"{name}.json").read_text())
        assert len(bench["runs"]) == 2 and bench["alone"]["alone"] is True, bench["alone"]
    for name in ("small_dic_roadmap", "small_dico_ablation"):
        report = tmp_path / "reports" / name
        assert (report / "index.html").is_file() and (report / "table.csv").is_file()
        assert len(list((report / "figures").glob("*.png"))) == len(FIGURES)
    metrics = sorted(root.glob("runs/*/train/metrics.jsonl"))
    assert len(metrics) == 4
    before = {p: p.read_text() for p in metrics}
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "small_dic_roadmap: queued 0 jobs; 8/8 stages done" in out, out
    assert {p: p.read_text() for p in metrics} == before  # no training the second time
    for state in root.glob("runs/*/state.json"):
        history = json.loads(state.read_text())["stages"]["train"]["history"]
        assert [e["state"] for e in history].count("running") == 1


def test_seeds_extend_each_study_and_keep_seed_0_as_the_same_run(tmp_path):
    from repro.demo import STUDIES, seeded_study
    from repro.plan import expand, load_study

    for study in STUDIES:
        plain = expand(load_study(ROOT / study))
        path = seeded_study(ROOT / study, 3, tmp_path)
        assert path.parent == tmp_path / "demo"
        seeded = expand(load_study(path))
        assert seeded.study.study.study == plain.study.study.study + "_3seeds"
        assert len(seeded.runs) == 3 * len(plain.runs)
        by_seed = {s: [r for r in seeded.runs if r.seed == s] for s in (0, 1, 2)}
        assert [r.id for r in by_seed[0]] == [r.id for r in plain.runs]  # seed 0 trains once, shared
        assert len({r.id for r in seeded.runs}) == len(seeded.runs)
        assert seeded.study.paper_path == plain.study.paper_path  # same paper table, so the same report rows
        before = path.stat().st_mtime_ns
        assert seeded_study(ROOT / study, 3, tmp_path) == path and path.stat().st_mtime_ns == before
