"""The figures researchers otherwise draw by hand, each written as PNG and SVG.

- roadmap: FID after each cumulative step, paper and ours (DiC Figure 1);
- fid_vs_step: FID against training step, one line per model (DiCo Table 8);
- frontier: throughput against FID, the speed/quality frontier, DiT baselines marked;
- speedup: throughput ratio of each model to the DiT baseline;
- loss: the training loss (ε-MSE) against step, one line per model: whether training had flattened.

A figure with nothing to show says so in its title instead of being skipped, so the report's layout is stable.
Our numbers and the paper's sit on separate axes when they are measured under different protocols.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: compute nodes and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from repro import rundir  # noqa: E402

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


def _is_baseline(model: str, label: str) -> bool:
    return str(model).startswith("DiT") or str(label).startswith("DiT")


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
            std = pd.to_numeric(main["ours_fid_std"], errors="coerce").fillna(0) if "ours_fid_std" in main else None
            ax2 = ax.twinx()  # ours is measured under another protocol: never on the paper's axis
            ax2.errorbar(list(x), ours, yerr=std, fmt="s-", color="tab:blue", capsize=3, label="ours (own protocol)")
            ax2.set_ylabel("our FID (own protocol)", color="tab:blue")
            ax2.grid(False)
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=2, fontsize=8, frameon=False)
        ax.set_title(title, fontsize=10)
    else:
        ax.set_title(f"{title}: no paper FID for this study", fontsize=10)
    return _save(fig, out, "roadmap")


def fid_vs_step(df: pd.DataFrame, out: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(6, 4))
    have = df.dropna(subset=["fid"]) if len(df) else df
    if len(have):
        for label, g in have.groupby("label", sort=False):
            g = g.groupby("checkpoint_step")["fid"].mean().sort_index()
            ax.plot(g.index, g.values, "o-", label=label)
        ax.set_xlabel("training step")
        ax.set_ylabel(str(have["fid_label"].dropna().iloc[0]) if have["fid_label"].notna().any() else "FID")
        ax.legend(fontsize=7)
        ax.set_title("FID against training step", fontsize=10)
    else:
        ax.set_title("FID against training step: no evaluated samples yet", fontsize=10)
    return _save(fig, out, "fid_vs_step")


def frontier(steps: pd.DataFrame, out: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(6, 4))
    final = steps[steps["checkpoint_step"] == steps["train_steps"]] if len(steps) else steps
    have = final.dropna(subset=["fid", "img_per_s"]) if len(final) else final
    if len(have):
        for _, r in have.iterrows():
            base = _is_baseline(r["model"], r["label"])
            ax.scatter(r["img_per_s"], r["fid"], marker="s" if base else "o", s=60 if base else 40,
                       color="tab:red" if base else "tab:blue")
            ax.annotate(r["label"], (r["img_per_s"], r["fid"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("denoiser img/s (bench stage)")
        ax.set_ylabel("FID")
        ax.set_title("Speed / quality (squares: DiT baselines)", fontsize=10)
    else:
        ax.set_title("Speed / quality: needs FID and img/s (evaluate and bench stages)", fontsize=10)
    return _save(fig, out, "frontier")


def speedup(steps: pd.DataFrame, out: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(6, 4))
    per_step = steps.groupby(["step", "label", "model"], sort=False)["img_per_s"].mean().reset_index() \
        if len(steps) else steps
    base = per_step[[_is_baseline(m, lab) for m, lab in zip(per_step["model"], per_step["label"], strict=True)]] \
        if len(per_step) else per_step
    if len(base) and base["img_per_s"].notna().any():
        ref = base.dropna(subset=["img_per_s"]).iloc[0]
        ratio = per_step["img_per_s"] / ref["img_per_s"]
        ax.barh(per_step["label"], ratio, color=["tab:red" if _is_baseline(m, lab) else "tab:blue"
                                                 for m, lab in zip(per_step["model"], per_step["label"],
                                                                   strict=True)])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xlabel(f"img/s relative to {ref['label']}")
        ax.set_title("Throughput ratio to the DiT baseline", fontsize=10)
        ax.invert_yaxis()
    else:
        ax.set_title("Throughput ratio: needs bench.json for a DiT baseline", fontsize=10)
    return _save(fig, out, "speedup")


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
