"""The papers' numbers: both files load strictly, every row names a real preset, and spot checks match the specs."""

import pytest

from repro import models
from repro.errors import ConfigError
from repro.paper import METRICS, PAPER_DIR, Protocol, load_all, load_paper


@pytest.fixture(scope="module")
def papers():
    return load_all()


@pytest.fixture(scope="module")
def dic(papers):
    return papers["DiC"]


@pytest.fixture(scope="module")
def dico(papers):
    return papers["DiCo"]


def test_both_files_load(papers):
    assert set(papers) == {"DiC", "DiCo"}
    assert {p.name for p in PAPER_DIR.glob("*.yaml")} == {"dic.yaml", "dico.yaml"}
    for paper in papers.values():
        assert paper.citation and paper.tables
        for table in paper.tables.values():
            assert table.title and table.source and table.rows
            for row in table.rows.values():
                assert row.label and row.values and set(row.values) <= set(METRICS)


def test_every_model_is_a_preset(papers):
    named = {row.model for p in papers.values() for t in p.tables.values() for row in t.rows.values()}
    named.discard(None)
    assert named <= set(models.PRESETS)
    assert {f"DiC-XL-step{i}" for i in range(1, 9)} <= named


# (paper, table, row, metric, value as printed in specs/dic.md / specs/dico.md)
SPOT = [
    ("DiC", "roadmap", "step1_isotropic", "fid", 29.31),
    ("DiC", "roadmap", "step2_isotropic_skip", "fid", 15.07),
    ("DiC", "roadmap", "step3_unet", "fid", 14.65),
    ("DiC", "roadmap", "step4_sparse_skip", "fid", 11.49),
    ("DiC", "roadmap", "step5_stage_embed", "fid", 10.07),
    ("DiC", "roadmap", "step6_mid_injection", "fid", 8.80),
    ("DiC", "roadmap", "step7_gating", "fid", 6.54),
    ("DiC", "roadmap", "step8_gelu", "fid", 6.26),
    ("DiC", "roadmap", "dit_xl2", "fid", 12.96),
    ("DiC", "roadmap", "step1_isotropic", "gflops", 115.6),
    ("DiC", "roadmap", "uvit_h", "gflops", 133.5),
    ("DiC", "t_a", "dic_xl", "fid", 13.11),
    ("DiC", "t_a", "dic_xl", "is", 100.15),
    ("DiC", "t_a", "dic_xl", "img_per_s", 313.7),
    ("DiC", "t_a", "dic_xl", "winograd_gflops", 57.2),
    ("DiC", "t_a", "dit_xl2", "fid", 20.05),
    ("DiC", "t_a", "pixart_alpha_xl2", "is", 52.24),
    ("DiC", "dico_t1", "dic_s", "fid", 58.68),
    ("DiC", "dico_t1", "dic_b", "gflops", 23.5),
    ("DiC", "t_b", "dic_h_800k", "is", 124.33),
    ("DiC", "t_c", "dic_h", "fid", 2.25),
    ("DiC", "t_d", "dic_h", "fid", 2.96),
    ("DiC", "t_d", "dic_h", "winograd_gflops", 388.4),
    ("DiC", "t_e", "dic_xl_urepa_sde", "fid", 1.75),
    ("DiC", "issue6_train_speed", "dic_xl", "train_steps_per_s", 2.71),
    ("DiCo", "t4", "dit_iso", "fid", 67.16),
    ("DiCo", "t4", "dico_iso", "fid", 60.58),
    ("DiCo", "t4", "dit_isoskip", "fid", 62.63),
    ("DiCo", "t4", "dico_isoskip", "fid", 56.95),
    ("DiCo", "t4", "dit_ushape", "fid", 54.00),
    ("DiCo", "t4", "dico_s", "fid", 49.97),
    ("DiCo", "t4", "dico_iso", "img_per_s", 1901.39),
    ("DiCo", "t5", "no_cca", "fid", 54.78),
    ("DiCo", "t5", "dw7", "img_per_s", 1469.45),
    ("DiCo", "t5", "agent_attn", "params_m", 33.3),
    ("DiCo", "t1", "dico_xl_400k", "fid", 11.67),
    ("DiCo", "t1", "dico_xl_400k", "is", 100.42),
    ("DiCo", "t1", "dico_xl_400k", "img_per_s", 208.47),
    ("DiCo", "t1", "dit_l2_400k", "img_per_s", 114.63),
    ("DiCo", "t1", "dico_h_cfg", "fid", 1.90),
    ("DiCo", "t1", "dit_xl2_400k", "fid", 19.47),
    ("DiCo", "t2", "dico_xl_cfg", "fid", 2.53),
    ("DiCo", "t2", "dico_xl_3m", "gflops", 349.78),
    ("DiCo", "t6", "dico_h", "params_m", 1037.4),
    ("DiCo", "t8", "dico_s_50k", "fid", 109.50),
    ("DiCo", "t8", "dico_xl_400k", "sfid", 5.38),
    ("DiCo", "t8", "dico_b_400k", "precision", 0.603),
    ("DiCo", "t11", "dico_s", "fid", 102.60),
    ("DiCo", "t12", "ours_s2", "img_per_s", 2489),
    ("DiCo", "t13", "ours", "is", 300.2),
    ("DiCo", "readme", "xl_3750k", "fid", 2.05),
    ("DiCo", "readme", "xl_3750k", "is", 282.17),
]


