"""The `repro models` and `repro bench` commands, and their one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from repro.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_json_exact_counts_beside_paper_values(capsys):
    code, out, _ = _run(capsys, "models", "DiC-XL", "DiCo-XL", "DiT-XL/2", "--json")
    assert code == 0
    rows = {r["model"]: r for r in json.loads(out)}
    assert rows["DiC-XL"]["params"] == 702_266_120
    assert rows["DiC-XL"]["gmacs"] == 116.137 and rows["DiC-XL"]["paper_gmacs"] == 116.1
    assert rows["DiC-XL"]["winograd_gmacs"] == 57.249 and rows["DiC-XL"]["paper_winograd_gmacs"] == 57.2
    assert rows["DiCo-XL"]["params"] == 701_151_368 and rows["DiCo-XL"]["winograd_gmacs"] is None
    assert rows["DiT-XL/2"]["params"] == 675_129_632 and rows["DiT-XL/2"]["paper_gmacs"] == 118.66
    assert all(r["counting_tool"] and r["family"] for r in rows.values())
    assert rows["DiC-XL"]["config"]["depths"] == [7, 7, 8, 7, 7] and rows["DiC-XL"]["config"]["skip_stride"] == 3


def test_models_at_512(capsys):
    code, out, _ = _run(capsys, "models", "DiC-H", "--resolution", "512", "--json")
    (row,) = json.loads(out)
    assert code == 0 and row["resolution"] == 512
    assert row["gmacs"] == 817.181 and row["paper_gmacs"] == 817.2 and row["paper_winograd_gmacs"] == 388.4


def test_models_table(capsys):
    code, out, _ = _run(capsys, "models", "DiC-S", "DiT-S/2")
    assert code == 0 and "DiC-S" in out and "5.874" in out and "6.060" in out
    assert "full GMACs" in out and "fused kernels" not in out  # the note comes only with a model that has some


def test_models_both_counting_conventions_for_fused_kernel_families(capsys):
    """DiG's printed GFLOPs leave out what its code runs in flash-linear-attention kernels; both are shown."""
    code, out, _ = _run(capsys, "models", "DiG-XL/2", "DiT-XL/2", "--json")
    rows = {r["model"]: r for r in json.loads(out)}
    assert code == 0 and rows["DiG-XL/2"]["gmacs"] == 89.332 and rows["DiG-XL/2"]["paper_gmacs"] == 89.4
    assert rows["DiG-XL/2"]["full_gmacs"] == 116.352 and rows["DiT-XL/2"]["full_gmacs"] == rows["DiT-XL/2"]["gmacs"]
    code, out, _ = _run(capsys, "models", "DiG-S/2")
    assert "5.732" in out and "fused kernels" in out


def test_models_shows_table5_attention_rows_in_both_conventions(capsys):
    """The self-attention row's SDPA is what torchprofile 0.0.4 could not see; the other mixers' matmuls it saw."""
    code, out, _ = _run(capsys, "models", "DiCo-S-attn", "DiCo-S-window", "DiCo-S-agent", "--json")
    rows = {r["model"]: r for r in json.loads(out)}
    assert code == 0 and (rows["DiCo-S-attn"]["gmacs"], rows["DiCo-S-attn"]["full_gmacs"]) == (4.254, 6.955)
    assert rows["DiCo-S-window"]["gmacs"] == rows["DiCo-S-window"]["full_gmacs"] == 4.339
    assert rows["DiCo-S-agent"]["paper_params_m"] == 33.3 and rows["DiCo-S-agent"]["paper_gmacs"] == 4.24
    code, out, _ = _run(capsys, "models", "DiCo-S-attn", "DiCo-S-window")
    assert "6.955" in out and "scaled_dot_product_attention" in out and "paper M" in out


@pytest.mark.parametrize("argv,needle", [
    (["models", "--resolution", "300"], "invalid choice: 300"),
    (["models", "DiC-XXL"], "unknown model 'DiC-XXL'"),
    (["bench", "--models", "DiC-S,Nope"], "unknown model 'Nope'"),
    (["bench", "--models", "DiC-S", "--batch", "0"], "--batch: must be >= 1"),
    (["bench", "--models", "DiC-S", "--cpu-threads", "0"], "--cpu-threads: must be >= 1"),
    (["bench", "--models", "DiC-S", "--dtype", "fp8"], "invalid choice: 'fp8'"),
    (["bench", "--models", "DiC-S,DiC-S"], "named twice"),
    (["bench"], "--models"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, needle):
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bench_cuda_unavailable_is_a_usage_error(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    code, _, err = _run(capsys, "bench", "--models", "DiC-S", "--device", "cuda")
    assert code == 2 and "no CUDA device" in err


def test_bench_measures_interleaved_with_ratio_and_protocol(capsys, tmp_path):
    out_file = tmp_path / "bench" / "b.json"
    code, out, _ = _run(capsys, "bench", "--models", "DiC-S,DiT-S/8", "--batch", "1", "--warmup", "1", "--iters",
                        "1", "--repeats", "2", "--json", "--out", str(out_file))
    assert code == 0
    report = json.loads(out)
    assert json.loads(out_file.read_text()) == report
    first, second = report["results"]
    assert first["model"] == "DiC-S" and first["ratio_to_first"] == 1.0
    assert len(second["img_per_s_repeats"]) == 2 and second["img_per_s"] > 0
    per_repeat = [a / b for a, b in zip(second["img_per_s_repeats"], first["img_per_s_repeats"], strict=True)]
    assert second["ratio_to_first"] == pytest.approx(sorted(per_repeat)[0] / 2 + sorted(per_repeat)[1] / 2)
    p = report["protocol"]
    assert p["batch"] == 1 and p["dtype"] == "fp32" and p["device"] == "cpu" and p["resolution"] == 256
    assert p["flags"] == dict(profile="strict_fp32", matmul_tf32=False, cudnn_tf32=False, cudnn_benchmark=False)
    assert p["environment"]["torch"] and p["environment"]["threads"] >= 1


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "repro"
    assert script.exists(), "install the package (pip install -e .) so the `repro` command exists"
    res = subprocess.run([str(script), "models", "DiC-S", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(res.stdout)[0]["params"] == 32_835_752
