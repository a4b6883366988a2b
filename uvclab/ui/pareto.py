"""Accuracy-vs-MACs (Pareto) figures: `plot_pareto` (one line per method or setting, UVC and the strongest
baseline emphasised, legend outside), `plot_benchmark_pareto` (the benchmark's figure: dataset, test size and
seed counts in the title, error bars = sd over seeds) and `write_results` (a benchmark's csv, md and png)."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from uvclab.ui.viz import DPI, MARKERS, _label

EMPHASIS = ["#D55E00", "#0072B2", "#009E73", "#CC79A7"]   # emphasised Pareto lines (Okabe-Ito)


def plot_pareto(df: pd.DataFrame, x: str = "macs_ratio", y: str = "top1", hue: str = "method",
                teacher: Optional[float] = None, err: Optional[str] = None, emphasis: Optional[Sequence[str]] = None,
                title: Optional[str] = None, caption: str = "", teacher_label: Optional[str] = None) -> Figure:
    """Accuracy vs MACs ratio, one line (own colour and marker) per `hue` value (a single line if the column
    is absent), error bars from column `err` (e.g. sd over seeds; none where it is NaN or 0); the teacher
    (dense) accuracy as a dashed horizontal line. `emphasis`: the hue values drawn bold and on top (e.g. UVC
    and the best baseline); the others thin and pale, so that lines sharing points do not hide the emphasised
    ones (the thin ones are drawn on top, so their small markers stay visible without hiding the bold lines).
    The legend sits outside the axes (right); `caption` (wrapped) goes under the figure."""
    import textwrap
    emphasis = list(emphasis or [])
    fig, ax = plt.subplots(figsize=(8.2 if len(df) else 6.5, 4.3 + 0.16 * caption.count("\n")), dpi=DPI,
                           layout="constrained")
    groups = list(df.groupby(hue, sort=False)) if hue in df else [(_label(y), df)]
    order = [n for n, _ in groups if n in emphasis] + [n for n, _ in groups if n not in emphasis]  # thin on top
    groups = dict(groups)
    for i, name in enumerate(order):
        g = groups[name].sort_values(x)
        k = list(groups).index(name)
        yerr = g[err].fillna(0).to_numpy() if err is not None and err in g else None
        if yerr is not None and not (yerr > 0).any():
            yerr = None
        strong = not emphasis or name in emphasis
        colour = EMPHASIS[emphasis.index(name) % len(EMPHASIS)] if emphasis and strong else f"C{k % 10}"
        ax.errorbar(g[x], g[y], yerr=yerr, fmt="-" + MARKERS[k % len(MARKERS)], color=colour,
                    ms=6.5 if strong else 4.5, lw=2.2 if strong else 1.0, alpha=1 if strong else 0.6,
                    capsize=4 if strong else 2, elinewidth=1.4 if strong else 0.8, zorder=3 + i,
                    label=str(name))
    if teacher is not None:
        ax.axhline(teacher, color="k", ls="--", lw=1.2, zorder=2,
                   label=teacher_label or f"teacher (dense) {teacher:.2f} %")
    ax.set(xlabel=_label(x), ylabel=_label(y),
           title=title or f"{_label(y).split(' (')[0]} vs {_label(x).split(' (')[0]}")
    ax.title.set_fontsize(10)
    handles, labels = ax.get_legend_handles_labels()
    if emphasis:       # the emphasised lines first in the legend
        idx = sorted(range(len(labels)), key=lambda j: (emphasis.index(labels[j]) if labels[j] in emphasis
                                                        else len(emphasis), j))
        handles, labels = [handles[j] for j in idx], [labels[j] for j in idx]
    fig.legend(handles, labels, loc="outside right upper", fontsize=8,
               title=hue.replace("_", " ") if hue in df else None, title_fontsize=8)
    ax.grid(alpha=0.3)
    if caption:
        fig.supxlabel("\n".join(textwrap.fill(c, 130) for c in caption.split("\n")), fontsize=8, ha="left", x=0.01)
    return fig


def strongest_baseline(summary: pd.DataFrame, reference: str = "uvc", y: str = "top1",
                       hue: str = "method") -> Optional[str]:
    """The strongest method that is not a UVC variant (name not starting with 'uvc'): the most budgets shared
    with `reference` (all of its budgets when the reference is absent), then the highest mean `y` over them
    (pass a validation column to choose without looking at test)."""
    ref = set(summary.loc[summary[hue] == reference, "budget"])
    best, key = None, None
    for m, g in summary.groupby(hue):
        if str(m).startswith("uvc"):
            continue
        shared = g[g["budget"].isin(ref)] if ref else g
        k = (len(shared), float(shared[y].mean()) if len(shared) and shared[y].notna().any() else -np.inf)
        if key is None or k > key:
            best, key = m, k
    return best


DATASET_NAMES = {"fashion_mnist": "Fashion-MNIST", "digits": "digits (8x8)", "cifar10": "CIFAR-10",
                 "cifar100": "CIFAR-100", "imagefolder": "ImageFolder", "imagenet": "ImageNet"}


def plot_benchmark_pareto(df: pd.DataFrame, dataset: str, test_images: Optional[int] = None,
                          reference: str = "uvc") -> Figure:
    """The benchmark's accuracy-vs-MACs figure from its results rows (one row per run: method, budget, seed,
    macs_ratio, top1, teacher_top1; any subset of methods and budgets): mean over seeds per method and budget,
    error bars = sd over seeds where a point has more than one, UVC (`reference`) and the best baseline
    (`best_baseline`) emphasised, the others thin. The title names the dataset, test size and seed counts."""
    from uvclab.compare.benchmark import summary_table
    s = summary_table(df)
    if test_images is None and "test_samples" in df and df["test_samples"].notna().any():
        test_images = int(df["test_samples"].max())
    choose = "top1"
    if "val_top1" in df and df["val_top1"].notna().any():  # choose the baseline on validation, not test
        s = s.merge(df.groupby(["budget", "method"], as_index=False)["val_top1"].mean(), on=["budget", "method"])
        choose = "val_top1"
    best = strongest_baseline(s, reference, choose) if len(s) else None
    emphasis = [m for m in (reference, best) if m is not None and m in set(s["method"])]
    seeds = s.groupby("method")["seeds"].max()
    per = seeds.value_counts()                            # seed count -> number of methods with it
    common = per.idxmax() if len(per) else 1
    parts = []
    for n in sorted(per.index, reverse=True):
        who = ("per method" if len(per) == 1 else "the others") if n == common else ", ".join(seeds[seeds == n].index)
        parts.append(f"{n} seed{'s' if n > 1 else ''} {who}" if n == common and len(per) == 1
                     else f"{n} seed{'s' if n > 1 else ''}: {who}")
    seed_text = "; ".join(parts)
    name = DATASET_NAMES.get(dataset, dataset)
    test = f"{test_images:,}-image test set" if test_images else "test size not recorded"
    title = f"{name}: test top-1 vs MACs ratio, {test}\n" + "\n".join(textwrap.wrap(seed_text, 75))
    multi = s[s["seeds"] > 1]
    caption = (("Points: mean over seeds; error bars: sd over seeds, drawn where a point has more than one seed "
                f"({', '.join(sorted(multi['method'].unique()))}); single-seed points have no error bar. ")
               if len(multi) else "One seed per point (no error bars). ")
    caption += (f"Bold: {' and '.join(emphasis)}" + (" (the best baseline: most budgets shared with "
                f"{reference}, then highest mean {'validation' if choose == 'val_top1' else 'test'} top-1)" if best in emphasis else "") + "; thin: the other methods.")
    fig = plot_pareto(s, x="macs_ratio", y="top1", hue="method", err="top1_std", emphasis=emphasis,
                      teacher=float(df["teacher_top1"].iloc[0]) if len(df) else None, title=title, caption=caption)
    return fig


def write_results(df: pd.DataFrame, results_dir: str | Path, name: str, note: str = "",
                  test_images: Optional[int] = None) -> dict[str, Path]:
    """`<name>.csv`, `<name>.md` (summary table, `note` above it, then the regime table) and `<name>_pareto.png`
    in results_dir (`plot_benchmark_pareto`; the test size from the rows' `test_samples`, else `test_images`)."""
    from uvclab.compare.benchmark import markdown_table, regime_markdown
    from uvclab.io_utils import atomic_write_text
    d = Path(results_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = {"csv": d / f"{name}.csv", "md": d / f"{name}.md", "png": d / f"{name}_pareto.png"}
    atomic_write_text(paths["csv"], df.to_csv(index=False, float_format="%.4f"))
    regimes = ("\n\nUVC against the best one-shot method per budget (chosen on validation; verdict: the per-seed "
               "gap against its spread over seeds, `regime_table`):\n\n" + regime_markdown(df)) if len(df) else ""
    atomic_write_text(paths["md"], (note + "\n\n" if note else "") + markdown_table(df) + regimes)
    dataset = str(df["dataset"].dropna().iloc[0]) if "dataset" in df and df["dataset"].notna().any() else \
        name.removesuffix("_quick").removesuffix("_long")
    fig = plot_benchmark_pareto(df, dataset, test_images)
    fig.savefig(paths["png"])
    plt.close(fig)
    return paths
