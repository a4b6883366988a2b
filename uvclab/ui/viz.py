"""Figures of a UVC run: search traces, per-layer counts and gates, structure masks, ratios (Pareto curves:
`uvclab.ui.pareto`).

Readers turn a run folder written by `uvclab compress` (report.json, metrics.jsonl, structure.json) into
pandas objects; each `plot_*` function returns a small matplotlib `Figure` (pyplot-managed, so close it
with `plt.close(fig)` when done; in Jupyter write `fig = plot_...(...)` to show it once). The dual and
count traces follow the variables of UVC (Yu et al., ICLR 2022): budget B, dual z, counts s (heads,
neurons) and r (head dims), block keep gates.
"""
from __future__ import annotations

from typing import Mapping, Optional

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from uvclab.errors import UvclabError
from uvclab.vit.structure import Structure

DPI = 90
KEPT, PRUNED, SKIPPED = "#2b5d8a", "#f2f2f2", "#b0b0b0"   # kept / pruned cells, hatch of skipped rows
LABELS = {"macs_ratio": "MACs ratio (fraction of dense)", "params_ratio": "params ratio (fraction of dense)",
          "budget": "MACs budget (fraction of dense)", "top1": "test top-1 (%)",
          "val_top1": "validation top-1 (%)", "teacher_top1": "teacher top-1 (%)", "latency_ms": "latency (ms)",
          "macs": "MACs", "params": "parameters"}


def compact_png(fig: Figure, dpi: Optional[float] = None, colors: int = 256, method: str = "mediancut") -> bytes:
    """`fig` as a 256-colour (or `colors`) PNG (about 3x smaller than matplotlib's RGBA PNG): keeps executed
    notebooks small. method 'octree' (PIL's fast octree) is another third smaller on text-heavy figures and keeps
    small markers' colours."""
    import io
    from PIL import Image
    buf, out = io.BytesIO(), io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi or fig.dpi, bbox_inches="tight")
    how = {"mediancut": Image.Quantize.MEDIANCUT, "octree": Image.Quantize.FASTOCTREE}[method]
    Image.open(buf).convert("RGB").quantize(colors, method=how, dither=Image.Dither.NONE).save(
        out, format="png", optimize=True)
    return out.getvalue()


