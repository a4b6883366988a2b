"""Teaching figures and facts of UVC runs (notebooks 02-04): what the search did, step by step, and what the final
structures share.

Facts are plain dicts / DataFrames computed from a run folder's files (metrics.jsonl through `read_metrics`,
structure.json, uvc_state.json), so that a notebook's text can quote them instead of typing numbers by hand.
Figures follow `uvclab.ui.viz`: each `plot_*` returns a small pyplot-managed `Figure`.

* one run's search: `search_facts`, `plot_count_heatmaps` (kept counts per layer over the steps, and the
  value-dim rounding of the export), `plot_mask_snapshots` (kept counts per layer at a few steps),
  `plot_skip_heatmap` (skip probability per layer over the steps), `read_scores` / `score_cuts` /
  `plot_score_distribution` (the final group scores, kept vs removed);
* several runs: `binomial_se`, `noise_pairs`, `plot_accuracy_dots` (accuracy with its standard error),
  `structure_difference` (fraction of groups two structures disagree on), `kept_by_type`, `edge_blocks` and
  `nestedness` (across budgets).
"""
from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path
from typing import Mapping, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from uvclab.errors import UvclabError
from uvclab.paths import UVC_STATE
from uvclab.ui.viz import DPI, KEPT, PRUNED, _search, _shade_warmup
from uvclab.vit.structure import Structure

TYPES = ("heads", "v_dims", "neurons")
TYPE_LABELS = {"heads": "heads", "v_dims": "value dims", "neurons": "MLP neurons"}


def model_name(model: Mapping) -> str:
    """A report's `model` entry named as built, e.g. "ViT 12x96, 3 heads, patch 7, 28 px" (not the timm name it was
    derived from); the timm name when the kwargs do not give the shape."""
    kw = model.get("kwargs") or {}
    if not {"depth", "embed_dim"} <= set(kw):
        return str(model.get("name"))
    parts = [f"ViT {kw['depth']}x{kw['embed_dim']}"]
    if "num_heads" in kw:
        parts.append(f"{kw['num_heads']} heads")
    if "patch_size" in kw:
        parts.append(f"patch {kw['patch_size']}")
    if "img_size" in kw:
        parts.append(f"{kw['img_size']} px")
    return ", ".join(parts)


# ---- one run: the search ----------------------------------------------------------------------------------

def _shape(metrics_df: pd.DataFrame, num_heads=None, head_dim=None, mlp_hidden=None) -> tuple[int, int, int]:
    H = num_heads or metrics_df.attrs.get("num_heads")
    Dh = head_dim or metrics_df.attrs.get("head_dim")
    M = mlp_hidden or metrics_df.attrs.get("mlp_hidden")
    if not (H and Dh and M):
        raise UvclabError("The model shape is unknown: read the metrics with `read_metrics(run_dir)` from a finished "
                          "run (it reads structure.json) or pass num_heads, head_dim and mlp_hidden.")
    return int(H), int(Dh), int(M)


def kept_counts(metrics_df: pd.DataFrame, num_heads=None, head_dim=None, mlp_hidden=None) -> dict[str, np.ndarray]:
    """Per search step and layer, what the counts keep: heads (steps, L), value dims per head, mean over the
    layer's heads (steps, L), MLP neurons (steps, L); `steps` (steps,) and `warmup` (steps,) bool too.
    The log holds ceil(s), ceil(r) (the straight-through counts), not which groups: the kept *sets* per step
    are not logged."""
    s = _search(metrics_df)
    H, Dh, M = _shape(metrics_df, num_heads, head_dim, mlp_hidden)
    arr = lambda c: np.array(s[c].tolist(), dtype=float)  # noqa: E731
    return {"steps": s["step"].to_numpy(), "warmup": s["warmup"].astype(bool).to_numpy() if "warmup" in s
            else np.zeros(len(s), bool),
            "heads": H - arr("heads_removed"), "v_dims": Dh - arr("dims_removed").mean(-1),
            "neurons": M - arr("neurons_removed")}


