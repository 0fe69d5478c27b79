"""Studies and the planner: stable, deduplicated run ids; cumulative steps; strict, one-line errors."""

import json
from pathlib import Path

import pytest
import yaml

from repro.cli import main
from repro.config import EVALUATOR_VERSION
from repro.errors import ConfigError
from repro.plan import expand
from repro.study import load_study

ROADMAP = Path(__file__).parent.parent / "experiments" / "dic_roadmap.yaml"


def _plan_json(capsys, study, results):
    assert main(["plan", str(study), "--json", "--results", str(results)]) == 0
    return json.loads(capsys.readouterr().out)


def test_roadmap_plans_nine_distinct_cumulative_runs(capsys, tmp_path):
    data = _plan_json(capsys, ROADMAP, tmp_path)
    runs = data["runs"]
    assert len(runs) == 9 and len({r["id"] for r in runs}) == 9
    assert all(r["status"] == "new" for r in runs)
    changed = []
    for a, b in zip(runs[:8], runs[1:8], strict=False):
        oa, ob = a["config"]["model"]["overrides"], b["config"]["model"]["overrides"]
        changed.append(sorted(k for k in set(oa) | set(ob) if oa.get(k) != ob.get(k)))
    assert changed == [["arch", "depths"], ["arch", "depths", "skip_stride"], ["depths", "skip_stride"],
                       ["cond_embed"], ["inject"], ["gate"], ["act"]]
    assert runs[7]["switches"] == {}  # the last step is DiC-XL itself
    assert [s["name"] for s in runs[0]["stages"]][:3] == ["train", "sample:ddpm250-cfg1.5-g3-uniform-n50000-seed0",
                                                          "evaluate:ddpm250-cfg1.5-g3-uniform-n50000-seed0"]
    assert runs[0]["gpu_hours"] == pytest.approx(200_000 * 1.0 * 8 / 3600)


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False) if not isinstance(data, str) else data)
    return path


def _other_study(tmp_path, **train):
    roadmap = yaml.safe_load(ROADMAP.read_text())
    defaults = {**roadmap["defaults"], "train": {**roadmap["defaults"]["train"], **train}}
    return _write(tmp_path, "other.yaml", {"study": "other", "defaults": defaults, "steps": [
        {"name": "baseline", "label": "DiT-XL/2", "config": {"model": {"name": "DiT-XL/2"}}},
        {"name": "dic", "config": {"model": {"name": "DiC-XL"}}}]})


def test_same_run_in_two_studies_is_one_run(tmp_path):
    roadmap = {r.step: r.id for r in expand(load_study(ROADMAP)).runs}
    other = {r.step: r.id for r in expand(load_study(_other_study(tmp_path))).runs}
    assert other["baseline"] == roadmap["dit_xl2"]
    assert other["dic"] == roadmap["gelu"]  # DiC-XL named directly == the roadmap's last step
    # changing what only logging and checkpoints touch keeps the ids; the learning rate changes them
    same = {r.step: r.id for r in expand(load_study(_other_study(tmp_path, log_every=7, ckpt_every=1000))).runs}
    assert same == other
    lr = {r.step: r.id for r in expand(load_study(_other_study(tmp_path, lr=2e-4))).runs}
    assert lr["baseline"] != other["baseline"] and lr["dic"] != other["dic"]


def test_ids_are_stable_and_resources_do_not_change_them(tmp_path):
    first = [r.id for r in expand(load_study(ROADMAP)).runs]
    assert [r.id for r in expand(load_study(ROADMAP)).runs] == first
    data = yaml.safe_load(ROADMAP.read_text())
    data["resources"] = {"nodes": 4, "gpus_per_node": 4, "partition": "gpu", "time": "12:00:00"}
    data["paper"]["file"] = str(ROADMAP.parent / "paper" / "dic.yaml")
    moved = _write(tmp_path, "roadmap.yaml", data)
    assert [r.id for r in expand(load_study(moved)).runs] == first


def test_grid_seeds_and_extends_file(tmp_path):
    _other_study(tmp_path)
    child = _write(tmp_path, "child.yaml", {"extends": "other.yaml", "study": "child", "grid": {"seeds": [0, 1, 2]},
                                            "defaults": {"train": {"steps": 100}}})
    plan = expand(load_study(child))
    assert len(plan.runs) == 6 and {r.seed for r in plan.runs} == {0, 1, 2}
    assert all(r.config.train.steps == 100 and r.config.train.global_batch == 256 for r in plan.runs)


