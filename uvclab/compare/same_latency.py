"""Methods compared at the same *measured* latency (issue 25): each method's frontier (mean over seeds per budget
of measured latency ratio and accuracy, every model timed in one process), read off by linear interpolation at a
reference method's measured latency. A method is only read inside the latency range its budgets span: outside
it there is no number, not an extrapolation.

Rows in: one per run with `method`, `budget`, `seed`, `latency` (measured ratio to dense), `top1`, `val_top1`.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd


def frontier(df: pd.DataFrame, method: str) -> pd.DataFrame:
    """One method's points: mean latency, top-1 and validation over seeds per budget, sorted by latency."""
    g = df[df.method == method].groupby("budget")
    f = g.agg(latency=("latency", "mean"), top1=("top1", "mean"), val_top1=("val_top1", "mean"),
              seeds=("seed", "count"))
    return f.sort_values("latency").reset_index()


def at_latency(points: pd.DataFrame, latency: float, y: str = "top1") -> Optional[float]:
    """`y` of a frontier at `latency`, linearly interpolated between its points; None outside their range."""
    if points.empty or not points.latency.min() <= latency <= points.latency.max():
        return None
    return float(np.interp(latency, points.latency, points[y]))


def equal_latency_table(df: pd.DataFrame, reference: str, baselines: list[str], margin: float = 0.5) -> pd.DataFrame:
    """Per budget of `reference` (e.g. the latency-budget UVC): its mean measured latency and top-1 (sd over
    seeds), every baseline's frontier read at that latency (the best chosen on interpolated validation, test
    never chooses), the gap, and whether the reference clears the best by `margin` points."""
    fronts = {m: frontier(df, m) for m in baselines}
    rows = []
    for budget, d in df[df.method == reference].groupby("budget", sort=False):
        lat = d.latency.mean()
        read = {m: (at_latency(f, lat, "val_top1"), at_latency(f, lat)) for m, f in fronts.items()}
        read = {m: v for m, v in read.items() if v[0] is not None}
        best = max(read, key=lambda m: read[m][0]) if read else None
        sd = d.top1.std() if len(d) > 1 else 0.0
        row = {"budget": budget, "seeds": len(d), "latency": lat, "latency_max": d.latency.max(),
               "top1": d.top1.mean(), "top1_sd": sd, "best_baseline": best,
               "baseline_top1": read[best][1] if best else None,
               "readable": ", ".join(sorted(read)) or "-"}
        row["gap"] = row["top1"] - row["baseline_top1"] if best else None
        row["verdict"] = ("-" if best is None else f"clears +{margin:g}" if row["gap"] >= margin
                          else "better, below the margin" if row["gap"] > sd else "within noise" if row["gap"] >= -sd
                          else "baseline better")
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(t: pd.DataFrame, reference: str) -> str:
    lines = [f"| budget | {reference} latency (max) | its top-1 (seeds) | best baseline at that latency (on "
             "validation) | its top-1 (interpolated) | gap | verdict | baselines readable there |",
             "|---:|---:|---:|---|---:|---:|---|---|"]
    for r in t.itertuples():
        sd = f" ± {r.top1_sd:.2f}" if r.seeds > 1 else ""
        none = pd.isna(r.best_baseline)  # a frame stores the missing baseline as NaN
        base, gap = ("-", "-") if none else (f"{r.baseline_top1:.2f}", f"{r.gap:+.2f}")
        lines.append(f"| {r.budget:g} | {r.latency:.3f} ({r.latency_max:.3f}) | {r.top1:.2f}{sd} ({r.seeds}) | "
                     f"{'-' if none else r.best_baseline} | {base} | {gap} | {r.verdict} | {r.readable} |")
    return "\n".join(lines) + "\n"
