"""Issue 16, strict input files: study, run and profile files are refused at load, in one line naming the file (and
its line), when they hold YAML aliases, characters that would inject sbatch lines, unsafe names or absurd numbers;
and a seeded fuzz of the shipped files through the CLI."""

import math
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from repro.cli import main
from repro.config import DataConfig, RunConfig, load_run_config, to_dict
from repro.errors import ConfigError
from repro.launch import load_profile
from repro.plan import expand
from repro.study import load_study
from repro.yamlio import read_yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "experiments" / "tiny" / "dic_roadmap.yaml"
ROADMAP = ROOT / "experiments" / "dic_roadmap.yaml"
PROFILES = sorted((ROOT / "slurm" / "profiles").glob("*.yaml"))

# 9 levels of 9 aliases each (the "billion laughs"): 9^9 = 387M strings once expanded
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True))


def _write(folder: Path, name: str, data) -> Path:
    path = folder / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


def _one_line(err: str, *needles: str) -> None:
    assert err.startswith("repro: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


def _study(tmp_path: Path, name: str = "s.yaml", **changes) -> Path:
    """The tiny roadmap with top-level keys replaced, written beside a copy of the paper file it names."""
    data = yaml.safe_load(TINY.read_text())
    data["paper"]["file"] = str(TINY.parent.parent / "paper" / "dic.yaml")
    data.update(changes)
    return _write(tmp_path, name, data)


# ---------------------------------------------------------------------------------------------- 1. alias bomb
def test_alias_bomb_is_refused_fast_in_every_kind_of_file(tmp_path, capsys):
    assert len(BOMB) < 400
    bomb = _write(tmp_path, "bomb.yaml", BOMB)
    start = time.perf_counter()
    for load in (read_yaml, load_study, load_run_config, load_profile):
        with pytest.raises(ConfigError) as e:
            load(bomb)
        assert str(e.value).startswith(f"{bomb}:1: YAML anchor &a: anchors and aliases are not allowed")
    assert time.perf_counter() - start < 1.0
    alias_only = _write(tmp_path, "alias.yaml", "study: s\nsteps:\n  - *x\n")  # an alias with no anchor: line 3
    with pytest.raises(ConfigError, match=r"alias.yaml:3: YAML alias \*x"):
        read_yaml(alias_only)
    # through the CLI, in a process of its own so that a regression fails this test instead of hanging the suite
    out = subprocess.run([sys.executable, "-m", "repro.cli", "plan", str(bomb), "--results", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2
    _one_line(out.stderr, "bomb.yaml:1: YAML anchor")
    assert not (tmp_path / "r").exists()


def test_deep_nesting_is_one_line(tmp_path):
    deep = _write(tmp_path, "deep.yaml", "study: " + "[" * 100 + "]" * 100 + "\n")
    with pytest.raises(ConfigError, match="deep.yaml:1: nested more than 64 levels"):
        read_yaml(deep)


# ---------------------------------------------------------------------------------------------- 2. sbatch injection
INJECT = "x\n#SBATCH --wrap=touch /tmp/pwned"


@pytest.mark.parametrize("name", ["", "a" * 65, "a" * 5000, "a/b", "../x", "..", "a..b", ".hidden", "a b",
                                  "x\u202egnp.exe", "a\u2066b", INJECT, "a\tb", "é"])
def test_bad_step_names_are_refused_at_load(tmp_path, capsys, name):
    data = yaml.safe_load(TINY.read_text())
    steps = data["steps"]
    study = _study(tmp_path, steps=[{**steps[0], "name": name}])
    assert main(["plan", str(study), "--results", str(tmp_path / "r")]) == 2
    _one_line(capsys.readouterr().err, f"{study}:", "steps.0.name: use letters, digits and")
    assert not (tmp_path / "r").exists()


def test_shipped_step_and_study_names_pass():
    for path in sorted((ROOT / "experiments").rglob("*.yaml")):
        if "paper" not in path.parts:
            assert expand(load_study(path)).runs


@pytest.mark.parametrize("name", ["a" * 5000, "a" * 65, "../x", "a.b", "x\u202e"])
def test_bad_study_names_are_refused(tmp_path, capsys, name):
    study = _study(tmp_path, study=name)
    assert main(["plan", str(study), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    _one_line(err, f"{study}:", ": study: use letters")


@pytest.mark.parametrize("key,value,needle", [
    ("account", INJECT, "resources.account: control or bidi character \\n not allowed"),
    ("partition", "gpu\u202e", "resources.partition: control or bidi character \\u202e"),
    ("constraint", "a\rb", "resources.constraint: control or bidi character \\r"),
    ("qos", "a\x00b", "resources.qos: control or bidi character \\x00"),
    ("time", INJECT, "resources.time: control or bidi character \\n"),
    ("time", "abc", "resources.time: not a SLURM time"),
    ("time", "0", "resources.time: must be between 1 minute and 366 days"),
    ("time", "99999-00", "resources.time: must be between"),
    ("nodes", -1, "resources.nodes: must be >= 1, got -1"),
    ("nodes", 0, "resources.nodes: must be >= 1, got 0"),
    ("gpus_per_node", -8, "resources.gpus_per_node: must be >= 0"),
    ("cpus_per_task", 10**12, "resources.cpus_per_task: must be <= 4096"),
])
def test_resources_are_checked_at_load_with_file_and_line(tmp_path, capsys, key, value, needle):
    resources = yaml.safe_load(TINY.read_text())["resources"]
    study = _study(tmp_path, resources={**resources, key: value})
    assert main(["plan", str(study), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    _one_line(err, needle)
    assert f"{study}:" in err and not (tmp_path / "r").exists()


@pytest.mark.parametrize("key,value,needle", [
    ("account", INJECT, "account: control or bidi character \\n"),
    ("partition", "gpu\n#SBATCH --account=theirs", "partition: control or bidi character \\n"),
    ("qos", "\u2067normal", "qos: control or bidi character \\u2067"),
    ("constraint", "a100\x0b", "constraint: control or bidi character \\x0b"),
    ("setup", ["module load cuda\nrm -rf ~"], "setup.0: control or bidi character \\n"),
    ("additional", {"wrap\nx": "y"}, "additional: not an sbatch option name"),
    ("additional", {"mail type": "y"}, "additional: not an sbatch option name"),
    ("additional", {"comment": INJECT}, "additional.comment: control or bidi character \\n"),
    ("additional", {"exclude": ["a", "b"]}, "additional.exclude: expected a string, a number or true"),
    ("additional", {"exclusive": False}, "additional.exclusive: false is no sbatch value"),
    ("time_min", -1, "time_min: must be >= 0"),
    ("time_min", 10**12, "time_min: must be <= "),
])
def test_profile_strings_that_reach_sbatch_are_checked(tmp_path, capsys, key, value, needle):
    data = yaml.safe_load((ROOT / "slurm" / "profiles" / "example.yaml").read_text())
    profile = _write(tmp_path, "p.yaml", {**data, key: value})
    with pytest.raises(ConfigError) as e:
        load_profile(profile)
    assert str(e.value).startswith(f"{profile}:") and needle in str(e.value) and "\n" not in str(e.value)
    assert main(["submit", str(TINY), "--cluster", "slurm", "--profile", str(profile), "--dry-run",
                 "--results", str(tmp_path / "r")]) == 2
    _one_line(capsys.readouterr().err, needle)


def test_shipped_profiles_still_load():
    assert [load_profile(p).cluster for p in PROFILES] == ["slurm"] * len(PROFILES)


# ---------------------------------------------------------------------------------------------- 3. absurd values
RUN = "model:\n  name: DiC-S\n  overrides: {width: 16, depths: [2, 2, 1, 2, 2]}\n# a tiny DiC\n"


@pytest.mark.parametrize("text,needle", [
    ("train:\n  steps: 100000000000000000000000000000\n", "run.yaml:6: train.steps: must be <= 1_000_000_000"),
    ("train:\n  steps: 1e29\n", "run.yaml:6: train.steps: expected an integer, got '1e29'"),
    ("train:\n  steps: 1.0e+29\n", "run.yaml:6: train.steps: expected an integer"),
    ("train:\n  global_batch: 10000000000000000000000\n", "run.yaml:6: train.global_batch: must be <= 1_048_576"),
    ("train:\n  global_batch: 1.0e+22\n", "run.yaml:6: train.global_batch: expected an integer"),
    ("train:\n  lr: .inf\n", "run.yaml:6: train.lr: must be a finite number"),
    ("train:\n  lr: .nan\n", "run.yaml:6: train.lr: must be a finite number"),
    ("train:\n  lr: 1e400\n", "run.yaml:6: train.lr: must be a finite number"),
    ("train:\n  lr: 5\n", "run.yaml:6: train.lr: must be > 0 and <= 1"),
    ("train:\n  grad_clip: -1\n", "run.yaml:6: train.grad_clip: must be > 0 (or absent"),
    ("train:\n  grad_clip: 0\n", "run.yaml:6: train.grad_clip: must be > 0"),
    ("train:\n  betas: [0.9, 1.5]\n", "run.yaml:6: train.betas: must be <= "),
    ("train:\n  ema_decay: -0.1\n", "run.yaml:6: train.ema_decay: must be >= 0"),
    ("train:\n  weight_decay: -1\n", "run.yaml:6: train.weight_decay: must be >= 0"),
    ("train:\n  seed: -1\n", "run.yaml:6: train.seed: must be >= 0"),
    ("train:\n  warmup_steps: 10000000000\n", "run.yaml:6: train.warmup_steps: must be <= "),
    ("train:\n  num_workers: 100000\n", "run.yaml:6: train.num_workers: must be <= 1024"),
    ("train:\n  lr: 100000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
     "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
     "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
     "000000000000000000000000000000000000000000\n", "run.yaml:6: train.lr: out of range"),
    ("sample:\n  cfg_scale: .nan\n", "run.yaml:6: sample.cfg_scale: must be a finite number"),
    ("sample:\n  num_samples: 100000000000\n", "run.yaml:6: sample.num_samples: must be <= "),
    ("sample:\n  steps: '../../x'\n", "run.yaml:6: sample.steps: expected '250', '25,25,50' or 'ddim50'"),
    ("sample:\n  guide_channels: -3\n", "run.yaml:6: sample.guide_channels: "),
    ("diffusion:\n  diffusion_steps: 100000000\n", "run.yaml:6: diffusion.diffusion_steps: must be <= 100_000"),
    ("diffusion:\n  learn_sigma: false\n", "run.yaml:6: diffusion.learn_sigma: false is not supported"),
    ("data:\n  resolution: -32\n  kind: latents\n", "run.yaml:6: data.resolution: must be >= 8"),
    ("data:\n  path: \"a\\0b\"\n", "run.yaml:6: data.path: control or bidi character \\x00"),
])
def test_absurd_run_values_are_refused_with_file_and_line(tmp_path, text, needle):
    path = _write(tmp_path, "run.yaml", RUN + text)
    with pytest.raises(ConfigError) as e:
        load_run_config(path)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("overrides,needle", [
    ("{width: -16}", "run.yaml:3: model.overrides.width: must be in [1, 1048576], got -16"),
    ("{width: 0}", "run.yaml:3: model.overrides.width: must be in [1, "),
    ("{depths: [2, -2, 1, 2, 2]}", "run.yaml:3: model.overrides.depths: must be in [1, "),
    ("{class_dropout_prob: .nan}", "run.yaml:3: model.overrides.class_dropout_prob: must be in [0, "),
    ("{act: {x: 1}}", "run.yaml:3: model.overrides.act: expected a number, string"),
    ("{actt: gelu}", "run.yaml:1: model: DiC-S: unknown switch 'actt' (did you mean act?)"),
])
def test_bad_model_overrides_in_a_run_file_name_file_and_line(tmp_path, capsys, overrides, needle):
    path = _write(tmp_path, "run.yaml", f"model:\n  name: DiC-S\n  overrides: {overrides}\n")
    with pytest.raises(ConfigError) as e:
        load_run_config(path)
    assert needle in str(e.value), str(e.value)
    assert main(["train", str(path), "--out", str(tmp_path / "out")]) == 2
    _one_line(capsys.readouterr().err, needle)
    assert not (tmp_path / "out").exists()


def test_unknown_model_in_a_run_file_names_file_and_line(tmp_path):
    path = _write(tmp_path, "run.yaml", "train: {steps: 10}\nmodel:\n  name: DiC-XXL\n")
    with pytest.raises(ConfigError, match=r"run.yaml:3: model.name: unknown model 'DiC-XXL'|"
                                          r"run.yaml:2: model: unknown model 'DiC-XXL'"):
        load_run_config(path)


def test_valid_run_files_still_load(tmp_path):
    text = (RUN + "data: {kind: fashion_mnist}\ntrain: {steps: 2000, global_batch: 64, grad_clip: 1}\n"
            "sample: {num_samples: 1000, sampler: ddim, steps: '50'}\n")
    cfg = load_run_config(_write(tmp_path, "run.yaml", text))
    assert cfg.train.grad_clip == 1.0 and cfg.train.tf32_matmul is not None


# ---------------------------------------------------------------------------------------------- 4. smaller ones
@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_empty_profile_is_refused(tmp_path, capsys, text):
    profile = _write(tmp_path, "empty.yaml", text)
    with pytest.raises(ConfigError, match="empty.yaml: the profile is empty"):
        load_profile(profile)
    assert main(["submit", str(TINY), "--cluster", "slurm", "--profile", str(profile), "--dry-run",
                 "--results", str(tmp_path / "r")]) == 2
    _one_line(capsys.readouterr().err, "empty.yaml: the profile is empty")


def test_extends_cycle_names_the_extends_line(tmp_path):
    base = "study: s\nsteps:\n  - name: a\n    config: {model: {name: DiC-S}}\n"
    _write(tmp_path, "a.yaml", "# a\nextends: b.yaml\n" + base)
    _write(tmp_path, "b.yaml", "\n\n\nextends: a.yaml\n" + base)
    with pytest.raises(ConfigError) as e:
        load_study(tmp_path / "a.yaml")
    assert "b.yaml:4: extends cycle: " in str(e.value) and str(tmp_path) in str(e.value)
    _write(tmp_path, "c.yaml", "extends: c.yaml\n" + base)
    with pytest.raises(ConfigError, match=r"c.yaml:1: extends cycle: "):
        load_study(tmp_path / "c.yaml")


def test_paths_the_system_refuses_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"s.yaml:\d+: paper.file: file not found"):
        load_study(_study(tmp_path, paper={"file": "x" * 5000, "table": "roadmap"}))
    with pytest.raises(ConfigError, match=r"s.yaml:1: extends: control or bidi"):
        load_study(_write(tmp_path, "s.yaml", "extends: \"a\\0b\"\nstudy: s\nsteps: [{name: a}]\n"))


# ---------------------------------------------------------------------------------------------- 5. protocol defaults
def test_flip_defaults_to_the_protocol_of_each_data_kind():
    assert DataConfig(kind="imagenet_folder").flip is True  # DiT's RandomHorizontalFlip
    assert DataConfig(kind="fashion_mnist").flip is False and DataConfig(kind="latents").flip is False
    assert DataConfig(kind="imagenet_folder", flip=False).flip is False  # stated: kept
    assert to_dict(RunConfig())["data"]["flip"] is False  # resolved, so a run's identity holds the flag it uses


# run ids before issue 16 (`repro plan --json` at the commit before): the new checks and the flip default keep them
ROADMAP_IDS = ["55d609395c", "5e486cdc7a", "054cc55c09", "c865875010", "06dc94c090", "e9c0e7c95d", "6eb52f7380",
               "e31a4bb2ee", "921f056c20"]
# The tiny roadmap's ids changed once on purpose (issue 18): it now trains with fused AdamW, a speed switch that is
# part of a run's identity (it changes float rounding). Before: a05fc17db2, 18ec8ce27c, ... bcabc9d0ae.
TINY_IDS = ["2297094e04", "608375c3d7", "2a9be0b7a1", "876299f4fd", "99c7de8386", "b3b111d8fe", "f326e0308e",
            "e269ffad14", "a77ae6bbd8"]


def test_run_ids_are_unchanged():
    assert [r.id for r in expand(load_study(ROADMAP)).runs] == ROADMAP_IDS
    assert [r.id for r in expand(load_study(TINY)).runs] == TINY_IDS


def test_learn_sigma_false_is_refused_in_a_study(tmp_path, capsys):
    study = _study(tmp_path, defaults={**yaml.safe_load(TINY.read_text())["defaults"],
                                       "diffusion": {"learn_sigma": False}})
    assert main(["plan", str(study), "--results", str(tmp_path / "r")]) == 2
    _one_line(capsys.readouterr().err, "defaults.diffusion.learn_sigma: false is not supported")


# ---------------------------------------------------------------------------------------------- 6. the fuzz test
BAD_VALUES = [-1, 0, -10**30, 10**30, 2**63, 1e300, math.inf, -math.inf, math.nan, -0.5, 1.5, 1e22, "abc", "", True,
              False, None, [], {}, [1, "x"], {"x": 1}, "a\nb", INJECT, "a\tb", "a\x00b", "\u202eevil", "a\u2066b",
              "a" * 5000, "../../etc/passwd", "a/b", "é", "1e29", "-1", ".inf", "99999-99:99:99", 10**5000]
SYNTAX = list(":{}[]&*!|>'\"%@`#-?,\t\n") + ["\n  ", ": :", "- ", "{", "]", "&a ", "*a", "!!python/object ",
                                              "\x00", "\ufeff", "\u202e"]


def _leaves(node, path=()):
    """(path, value) of every value in plain YAML data, containers included (not the root)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield (*path, k), v
        yield from _leaves(v, (*path, k))


def _set(data, path, value):
    for k in path[:-1]:
        data = data[k]
    data[path[-1]] = value


def mutate(text: str, rng: random.Random) -> str:
    """One mutant of a YAML file: broken syntax, a wrong or absurd value, a key renamed, an alias, a long or hidden
    character, or a cut."""
    kind = rng.choice(["syntax", "syntax", "value", "value", "value", "value", "key", "alias", "cut", "bomb"])
    if kind == "syntax":
        i = rng.randrange(len(text) + 1)
        return text[:i] + rng.choice(SYNTAX) + text[i + rng.choice([0, 0, 1, 5]):]
    if kind == "cut":
        return text[:rng.randrange(len(text))]
    if kind == "bomb":
        return BOMB + text
    data = yaml.safe_load(text)
    leaves = list(_leaves(data))
    path, value = rng.choice(leaves)
    if kind == "value":
        _set(data, path, rng.choice(BAD_VALUES))
    elif kind == "key":
        parents = [(p, v) for p, v in [((), data), *leaves] if isinstance(v, dict) and v]
        p, d = rng.choice(parents)
        old = rng.choice(list(d))
        new = rng.choice([f"{old}x", old[:-1], "", "a\nb", "x" * 300, "\u202e", 7, f"{old}.{old}"])
        d[new] = d.pop(old)
    else:  # the same container in two places: the dumper writes an anchor and an alias
        shared = value if isinstance(value, dict | list) else [value]
        _set(data, path, shared)
        _set(data, rng.choice(leaves)[0], shared)
    try:
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=rng.random() < 0.5, width=10**6)
    except (ValueError, yaml.YAMLError):  # e.g. an integer too long to print: cut instead
        return text[:rng.randrange(len(text))]


def _snapshot(*folders: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for f in folders for p in sorted(f.rglob("*"))}


def _run_files() -> list[str]:
    """Run files: the README's example and every step of the tiny roadmap written out as one."""
    loaded = load_study(TINY)
    out = [RUN + "data: {kind: fashion_mnist}\ntrain: {steps: 2000, global_batch: 64, ckpt_every: 500, log_every: 50}\n"
                 "sample: {num_samples: 1000, sampler: ddim, steps: \"50\"}\n"]
    for name in ("isotropic", "gelu", "dit"):
        d = to_dict(loaded.configs[name])
        out.append(yaml.safe_dump(d, sort_keys=False))
    return out


def test_fuzz_mutants_of_shipped_files_are_one_line_errors_that_write_nothing(tmp_path, monkeypatch, capsys):
    rng = random.Random(16)
    exp = tmp_path / "exp"
    shutil.copytree(ROOT / "experiments", exp)
    root, cwd = tmp_path / "results", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    # a warm model-check cache, as after any plan: a refused file must not write it (or anything else)
    assert main(["plan", str(TINY), "--results", str(root)]) == 0
    studies = sorted(p for p in exp.rglob("*.yaml") if "paper" not in p.parts)
    seeds = ([("study", p.parent, p.read_text()) for p in studies]
             + [("run", tmp_path, t) for t in _run_files()]
             + [("profile", tmp_path, p.read_text()) for p in PROFILES])
    refused, accepted, failures, kinds = 0, 0, [], set()
    start = time.perf_counter()
    for i in range(360):
        kind, folder, text = seeds[i % len(seeds)]
        mutant = folder / f"mutant{i}.yaml"
        mutant.write_text(mutate(text, rng), encoding="utf-8")
        if kind == "run":  # a valid run file would train: ask the loader first, and the CLI only when it refuses
            try:
                load_run_config(mutant)
                accepted += 1
                continue
            except ConfigError:
                pass
            argv = ["train", str(mutant), "--out", str(root / "runs" / "fuzz")]
        elif kind == "profile":  # likewise: a valid profile would reach submitit
            try:
                load_profile(mutant)
                accepted += 1
                continue
            except ConfigError:
                pass
            argv = ["submit", str(TINY), "--cluster", "slurm", "--profile", str(mutant), "--dry-run",
                    "--results", str(root)]
        else:
            argv = ["plan", str(mutant), "--results", str(root)]
        before = _snapshot(root, cwd)
        capsys.readouterr()
        try:
            code = main(argv)
        except BaseException as e:  # noqa: BLE001 - any escape is a finding: record the mutant
            failures.append((mutant.name, kind, f"raised {type(e).__name__}: {e}"[:300]))
            continue
        err = capsys.readouterr().err
        if code == 0 and kind == "study":
            accepted += 1
            continue
        refused += 1
        kinds.add(kind)
        problems = []
        if code != 2:
            problems.append(f"exit {code}")
        if not err.startswith("repro: error: ") or err.count("\n") != 1 or "Traceback" in err:
            problems.append(f"stderr {err[:300]!r}")
        if mutant.name not in err:
            problems.append(f"does not name the file: {err[:300]!r}")
        if _snapshot(root, cwd) != before:
            problems.append("wrote files")
        if problems:
            failures.append((mutant.name, kind, "; ".join(problems)))
        mutant.unlink()
    elapsed = time.perf_counter() - start
    assert not failures, "\n".join(map(str, failures[:20]))
    assert refused >= 0.6 * (refused + accepted) and kinds == {"study", "run", "profile"}, (refused, accepted, kinds)
    assert elapsed < 60, elapsed
