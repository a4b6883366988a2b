"""Facts across several UVC runs (notebooks 03-04): an accuracy with its binomial standard error and which
differences are within noise (`binomial_se`, `noise_pairs`, `plot_accuracy_dots`), how much two structures
differ (`structure_difference`, `kept_arrays`), what each budget keeps by group type (`kept_by_type`), how wide
the first and last blocks stay (`edge_blocks`) and whether structures are nested across budgets (`nestedness`).
"""
from __future__ import annotations

import math
from itertools import combinations
from typing import Mapping, Optional

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from uvclab.ui.viz import DPI
from uvclab.vit.structure import Structure

TYPES = ("heads", "v_dims", "neurons")


def kept_arrays(structure: Structure) -> dict[str, np.ndarray]:
    """0/1 per group as the model runs it: heads (L, H), v_dims (L, H, Dh), neurons (L, M); a group of a
    skipped block or branch counts as removed."""
    L, H, Dh, M = structure.depth, structure.num_heads, structure.head_dim, structure.mlp_hidden
    heads, dims, neurons = np.zeros((L, H), bool), np.zeros((L, H, Dh), bool), np.zeros((L, M), bool)
    for l, b in enumerate(structure.blocks):
        if b.runs_attn:
            for h, d in zip(b.heads, b.v_dims):
                heads[l, h] = True
                dims[l, h, list(d)] = True
        if b.runs_mlp:
            neurons[l, list(b.mlp)] = True
    return {"heads": heads, "v_dims": dims, "neurons": neurons}


# ---- several runs: accuracy and noise --------------------------------------------------------------------

def binomial_se(top1_percent, n: int):
    """Binomial standard error of an accuracy in percent measured on n images: 100 sqrt(p (1 - p) / n)."""
    p = np.asarray(top1_percent, dtype=float) / 100.0
    se = 100.0 * np.sqrt(p * (1.0 - p) / n)
    return float(se) if se.ndim == 0 else se


def noise_pairs(values: Mapping[str, float], errors: Mapping[str, float], k: float = 2.0) -> pd.DataFrame:
    """Every pair (a, b): the difference a - b, its standard error sqrt(se_a^2 + se_b^2) (independent errors) and
    whether |difference| < k x that error ("within noise"); sorted by |difference|, largest first."""
    rows = []
    for a, b in combinations(values, 2):
        d = float(values[a]) - float(values[b])
        se = math.hypot(float(errors[a]), float(errors[b]))
        rows.append({"a": a, "b": b, "difference": d, "se": se, "within_noise": abs(d) < k * se})
    df = pd.DataFrame(rows, columns=["a", "b", "difference", "se", "within_noise"])
    return df.reindex(df["difference"].abs().sort_values(ascending=False).index).reset_index(drop=True)


def plot_accuracy_dots(df: pd.DataFrame, label_col: str, value_col: str = "top1", err_col: Optional[str] = None,
                       teacher: Optional[float] = None, title: str = "", err_label: str = "± 1 standard error",
                       xlabel: str = "test top-1 (%)") -> Figure:
    """One dot per row with a horizontal error bar (`err_col`), labels on the y axis, the teacher as a dashed
    line; the axis spans the dots, their error bars and the teacher, with its extent printed in the labels
    (a dot plot reads differences as positions, without bars anchored to an arbitrary baseline)."""
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(df) + 1.6), dpi=DPI, layout="constrained")
    y = np.arange(len(df))[::-1]
    err = df[err_col].to_numpy(dtype=float) if err_col else None
    ax.errorbar(df[value_col], y, xerr=err, fmt="o", color="C0", ms=6, capsize=4, lw=1.5, label=err_label)
    for yi, v, e in zip(y, df[value_col], err if err is not None else [None] * len(df)):
        ax.annotate(f"{v:.2f}" + (f" ± {e:.2f}" if e is not None else ""), (v, yi), textcoords="offset points",
                    xytext=(0, 7), ha="center", fontsize=8)
    if teacher is not None:
        ax.axvline(teacher, color="k", ls="--", lw=1.2, label=f"teacher {teacher:.2f}")
    ax.set_yticks(y, df[label_col].astype(str).tolist(), fontsize=9)
    ax.set_ylim(-0.7, len(df) - 0.3)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return fig


# ---- several runs: structures ----------------------------------------------------------------------------

def structure_difference(a: Structure, b: Structure) -> pd.Series:
    """Per group type (heads, v_dims, neurons) and over all groups: the fraction of the dense model's groups that
    one structure runs and the other does not (0: the same structure; a skipped block's groups count as
    removed)."""
    ka, kb = kept_arrays(a), kept_arrays(b)
    out = {t: float((ka[t] != kb[t]).mean()) for t in TYPES}
    out["all"] = float(sum((ka[t] != kb[t]).sum() for t in TYPES) / sum(ka[t].size for t in TYPES))
    out["blocks"] = int(sum(x.keep != y.keep for x, y in zip(a.blocks, b.blocks)))
    return pd.Series(out)


def kept_by_type(structures: Mapping[float, Structure]) -> pd.DataFrame:
    """Per structure (e.g. budget): the kept fraction of all heads, value dims and neurons of the dense model
    (groups of skipped blocks count as removed) and the number of skipped blocks."""
    rows = {}
    for key, st in structures.items():
        k = kept_arrays(st)
        rows[key] = {**{t: float(k[t].mean()) for t in TYPES}, "blocks_skipped": sum(not b.keep for b in st.blocks)}
    return pd.DataFrame.from_dict(rows, orient="index")


def edge_blocks(structures: Mapping[float, Structure]) -> pd.DataFrame:
    """Per structure and group type: the kept fraction in the first block, the last block and the mean over the
    blocks in between (a skipped block counts as 0)."""
    rows = []
    for key, st in structures.items():
        k = kept_arrays(st)
        for t in TYPES:
            f = k[t].reshape(st.depth, -1).mean(1)
            rows.append({"structure": key, "type": t, "first": float(f[0]), "last": float(f[-1]),
                         "middle": float(f[1:-1].mean()) if st.depth > 2 else math.nan})
    return pd.DataFrame(rows)


def nestedness(structures: Mapping[float, Structure]) -> pd.DataFrame:
    """Are the structures nested? For each pair of budgets (smaller, larger) and group type, the groups kept at the
    smaller budget but removed at the larger one (a nested family has none). Keys are budgets (sorted here)."""
    keys = sorted(structures)
    kept = {b: kept_arrays(structures[b]) for b in keys}
    rows = []
    for small, large in combinations(keys, 2):
        for t in TYPES:
            v = kept[small][t] & ~kept[large][t]
            layers = sorted({int(i) for i in np.argwhere(v)[:, 0]}) if v.any() else []
            rows.append({"smaller": small, "larger": large, "type": t, "violations": int(v.sum()),
                         "kept_at_smaller": int(kept[small][t].sum()), "layers": layers})
    return pd.DataFrame(rows)
