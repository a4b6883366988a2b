"""Reading run folders: reports, metrics traces, every run under a folder as one table, and the tables of
`uvclab runs` (one row per run) and `uvclab show` (one run: report, structure per block, files).

Works on what `compress` writes (and on run folders of earlier versions: renamed keys are mapped).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional

import pandas as pd

from uvclab.engine.config import CompressConfig, into_sections, sections
from uvclab.errors import UvclabError
from uvclab.paths import CONFIG, METRICS, REPORT, STRUCTURE
from uvclab.vit.structure import Structure
from uvclab.vit.t2t_vit import card_kwargs


def read_report(run_dir: str | Path) -> dict:
    """The run's report.json as a dict."""
    path = Path(run_dir) / REPORT
    if not path.is_file():
        raise UvclabError(f"No report.json in '{run_dir}'. Point at a folder written by `uvclab compress` "
                          "(the run may still be in progress).")
    return _current_keys(json.loads(path.read_text()))


def run_config(run_dir: str | Path) -> dict:
    """The run folder's config.yaml as a dict by section ({} without one; uvclab 0.2's flat keys moved in)."""
    import yaml
    path = Path(run_dir) / CONFIG
    return into_sections(CompressConfig, yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def flat_config(cfg: Mapping) -> dict:
    """A config with its sections' settings as `run.<key>`, `uvc.<key>` entries (one level, for tables)."""
    flat = {k: v for k, v in cfg.items() if k not in sections(CompressConfig)}
    for name in sections(CompressConfig):
        flat.update({f"{name}.{k}": v for k, v in (cfg.get(name) or {}).items()})
    return flat


LEGACY_KEYS = {"macs_ratio_target": "budget", "val_top1_after_search": "val_top1_before_finetune",
               "val_top1_after_prune": "val_top1_before_finetune"}  # report keys before uvclab 0.2


def _current_keys(report: dict) -> dict:
    for old, new in LEGACY_KEYS.items():
        if old in report:
            report.setdefault(new, report.pop(old))
    return report


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    """metrics.jsonl as a DataFrame, one row per record (column `stage`: search | search_epoch | finetune_epoch).

    List-valued fields (per-layer counts, gates) stay lists. A half-written last line (run in progress) is
    skipped. When structure.json is present, `df.attrs` holds num_heads, head_dim and mlp_hidden so that
    `plot_counts` can show kept (not removed) counts.
    """
    run_dir = Path(run_dir)
    path = run_dir / METRICS
    if not path.is_file():
        raise UvclabError(f"No metrics.jsonl in '{run_dir}'. Point at a folder written by `uvclab compress`.")
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    records = []
    for i, ln in enumerate(lines):
        try:
            records.append(json.loads(ln))
        except json.JSONDecodeError as e:
            if i < len(lines) - 1:
                raise UvclabError(f"{path} line {i + 1} is not JSON ({e}); the file is corrupt.") from e
    df = pd.DataFrame.from_records(records)
    if "macs_ratio" in df and "expected_macs_ratio" not in df:  # metrics written before uvclab 0.2
        df = df.rename(columns={"macs_ratio": "expected_macs_ratio"})
    if (run_dir / STRUCTURE).is_file():
        s = Structure.load(run_dir / STRUCTURE)
        df.attrs.update(num_heads=s.num_heads, head_dim=s.head_dim, mlp_hidden=s.mlp_hidden)
    return df


def method_label(config: Mapping) -> str:
    """The benchmark's name for what a `uvclab compress` config does: a one-shot method's name, or 'uvc' plus
    '_prune_only' (no block skipping) or '_skip_only' (no pruning inside blocks), plus '_hard_kd' or '_no_kd'
    when not soft KD."""
    if config.get("method", "uvc") != "uvc":
        return config["method"]
    uvc = config.get("uvc", {}) or {}
    prune, skip = uvc.get("prune", True), uvc.get("block_skip", True)
    name = "uvc" + {(True, True): "", (True, False): "_prune_only", (False, True): "_skip_only"}.get(
        (prune, skip), "_nothing")
    kd = config.get("kd", "soft")
    return name + {"soft": "", "hard": "_hard_kd", "none": "_no_kd"}.get(kd, f"_{kd}_kd")


def read_runs(runs_root: str | Path | None = None) -> pd.DataFrame:
    """One row per finished run folder under `runs_root` (any depth; default `paths.runs_dir()`, i.e.
    $UVCLAB_RUNS or ./runs): report fields, model_name, model_kwargs (JSON), name (folder), path, and the
    run's settings from config.yaml where the report lacks them (`kd`, `warmup_epochs`, ..., `uvc.prune`,
    `uvc.block_skip`, ...). `method` is the report's (benchmark runs) or `method_label(config)`.

    Sorted by dataset, model and MACs budget; empty (with those columns) when there is none.
    """
    from uvclab.paths import runs_dir
    rows = []
    for rep in sorted(Path(runs_root or runs_dir()).glob(f"**/{REPORT}")):
        try:
            r = _current_keys(json.loads(rep.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue                                   # being written or corrupt: not a finished run
        cfg = run_config(rep.parent)
        settings = {k: v for k, v in flat_config(cfg).items() if k != "model_kwargs"}
        model = r.pop("model", {}) or {}
        if cfg:  # a plain `compress` report says method=uvc; the label also names the UVC variant
            r["method"] = r["method"] if r.get("method") not in (None, "uvc") else method_label(cfg)
        rows.append(dict({k: v for k, v in settings.items() if k not in r}, **r, model_name=model.get("name"),
                         model_kwargs=json.dumps(card_kwargs(model.get("name"), model.get("kwargs", {}))),
                         name=rep.parent.name,
                         path=str(rep.parent)))
    cols = ["dataset", "model_name", "budget", "method", "name", "path"]
    if not rows:
        return pd.DataFrame(columns=cols)
    return pd.DataFrame(rows).sort_values(["dataset", "model_name", "budget", "name"],
                                          ignore_index=True)


def search_summary(run_dir: str | Path) -> dict:
    """How a run's search ended, from metrics.jsonl: steps, final expected MACs ratio R and dual z, the
    largest z, the hard structure's MACs ratio and validation at the last search epoch, best fine-tune
    validation. NaN where the run has no search (one-shot methods)."""
    nan = float("nan")
    m = read_metrics(run_dir)
    s = m[m.stage == "search"] if "stage" in m else m.iloc[:0]
    ep = m[m.stage == "search_epoch"] if "stage" in m else m.iloc[:0]
    ft = m[m.stage == "finetune_epoch"] if "stage" in m else m.iloc[:0]
    last = lambda df, col: df[col].iloc[-1] if len(df) and col in df else nan  # noqa: E731
    return {"search_steps": len(s), "final_R": last(s, "expected_macs_ratio"), "final_z": last(s, "z"),
            "max_z": s["z"].max() if len(s) else nan, "last_epoch_structure_macs": last(ep, "structure_macs_ratio"),
            "last_epoch_val_hard": last(ep, "val_top1_hard"),
            "best_finetune_val": ft["val_top1"].max() if len(ft) else nan}


def find_run(config: Mapping, runs_root: str | Path) -> Optional[Path]:
    """The first finished run folder under `runs_root` (any depth, sorted) whose config.yaml equals `config`
    (a `CompressConfig.to_dict()`), or None: a notebook can reuse a run an earlier notebook made."""
    for rep in sorted(Path(runs_root).glob(f"**/{REPORT}")):
        if (rep.parent / CONFIG).is_file() and run_config(rep.parent) == dict(config):
            return rep.parent
    return None


# ---- `uvclab runs` and `uvclab show` ---------------------------------------------------------------

RUN_COLUMNS = ["run", "dataset", "method", "budget_kind", "budget", "seed", "top1", "test_samples", "macs_ratio",
               "latency_ratio_measured", "seconds", "path"]
FIGURE_SUFFIXES = {".png", ".svg", ".pdf", ".jpg", ".jpeg"}


def runs_table(runs_root: str | Path | None = None) -> pd.DataFrame:
    """One row per finished run under `runs_root` (default: the runs folder): `RUN_COLUMNS`, `run` being the
    folder relative to the root; a field an older report lacks is NaN (`latency_ratio_measured`: latency
    budgets only). A given root that is not a folder is an error naming it; a missing default root has no runs."""
    from uvclab.paths import runs_dir
    root = Path(runs_root or runs_dir())
    if not root.is_dir() and runs_root is None:
        return pd.DataFrame(columns=RUN_COLUMNS)
    if not root.is_dir():
        raise UvclabError(f"'{root}' is not a folder. Give the folder that holds the run folders (default: "
                          "$UVCLAB_RUNS or ./runs).")
    df = read_runs(root)
    df["run"] = [str(Path(p).relative_to(root)) if Path(p) != root else "." for p in df["path"]]
    return df.reindex(columns=RUN_COLUMNS)


def block_table(structure: Structure) -> list[dict]:
    """Per block what a structure keeps, as counts of the dense model's: heads, value dims (all heads
    together), MLP neurons, and what is skipped ('block', 'attn', 'mlp' or '')."""
    rows = []
    for l, b in enumerate(structure.blocks):
        skipped = "block" if not b.keep else "attn" if not b.runs_attn else "mlp" if not b.runs_mlp else ""
        rows.append({"block": l, "heads": len(b.heads) if b.runs_attn else 0,
                     "v_dims": sum(map(len, b.v_dims)) if b.runs_attn else 0,
                     "qk_dims": sum(map(len, b.qk_dims)) if b.runs_attn else 0,
                     "mlp": len(b.mlp) if b.runs_mlp else 0, "skipped": skipped})
    return rows


def run_details(run_dir: str | Path) -> dict:
    """What `uvclab show` prints: the report, the structure per block (`block_table`, with the dense sizes),
    and every file of the run folder (relative paths; `figures`: the images among them)."""
    run_dir = Path(run_dir)
    report = read_report(run_dir)
    structure = None
    if (run_dir / "structure.json").is_file():
        s = Structure.load(run_dir / "structure.json")
        structure = {"num_heads": s.num_heads, "head_dim": s.head_dim, "mlp_hidden": s.mlp_hidden,
                     "blocks": block_table(s)}
    files = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    return {"path": str(run_dir), "report": report, "structure": structure, "files": files,
            "figures": [f for f in files if Path(f).suffix.lower() in FIGURE_SUFFIXES]}
