"""Latency vs width, per component, next to the MACs the same widths cost: where time and MACs part ways.

`latency_curves` reads a `LatencyTable` into one tidy frame (component, kept fraction, latency ratio, MACs
ratio); `plot_latency_curves` draws it, one panel per component (Okabe-Ito colours, colour-blind safe).
"""
from __future__ import annotations

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