def test_spot_check_numbers(papers):
    for paper, table, row, metric, value in SPOT:
        assert papers[paper].number(table, row, metric) == pytest.approx(value, abs=1e-9), (paper, table, row)


def test_empty_cells_and_typos(dic, dico):
    assert dic.number("roadmap", "step4_sparse_skip", "gflops") is None  # not printed
    assert dico.number("t1", "dit_s2_400k", "is") is None
    with pytest.raises(KeyError, match="did you mean t4"):
        dico.number("t44", "dico_s", "fid")
    with pytest.raises(KeyError, match="did you mean dico_iso"):
        dico.number("t4", "dico_isso", "fid")
    with pytest.raises(KeyError, match="did you mean fid"):
        dico.number("t4", "dico_s", "fdi")


def test_table_and_row_structure(dic, dico):
    assert list(dic.tables["roadmap"].rows)[:8] == ["step1_isotropic", "step2_isotropic_skip", "step3_unet",
                                                   "step4_sparse_skip", "step5_stage_embed", "step6_mid_injection",
                                                   "step7_gating", "step8_gelu"]
    assert [r.model for r in list(dic.tables["roadmap"].rows.values())[:8]] == [
        f"DiC-XL-step{i}" for i in range(1, 9)]
    assert len(dic.tables["t_a"].rows) == 7 and dic.tables["t_a"].rows["pixart_alpha_xl2"].model == "PixArt-α-XL/2"
    assert dico.tables["t1"].rows["dimsum_l2"].model == "DiMSUM-L/2"
    assert dico.tables["t1"].rows["adm_u"].model is None  # quoted, not built
    assert len(dico.tables["t1"].rows) == 27 and len(dico.tables["t5"].rows) == 11
    assert len(dico.tables["t8"].rows) == 20
    t4 = dico.tables["t4"].rows
    assert (t4["dit_iso"].model, t4["dit_isoskip"].model, t4["dit_ushape"].model) == (
        "DiT-S/2", "DiT-S/2-skip", "DiCo-S-attn")
    assert dico.tables["t5"].rows["self_attn"].model == "DiCo-S-attn"
    for key in ("t4", "t5"):
        assert "camera-ready v2" in dico.tables[key].notes.lower()


def test_protocols(dic, dico):
    for key in ("t4", "t5"):
        table = dico.tables[key]
        assert table.protocol.attention == "no_fa2"
        assert all(table.row_protocol(r).cfg_scale == 1.0 for r in table.rows)
    # every row measured at 400K (by step or by label) is unguided
    rows_400k = [(t, r) for p in (dic, dico) for t in p.tables.values() for r in t.rows
                 if t.row_protocol(r).train_steps == 400_000 or "400K" in t.rows[r].label]
    assert len(rows_400k) > 30
    assert all(t.row_protocol(r).cfg_scale == 1.0 for t, r in rows_400k if "fid" in t.rows[r].values)
    assert dic.tables["t_d"].protocol.cfg_scale == 1.5 and dic.tables["t_d"].protocol.resolution == 512
    xl = dico.tables["t1"].row_protocol("dico_xl_cfg")
    assert (xl.cfg_scale, xl.train_steps, xl.guide_channels) == (1.4, 3_750_000, 3)
    readme = dico.tables["readme"].row_protocol("xl_3750k")
    assert (readme.cfg_scale, readme.train_steps) == (1.4, 3_750_000)
    roadmap = dic.tables["roadmap"].protocol
    assert roadmap.cfg_scale is None and roadmap.train_steps == 200_000
    assert any("cfg" in a for a in roadmap.assumptions)
    # a row's stated fields override, the table's fill in, assumptions accumulate
    h = dico.tables["t1"].row_protocol("dico_h_cfg")
    assert (h.cfg_scale, h.batch, h.train_steps, h.gpu, h.sampler) == (None, 1024, 1_000_000, "A100 80G", "ddpm")
    assert h.assumptions[:len(dico.tables["t1"].protocol.assumptions)] == dico.tables["t1"].protocol.assumptions
    assert any("1.5" in a for a in h.assumptions)
    assert dic.tables["t_b"].row_protocol("dit_xl2_7m").train_steps == 7_000_000
    assert Protocol(cfg_scale=1.0).merged(None) == Protocol(cfg_scale=1.0)


