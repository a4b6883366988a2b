"""Latency vs width, per component, next to the MACs the same widths cost: where time and MACs part ways.

`latency_curves` reads a `LatencyTable` into one tidy frame (component, kept fraction, latency ratio, MACs
ratio); `plot_latency_curves` draws it, one panel per component (Okabe-Ito colours, colour-blind safe).
"""
from __future__ import annotations

from typing import Optional

import matplotlib.pyplot as plt
import pandas as pd
import torch

from uvclab.vit.latency import LatencyTable
from uvclab.vit.macs import VitShape, block_macs
from uvclab.vit.structure import BlockStructure

LATENCY_COLOUR, MACS_COLOUR = "#0072B2", "#E69F00"


def _attn_macs(s: VitShape, h: int, a: int, v: int) -> int:
    b = BlockStructure(list(range(h)), [list(range(a))] * h, [list(range(v))] * h, [], mlp_branch=False)
    return block_macs(s, b)


def latency_curves(table: LatencyTable, s: VitShape) -> pd.DataFrame:
    """Rows (component, kept, latency_ratio, macs_ratio): the attention branch over kept heads (full widths)
    and over the v width (all heads), the MLP branch over kept neurons; ratios of the component's full size."""
    H, Dh, M = s.num_heads, s.head_dim, s.mlp_hidden
    def at(h, a, v) -> float:
        return float(table.attn(torch.tensor(float(h)), torch.tensor(float(a)), torch.tensor(float(v))))
    full_ms, full_macs = at(H, Dh, Dh), _attn_macs(s, H, Dh, Dh)
    rows = [("attention: heads kept", h / H, at(h, Dh, Dh) / full_ms, _attn_macs(s, h, Dh, Dh) / full_macs)
            for h in table.heads if h <= H]
    rows += [("attention: v width per head", v / Dh, at(H, Dh, v) / full_ms, _attn_macs(s, H, Dh, v) / full_macs)
             for v in table.v_widths]
    rows += [("MLP: neurons kept", m / M, ms / table.mlp_ms[-1], m / M)
             for m, ms in zip(table.mlp_widths, table.mlp_ms)]
    return pd.DataFrame(rows, columns=["component", "kept", "latency_ratio", "macs_ratio"])


