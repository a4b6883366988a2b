"""Provenance of runs: teacher -> family -> run, and what each run changed relative to its family.

A *family* is the runs that start from the same teacher, model and data and share one recipe (epochs, steps,
learning rates, batch size...): they differ only in what a sweep varies (method, budget, seed, distillation,
UVC settings, layout). So a budget sweep made with papermill, a notebook's ablations and a whole benchmark
each show as one family, wherever their folders lie. Besides its method, budget, seed and KD, each run's
`changes` lists the settings in which it differs from its family's most common value (every run of a family
shows a setting whose values tie). This is the model map of Compress and Compare (Boggust et al.,
IEEE VIS 2024) as a table; `uvclab.ui.compare_figures.plot_provenance` draws it.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Optional

import pandas as pd

from uvclab.compare.runs import flat_config, read_runs, run_config
from uvclab.paths import REPO_ROOT, default_teacher, runs_dir

SWEPT = ("method", "macs_ratio", "seed", "kd", "kd_alpha", "kd_tau", "kd_reduction", "layout", "budget_slack")
NOT_RECIPE = ("resume",)  # how it ran, not what it computed (and the `run.` section)
SHOWN = ("method", "macs_ratio", "seed", "kd")   # columns of their own in the table, not repeated in `changes`



def _teacher(cfg: dict, dataset: str) -> tuple[str, Optional[float]]:
    """(teacher name, its test top-1 from the card) of a run's config."""
    name = cfg.get("teacher", "default")
    if name is None:
        return "(its own starting model)", None
    path = default_teacher(dataset) if name == "default" else Path(name)
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    card = path.with_suffix(".json")
    top1 = json.loads(card.read_text()).get("test_top1") if card.is_file() else None
    return path.stem, top1


def _reference(values) -> Optional[str]:
    """The family's value of a setting: the most common one; None when several tie (then every run shows it)."""
    top = Counter(values).most_common(2)
    return top[0][0] if len(top) == 1 or (top and top[0][1] > top[1][1]) else None


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def provenance(runs_root: str | Path | None = None) -> pd.DataFrame:
    """One row per finished run under `runs_root` (default `paths.runs_dir()`): teacher, teacher_top1,
    model (as built, `uvclab.compare.runs.model_label`), family, run (folder relative to the root), method, budget, seed, kd, changes (settings that differ from
    the family's most common value, 'key=value; ...', besides method, budget, seed and kd, which are columns), top1,
    test_samples (the test images top1 was measured on), macs, macs_ratio, path. Sorted by teacher,
    family, method, budget."""
    root = Path(runs_root or runs_dir())
    runs = read_runs(root)
    cols = ["teacher", "teacher_top1", "model", "family", "run", "method", "budget", "seed", "kd", "changes", "top1",
            "test_samples", "macs", "macs_ratio", "path"]
    if not len(runs):
        return pd.DataFrame(columns=cols)
    rows, configs = [], []
    for r in runs.itertuples():
        cfg = flat_config(run_config(r.path))
        teacher, t_top1 = _teacher(cfg, r.dataset)
        recipe = {k: v for k, v in cfg.items()
                  if k not in SWEPT and k not in NOT_RECIPE and not k.startswith(("uvc.", "run."))}
        rel = os.path.relpath(r.path, root)
        rows.append({"teacher": teacher, "teacher_top1": t_top1 if t_top1 is not None else r.teacher_top1,
                     "recipe": json.dumps([r.dataset, r.model_name, r.model_kwargs, recipe], sort_keys=True,
                                          default=str),
                     "model": r.model, "run": rel, "method": r.method, "budget": r.budget, "seed": getattr(r, "seed", None),
                     "kd": cfg.get("kd"), "top1": r.top1, "test_samples": getattr(r, "test_samples", None), "macs": r.macs, "macs_ratio": r.macs_ratio,
                     "path": r.path})
        configs.append({k: v for k, v in cfg.items() if k not in NOT_RECIPE and not k.startswith("run.")})
    df = pd.DataFrame(rows)
    df["family"], df["changes"] = "", ""
    for (teacher, _), g in df.groupby(["teacher", "recipe"], sort=False):
        folders = [str(Path(p).parent) for p in g["run"]]
        common = os.path.commonpath(folders) if all(f != "." for f in folders) else "."
        df.loc[g.index, "family"] = f"{teacher}: {common if common not in ('', '.') else 'several folders'}"
        keys = sorted({k for i in g.index for k in configs[i]} - set(SHOWN))
        uses = lambda i, k: not k.startswith("uvc.") or configs[i].get("method", "uvc") == "uvc"  # noqa: E731
        mode = {k: _reference(str(configs[i].get(k)) for i in g.index if uses(i, k)) for k in keys}
        for i in g.index:       # uvc.* settings count only for UVC runs (one-shot methods ignore them)
            diff = [f"{k}={_fmt(configs[i].get(k))}" for k in keys
                    if uses(i, k) and str(configs[i].get(k)) != mode[k]]
            df.loc[i, "changes"] = "; ".join(diff)
    dup = df.groupby("family")["recipe"].transform("nunique") > 1     # two recipes in one folder: number them
    if dup.any():
        nums = df[dup].groupby("family")["recipe"].transform(lambda s: pd.factorize(s)[0] + 1)
        df.loc[dup, "family"] = df.loc[dup, "family"] + " #" + nums.astype(str)
    return df[cols].sort_values(["teacher", "family", "method", "budget", "run"], ignore_index=True)


def family_summary(prov: pd.DataFrame) -> pd.DataFrame:
    """Per family: runs, methods, budgets, seeds, best top-1 and its run."""
    if not len(prov):
        return pd.DataFrame()
    g = prov.groupby(["teacher", "family"])
    best = prov.loc[g["top1"].idxmax(), ["teacher", "family", "run", "top1"]].set_index(["teacher", "family"])
    return pd.DataFrame({"runs": g.size(), "methods": g["method"].agg(lambda s: ", ".join(sorted(set(s)))),
                         "budgets": g["budget"].agg(lambda s: ", ".join(f"{b:g}" for b in sorted(set(s)))),
                         "seeds": g["seed"].nunique(), "best_top1": best["top1"], "best_run": best["run"]})
