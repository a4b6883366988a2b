"""Teaching figures and facts of UVC runs (notebooks 02-04): what the search did, step by step, and what the final
structures share.

Facts are plain dicts / DataFrames computed from a run folder's files (metrics.jsonl through `read_metrics`,
structure.json, uvc_state.json), so that a notebook's text can quote them instead of typing numbers by hand.
Figures follow `uvclab.ui.viz`: each `plot_*` returns a small pyplot-managed `Figure`.

* one run's search: `search_facts`, `plot_count_heatmaps` (kept counts per layer over the steps, and the
  value-dim rounding of the export), `plot_mask_snapshots` (kept counts per layer at a few steps),
  `plot_skip_heatmap` (skip probability per layer over the steps), `read_scores` / `score_cuts` /
  `plot_score_distribution` (the final group scores, kept vs removed);
* several runs: `uvclab.ui.run_facts` (accuracy with its standard error, structure differences, nestedness).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from uvclab.compare.runs import model_label
from uvclab.errors import UvclabError
from uvclab.paths import UVC_STATE
from uvclab.ui.run_facts import TYPES, kept_arrays
from uvclab.ui.viz import DPI, KEPT, _search
from uvclab.vit.structure import Structure

TYPE_LABELS = {"heads": "heads", "v_dims": "value dims", "neurons": "MLP neurons"}


def model_name(model: Mapping) -> str:
    """A report's `model` entry named as built with its head count, e.g. "ViT 12x96, 3 heads, patch 7, 28 px"
    (`uvclab.compare.runs.model_label` plus heads); the timm name when the kwargs do not give the shape."""
    kw = model.get("kwargs") or {}
    if not {"depth", "embed_dim"} <= set(kw):
        return str(model.get("name"))
    first, _, rest = model_label(model.get("name"), kw).partition(", ")
    heads = [f"{kw['num_heads']} heads"] if "num_heads" in kw else []
    return ", ".join([first, *heads] + ([rest] if rest else []))


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
