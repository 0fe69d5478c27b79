"""The figures researchers otherwise draw by hand, each written as PNG and SVG.

- roadmap: FID after each cumulative step, paper and ours (DiC Figure 1);
- fid_vs_step: FID against training step, one line per model (DiCo Table 8);
- frontier: throughput against FID, the speed/quality frontier, DiT baselines marked;
- speedup: throughput ratio of each model to the study's baseline, from the study's one bench measurement;
- loss: the training loss (ε-MSE) against step, one line per model: whether training had flattened.

A figure with nothing to show says so in its title instead of being skipped, so the report's layout is stable.
Our numbers and the paper's sit on separate axes when they are measured under different protocols. Throughput
marked unreliable (timed under contention) is drawn hollow or hatched in grey, labelled so, never as a plain figure.
"""

from __future__ import annotations

import functools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: compute nodes and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from repro import rundir  # noqa: E402
from repro.metrics.stats import z_value  # noqa: E402

FIGURES = ("roadmap", "fid_vs_step", "frontier", "speedup", "loss")
sns.set_theme(style="whitegrid", context="paper")


def _save(fig, out: Path, name: str) -> list[Path]:
    paths = []
    for ext in ("png", "svg"):
        path = out / f"{name}.{ext}"
        rundir.atomic_write(path, lambda f, ext=ext: fig.savefig(f, format=ext, dpi=110, bbox_inches="tight"))
        paths.append(path)
    plt.close(fig)
    return paths


def _plain_text(draw):
    """Draw with every text as written: a study's labels and description are its author's, and mathtext would read
    a `$` in them as LaTeX (failing on one `$`, silently rendering a pair as math)."""
    @functools.wraps(draw)
    def plain(*args, **kwargs):
        with plt.rc_context({"text.parse_math": False, "text.usetex": False}):  # also the ticks drawn at savefig
            return draw(*args, **kwargs)
    return plain


def _is_baseline(model: str, label: str) -> bool:
    return str(model).startswith("DiT") or str(label).startswith("DiT")


def _unreliable(v) -> bool:
    """bench_reliable is False (None or NaN: not measured, nothing to mark)."""
    return v is not None and not (isinstance(v, float) and v != v) and not bool(v)


@_plain_text
def fid_bars(std: pd.Series, se: pd.Series) -> pd.Series:
    """Error bars of our FIDs: the std over seeds; where one seed, the half-width of its 95% interval over the
    sample set; 0 where neither is known."""
    return pd.to_numeric(std, errors="coerce").fillna(z_value() * pd.to_numeric(se, errors="coerce")).fillna(0)


def roadmap(table: pd.DataFrame, out: Path, title: str) -> list[Path]:
    fig, ax = plt.subplots(figsize=(8, 4))
    main = table[table["table"] == table["table"].iloc[0]] if len(table) else table
    if len(main) and "paper_fid" in main:
        x = range(len(main))
        ax.plot(x, pd.to_numeric(main["paper_fid"], errors="coerce"), "o-", color="tab:gray", label="paper FID-50K")
        ax.set_ylabel("paper FID")
        ax.set_xticks(list(x), main["paper_label"], rotation=35, ha="right", fontsize=8)
        handles, labels = ax.get_legend_handles_labels()
        ours = pd.to_numeric(main["ours_fid"], errors="coerce") if "ours_fid" in main else None
        if ours is not None and ours.notna().any():
            std, se = (pd.to_numeric(main[c], errors="coerce") if c in main else pd.Series(float("nan"), main.index)
                       for c in ("ours_fid_std", "ours_fid_se"))
            bars = fid_bars(std, se)
            ax2 = ax.twinx()  # ours is measured under another protocol: never on the paper's axis
            ax2.errorbar(list(x), ours, yerr=bars, fmt="s-", color="tab:blue", capsize=3,
                         label="ours (own protocol; bars: seed std, or 95% over samples for one seed)")
            ax2.set_ylabel("our FID (own protocol)", color="tab:blue")
            ax2.grid(False)
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=2, fontsize=8, frameon=False)
        ax.set_title(title, fontsize=10)
    else:
        ax.set_title(f"{title}: no paper FID for this study", fontsize=10)
    return _save(fig, out, "roadmap")


@_plain_text
def fid_vs_step(df: pd.DataFrame, out: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(6, 4))
    have = df.dropna(subset=["fid"]) if len(df) else df
    if len(have):
        for label, g in have.groupby("label", sort=False):
            at = g.groupby("checkpoint_step")
            mean = at["fid"].mean().sort_index()
            bars = fid_bars(at["fid"].std(ddof=1), at["fid_se"].mean()).reindex(mean.index)
            ax.errorbar(mean.index, mean.values, yerr=bars.values, fmt="o-", capsize=2, label=label)
        ax.set_xlabel("training step (bars: seed std, or 95% over samples for one seed)")
        ax.set_ylabel(str(have["fid_label"].dropna().iloc[0]) if have["fid_label"].notna().any() else "FID")
        ax.legend(fontsize=7)
        ax.set_title("FID against training step", fontsize=10)
    else:
        ax.set_title("FID against training step: no evaluated samples yet", fontsize=10)
    return _save(fig, out, "fid_vs_step")


