"""`repro report`: the paper's table regenerated from the run folders, with the protocol of every number.

    reports/<study>/index.html   self-contained page (jinja2, autoescaped), figures beside it
    reports/<study>/report.md    the same in Markdown
    reports/<study>/table.csv    paper | ours | delta | protocol match, one row per paper row
    reports/<study>/table.tex    the same as a LaTeX tabular
    reports/<study>/runs.csv     every (run, sample set): ours, the protocol, the state
    reports/<study>/figures/     roadmap, fid_vs_step, frontier, speedup (PNG and SVG)

Works on partial studies: missing numbers are shown as pending / queued / running / failed, never as 0.
Throughput timed under contention (see repro.metrics.throughput) is shown marked "(unreliable)" with the reason
in a note, and the figures draw it hatched grey, never as a plain figure.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from repro import rundir
from repro.plan import Plan
from repro.report import plots
from repro.metrics.stats import LEVEL, z_value
from repro.results import PAPER_METRICS, bench_record, by_step, collect, loss_curves, paper_table, step_changes

FORMATS = ("html", "md", "csv", "tex")
SHOWN = ("fid", "is", "sfid", "precision", "recall", "gmacs", "params_m", "img_per_s")
NAMES = {"fid": "FID", "is": "IS", "sfid": "sFID", "precision": "Prec.", "recall": "Rec.", "gmacs": "GMACs",
         "winograd_gmacs": "Winograd GMACs", "params_m": "Params (M)", "img_per_s": "img/s"}
UNRELIABLE = "(unreliable)"  # follows an img/s timed under contention; the reason is in the notes below the table


def unreliable(row) -> bool:
    """Whether a row's throughput was measured and marked unreliable (None or NaN: not measured)."""
    v = row.get("bench_reliable")
    return v is not None and not (isinstance(v, float) and math.isnan(v)) and not bool(v)


def bench_notes(steps: pd.DataFrame) -> list[str]:
    """One line per step whose img/s is unreliable: its label and why."""
    if not len(steps) or "bench_reliable" not in steps:
        return []
    out = {}
    for _, r in steps.iterrows():
        if unreliable(r):
            out.setdefault(f"{r['label']}: {r['bench_note'] or 'marked unreliable'}", None)
    return list(out)


def spearman(table: pd.DataFrame, metric: str = "fid", scope: str = "") -> dict | None:
    """Rank correlation between the paper's numbers and ours over the rows that have both (None under 3 rows),
    with its bootstrap interval over rows (`repro.metrics.stats.spearman_interval`)."""
    from scipy.stats import spearmanr

    from repro.metrics.stats import spearman_interval

    p, o = f"paper_{metric}", f"ours_{metric}"
    if p not in table or o not in table:
        return None
    both = table.dropna(subset=[p, o])
    if len(both) < 3:
        return None
    x, y = both[p].astype(float), both[o].astype(float)
    rho, pvalue = spearmanr(x, y)
    interval = spearman_interval(x, y)
    return {"metric": metric, "rho": float(rho), "p": float(pvalue), "n": len(both), "scope": scope,
            "lo": interval["lo"], "hi": interval["hi"], "level": interval["level"],
            "resamples": interval["resamples"]}


def correlations(table: pd.DataFrame, metric: str = "fid") -> list[dict]:
    """Spearman per paper table and, when the study spans several (DiCo Tables 4 and 5), over all its steps, each
    step once (a step standing for two paper rows, DiCo-S as Table 4's U-shape and Table 5's baseline, counts once
    where the paper prints the same number twice)."""
    if not len(table):
        return []
    tables = list(dict.fromkeys(table["table"]))
    out = [spearman(table[table["table"] == t], metric, table.loc[table["table"] == t, "table_title"].iloc[0])
           for t in tables]
    if len(tables) > 1:
        steps = table.drop_duplicates(subset=[c for c in ("step", "protocol") if c in table])
        out.append(spearman(steps, metric, "every step of the study, once"))
    return [c for c in out if c]