def search_facts(metrics_df: pd.DataFrame, report: Optional[Mapping] = None, tol: float = 0.01) -> dict:
    """Numbers a text about the search can quote: budget B, the step the target reaches B, the first step R comes
    within `tol` of B (None if never), R at the end of the search and its minimum, the lag between the two,
    the mean and largest gap R - target while the target walks to B, the final exported MACs ratio (from
    `report`), and the skip gates' largest skip probability (layer, step) and change from the first to the last
    logged step (most negative / positive over layers)."""
    s = _search(metrics_df)
    B = float(s["budget"].iloc[-1])
    R = s["expected_macs_ratio"].to_numpy(dtype=float)
    steps = s["step"].to_numpy()
    target = s["target"].to_numpy(dtype=float) if "target" in s else np.full(len(s), B)
    at_b = np.flatnonzero(np.isclose(target, B, atol=1e-9) & ~s.get("warmup", pd.Series(False, s.index))
                          .astype(bool).to_numpy())
    near = np.flatnonzero(R <= B + tol)
    skip = 1.0 - np.array(s["keep_prob"].tolist(), dtype=float)            # (steps, L)
    i, l = np.unravel_index(int(np.argmax(skip)), skip.shape)
    search_steps = s[~s["warmup"].astype(bool)] if "warmup" in s else s
    out = {"budget": B, "tol": tol, "first_step": int(steps[0]), "last_step": int(steps[-1]),
           "search_start_step": int(search_steps["step"].iloc[0]) if len(search_steps) else None,
           "target_reaches_b_step": int(steps[at_b[0]]) if len(at_b) else None,
           "r_within_tol_step": int(steps[near[0]]) if len(near) else None,
           "r_end": float(R[-1]), "r_min": float(R.min()), "r_min_step": int(steps[int(R.argmin())]),
           "z_end": float(s["z"].iloc[-1]), "z_max": float(s["z"].max()),
           "max_skip_prob": float(skip[i, l]), "max_skip_layer": int(l), "max_skip_step": int(steps[i]),
           "skip_prob_end_max": float(skip[-1].max())}
    walk = (steps >= (out["search_start_step"] or steps[0])) & (steps <= (out["target_reaches_b_step"] or steps[-1]))
    gap = R[walk] - target[walk]                                            # R above the target while it walks
    out["walk_gap_mean"] = float(gap.mean()) if gap.size else None
    out["walk_gap_max"] = float(gap.max()) if gap.size else None
    out["skip_prob_change_min"] = float((skip[-1] - skip[0]).min())         # most negative: moved towards keeping
    out["skip_prob_change_max"] = float((skip[-1] - skip[0]).max())
    out["lag_steps"] = (None if out["r_within_tol_step"] is None or out["target_reaches_b_step"] is None
                        else out["r_within_tol_step"] - out["target_reaches_b_step"])
    if report is not None:
        out["exported_macs_ratio"] = float(report["macs_ratio"])
        out["search_structure_macs_ratio"] = (report.get("selection") or {}).get("search_structure_cost_ratio")
    return out


def _int_colorbar(fig, im, ax, label: str, vmax: float) -> None:
    cb = fig.colorbar(im, ax=ax, pad=0.02, fraction=0.05)
    cb.set_label(label, fontsize=8)
    cb.ax.tick_params(labelsize=8)
    if vmax <= 8:
        cb.set_ticks(range(int(vmax) + 1))
    else:
        cb.locator = plt.MaxNLocator(integer=True, nbins=6)
        cb.update_ticks()