def use_compact_png(colors: int = 256, method: str = "mediancut") -> None:
    """In IPython/Jupyter: show every matplotlib figure through `compact_png` (no effect outside IPython);
    `method='octree'` (or fewer `colors`) for a notebook with many figures."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    ip = get_ipython()
    if ip is None:
        return
    import matplotlib_inline.backend_inline  # noqa: F401  (sets up inline figures first, so our formatter wins)
    ip.display_formatter.formatters["image/png"].for_type(
        Figure, compact_png if (colors, method) == (256, "mediancut") else
        lambda fig: compact_png(fig, colors=colors, method=method))


# ---- helpers --------------------------------------------------------------------------------------

def _search(df: pd.DataFrame) -> pd.DataFrame:
    s = df[df["stage"] == "search"] if "stage" in df else df
    if s.empty:
        raise UvclabError("No search records (stage == 'search') in these metrics; was stage 1 run?")
    return s.sort_values("step")


def _shade_warmup(ax, s: pd.DataFrame) -> None:
    if "warmup" in s and s["warmup"].astype(bool).any():
        w = s.loc[s["warmup"].astype(bool), "step"]
        ax.axvspan(w.min(), w.max(), color="0.85", zorder=0, label="warm-up (weights only)")


def _per_layer(s: pd.DataFrame, col: str) -> np.ndarray:
    return np.array(s[col].tolist(), dtype=float)             # (steps, L) or (steps, L, H)


def _layer_lines(ax, steps, values: np.ndarray, cmap="viridis") -> None:
    """One line per layer (column of `values`), coloured by layer index."""
    L = values.shape[1]
    cm = plt.get_cmap(cmap)
    for l in range(L):
        ax.plot(steps, values[:, l], color=cm(l / max(L - 1, 1)), lw=1.3)


def _layer_colorbar(fig, axes, L: int, cmap="viridis") -> None:
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(-0.5, L - 0.5))
    cb = fig.colorbar(sm, ax=axes, pad=0.015, fraction=0.03)
    cb.set_label("layer")
    cb.set_ticks(range(0, L, max(1, L // 6)))


def _label(col: str) -> str:
    return LABELS.get(col, col.replace("_", " "))


# ---- search traces --------------------------------------------------------------------------------

def plot_search_trace(metrics_df: pd.DataFrame) -> Figure:
    """Left: expected MACs ratio R vs step with the budget B (dashed) and the hard structure at epoch ends.
    Right: the budget dual z. Warm-up steps are shaded."""
    s = _search(metrics_df)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=DPI, sharex=True, layout="constrained")
    _shade_warmup(a1, s)
    _shade_warmup(a2, s)
    a1.plot(s["step"], s["expected_macs_ratio"], color="C0", lw=1.5, label="expected MACs ratio R")
    a1.plot(s["step"], s["budget"], color="k", ls="--", lw=1.2, label="budget B")
    if "target" in s and (s["target"] != s["budget"]).any():   # a budget schedule walks the target down to B
        a1.plot(s["step"], s["target"], color="0.45", ls=":", lw=1.2, label="target (schedule)")
    ep = metrics_df[metrics_df["stage"] == "search_epoch"] if "stage" in metrics_df else pd.DataFrame()
    if not ep.empty and "structure_macs_ratio" in ep:
        end_step = s.groupby("epoch")["step"].max()            # epoch -> its last step
        ep = ep[ep["epoch"].isin(end_step.index)]
        a1.plot(end_step[ep["epoch"]].to_numpy(), ep["structure_macs_ratio"], "o", color="C3", ms=5,
                label="hard structure (epoch end)")
    a1.set(xlabel="search step", ylabel="MACs ratio (fraction of dense)", title="Resource vs budget")
    a1.legend(fontsize=8, loc="best")
    a1.grid(alpha=0.3)
    a2.plot(s["step"], s["z"], color="C2", lw=1.5, label="dual z")
    a2.set(xlabel="search step", ylabel="z (budget dual, >= 0)", title="Budget dual variable z")
    a2.legend(fontsize=8, loc="best")
    a2.grid(alpha=0.3)
    return fig


def plot_counts(metrics_df: pd.DataFrame, num_heads: Optional[int] = None, head_dim: Optional[int] = None,
                mlp_hidden: Optional[int] = None) -> Figure:
    """Per-layer kept heads, kept MLP neurons and mean kept v dims per head over the search steps.

    Shape defaults come from `metrics_df.attrs` (set by `read_metrics` from structure.json); without them
    the removed counts (s, r) are plotted instead.
    """
    s = _search(metrics_df)
    H = num_heads or metrics_df.attrs.get("num_heads")
    Dh = head_dim or metrics_df.attrs.get("head_dim")
    M = mlp_hidden or metrics_df.attrs.get("mlp_hidden")
    heads, neurons = _per_layer(s, "heads_removed"), _per_layer(s, "neurons_removed")
    dims = _per_layer(s, "dims_removed").mean(-1)                # (steps, L): mean over heads
    kept = H is not None and Dh is not None and M is not None
    panels = [("heads", heads, H), ("MLP neurons", neurons, M), ("v dims per head (mean)", dims, Dh)]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.5), dpi=DPI, sharex=True, layout="constrained")
    for ax, (name, removed, full) in zip(axes, panels):
        _shade_warmup(ax, s)
        _layer_lines(ax, s["step"], full - removed if kept else removed)
        ax.set(xlabel="search step", ylabel=("kept " if kept else "removed ") + name + " (count)",
               title=("Kept " if kept else "Removed ") + name)
        if kept:
            ax.set_ylim(-0.03 * full, full * 1.05)
        ax.grid(alpha=0.3)
    _layer_colorbar(fig, axes, heads.shape[1])
    return fig


def plot_gates(metrics_df: pd.DataFrame) -> Figure:
    """Block keep probability (softmax of the skip-gate logits) per layer over steps; < 0.5 means skipped."""
    s = _search(metrics_df)
    p = _per_layer(s, "keep_prob")
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=DPI, layout="constrained")
    _shade_warmup(ax, s)
    _layer_lines(ax, s["step"], p)
    ax.axhline(0.5, color="k", ls="--", lw=1, label="skip threshold 0.5")
    ax.set(xlabel="search step", ylabel="keep probability", ylim=(-0.03, 1.03), title="Block keep gates")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    _layer_colorbar(fig, ax, p.shape[1])
    return fig


# ---- structures -----------------------------------------------------------------------------------

def structure_arrays(structure: Structure, sort_neurons: bool = True) -> dict[str, np.ndarray]:
    """0/1 arrays the mask plot shows: heads (L, H), v_dims (L, H*Dh), mlp (L, M); as listed in the structure
    (a skipped block keeps its listed heads/neurons here; `plot_masks` hatches it). `sort_neurons` puts
    each layer's kept neurons first."""
    m = structure.masks()
    heads = np.stack([b["head"].numpy() for b in m])
    v = np.stack([b["v"].numpy().reshape(-1) for b in m])
    mlp = np.stack([b["neuron"].numpy() for b in m])
    if sort_neurons:
        mlp = -np.sort(-mlp, axis=1)
    return {"heads": heads, "v_dims": v, "mlp": mlp}