def _fmt(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        if 0 < abs(v) < 0.1:  # toy models' GMACs (0.0218): two decimals would print 0.02 for all of them
            return f"{v:.3g}"
        return f"{v:,.{digits}f}" if abs(v) < 1e6 else f"{v:,.0f}"
    return str(v)


def common_differences(table: pd.DataFrame) -> list[str]:
    """Protocol differences every measured row shares (printed once, above the table)."""
    lists = [set(d.split("; ")) for d, st in zip(table["protocol_differences"], table["state"], strict=True)
             if d and st == "done"]
    if not lists:
        return []
    first = [d for d in table.loc[table["state"] == "done", "protocol_differences"].iloc[0].split("; ")]
    return [d for d in first if all(d in s for s in lists)]


def _present(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _ours(r, m: str) -> str:
    """Our number: mean ± std over seeds, or with one seed the FID's interval over the sample set; else the state."""
    ours, std = r.get(f"ours_{m}"), r.get(f"ours_{m}_std")
    if not _fmt(ours):
        return r["state"]
    shown = _fmt(ours) + (f" ± {_fmt(std)}" if _fmt(std) else "")
    se = r.get("ours_fid_se") if m == "fid" else None
    if not _fmt(std) and _fmt(se):  # one seed: the sample set's 95% interval
        shown += f" [{_fmt(ours - z_value() * se)}, {_fmt(ours + z_value() * se)}]"
    if m == "img_per_s" and unreliable(r):
        shown += f" {UNRELIABLE}"
    return shown


def _match(r, common: set[str]) -> str:
    if r["protocol_match"]:
        return "matches"
    extra = [d for d in r["protocol_differences"].split("; ") if d not in common]
    return "differs" + (" (as listed above)" if common else "") + ("; " + "; ".join(extra) if extra else "")


def ranks(table: pd.DataFrame, column: str) -> pd.Series:
    """1 = lowest, within each paper table, over the rows that have both the paper's FID and ours (so the two
    rankings are over the same rows); NaN elsewhere."""
    both = table["paper_fid"].notna() & table["ours_fid"].notna() if "ours_fid" in table else table["paper_fid"] < 0
    out = pd.Series(float("nan"), index=table.index)
    for _, part in table[both].groupby("table", sort=False):
        out[part.index] = part[column].astype(float).rank(method="min")
    return out


def display_rows(table: pd.DataFrame, changes: pd.DataFrame | None = None) -> tuple[list[str], list[list[str]]]:
    """The regenerated table at a glance: the headline metric (FID), paper and ours, each's rank within its paper
    table, each's change from the step a step extends, and the protocol state. A Δ (ours minus paper) only where
    some row was measured under the paper's protocol, and only in those rows: values of two protocols do not
    subtract; ranks and changes compare."""
    common = set(common_differences(table))
    any_match = bool(table["protocol_match"].any())
    head = ["table", "paper row", "our step", "FID paper", "rank", "FID ours", "rank", "change, paper",
            "change, ours"] + (["FID Δ"] if any_match else []) + ["protocol"]
    paper_rank, our_rank = ranks(table, "paper_fid"), ranks(table, "ours_fid") if "ours_fid" in table else None
    by_step = {r["step"]: r for _, r in changes.iterrows()} if changes is not None and len(changes) else {}
    rows = []
    for i, r in table.iterrows():
        change = by_step.get(r["step"])
        paper_change = ours_change = ""
        if change is not None:
            paper_change = _signed(change["paper_change"]) if _present(change["paper_change"]) else ""
            if _present(change.get("diff")):
                ours_change = _signed(change["diff"]) + (" (resolved)" if change["resolved"] else " (not resolved)")
        cells = [r["table"], r["paper_label"], r["our_label"], _fmt(r.get("paper_fid")),
                 _rank(paper_rank[i]), _ours(r, "fid"), _rank(our_rank[i]) if our_rank is not None else "",
                 paper_change, ours_change]
        if any_match:
            cells.append(_fmt(r.get("delta_fid")) if r["protocol_match"] else "")
        cells.append(_match(r, common))
        rows.append(cells)
    return head, rows


def _rank(v) -> str:
    return str(int(v)) if _present(v) else ""


def other_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """The other metrics, each in its own unit: paper and ours side by side (a Δ only for rows whose protocol
    matches the paper's), and the run's state."""
    # a metric either side has: our img/s and params matter where the paper printed none (DiC's roadmap)
    metrics = [m for m in SHOWN if m != "fid" and any(c in table and table[c].notna().any()
                                                       for c in (f"paper_{m}", f"ours_{m}"))]
    any_match = bool(table["protocol_match"].any())
    head = ["table", "paper row", "our step"]
    for m in metrics:
        head += [f"{NAMES[m]} paper", f"{NAMES[m]} ours"] + ([f"{NAMES[m]} Δ"] if any_match else [])
    head += ["state"]
    rows = []
    for _, r in table.iterrows():
        cells = [r["table"], r["paper_label"], r["our_label"]]
        for m in metrics:
            cells += [_fmt(r.get(f"paper_{m}")), _ours(r, m)]
            if any_match:
                cells.append(_fmt(r.get(f"delta_{m}")) if r["protocol_match"] else "")
        rows.append(cells + [r["state"]])
    return head, rows


def change_rows(changes: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Step-to-step changes as text cells: ours (paired, with its interval and what it is over), resolved or not,
    the paper's change between the same rows (its sign is what compares across protocols), and what would
    resolve ours."""
    head = ["step", "extends", "FID change, ours [95%]", "interval over", "resolved", "FID change, paper",
            "same direction", "to resolve"]
    rows = []
    for _, r in changes.iterrows():
        paper = r.get("paper_change")
        paper = None if paper is None or (isinstance(paper, float) and math.isnan(paper)) else float(paper)
        cells = [r["label"], r["extends_label"]]
        diff = r.get("diff")
        if diff is None or (isinstance(diff, float) and math.isnan(diff)):
            cells += [f"not measured (no stored sample features: {r['missing']})", "", "", _signed(paper), "", ""]
            rows.append(cells)
            continue
        one = r["over"] == "samples"
        over = "samples (1 seed)" if one else f"{int(r['seeds'])} seeds"
        need = r["samples_to_resolve"] if one else r["seeds_to_resolve"]
        same = "" if paper is None or not r["resolved"] else ("yes" if (diff > 0) == (paper > 0) else "no")
        todo = "" if r["resolved"] or need is None or (isinstance(need, float) and math.isnan(need)) else \
            f"~{int(need):,} {'samples' if one else 'seeds'}"
        cells += [f"{_signed(diff)} [{_signed(r['lo'])}, {_signed(r['hi'])}]", over,
                  "resolved" if r["resolved"] else "not resolved at this budget", _signed(paper), same, todo]
        rows.append(cells)
    return head, rows


def _signed(v) -> str:
    return "" if v is None else f"{v:+.2f}"


def _markdown(head: list[str], rows: list[list[str]]) -> str:
    def esc(c: str) -> str:
        return str(c).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _latex(table: pd.DataFrame) -> str:
    cols = ["paper_label", "our_label"] + [c for m in SHOWN for c in (f"paper_{m}", f"ours_{m}", f"delta_{m}")
                                           if c in table and table[f"paper_{m}"].notna().any()]
    shown = table[cols].rename(columns=lambda c: c.replace("_", " "))
    return shown.to_latex(index=False, na_rep="--", float_format="%.2f", escape=True)


def write(plan: Plan, root: Path, out: Path, formats: tuple[str, ...] = FORMATS) -> dict[str, Path]:
    """Write the report of `plan`'s study into `out`; returns the files written. All or nothing: the report is
    built in a temp folder beside `out` and moved into place at the end, so a failure leaves the previous report
    (and any other file in `out`) as it was, and no half-written one."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"--format: unknown format {unknown[0]!r}; choose from {', '.join(FORMATS)}")
    out = Path(out)
    missing = [p for p in (out.absolute(), *out.absolute().parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        written = _write(plan, root, tmp, formats)
        return _move_into_place(tmp, out, written)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in missing[1:]:  # the folders above `out` this call created (deepest first), if still empty
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


REPORT_ENTRIES = ("figures", "grids", "index.html", "report.md", "table.csv", "table.tex", "runs.csv")


def _move_into_place(tmp: Path, out: Path, written: dict[str, Path]) -> dict[str, Path]:
    """Rename each entry of the finished report from `tmp` into `out`: files by an atomic rename, the figures and
    grids folders swapped whole; entries of `out` this report does not write are left as they are."""
    out.mkdir(exist_ok=True)
    for name in REPORT_ENTRIES:
        src, dst = tmp / name, out / name
        if not src.exists():
            continue
        if src.is_dir():
            old = None
            if dst.exists():
                old = tmp / f".old-{name}"
                os.replace(dst, old)
            os.replace(src, dst)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(src, dst)
    shutil.rmtree(tmp, ignore_errors=True)
    return {k: out / p.relative_to(tmp) for k, p in written.items()}


def _write(plan: Plan, root: Path, out: Path, formats: tuple[str, ...]) -> dict[str, Path]:
    """Every file of the report, into the (empty) folder `out`."""
    import jinja2

    study = plan.study.study
    df = collect(plan, root)
    steps = by_step(df) if len(df) else df
    table = paper_table(df, plan)
    written: dict[str, Path] = {}
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    title = f"{study.study}: {study.description}" if study.description else study.study
    for name, paths in (("roadmap", plots.roadmap(table, figures, title)),
                        ("fid_vs_step", plots.fid_vs_step(df, figures)),
                        ("frontier", plots.frontier(steps, figures)),
                        ("speedup", plots.speedup(steps, figures)),
                        ("loss", plots.loss(loss_curves(plan, root), figures))):
        written[f"figure:{name}"] = paths[0]
    grids = _copy_grids(plan, root, df, out / "grids")

    rundir.atomic_write_text(out / "runs.csv", df.to_csv(index=False))
    written["runs.csv"] = out / "runs.csv"
    if "csv" in formats:
        rundir.atomic_write_text(out / "table.csv", table.to_csv(index=False, float_format="%.6g"))
        written["table.csv"] = out / "table.csv"
    if "tex" in formats and len(table):
        rundir.atomic_write_text(out / "table.tex", _latex(table))
        written["table.tex"] = out / "table.tex"
    changes = step_changes(plan, root) if "evaluate" in study.stages else pd.DataFrame()
    head, rows = display_rows(table, changes) if len(table) else ([], [])
    other_head, other = other_rows(table) if len(table) else ([], [])
    if "csv" in formats and len(changes):
        rundir.atomic_write_text(out / "changes.csv", changes.to_csv(index=False, float_format="%.6g"))
        written["changes.csv"] = out / "changes.csv"
    changes_head, changes_rows = change_rows(changes) if len(changes) else ([], [])
    states = df["state"].value_counts().to_dict() if len(df) else {}
    planned = df.drop_duplicates("run_id")["gpu_hours_planned"].sum(min_count=1) if len(df) else None
    context = {
        "title": title, "study": study.study, "study_file": str(plan.study.path),
        "paper": study.paper.file if study.paper else None, "head": head, "rows": rows,
        "states": states, "runs": len({r.id for r in plan.runs}),
        "gpu_hours_planned": _fmt(planned), "gpu_hours_spent": _fmt(df.drop_duplicates("run_id")[
            "gpu_hours_spent"].sum() if len(df) else None),
        "wall_hours": _fmt(df.drop_duplicates("run_id")["wall_hours"].sum() if len(df) else None),
        "common_differences": common_differences(table) if len(table) else [],
        "bench_notes": bench_notes(steps), "unreliable_mark": UNRELIABLE,
        "correlations": correlations(table, "fid"),
        "changes_head": changes_head, "changes_rows": changes_rows, "other_head": other_head, "other_rows": other,
        "protocols": _protocol_lines(df, table, plan, root), "figures": plots.FIGURES, "grids": grids,
        "metrics": [NAMES[m] for m in PAPER_METRICS if m in NAMES],
        "damaged": damaged_notes(df),
    }
    # Study text (description, labels) is the study author's, maybe a colleague's: every value in the HTML is
    # escaped. select_autoescape matches the name's end, so "index.html.j2" needs "html.j2" (["html"] alone
    # misses it); the Markdown template stays unescaped.
    env = jinja2.Environment(loader=jinja2.PackageLoader("repro.report", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "html.j2"], default_for_string=True),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    if "md" in formats:
        context_md = {**context, "table_md": _markdown(head, rows) if rows else "",
                      "changes_md": _markdown(changes_head, changes_rows) if changes_rows else "",
                      "other_md": _markdown(other_head, other) if other else ""}
        rundir.atomic_write_text(out / "report.md", env.get_template("report.md.j2").render(**context_md))
        written["report.md"] = out / "report.md"
    if "html" in formats:
        rundir.atomic_write_text(out / "index.html", env.get_template("index.html.j2").render(**context))
        written["index.html"] = out / "index.html"
    return written


def damaged_notes(df: pd.DataFrame) -> list[str]:
    """Each damaged run-folder file once, named, with what it leaves missing (the next submit redoes that part)."""
    if not len(df) or "damaged" not in df:
        return []
    out: dict[str, None] = {}
    for text in df["damaged"].dropna():
        for part in str(text).split("; "):
            out.setdefault(part, None)
    return list(out)


def _protocol_lines(df: pd.DataFrame, table: pd.DataFrame, plan: Plan, root: Path) -> list[str]:
    """Under which conditions our numbers and the paper's were measured, one line each."""
    lines = []
    done = df.dropna(subset=["fid"]) if len(df) else df
    for _, r in done.drop_duplicates(["protocol", "extractor", "reference"]).iterrows():
        lines.append(f"ours: {r['sampler']}-{r['sampling_steps']} sampling, cfg {r['cfg_scale']:g}, "
                     f"{int(r['num_samples']):,} samples ({r['labels']} labels), {r['extractor']} against "
                     f"{r['reference']}: {r['fid_label']}")
    if "fid_se" in done and done["fid_se"].notna().any():
        lines.append(f"ours, uncertainty: a step with several seeds shows mean ± std over seeds; a step with one "
                     f"seed shows [lo, hi], the {LEVEL:.0%} interval of its FID over the sample set (FID ± "
                     f"{z_value():.2f} SE, SE from a bootstrap of the samples, the same rule for every run)")
    bench = bench_record(plan, root)
    if bench is not None:
        lines.append(_bench_line(bench))
    if plan.study.paper_path is not None and len(table):
        from repro.paper import load_paper

        paper = load_paper(plan.study.paper_path)
        for t in dict.fromkeys(table["table"]):
            p = paper.tables[t].protocol
            stated = ", ".join(f"{k} {v}" for k, v in vars(p).items() if v is not None and k != "assumptions")
            lines.append(f"paper ({paper.paper} {t}): {stated or 'not stated'}")
            lines.extend(f"paper assumption: {a}" for a in p.assumptions)
    return lines


def _bench_line(bench: dict) -> str:
    """How the study's throughput was measured: one job, its device and settings, and whether it was alone."""
    p = bench.get("protocol") or {}
    env = p.get("environment") or {}
    alone = bench.get("alone") or {}
    if not alone:
        where = "no record of what else ran"
    elif not alone.get("checked"):
        where = "on a node of its own (SLURM --exclusive)"
    elif alone.get("alone"):
        where = f"alone on the machine (after waiting {alone.get('waited_s', 0):.0f} s)"
    else:
        where = f"beside other stages (still running after {alone.get('waited_s', 0):.0f} s)"
    return (f"ours (img/s): every run timed interleaved in one job (measurement {str(bench.get('measurement_id'))[:8]}"
            f") on {env.get('gpu') or env.get('cpu')}, {where}; batch {p.get('batch')}, {p.get('dtype')}, flags "
            f"{(p.get('flags') or {}).get('profile')}, {p.get('iters')} forwards x {p.get('repeats')} repeats; "
            f"{'reliable' if bench.get('reliable') else 'unreliable rows are marked ' + UNRELIABLE}")


def _copy_grids(plan: Plan, root: Path, df: pd.DataFrame, folder: Path) -> list[dict]:
    """The sample grid of every evaluated run's final sample set, copied beside the report."""
    out = []
    for _, r in df.iterrows():
        if not isinstance(r["stem"], str) or r["checkpoint_step"] != r["train_steps"]:
            continue
        src = root / "runs" / r["run_id"] / "samples" / f"{r['stem']}.png"
        if src.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{r['run_id']}-{r['stem']}.png"
            shutil.copyfile(src, folder / name)
            out.append({"label": f"{r['label']} (seed {r['seed']})", "file": f"grids/{name}"})
    return out