def test_plan_remembers_the_study_for_status(capsys, tmp_path):
    _plan_json(capsys, ROADMAP, tmp_path)
    assert main(["status", "--json", "--results", str(tmp_path)]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["study"] == "dic_roadmap" and len(status["runs"]) == 9


BASE = "study: s\nsteps:\n  - name: a\n    config: {model: {name: DiC-S}}\n"
MALFORMED = [
    ("unknown top key", BASE + "stepz: []\n", "x.yaml:5: stepz: unknown key (did you mean steps?)"),
    ("unknown config key", "study: s\nsteps:\n  - name: a\n    config: {trian: {}}\n",
     "x.yaml:4: steps.0.config.trian"),
    ("wrong type", "study: s\ndefaults:\n  train: {lr: fast}\nsteps:\n  - name: a\n", "x.yaml:3: defaults.train.lr"),
    ("bad enum", "study: s\ndefaults:\n  sample: {labels: random}\nsteps: [{name: a}]\n", "defaults.sample.labels"),
    ("missing steps", "study: s\n", "missing required key steps"),
    ("missing study", "steps: [{name: a}]\n", "missing required key study"),
    ("missing step name", "study: s\nsteps:\n  - label: x\n", "x.yaml:3: steps.0: missing required key"),
    ("unknown model", "study: s\nsteps:\n  - name: a\n    config: {model: {name: DiC-XXL}}\n",
     "unknown model 'DiC-XXL'"),
    ("bad switch", "study: s\nsteps:\n  - name: a\n    config: {model: {name: DiC-S, overrides: {act: relu}}}\n",
     "x.yaml:4: steps.0.config.model: act='relu'"),
    ("extends unknown step", BASE + "  - name: b\n    extends: c\n",
     "x.yaml:6: steps.1.extends: 'c' is not an earlier step"),
    ("duplicate step", BASE + "  - name: a\n", "x.yaml:5: steps.1.name: step name 'a' is used twice"),
    ("same run twice", BASE + "  - name: b\n    config: {model: {name: DiC-S}}\n", "are the same run"),
    ("bad stage", BASE + "stages: [train, deploy]\n", "x.yaml:5: stages.1: 'deploy' is not one of"),
    ("bad resources", BASE + "resources: {gpus: 8}\n", "resources.gpus: unknown key (did you mean gpus_per_node?)"),
    ("yaml syntax", "study: [s\n", "not valid YAML"),
    ("tab indentation", "study: s\nsteps:\n\t- name: a\n", "not valid YAML"),
    ("empty file", "", "missing required key"),
    ("not a mapping", "- 1\n- 2\n", "expected a mapping"),
    ("extends missing file", "extends: nope.yaml\n" + BASE, "extends: file not found"),
    ("bad seeds", BASE + "grid: {seeds: [0, x]}\n", "grid.seeds.1: expected an integer"),
    ("bad name", "study: 'a b'\nsteps: [{name: a}]\n", "x.yaml:1: study: use letters"),
    ("duplicate key", BASE + "study: t\n", "x.yaml:5: study: duplicate key"),
    ("duplicate nested key", "study: s\ndefaults:\n  train: {lr: 1.0e-4, lr: 2.0e-4}\nsteps: [{name: a}]\n",
     "x.yaml:3: defaults.train.lr: duplicate key"),
    ("negative steps", "study: s\ndefaults:\n  train: {steps: -1}\nsteps: [{name: a}]\n", "train.steps: must be >= 1"),
    ("config not a mapping", "study: s\nsteps:\n  - name: a\n    config: [1]\n", "steps.0.config: expected a mapping"),
    ("paper not a mapping", BASE + "paper: dic.yaml\n", "x.yaml:5: paper: expected a mapping"),
    ("unsafe tag", "study: !!python/object/apply:os.system [ls]\nsteps: [{name: a}]\n", "not valid YAML"),
    ("bad cost", BASE + "cost: {step_seconds: slow}\n", "cost.step_seconds: expected a number"),
    ("bad samples", BASE + "samples: [{cfg_scale: 0.5}]\n", "cfg_scale"),
    ("samples unknown key", BASE + "samples: [{cfg: 1.5}]\n", "x.yaml:5: samples.0.cfg: unknown key"),
    ("paper file missing", BASE + "paper: {file: nope.yaml, table: t}\n", "x.yaml:5: paper.file: file not found"),
]


def test_paper_rows_are_checked(tmp_path, capsys):
    paper = ROADMAP.parent / "paper" / "dic.yaml"
    bad_table = BASE + f"paper: {{file: {paper}, table: roadmapp}}\n"
    bad_row = ("study: s\nsteps:\n  - name: a\n    row: step9\n    config: {model: {name: DiC-S}}\n"
               f"paper: {{file: {paper}, table: roadmap}}\n")
    for text, needle in ((bad_table, "no table 'roadmapp'"), (bad_row, "x.yaml:4: steps.0.row: no row 'step9'")):
        study = _write(tmp_path, "x.yaml", text)
        assert main(["plan", str(study), "--results", str(tmp_path / "r")]) == 2
        assert needle in capsys.readouterr().err


@pytest.mark.parametrize("text,needle", [(t, n) for _, t, n in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_studies_give_one_line_errors_and_write_nothing(tmp_path, capsys, text, needle):
    study = _write(tmp_path, "x.yaml", text)
    results = tmp_path / "results"
    assert main(["plan", str(study), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not results.exists()


def test_extends_cycle(tmp_path):
    _write(tmp_path, "a.yaml", "extends: b.yaml\n" + BASE)
    _write(tmp_path, "b.yaml", "extends: a.yaml\n" + BASE)
    with pytest.raises(ConfigError, match="extends cycle"):
        load_study(tmp_path / "a.yaml")


def test_non_utf8_file(tmp_path, capsys):
    (tmp_path / "x.yaml").write_bytes(b"study: \xff\xfe\n")
    assert main(["plan", str(tmp_path / "x.yaml"), "--results", str(tmp_path / "r")]) == 2
    assert "x.yaml:1: not UTF-8 text (byte 0xff)" in capsys.readouterr().err


STUDIES = sorted(str(p.relative_to(ROADMAP.parent)) for p in ROADMAP.parent.rglob("*.yaml")
                 if "paper" not in p.parts)


@pytest.mark.parametrize("name", STUDIES)
def test_every_study_file_plans(name):
    plan = expand(load_study(ROADMAP.parent / name))
    # rows with no paper row in the study's paper file (DiC's 400K table rows sit in paper/dic.yaml)
    unlinked = ("dit_s2", "dit_b2", "dic_h", "uvit_xl", "pixart_xl2", "diffit_xl2", "dit_llama_xl2")
    assert plan.runs and all(r.rows or r.step in unlinked for r in plan.runs)


def test_shared_baseline_across_paper_scale_studies():
    ids = {}
    for name in ("dic_main.yaml", "dico_main.yaml", "throughput.yaml"):
        ids[name] = {r.step: r.id for r in expand(load_study(ROADMAP.parent / name)).runs}["dit_xl2"]
    assert len(set(ids.values())) == 1, ids


def test_tiny_roadmap_runs_train(tmp_path):
    import dataclasses

    from repro.train import train

    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
        pytest.skip("dataset-fashion-mnist is not installed")
    loaded = load_study(ROADMAP.parent / "tiny" / "dic_roadmap.yaml")
    for step in ("isotropic", "unet", "gelu"):
        cfg = loaded.configs[step]
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=2, ckpt_every=2, log_every=1))
        assert train(cfg, tmp_path / step, progress=False)["step"] == 2


def test_changing_one_steps_learning_rate_changes_one_id(tmp_path):
    data = yaml.safe_load(ROADMAP.read_text())
    data["paper"]["file"] = str(ROADMAP.parent / "paper" / "dic.yaml")
    data["steps"][4]["config"] = {**data["steps"][4]["config"], "train": {"lr": 2.0e-4}}
    before = [r.id for r in expand(load_study(ROADMAP)).runs]
    after = [r.id for r in expand(load_study(_write(tmp_path, "lr.yaml", data))).runs]
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert changed == [4, 5, 6, 7]  # the step itself, and the steps that extend it inherit its learning rate
    data["steps"][4]["config"].pop("train")
    data["steps"][8]["config"] = {**data["steps"][8]["config"], "train": {"lr": 2.0e-4}}  # DiT-XL/2, standalone
    after = [r.id for r in expand(load_study(_write(tmp_path, "lr.yaml", data))).runs]
    assert [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b] == [8]


def test_extends_cycle_through_the_cli(tmp_path, capsys):
    _write(tmp_path, "a.yaml", "extends: b.yaml\n" + BASE)
    _write(tmp_path, "b.yaml", "extends: a.yaml\n" + BASE)
    assert main(["plan", str(tmp_path / "a.yaml"), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "extends cycle" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_status_reads_the_run_folders(tmp_path, capsys):
    from repro import rundir

    plan = expand(load_study(ROADMAP))
    run = plan.runs[0]
    paths = rundir.RunPaths(tmp_path / "runs" / run.id)
    rundir.save_atomic({"step": 50_000}, paths.checkpoint(50_000))
    rundir.append_line(paths.metrics, json.dumps({"step": 50_100, "loss": 0.25, "steps_per_s": 2.0}))
    done = plan.runs[1]
    done_paths = rundir.RunPaths(tmp_path / "runs" / done.id)
    rundir.save_atomic({"step": 200_000}, done_paths.checkpoint(200_000))
    pid = "ddpm250-cfg1.5-g3-uniform-n50000-seed0"
    done_paths.samples.mkdir(parents=True)
    (done_paths.samples / f"{pid}.json").write_text("{}")
    assert main(["status", str(ROADMAP), "--json", "--results", str(tmp_path)]) == 0
    runs = {r["id"]: r for r in json.loads(capsys.readouterr().out)["runs"]}
    train = runs[run.id]["stages"][0]
    assert runs[run.id]["status"] == "partial" and train["state"] == "partial"
    assert train["step"] == 50_100 and train["total"] == 200_000 and train["loss"] == 0.25
    assert train["eta_s"] == pytest.approx((200_000 - 50_100) / 2.0)
    stages = {s["name"]: s["state"] for s in runs[done.id]["stages"]}
    assert stages["train"] == "done" and stages[f"sample:{pid}"] == "done" and stages[f"evaluate:{pid}"] == "new"
    assert all(runs[r.id]["status"] == "new" for r in plan.runs[2:])
    # an eval file under the study's evaluation protocol (extractor, mode, reference) makes the stage done
    eval_file = done_paths.eval_file(pid, "inception_tf-VIRTUAL_imagenet256_labeled")
    eval_file.parent.mkdir(parents=True)
    # written by an older evaluator (sFID flattened channel-first): the stage is to run again
    eval_file.write_text('{"protocol": {}}')
    assert main(["status", str(ROADMAP), "--json", "--results", str(tmp_path)]) == 0
    runs = {r["id"]: r for r in json.loads(capsys.readouterr().out)["runs"]}
    assert {s["name"]: s["state"] for s in runs[done.id]["stages"]}[f"evaluate:{pid}"] == "new"
    # a current record without its numbers is damaged (issue 16), not done: a whole one is done
    eval_file.write_text(json.dumps({"protocol": {"evaluator_version": EVALUATOR_VERSION}}))
    assert main(["status", str(ROADMAP), "--json", "--results", str(tmp_path)]) == 0
    runs = {r["id"]: r for r in json.loads(capsys.readouterr().out)["runs"]}
    assert {s["name"]: s["state"] for s in runs[done.id]["stages"]}[f"evaluate:{pid}"] == "damaged"
    eval_file.write_text(json.dumps({"metrics": {"fid": 2.0}, "labels": {}, "unavailable": {},
                                     "protocol": {"evaluator_version": EVALUATOR_VERSION},
                                     "paper_protocol": {"comparable": True, "differences": []}}))
    assert main(["status", str(ROADMAP), "--json", "--results", str(tmp_path)]) == 0
    runs = {r["id"]: r for r in json.loads(capsys.readouterr().out)["runs"]}
    assert {s["name"]: s["state"] for s in runs[done.id]["stages"]}[f"evaluate:{pid}"] == "done"


def test_model_checks_cache_gives_the_same_plan_without_importing_torch(tmp_path):
    import subprocess
    import sys

    root = tmp_path / "results"
    cmd = [sys.executable, "-c",
           "import sys, io, contextlib\n"
           "from repro.cli import main\n"
           "out = io.StringIO()\n"
           "with contextlib.redirect_stdout(out): code = main(sys.argv[1:])\n"
           "print(code, 'repro.models' in sys.modules, 'torch' in sys.modules)\n"
           "print(out.getvalue())",
           "plan", "experiments/dic_roadmap.yaml", "--json", "--results", str(root)]
    first = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    second = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert first.splitlines()[0] == "0 True True"    # a cold cache builds the models on the meta device
    assert second.splitlines()[0] == "0 False False"  # a warm one needs neither the registry nor torch
    in_process = expand(load_study("experiments/dic_roadmap.yaml"))
    plan = json.loads("\n".join(second.splitlines()[1:]))
    assert [r["id"] for r in plan["runs"]] == [r.id for r in in_process.runs]
    assert plan == json.loads("\n".join(first.splitlines()[1:]))

    cache = root / ".cache" / "model-checks.json"
    data = json.loads(cache.read_text())
    data["fingerprint"] = "stale"  # another version of repro/models: nothing cached may be trusted
    cache.write_text(json.dumps(data))
    assert subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[0] == "0 True True"
    cache.write_text("{not json")  # a damaged cache is only a slower plan
    assert subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[0] == "0 True True"


def test_a_bad_switch_fails_with_a_warm_cache(tmp_path, capsys):
    root = tmp_path / "results"
    assert main(["plan", "experiments/tiny/dic_roadmap.yaml", "--results", str(root)]) == 0
    study = yaml.safe_load(Path("experiments/tiny/dic_roadmap.yaml").read_text())
    study["steps"][1]["config"] = {"model": {"overrides": {"act": "swish"}}}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(study, sort_keys=False))
    before = (root / ".cache" / "model-checks.json").read_text()
    capsys.readouterr()
    assert main(["plan", str(bad), "--results", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "steps.1.config.model" in err and "swish" in err
    assert (root / ".cache" / "model-checks.json").read_text() == before  # an invalid study writes nothing
