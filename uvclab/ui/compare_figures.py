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
                      teacher_top1: Optional[float] = None) -> Figure:
    """Test top-1 vs exported MACs ratio of every run (`read_runs` columns method, macs_ratio, top1, path);
    the runs at paths `a` and `b` ringed and labelled A and B; the teacher at MACs ratio 1 (a star)."""
    fig, ax = plt.subplots(figsize=(6.2, 3.8), dpi=DPI, layout="constrained")
    styles = method_colours(runs["method"])
    for m, g in runs.groupby("method"):
        colour, marker = styles[m]
        ax.scatter(g["macs_ratio"], g["top1"], c=colour, marker=marker, s=30, label=m, alpha=0.85, zorder=2)
    if teacher_top1 is not None:
        ax.scatter([1.0], [teacher_top1], marker="*", s=160, c="k", label="teacher", zorder=3)
    for tag, path, colour in (("A", a, A_COLOUR), ("B", b, B_COLOUR)):
        if path is None:
            continue
        if path == "teacher" and teacher_top1 is not None:
            x, y = 1.0, teacher_top1
        else:
            row = runs[runs["path"] == str(path)]
            if not len(row):
                continue
            x, y = float(row["macs_ratio"].iloc[0]), float(row["top1"].iloc[0])
        ax.scatter([x], [y], s=220, facecolors="none", edgecolors=colour, linewidths=2.5, zorder=4)
        ax.annotate(tag, (x, y), xytext=(7, 7), textcoords="offset points", fontsize=12, fontweight="bold",
                    color=colour)
    ax.set(xlabel="exported MACs ratio (fraction of dense)", ylabel="test top-1 (%)",
           title="Accuracy vs MACs of all runs (A, B: compared)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncols=2, loc="lower right")
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
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.55 * cols, 1.75 * rows + 0.5), dpi=DPI, squeeze=False,
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
                     f"B: {r['pred_b']} {r['conf_b']:.2f}", fontsize=7)
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
    """The provenance tree of `uvclab.compare.provenance.provenance`: teacher -> family -> run (leaf label:
    run, method, budget, top-1 and its changes from the family), leaves coloured by method."""
    prov = prov.head(max_runs)
    n = max(len(prov), 1)
    fig, ax = plt.subplots(figsize=(10.5, 0.24 * n + 0.9), dpi=DPI, layout="constrained")
    styles = method_colours(prov["method"])
    ys = {i: n - 1 - k for k, i in enumerate(prov.index)}
    for t, tg in prov.groupby("teacher", sort=False):
        ty = np.mean([ys[i] for i in tg.index])
        top1 = tg["teacher_top1"].iloc[0]
        ax.text(0, ty, f"{t}\n{top1:.2f} %" if pd.notna(top1) else t, ha="right", va="center", fontsize=8,
                fontweight="bold")
        for f, fg in tg.groupby("family", sort=False):
            fy = np.mean([ys[i] for i in fg.index])
            folder = f.split(": ", 1)[-1]
            ax.plot([0.02, 0.08], [ty, fy], color="#888", lw=1)
            ax.text(0.09, fy, f"{folder} ({len(fg)})", ha="left", va="center", fontsize=8,
                    bbox=dict(boxstyle="round", fc="w", ec="#888"))
            for i, r in fg.iterrows():
                colour, marker = styles[r["method"]]
                name = r["run"][len(folder) + 1:] if r["run"].startswith(folder + "/") else r["run"]
                ax.plot([0.95, 1.05], [fy, ys[i]], color="#bbb", lw=0.6)
                ax.scatter([1.06], [ys[i]], c=colour, marker=marker, s=22, zorder=3)
                ax.text(1.09, ys[i], f"{name}  {r['method']} B={r['budget']:g} seed {r['seed']} kd {r['kd']}  {r['top1']:.2f} %  "
                        f"{r['changes']}",
                        va="center", fontsize=7)
    ax.set_xlim(-0.45, 3.3)
    ax.set_ylim(-1, n)
    ax.axis("off")
    ax.set_title("Provenance: teacher -> family (runs) -> run, with what each run changed from its family",
                 fontsize=10)
    return fig
