"""Figures of a run comparison (`uvclab.compare.behaviour.Comparison`) and of run provenance.

Accuracy vs MACs of all runs with two selected, per-class accuracy deltas, the confusion-matrix delta, a
gallery of flipped test images with both predictions, the per-block structure difference, and the
teacher -> family -> run tree. Colours: the Okabe-Ito palette (colour-blind safe); a diverging blue-orange
map for deltas. Each function returns a matplotlib Figure (close it with `plt.close(fig)` when done).
"""
from __future__ import annotations

from typing import Optional

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from uvclab.ui.viz import DPI, MARKERS

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]
A_COLOUR, B_COLOUR, BOTH_COLOUR = "#E69F00", "#0072B2", "#bdbdbd"   # side a, side b, shared
DIVERGING = "PuOr_r"                                                 # orange = a better, purple = b better


def method_colours(methods) -> dict[str, tuple[str, str]]:
    """A stable (colour, marker) per method name."""
    return {m: (OKABE_ITO[i % len(OKABE_ITO)], MARKERS[i % len(MARKERS)]) for i, m in enumerate(sorted(set(methods)))}


def plot_runs_scatter(runs: pd.DataFrame, a: Optional[str] = None, b: Optional[str] = None,
                      teacher_top1: Optional[float] = None, top1: Optional[dict] = None,
                      compared_on: Optional[int] = None) -> Figure:
    """Test top-1 vs exported MACs ratio of every run (`read_runs` columns method, macs_ratio, top1, path,
    test_samples); the runs at paths `a` and `b` ringed and labelled A and B; the teacher at MACs ratio 1 (a
    star). `top1`: {path or 'teacher': accuracy} drawn instead of the report's (the Compare view's own
    evaluation of A and B on `compared_on` test images), so a run has one accuracy in the view; runs whose
    report used a different number of test images than `compared_on` are drawn hollow and the title says so."""
    top1 = dict(top1 or {})
    fig, ax = plt.subplots(figsize=(6.4, 3.9), dpi=DPI, layout="constrained")
    styles = method_colours(runs["method"])
    n = runs["test_samples"] if "test_samples" in runs else pd.Series(np.nan, index=runs.index)
    ref = compared_on if compared_on is not None else (int(n.max()) if n.notna().any() else None)
    same = (n == ref) if ref is not None else pd.Series(True, index=runs.index)
    shown = runs.assign(top1=[top1.get(str(p), t) for p, t in zip(runs["path"], runs["top1"])],
                        full=same | runs["path"].astype(str).isin(top1))
    for m, g in shown.groupby("method"):
        colour, marker = styles[m]
        for full, h in g.groupby("full"):
            ax.scatter(h["macs_ratio"], h["top1"], marker=marker, s=30, alpha=0.85, zorder=2,
                       label=m if full or not g["full"].any() else None,
                       **(dict(c=colour) if full else dict(facecolors="none", edgecolors=colour, linewidths=1.2)))
    teacher_y = top1.get("teacher", teacher_top1)
    if teacher_y is not None:
        ax.scatter([1.0], [teacher_y], marker="*", s=160, c="k", label="teacher", zorder=3)
    for tag, path, colour in (("A", a, A_COLOUR), ("B", b, B_COLOUR)):
        if path is None:
            continue
        if path == "teacher" and teacher_y is not None:
            x, y = 1.0, teacher_y
        else:
            row = shown[shown["path"] == str(path)]
            if not len(row):
                continue
            x, y = float(row["macs_ratio"].iloc[0]), float(row["top1"].iloc[0])
        ax.scatter([x], [y], s=220, facecolors="none", edgecolors=colour, linewidths=2.5, zorder=4)
        ax.annotate(tag, (x, y), xytext=(7, 7), textcoords="offset points", fontsize=12, fontweight="bold",
                    color=colour)
    title = "Accuracy vs MACs of all runs (A, B: compared)"
    if ref is not None:
        title += f"\ntop-1 on {ref:,} test images" + ("; hollow: a run's report on fewer" if not shown["full"].all() else "")
    ax.set(xlabel="exported MACs ratio (fraction of dense)", ylabel="test top-1 (%)", title=title)
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    fig.legend(fontsize=8, loc="outside right upper")
    return fig