def _skip_rows(ax, structure: Structure, branch: str, width: float) -> None:
    """Hatch rows whose block (or this branch) does not run."""
    for l, b in enumerate(structure.blocks):
        runs = b.runs_attn if branch == "attn" else b.runs_mlp
        if not runs:
            ax.add_patch(Rectangle((-0.5, l - 0.5), width, 1, facecolor=SKIPPED, edgecolor="k", hatch="///",
                                   lw=0, alpha=0.9))


def plot_masks(structure: Structure, sort_neurons: bool = True) -> Figure:
    """Three heatmaps over layers: kept heads, kept v dims (H*Dh columns, head separators), kept MLP neurons.

    Dark = kept, light = pruned, grey hatched = the block or branch is skipped (does not run); the kept
    counts in the titles leave skipped rows out.
    """
    arr = structure_arrays(structure, sort_neurons)
    L, H, Dh = structure.depth, structure.num_heads, structure.head_dim
    small, tick = 10, (9 if L <= 16 else 7)                       # label / tick sizes (pt)
    cmap = plt.matplotlib.colors.ListedColormap([PRUNED, KEPT])
    fig, axes = plt.subplots(1, 3, figsize=(10, max(3.8, 1.7 + 0.2 * L)), dpi=DPI, layout="constrained",
                             gridspec_kw={"width_ratios": [1, 2.2, 2.2]})
    titles = ("Heads", "Value dims", "MLP neurons")
    xlabels = ("head", f"head ({Dh} dims each)", "neuron (sorted, kept first)" if sort_neurons else "neuron")
    for ax, key, title, xl, branch in zip(axes, ("heads", "v_dims", "mlp"), titles, xlabels,
                                          ("attn", "attn", "mlp")):
        a = arr[key]
        ax.imshow(a, cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        _skip_rows(ax, structure, branch, a.shape[1])
        runs = np.array([b.runs_attn if branch == "attn" else b.runs_mlp for b in structure.blocks])
        kept = a.sum(1) * runs                                     # what actually runs
        ax.set_title(f"{title}: {int(kept.sum())}/{a.size} kept", fontsize=11)
        ax.set_xlabel(xl, fontsize=small)
        ax.set_ylabel("layer", fontsize=small)
        ax.set_yticks(range(L))
        ax.set_yticklabels([str(l) for l in range(L)])
        ax.tick_params(labelsize=tick)
        if key == "heads":
            ax.set_xticks(range(H))
        if key == "v_dims":
            for h in range(1, H):
                ax.axvline(h * Dh - 0.5, color="#d95f02", lw=1.5)
            ax.set_xticks(np.arange(H) * Dh + Dh / 2 - 0.5, [str(h) for h in range(H)])
        if key == "mlp" and sort_neurons:
            ax2 = ax.secondary_yaxis("right")
            ax2.set_yticks(range(L), [str(int(k)) if r else "skip" for k, r in zip(kept, runs)])
            ax2.tick_params(labelsize=tick)
            ax2.set_ylabel("kept neurons", fontsize=small)
    handles = [Patch(facecolor=KEPT, label="kept"), Patch(facecolor=PRUNED, edgecolor="0.6", label="pruned"),
               Patch(facecolor=SKIPPED, edgecolor="k", hatch="///", label="skipped (block/branch)")]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=small, frameon=False,
               handlelength=2.2, handleheight=1.3, columnspacing=2.0)
    return fig