@_plain_text
def frontier(steps: pd.DataFrame, out: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(6, 4))
    final = steps[steps["checkpoint_step"] == steps["train_steps"]] if len(steps) else steps
    have = final.dropna(subset=["fid", "img_per_s"]) if len(final) else final
    if len(have):
        grey = 0
        for _, r in have.iterrows():
            base = _is_baseline(r["model"], r["label"])
            colour = "tab:red" if base else "tab:blue"
            label = r["label"]
            if _unreliable(r.get("bench_reliable")):  # hollow grey: measured, but not as fact
                grey += 1
                ax.scatter(r["img_per_s"], r["fid"], marker="s" if base else "o", s=60 if base else 40,
                           facecolors="none", edgecolors="tab:gray", hatch="///")
                label = f"{label} (img/s unreliable)"
            else:
                ax.scatter(r["img_per_s"], r["fid"], marker="s" if base else "o", s=60 if base else 40, color=colour)
            bar = fid_bars(pd.Series([r.get("fid_std")], dtype=float), pd.Series([r.get("fid_se")], dtype=float))[0]
            if bar:
                ax.errorbar(r["img_per_s"], r["fid"], yerr=bar, fmt="none", ecolor="tab:gray", capsize=2)
            ax.annotate(label, (r["img_per_s"], r["fid"]), fontsize=7, xytext=(3, 3), textcoords="offset points",
                        color="tab:gray" if label != r["label"] else "black")
        ax.set_xlabel("denoiser img/s (the study's bench job)")
        ax.set_ylabel("FID")
        note = f"; hollow grey: img/s unreliable ({grey})" if grey else ""
        ax.set_title(f"Speed / quality (squares: DiT baselines{note})", fontsize=10)
    else:
        ax.set_title("Speed / quality: needs FID and img/s (evaluate and bench stages)", fontsize=10)
    return _save(fig, out, "frontier")


@_plain_text
def speedup(steps: pd.DataFrame, out: Path) -> list[Path]:
    """Ratios from the study's bench record: every run timed in one job, each figure over the same baseline's."""
    fig, ax = plt.subplots(figsize=(6, 4))
    have = steps.dropna(subset=["bench_ratio"]) if len(steps) and "bench_ratio" in steps else steps.iloc[0:0]
    if len(have):
        g = have.groupby(["step", "label", "model"], sort=False)
        per_step = g["bench_ratio"].mean().reset_index()
        ref = str(have["bench_baseline"].dropna().iloc[0]) if have["bench_baseline"].notna().any() else "baseline"
        if "bench_ratio_reliable" in have:
            # the ratio's own rule (repro.metrics.throughput.ratio_reliability): contention on either row, or
            # per-repeat ratios that spread; the drift of the machine that makes img/s unreliable cancels in it
            bad = list(g["bench_ratio_reliable"].agg(lambda s: any(_unreliable(v) for v in s)).values)
        else:
            per_step["unreliable"] = g["bench_reliable"].agg(lambda s: any(_unreliable(v) for v in s)).values
            base_bad = bool(per_step.loc[per_step["label"] == ref, "unreliable"].any())
            bad = [u or base_bad for u in per_step["unreliable"]]  # as unreliable as either of its figures
        colours = ["tab:gray" if b else ("tab:red" if _is_baseline(m, lab) else "tab:blue")
                   for b, m, lab in zip(bad, per_step["model"], per_step["label"], strict=True)]
        labels = [f"{lab} (unreliable)" if b else lab for b, lab in zip(bad, per_step["label"], strict=True)]
        bars = ax.barh(labels, per_step["bench_ratio"], color=colours)
        for bar, b in zip(bars, bad, strict=True):
            if b:
                bar.set_hatch("///")
                bar.set_alpha(0.5)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xlabel(f"img/s relative to {ref} (one interleaved measurement)")
        note = f"; hatched grey: unreliable ({sum(bad)})" if any(bad) else ""
        ax.set_title(f"Throughput ratio to {ref}{note}", fontsize=10)
        ax.invert_yaxis()
    else:
        ax.set_title("Throughput ratio: needs the study's bench record (bench stage)", fontsize=10)
    return _save(fig, out, "speedup")


@_plain_text
def loss(curves: pd.DataFrame, out: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(6, 4))
    col = "mse" if len(curves) and curves["mse"].notna().any() else "loss"  # mse: without the VLB term
    have = curves.dropna(subset=[col]) if len(curves) else curves
    if len(have):
        groups = list(have.groupby("label", sort=False))
        colors = sns.color_palette("tab10" if len(groups) <= 10 else "husl", len(groups))  # one colour per line
        for (label, g), color in zip(groups, colors, strict=True):
            g = g.groupby("step")[col].mean().sort_index()  # mean over seeds
            # a centred 5-window mean: the logged windows of small batches are noisy
            ax.plot(g.index, g.rolling(5, center=True, min_periods=1).mean().values, label=label, lw=1.2,
                    color=color)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{'ε-MSE' if col == 'mse' else 'loss'} (logged windows, 5-window mean)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.set_title("Training loss", fontsize=10)
    else:
        ax.set_title("Training loss: no run has logged a step yet", fontsize=10)
    return _save(fig, out, "loss")