# ----------------------------------------------------------------------------------------------- strictness
GOOD = """\
paper: X
citation: "someone"
tables:
  t1:
    title: "Table 1"
    source: "somewhere"
    protocol:
      resolution: 256
    rows:
      a_row:
        label: "A"
        model: DiCo-S
        values: {fid: 1.0}
"""


def _load(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return load_paper(path)


def test_minimal_file_loads(tmp_path):
    paper = _load(tmp_path, GOOD)
    assert paper.number("t1", "a_row", "fid") == 1.0 and paper.tables["t1"].row_protocol("a_row").resolution == 256


@pytest.mark.parametrize("old,new,message", [
    ("{fid: 1.0}", "{fdi: 1.0}",
     "bad.yaml:13: tables.t1.rows.a_row.values.fdi: unknown metric (did you mean fid?); valid metrics: fid, sfid"),
    ("model: DiCo-S", "model: DiCo-SS",
     "bad.yaml:12: tables.t1.rows.a_row.model: unknown model 'DiCo-SS' (did you mean DiCo-S"),
    ('label: "A"', 'lable: "A"', "bad.yaml:11: tables.t1.rows.a_row.lable: unknown key (did you mean label?)"),
    ("{fid: 1.0}", "{fid: low}", "bad.yaml:13: tables.t1.rows.a_row.values.fid: expected a number >= 0, got 'low'"),
    ("resolution: 256", "resolution: 300", "bad.yaml:8: tables.t1.protocol.resolution: 300 is not one of 256"),
    ("resolution: 256", "train_steps: 1.5", "bad.yaml:8: tables.t1.protocol.train_steps: expected an integer"),
    ("resolution: 256", "cfg_scale: high", "bad.yaml:8: tables.t1.protocol.cfg_scale: expected a number"),
    ("resolution: 256", "cfg_scale: 0.5", "bad.yaml:8: tables.t1.protocol.cfg_scale: must be >= 1"),
    ("resolution: 256", "sampler: euler", "bad.yaml:8: tables.t1.protocol.sampler: 'euler' is not one of"),
    ("resolution: 256", "cfg: 1.5", "bad.yaml:8: tables.t1.protocol.cfg: unknown key (did you mean cfg_scale?)"),
    ("resolution: 256", "assumptions: nope", "bad.yaml:8: tables.t1.protocol.assumptions: expected a list"),
    ("        values: {fid: 1.0}\n", "",
     "bad.yaml:10: tables.t1.rows.a_row: missing required key tables.t1.rows.a_row.values"),
    ("a_row:", "A-Row:", "bad.yaml:10: tables.t1.rows.A-Row: key must be snake_case"),
    ('    title: "Table 1"\n', '    title: "Table 1"\n    title: "again"\n',
     "bad.yaml:6: tables.t1.title: duplicate key"),
    ("tables:\n", "tabels:\n", "bad.yaml:3: tabels: unknown key (did you mean tables?)"),
    ('        label: "A"\n', "", "bad.yaml:10: tables.t1.rows.a_row: missing required key tables.t1.rows.a_row.label"),
    ("{fid: 1.0}", "{fid: true}", "bad.yaml:13: tables.t1.rows.a_row.values.fid: expected a number >= 0, got True"),
    ("{fid: 1.0}", "{}", "bad.yaml:13: tables.t1.rows.a_row.values: expected a non-empty mapping of metric: number"),
])
def test_mistakes_are_one_line_with_file_line_and_key(tmp_path, old, new, message):
    assert old in GOOD
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, GOOD.replace(old, new, 1))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_load_all_rejects_two_files_for_one_paper(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yaml").write_text(GOOD)
    with pytest.raises(ConfigError, match="b.yaml: paper 'X' is already defined"):
        load_all(tmp_path)
    with pytest.raises(ConfigError, match="no paper files"):
        load_all(tmp_path / "empty")