def plot_latency_curves(table: LatencyTable, s: VitShape, title: str = ""):
    """One panel per component: measured latency and MACs as fractions of the full component."""
    df = latency_curves(table, s)
    comps = list(dict.fromkeys(df.component))
    fig, axes = plt.subplots(1, len(comps), figsize=(4.2 * len(comps), 3.6), dpi=90, sharey=True)
    for ax, c in zip(axes, comps):
        d = df[df.component == c]
        ax.plot(d.kept, d.latency_ratio, "o-", color=LATENCY_COLOUR, lw=1.8, label="measured latency")
        ax.plot(d.kept, d.macs_ratio, "s--", color=MACS_COLOUR, lw=1.5, label="MACs")
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls=":")
        ax.set(title=c, xlabel="kept fraction of the component", xlim=(0, 1.02), ylim=(0, 1.1))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of the full component")
    axes[0].legend(loc="upper left", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_speedup(sweep: pd.DataFrame, sweep_label: str, runs: Optional[pd.DataFrame] = None,
                 title: str = "", caption: str = ""):
    """Measured speedup over dense against the exported MACs ratio, next to the MACs-ideal 1 / ratio.

    `sweep`: rows with `MACs ratio` and `speedup` (e.g. uniform structures of one model), drawn as one series
    labelled `sweep_label` (say what is timed: structures, weights, model, image size, batch, threads);
    `runs`: rows with `MACs ratio`, `speedup` and `label` (e.g. a finished run's export against its teacher),
    each its own marker. Each point is annotated with its speedup and its share of the ideal."""
    import textwrap
    import numpy as np
    fig, ax = plt.subplots(figsize=(8.6, 4.2 + 0.15 * caption.count("\n")), dpi=90, layout="constrained")
    pts = [sweep] + ([runs] if runs is not None and len(runs) else [])
    lo = min(min(float(p["MACs ratio"].min()) for p in pts), 0.25)
    grid = np.linspace(lo, 1, 100)
    ax.plot(grid, 1 / grid, "k--", lw=1.2, label="MACs-ideal: dense MACs / exported MACs")
    ax.fill_between(grid, 0.9 / grid, 1 / grid, color="0.88", label="within 90 % of the ideal")
    ax.plot(sweep["MACs ratio"], sweep["speedup"], "o", color=MACS_COLOUR, ms=7, label=sweep_label)
    for k, (_, r) in enumerate((runs if runs is not None else pd.DataFrame()).iterrows()):
        ax.plot([r["MACs ratio"]], [r["speedup"]], "D*^v"[k % 4], color=LATENCY_COLOUR if k == 0 else f"C{k + 2}",
                ms=9, label=r["label"])
    for k, p in enumerate(pts):              # sweep labels above-right, run labels below-left: no overlap
        for _, r in p.iterrows():
            ax.annotate(f"{r['speedup']:.2f}x ({100 * r['speedup'] * r['MACs ratio']:.0f} % of ideal)",
                        (r["MACs ratio"], r["speedup"]), textcoords="offset points",
                        xytext=(9, 6) if k == 0 else (-10, -14), ha="left" if k == 0 else "right",
                        fontsize=8, color="k" if k == 0 else LATENCY_COLOUR)
    ax.set(xlabel="MACs ratio of the exported model (fraction of its dense model)",
           ylabel="measured speedup over dense (x)", title=title)
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend([h for h in handles], ["\n".join(textwrap.wrap(lb, 46)) for lb in labels], loc="upper left",
              bbox_to_anchor=(1.01, 1), fontsize=8, borderaxespad=0)
    if caption:
        fig.supxlabel("\n".join(textwrap.fill(c, 130) for c in caption.split("\n")), fontsize=8, ha="left", x=0.01)
    return fig


def plot_accuracy_latency(runs: pd.DataFrame, teacher_top1: Optional[float] = None,
                          budget: Optional[float] = None, title: str = ""):
    """Test top-1 against *measured* latency ratio (fraction of dense, timed together) of runs with different
    budget kinds. `runs`: index = run name, columns `budget kind`, `budget`, `measured latency ratio`,
    `MACs ratio`, `test top-1`, `test images`. Error bars: the binomial standard error of each test accuracy,
    sqrt(p (1 - p) / n); the teacher (dense) at 1.0; `budget`: the latency budget as a dotted vertical line."""
    import numpy as np
    fig, ax = plt.subplots(figsize=(7.6, 3.9), dpi=90, layout="constrained")
    styles = {"latency": (LATENCY_COLOUR, "D"), "macs": (MACS_COLOUR, "o")}
    for name, r in runs.iterrows():
        colour, marker = styles.get(r["budget kind"], ("C2", "s"))
        p, n = r["test top-1"] / 100, r["test images"]
        se = 100 * np.sqrt(p * (1 - p) / n)
        ax.errorbar([r["measured latency ratio"]], [r["test top-1"]], yerr=[se], fmt=marker, color=colour, ms=8,
                    capsize=4, label=f"{r['budget kind']} budget {r['budget']:g} (MACs ratio {r['MACs ratio']:.3f}): "
                                     f"{r['test top-1']:.2f} % on {int(n):,} test images")
    if teacher_top1 is not None:
        n = int(runs["test images"].iloc[0]) if len(runs) else None
        ax.axhline(teacher_top1, color="k", ls="--", lw=1, label=f"teacher (dense) {teacher_top1:.2f} %"
                   + (f" on {n:,} test images" if n else ""))
    if budget is not None:
        ax.axvline(budget, color="0.4", ls=":", lw=1.2, label=f"latency budget {budget:g}")
    ax.set(xlabel="measured latency ratio (export / dense, timed together)", ylabel="test top-1 (%)",
           title=title)
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", fontsize=8, ncols=1,
               title="error bars: binomial standard error of the test accuracy", title_fontsize=8)
    return fig