def plot_class_delta(comp) -> Figure:
    """Per-class accuracy change b - a (points), one horizontal bar per class, values printed."""
    pc = comp.per_class
    fig, ax = plt.subplots(figsize=(6.2, 0.28 * len(pc) + 1.4), dpi=DPI, layout="constrained")
    d = pc["delta"].to_numpy()
    colours = [B_COLOUR if v > 0 else A_COLOUR for v in d]
    y = np.arange(len(pc))[::-1]
    ax.barh(y, d, color=colours, height=0.7)
    for yi, v, n in zip(y, d, pc["acc_b"]):
        ax.text(v, yi, f" {v:+.1f} ({n:.1f} %) ", va="center", ha="left" if v >= 0 else "right", fontsize=8)
    ax.set_yticks(y, pc.index)
    ax.axvline(0, color="k", lw=0.8)
    lim = max(1.0, float(np.abs(d).max())) * 1.6
    ax.set_xlim(-lim, lim)
    ax.set(xlabel="accuracy of B - accuracy of A (points); in brackets: B's accuracy", ylabel="true class",
           title=f"Per-class change: A = {comp.a.label}, B = {comp.b.label}")
    ax.legend(handles=[Patch(color=B_COLOUR, label="B better"), Patch(color=A_COLOUR, label="A better")],
              fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    return fig


def plot_confusion_delta(comp) -> Figure:
    """confusion(B) - confusion(A): rows true class, columns predicted; purple = B predicts it more often."""
    delta = comp.confusion_delta
    names = comp.class_names
    fig, ax = plt.subplots(figsize=(5.6, 4.8), dpi=DPI, layout="constrained")
    lim = max(1, int(np.abs(delta).max()))
    im = ax.imshow(delta, cmap=DIVERGING, vmin=-lim, vmax=lim)
    if len(names) <= 20:
        for i in range(len(names)):
            for j in range(len(names)):
                if delta[i, j]:
                    ax.text(j, i, f"{delta[i, j]:+d}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set(xlabel="predicted class", ylabel="true class", title="Confusion matrix: B - A (images)")
    fig.colorbar(im, ax=ax, shrink=0.8, label="images (B - A)")
    return fig


def plot_flipped_gallery(comp, kind: str = "right_to_wrong", limit: int = 12, cols: int = 6) -> Figure:
    """Up to `limit` flipped test images of one kind (most confident B first), titled with the true class
    and both predictions (with the probability each side gives its prediction)."""
    flips = comp.flipped(kind, limit)
    n = max(len(flips), 1)
    cols = min(cols, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(max(1.7 * cols, 4.5), 1.8 * rows + 0.5), dpi=DPI, squeeze=False,
                             layout="constrained")
    images = comp.images(flips["index"].to_numpy())
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= len(flips):
            continue
        r = flips.iloc[k]
        img = images[k]
        ax.imshow(img, cmap="gray_r" if img.ndim == 2 else None, interpolation="nearest")
        ax.set_title(f"#{r['index']} true {r['label']}\nA: {r['pred_a']} {r['conf_a']:.2f}\n"
                     f"B: {r['pred_b']} {r['conf_b']:.2f}", fontsize=8)
    what = {"right_to_wrong": "A right, B wrong", "wrong_to_right": "A wrong, B right"}[kind]
    total = len(getattr(comp, kind))
    fig.suptitle(f"Flipped predictions ({what}): {min(limit, total)} of {total}"
                 + ("" if total else ": none"), fontsize=10)
    return fig


def plot_structure_diff(diff: Optional[pd.DataFrame], a_label: str = "A", b_label: str = "B") -> Figure:
    """Per block: heads, value dims and MLP neurons kept by both (grey), only by A (orange), only by B (blue),
    from `uvclab.compare.behaviour.structure_diff`."""
    fig, axes = plt.subplots(1, 3, figsize=(9.5, 3.2), dpi=DPI, layout="constrained", sharey=True)
    if diff is None:
        for ax in axes:
            ax.axis("off")
        axes[1].text(0.5, 0.5, "different architectures: no per-block difference", ha="center")
        return fig
    y = np.arange(len(diff))
    for ax, (key, title) in zip(axes, (("heads", "heads"), ("v_dims", "value dims (all heads)"),
                                       ("mlp", "MLP neurons"))):
        left = np.zeros(len(diff))
        for part, colour in (("both", BOTH_COLOUR), ("only_a", A_COLOUR), ("only_b", B_COLOUR)):
            v = diff[f"{key}_{part}"].to_numpy()
            ax.barh(y, v, left=left, color=colour, height=0.75)
            left += v
        ax.set(title=title, xlabel="kept (count)")
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(y, [str(i) for i in diff.index])
    axes[0].set_ylabel("block")
    axes[0].invert_yaxis()
    fig.legend(handles=[Patch(color=BOTH_COLOUR, label="kept by both"), Patch(color=A_COLOUR, label=f"only A ({a_label})"),
                        Patch(color=B_COLOUR, label=f"only B ({b_label})")], loc="outside lower center", ncols=3,
               fontsize=8)
    return fig


def plot_provenance(prov: pd.DataFrame, max_runs: int = 60) -> Figure:
    """The provenance tree of `uvclab.compare.provenance.provenance`: teacher -> family -> run. Boxes for the
    teacher (name, test top-1) and each family (the model as built, its folder, how many runs); edges end on
    the box borders; each run is a marker coloured by method with a label (run, method, budget, seed, KD,
    top-1 with its test size and what it changed from its family). Text is 8 pt at the figure's dpi (90)."""
    from matplotlib.patches import FancyBboxPatch
    prov = prov.head(max_runs)
    order = [i for _, g in prov.groupby(["teacher", "family"], sort=False) for i in g.index]
    gaps = sum(1 for k in range(1, len(order))          # a blank row between families: their boxes never touch
               if prov.loc[order[k], "family"] != prov.loc[order[k - 1], "family"])
    n = max(len(prov) + gaps, 1)
    row_h = 0.18                                        # inches per run row (8 pt text: 0.11 in)
    fig, ax = plt.subplots(figsize=(11, row_h * n + 0.9), dpi=DPI, layout="constrained")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.8, n - 0.2)
    styles = method_colours(prov["method"])
    ys, y = {}, n - 1
    for k, i in enumerate(order):
        if k and prov.loc[i, "family"] != prov.loc[order[k - 1], "family"]:
            y -= 1
        ys[i], y = y, y - 1
    T0, T1, F0, F1, RX = 0.0, 0.14, 0.18, 0.41, 0.45      # teacher box, family box, run marker (axes x)
    half = lambda k: max(0.42, 0.5 * k * 0.72)          # noqa: E731  half box height (rows) for k text lines

    def box(x0, x1, y, text, k, weight="normal"):
        h = half(k)
        ax.add_patch(FancyBboxPatch((x0, y - h), x1 - x0, 2 * h, boxstyle="round,pad=0,rounding_size=0.01",
                                    fc="w", ec="#777", lw=1, mutation_aspect=n / 4, zorder=2))
        ax.text((x0 + x1) / 2, y, text, ha="center", va="center", fontsize=8, fontweight=weight, zorder=3)

    for t, tg in prov.groupby("teacher", sort=False):
        ty = float(np.mean([ys[i] for i in tg.index]))
        top1 = tg["teacher_top1"].iloc[0]
        box(T0, T1, ty, f"teacher\n{t}" + (f"\n{top1:.2f} % (full test)" if pd.notna(top1) else ""), 3, "bold")
        for f, fg in tg.groupby("family", sort=False):
            fy = float(np.mean([ys[i] for i in fg.index]))
            folder = f.split(": ", 1)[-1]
            model = fg["model"].iloc[0] if "model" in fg else ""
            box(F0, F1, fy, f"{model}\n{folder} ({len(fg)} run{'s' if len(fg) > 1 else ''})", 2)
            ax.plot([T1, F0], [ty, fy], color="#888", lw=1, zorder=1)
            for i, r in fg.iterrows():
                colour, marker = styles[r["method"]]
                name = r["run"][len(folder) + 1:] if r["run"].startswith(folder + "/") else r["run"]
                ax.plot([F1, RX - 0.006], [fy, ys[i]], color="#bbb", lw=0.7, zorder=1)
                ax.scatter([RX], [ys[i]], c=colour, marker=marker, s=28, zorder=3)
                n_test = r.get("test_samples")
                on = f" ({int(n_test):,} test)" if n_test is not None and pd.notna(n_test) else ""
                ax.text(RX + 0.012, ys[i], f"{name}   {r['method']} B={r['budget']:g}  seed {r['seed']}  kd {r['kd']}  "
                        f"{r['top1']:.2f} %{on}" + (f"   [{r['changes']}]" if r["changes"] else ""),
                        va="center", fontsize=8)
    ax.axis("off")
    ax.set_title("Provenance: teacher -> family (one recipe: model, data, epochs, learning rates) -> run, "
                 "with what each run changed from its family", fontsize=9)
    return fig
