"""Reading run folders: reports, metrics traces, every run under a folder as one table, and the tables of
`uvclab runs` (one row per run) and `uvclab show` (one run: report, structure per block, files).

Works on what `compress` writes (and on run folders of earlier versions: renamed keys are mapped).
"""
from __future__ import annotations

import hashlib
import json
import re
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
    '_prune_only' (no block skipping) or '_skip_only' (no pruning inside blocks), '_no_dims' (value dims kept
    whole), '_start' (cut from the starting weights, `uvc.final_weights`), plus '_hard_kd' or '_no_kd'
    when not soft KD, plus '_latency' for a latency budget (its budget is not a MACs ratio)."""
    if config.get("method", "uvc") != "uvc":
        return config["method"]
    uvc = config.get("uvc", {}) or {}
    prune, skip = uvc.get("prune", True), uvc.get("block_skip", True)
    name = "uvc" + {(True, True): "", (True, False): "_prune_only", (False, True): "_skip_only"}.get(
        (prune, skip), "_nothing")
    name += "_no_dims" if prune and not uvc.get("prune_dims", True) else ""   # value dims kept whole
    name += "_start" if uvc.get("final_weights", "search") == "start" else ""  # cut from the starting weights
    kd = config.get("kd", "soft")
    name += {"soft": "", "hard": "_hard_kd", "none": "_no_kd"}.get(kd, f"_{kd}_kd")
    return name + ("_latency" if config.get("budget_kind", "macs") == "latency" else "")


_TIMM_SIZES = {"tiny": (12, 192), "small": (12, 384), "base": (12, 768), "large": (24, 1024), "huge": (32, 1280)}
_T2T = {"t2t_vit_7": (7, 256), "t2t_vit_10": (10, 256), "t2t_vit_12": (12, 256), "t2t_vit_14": (14, 384),
        "t2t_vit_19": (19, 448), "t2t_vit_24": (24, 512)}


def model_label(name: Optional[str], kwargs: Optional[Mapping | str] = None) -> str:
    """The model as built, from a report's model name and kwargs: 'ViT 12x96, patch 7, 28 px' (depth x width,
    patch, image size), 'T2T-ViT 14x384, 224 px'. The timm name only supplies what the kwargs do not override
    (a 28 px width-96 model built from 'deit_tiny_patch16_224' is not a DeiT-Tiny); an unknown name is returned
    as it is."""
    kw = json.loads(kwargs) if isinstance(kwargs, str) else dict(kwargs or {})
    name = name or "?"
    if name in _T2T:
        depth, width = _T2T[name]
        return f"T2T-ViT {kw.get('depth', depth)}x{kw.get('embed_dim', width)}, {kw.get('img_size', 224)} px"
    size = re.search(r"_(tiny|small|base|large|huge)", name)
    patch = re.search(r"patch(\d+)(?:_(\d+))?", name)
    if not size and not {"depth", "embed_dim"} <= set(kw):
        return name
    depth, width = _TIMM_SIZES[size.group(1)] if size else (None, None)
    depth, width = kw.get("depth", depth), kw.get("embed_dim", width)
    p = kw.get("patch_size", int(patch.group(1)) if patch else None)
    img = kw.get("img_size", int(patch.group(2)) if patch and patch.group(2) else 224)
    return f"ViT {depth}x{width}" + (f", patch {p}" if p else "") + f", {img} px"


NOT_SETTINGS = ("method", "macs_ratio", "budget", "seed", "resume", "data_root")  # and the run.* section


def settings_key(config: Mapping) -> str:
    """A short fingerprint of what a run computed apart from its method, budget and seed (a config by section,
    as `run_config` returns it): two runs with the same key differ only in those, so they may be averaged over
    seeds and drawn on one line; runs with different keys never are. How the job ran (`run.*`: device,
    threads, bars) does not count."""
    flat = {k: v for k, v in flat_config(config).items() if k not in NOT_SETTINGS and not k.startswith("run.")}
    return hashlib.sha1(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:8]


def pareto_points(runs: pd.DataFrame, root: str | Path) -> pd.DataFrame:
    """`read_runs` rows grouped into Pareto points: one per (model, method, settings, budget), settings being
    `settings_key` of each run's config. Runs with the same config and seed (copies, e.g. one run reused by two
    notebooks) count once; different seeds give the mean, the sd (`top1_sd`, NaN for one seed) and `seeds`.
    `label`: the method plus the folders (relative to `root`, first part: the notebook that wrote them) its runs
    came from, and '#k' where one method has several settings under the same folders."""
    cols = ["model", "method", "settings", "label", "budget", "macs_ratio", "top1", "top1_sd", "seeds", "runs",
            "test_samples", "teacher_top1", "folders"]
    if not len(runs):
        return pd.DataFrame(columns=cols)
    df = runs.copy()
    for col in ("test_samples", "teacher_top1"):      # reports of older versions may lack them
        if col not in df:
            df[col] = float("nan")
    if "model" not in df:
        df["model"] = [model_label(n, k) for n, k in zip(df["model_name"], df["model_kwargs"])]
    df["settings"] = [settings_key(run_config(p)) for p in df["path"]]
    df["folder"] = [Path(p).resolve().relative_to(Path(root).resolve()).parts[0]
                    if Path(p).resolve() != Path(root).resolve() else "." for p in df["path"]]
    seed = df["seed"] if "seed" in df else 0
    df["seed_"] = seed
    keys = ["model", "method", "settings", "budget"]
    one = (df.groupby(keys + ["seed_"], as_index=False, sort=False)   # copies of one run: once
             .agg(macs_ratio=("macs_ratio", "mean"), top1=("top1", "mean"), runs=("path", "size"),
                  test_samples=("test_samples", "min"), teacher_top1=("teacher_top1", "first"),
                  folders=("folder", lambda s: sorted(set(s)))))
    pts = (one.groupby(keys, as_index=False, sort=False)
              .agg(macs_ratio=("macs_ratio", "mean"), top1_sd=("top1", "std"), top1=("top1", "mean"),
                   seeds=("seed_", "nunique"), runs=("runs", "sum"), test_samples=("test_samples", "min"),
                   teacher_top1=("teacher_top1", "first"), folders=("folders", lambda s: sorted(set(sum(s, []))))))
    where = pts.groupby(["model", "method", "settings"], sort=False)["folders"].agg(lambda s: sorted(set(sum(s, []))))
    short = {k: "+".join(f[:2] if re.match(r"\d\d_", f) else f for f in v) for k, v in where.items()}
    labels, seen = {}, {}
    for (model, method, settings), tag in short.items():
        n = seen[(model, method, tag)] = seen.get((model, method, tag), 0) + 1
        nb = "nb " if re.match(r"\d", tag) else ""
        labels[(model, method, settings)] = f"{method} ({nb}{tag}" + (f" #{n}" if n > 1 else "") + ")"
    pts["label"] = [labels[(m, me, s)] for m, me, s in zip(pts["model"], pts["method"], pts["settings"])]
    return pts[cols].sort_values(["model", "label", "budget"], ignore_index=True)


def read_runs(runs_root: str | Path | None = None) -> pd.DataFrame:
    """One row per finished run folder under `runs_root` (any depth; default `paths.runs_dir()`, i.e.
    $UVCLAB_RUNS or ./runs): report fields, model_name, model_kwargs (JSON), model (`model_label`: the model
    as built), name (folder), path, and the
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
                         model=model_label(model.get("name"), model.get("kwargs", {})),
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