def _layer_axis(ax, L: int) -> None:
    ax.set_ylabel("layer", fontsize=9)
    ax.set_yticks(range(0, L, max(1, L // 12)))
    ax.tick_params(labelsize=8)


def plot_count_heatmaps(metrics_df: pd.DataFrame, structure: Optional[Structure] = None,
                        dims_multiple: int = 1) -> Figure:
    """Kept heads, kept value dims per head (mean over the layer's heads) and kept MLP neurons, one heatmap each
    (rows = layers, columns = search steps; every layer visible, integer colour ticks); warm-up steps are left of
    the white line. With `structure`: a fourth panel, per layer, the value dims per kept head the counts ask for
    at the end of the search vs the exported width (rounded to `dims_multiple`, then fitted to the budget)."""
    k = kept_counts(metrics_df)
    H, Dh, M = _shape(metrics_df)
    L = k["heads"].shape[1]
    n = 4 if structure is not None else 3
    fig, axes = plt.subplots(1, n, figsize=(3.3 * n, max(3.2, 1.3 + 0.17 * L)), dpi=DPI, layout="constrained",
                             gridspec_kw={"width_ratios": [1.2] * 3 + ([0.8] if n == 4 else [])})
    steps = k["steps"]
    extent = (steps[0] - 0.5, steps[-1] + 0.5, L - 0.5, -0.5)
    for ax, key, full, title in zip(axes, ("heads", "v_dims", "neurons"), (H, Dh, M),
                                    ("Kept heads", "Kept value dims per head\n(mean over the layer's heads)",
                                     "Kept MLP neurons")):
        cmap = plt.get_cmap("viridis", H + 1) if key == "heads" else "viridis"
        lo = -0.5 if key == "heads" else 0
        hi = H + 0.5 if key == "heads" else full
        im = ax.imshow(k[key].T, aspect="auto", interpolation="nearest", cmap=cmap, vmin=lo, vmax=hi,
                       extent=extent)
        if k["warmup"].any():
            ax.axvline(steps[k["warmup"]].max() + 0.5, color="w", lw=1.5)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("search step", fontsize=9)
        _layer_axis(ax, L)
        _int_colorbar(fig, im, ax, f"kept (of {full})", full)
    if structure is not None:
        ax = axes[3]
        counts = k["v_dims"][-1]
        exported = np.array([np.mean([len(d) for d in b.v_dims]) if b.heads and b.runs_attn else np.nan
                             for b in structure.blocks])
        y = np.arange(L)
        ax.plot(counts, y, "o", color="C1", ms=5, label="search end: count")
        ax.plot(exported, y, "s", mfc="none", color=KEPT, ms=7, mew=1.5, label="exported width")
        for m in range(0, Dh + 1, max(dims_multiple, 1)) if dims_multiple > 1 else []:
            ax.axvline(m, color="0.8", lw=0.8, zorder=0)
        ax.set(xlim=(-1, Dh + 1), ylim=(L - 0.5, -0.5))
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_xlabel("value dims per kept head", fontsize=9)
        ax.set_title(f"Rounding to multiples of {dims_multiple}" if dims_multiple > 1 else "Exported width",
                     fontsize=10)
        _layer_axis(ax, L)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=1, frameon=False)
    return fig


def snapshot_steps(metrics_df: pd.DataFrame, n: int = 5) -> list[int]:
    """`n` logged steps spread over the search after warm-up: the first search step, evenly spaced ones, the last."""
    s = _search(metrics_df)
    s = s[~s["warmup"].astype(bool)] if "warmup" in s and (~s["warmup"].astype(bool)).any() else s
    st = s["step"].to_numpy()
    idx = np.unique(np.linspace(0, len(st) - 1, max(n, 1)).round().astype(int))
    return [int(st[i]) for i in idx]


def plot_mask_snapshots(metrics_df: pd.DataFrame, steps: Optional[Sequence[int]] = None, n: int = 5) -> Figure:
    """Kept counts per layer at a few search steps (default `snapshot_steps(n)`), one heat strip per group type:
    rows = layers, columns = the snapshots, each cell annotated with its count and coloured by the kept fraction.
    Only counts are logged per step (which heads / dims / neurons are kept is decided from the scores at the
    end), so the snapshots show how many are kept, not which."""
    k = kept_counts(metrics_df)
    H, Dh, M = _shape(metrics_df)
    steps = list(steps) if steps is not None else snapshot_steps(metrics_df, n)
    idx = [int(np.flatnonzero(k["steps"] == st)[0]) for st in steps]
    L = k["heads"].shape[1]
    fig, axes = plt.subplots(1, 3, figsize=(min(12.0, 2.0 + 2.0 * len(steps)), max(3.4, 1.3 + 0.24 * L)), dpi=DPI,
                             layout="constrained", sharey=True)
    for ax, key, full in zip(axes, ("heads", "v_dims", "neurons"), (H, Dh, M)):
        vals = k[key][idx].T                                         # (L, snapshots)
        im = ax.imshow(vals / full, aspect="auto", cmap="Blues", vmin=0, vmax=1.25, interpolation="nearest")
        for (l, j), v in np.ndenumerate(vals):
            txt = f"{v:.0f}" if key != "v_dims" else f"{v:.1f}".rstrip("0").rstrip(".")
            ax.text(j, l, txt, ha="center", va="center", fontsize=8, color="w" if v / full > 0.8 else "k")
        ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=8)
        ax.set_xlabel("search step", fontsize=9)
        ax.set_title(f"kept {TYPE_LABELS[key]}" + (" per head (mean)" if key == "v_dims" else "") + f" (of {full})",
                     fontsize=10)
        ax.set_yticks(range(L))
        ax.tick_params(axis="y", labelsize=8)
    axes[0].set_ylabel("layer", fontsize=9)
    cb = fig.colorbar(im, ax=axes, pad=0.01, fraction=0.025, ticks=[0, 0.25, 0.5, 0.75, 1])
    cb.ax.set_ylim(0, 1)                                           # the colour scale runs on to 1.25 (lighter full cells)
    cb.set_label("kept fraction", fontsize=8)
    cb.ax.tick_params(labelsize=8)
    return fig


def plot_skip_heatmap(metrics_df: pd.DataFrame) -> Figure:
    """Left: skip probability (1 - keep probability of the gate) per layer over the search steps; a block is
    skipped when it passes 0.5 (the colour scale ends there). Right: its change since the first logged step
    (symmetric scale: how far the gates moved at all). Warm-up steps are left of the white line."""
    s = _search(metrics_df)
    p = 1.0 - np.array(s["keep_prob"].tolist(), dtype=float)
    steps = s["step"].to_numpy()
    L = p.shape[1]
    d = p - p[0]
    lim = max(float(np.abs(d).max()), 1e-3)
    fig, axes = plt.subplots(1, 2, figsize=(10, max(3.0, 1.3 + 0.17 * L)), dpi=DPI, layout="constrained")
    extent = (steps[0] - 0.5, steps[-1] + 0.5, L - 0.5, -0.5)
    for ax, vals, cmap, lo, hi, title, label in (
            (axes[0], p, "magma_r", 0, 0.5, f"Skip probability (largest reached {p.max():.3f})",
             "skip probability (0.5: skipped)"),
            (axes[1], d, "RdBu_r", -lim, lim, f"Change since step {int(steps[0])} (start {p[0].mean():.3f})",
             "change of skip probability")):
        im = ax.imshow(vals.T, aspect="auto", interpolation="nearest", cmap=cmap, vmin=lo, vmax=hi, extent=extent)
        if "warmup" in s and s["warmup"].astype(bool).any():
            ax.axvline(s.loc[s["warmup"].astype(bool), "step"].max() + 0.5, color="0.3", lw=1.2, ls="--")
        ax.set_xlabel("search step", fontsize=9)
        ax.set_title(title, fontsize=10)
        _layer_axis(ax, L)
        cb = fig.colorbar(im, ax=ax, pad=0.02, fraction=0.05)
        cb.set_label(label, fontsize=8)
        cb.ax.tick_params(labelsize=8)
    return fig


# ---- one run: the final group scores -------------------------------------------------------------------

def read_scores(run_dir: str | Path) -> Optional[dict[str, np.ndarray]]:
    """The final group scores a UVC run ranked its groups by (uvc_state.json "scores": heads (L, H), v_dims
    (L, H, Dh), neurons (L, M)), or None for runs without them (not UVC, or written before they were saved)."""
    path = Path(run_dir) / UVC_STATE
    if not path.is_file():
        return None
    sc = json.loads(path.read_text()).get("scores")
    if not sc:
        return None
    return {"heads": np.asarray(sc["heads"], float), "v_dims": np.asarray(sc["dims"], float),
            "neurons": np.asarray(sc["neurons"], float)}


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


def score_cuts(scores: Mapping[str, np.ndarray], structure: Structure) -> pd.DataFrame:
    """Per group type: groups kept / removed, the lowest kept and the highest removed score, and how many removed
    groups score above the lowest kept one (the cut is made per layer and per MAC saved, then fitted to the
    exported budget, so it is not one global threshold per type)."""
    kept = kept_arrays(structure)
    rows = []
    for t in TYPES:
        sc, k = np.asarray(scores[t]).ravel(), kept[t].ravel()
        lo = float(sc[k].min()) if k.any() else math.nan
        rows.append({"type": t, "groups": sc.size, "kept": int(k.sum()), "removed": int((~k).sum()),
                     "lowest_kept": lo, "highest_removed": float(sc[~k].max()) if (~k).any() else math.nan,
                     "removed_above_lowest_kept": int((sc[~k] > lo).sum()) if k.any() else 0})
    return pd.DataFrame(rows).set_index("type")


def plot_score_distribution(scores: Mapping[str, np.ndarray], structure: Structure) -> Figure:
    """Histograms of the final group scores (log scale), kept (dark) and removed (light) stacked, one panel per
    group type; dashed: the lowest kept score, dotted: the highest removed one."""
    kept = kept_arrays(structure)
    cuts = score_cuts(scores, structure)
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.3), dpi=DPI, layout="constrained")
    for ax, t in zip(axes, TYPES):
        sc, k = np.asarray(scores[t]).ravel(), kept[t].ravel()
        pos = sc[sc > 0]
        if pos.size == 0:
            ax.set_title(f"{TYPE_LABELS[t]}: no positive scores", fontsize=10)
            continue
        floor = pos.min()
        v = np.log10(np.maximum(sc, floor))
        bins = np.linspace(v.min(), v.max() + 1e-9, 31 if sc.size > 60 else 13)
        ax.hist([v[k], v[~k]], bins=bins, stacked=True, color=[KEPT, "#c9c9c9"], edgecolor="w", lw=0.3,
                label=["kept", "removed"])
        c = cuts.loc[t]
        if not math.isnan(c.lowest_kept) and c.lowest_kept > 0:
            ax.axvline(math.log10(c.lowest_kept), color="k", ls="--", lw=1.2, label="lowest kept")
        if not math.isnan(c.highest_removed) and c.highest_removed > 0:
            ax.axvline(math.log10(c.highest_removed), color="C3", ls=":", lw=1.5, label="highest removed")
        ax.set_title(f"{TYPE_LABELS[t]}: {int(k.sum())}/{sc.size} kept", fontsize=10)
        ax.set_xlabel("log10 group score", fontsize=9)
        ax.yaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("groups", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=KEPT), plt.Rectangle((0, 0), 1, 1, color="#c9c9c9"),
               plt.Line2D([], [], color="k", ls="--", lw=1.2), plt.Line2D([], [], color="C3", ls=":", lw=1.5)]
    fig.legend(handles, ["kept", "removed", "lowest kept score", "highest removed score"], loc="outside lower center",
               ncol=4, fontsize=8, frameon=False)
    return fig


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