def structure_ratios(structure: Structure) -> pd.DataFrame:
    """Per layer: kept fraction of heads, of all H*Dh v dims and of MLP neurons (0 where skipped), and skip flags."""
    H, Dh, M = structure.num_heads, structure.head_dim, structure.mlp_hidden
    rows = []
    for l, b in enumerate(structure.blocks):
        rows.append(dict(layer=l, heads=len(b.heads) / H if b.runs_attn else 0.0,
                         v_dims=sum(map(len, b.v_dims)) / (H * Dh) if b.runs_attn else 0.0,
                         mlp=len(b.mlp) / M if b.runs_mlp else 0.0,
                         attn_skipped=not b.runs_attn, mlp_skipped=not b.runs_mlp, block_skipped=not b.keep))
    return pd.DataFrame(rows).set_index("layer")


def plot_ratios(structures: Mapping[str, Structure]) -> Figure:
    """Per-layer kept fraction of heads / v dims / neurons, one line per structure (e.g. per budget).

    A skipped block or branch counts as 0 and is marked with an x.
    """
    if not structures:
        raise UvclabError("plot_ratios needs at least one structure, e.g. {'0.5': Structure.load(...)}.")
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.5), dpi=DPI, sharey=True, layout="constrained")
    cm = plt.get_cmap("plasma")
    n = len(structures)
    for i, (label, st) in enumerate(structures.items()):
        r = structure_ratios(st)
        color = cm(0.85 * i / max(n - 1, 1))
        for ax, col, skip in zip(axes, ("heads", "v_dims", "mlp"), ("attn_skipped", "attn_skipped", "mlp_skipped")):
            ax.plot(r.index, r[col], "-o", color=color, ms=3.5, lw=1.4, label=str(label))
            sk = r[r[skip]]
            ax.plot(sk.index, sk[col], "x", color=color, ms=9, mew=2)
    for ax, title in zip(axes, ("Heads kept", "Value dims kept (of H x Dh)", "MLP neurons kept")):
        ax.set(xlabel="layer", title=title, ylim=(-0.05, 1.05))
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("kept fraction")
    handles, labels = axes[0].get_legend_handles_labels()
    handles.append(plt.Line2D([], [], color="0.3", marker="x", ls="", ms=8, mew=2))
    labels.append("skipped")
    fig.legend(handles, labels, loc="outside right center", fontsize=8, title="structure")
    return fig


# ---- accuracy -------------------------------------------------------------------------------------

MARKERS = "osD^vP*Xh<>"
def plot_accuracy_bars(df: pd.DataFrame, label_col: str, value_col: str = "top1",
                       teacher: Optional[float] = None, title: str = "Ablation", ymin: Optional[float] = None) -> Figure:
    """Bars of `value_col` per `label_col` row (e.g. ablations), values printed on the bars, teacher line.

    The value axis starts at `ymin` (default: a whole number 3 below the lowest bar or teacher, so that gaps
    of a point stay visible; the axis label says where it starts); pass 0 for bars from zero."""
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(df) + 2), 3.5), dpi=DPI, layout="constrained")
    labels = df[label_col].astype(str).tolist()
    bars = ax.bar(range(len(df)), df[value_col], color="C0", width=0.65)
    ax.bar_label(bars, fmt="%.2f", padding=-13, fontsize=8, color="w", fontweight="bold")  # inside the bar top
    if teacher is not None:
        ax.axhline(teacher, color="k", ls="--", lw=1.2, label=f"teacher {teacher:.2f} %")
        ax.legend(fontsize=8, loc="lower right", framealpha=1)
    values = [float(v) for v in df[value_col]] + ([teacher] if teacher is not None else [])
    top = max(values, default=0.0)
    if ymin is None:
        ymin = max(0.0, float(np.floor(min(values, default=0.0) - 3)))
    ax.set_ylim(ymin, top + 0.12 * (top - ymin) if top > ymin else ymin + 1)
    ax.set_xticks(range(len(df)), labels, rotation=20 if max(map(len, labels), default=0) > 8 else 0,
                  ha="right" if max(map(len, labels), default=0) > 8 else "center")
    ylabel = _label(value_col) + (f", axis from {ymin:g}" if ymin > 0 else "")
    ax.set(xlabel=label_col.replace("_", " "), ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, axis="y")
    return fig
