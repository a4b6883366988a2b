"""UVC against one-shot baselines on one dataset, under one protocol: accuracy at budget, MACs, speed.

Every method starts from the same teacher weights, sees the same number of training images (UVC: warm-up +
search + fine-tune epochs; one-shot methods: that many fine-tune epochs), distils from the same teacher with
the same fine-tune optimiser schedule, is selected on validation and reported on test. MACs are counted
independently of our calculator (FlopCounterMode, explicit-matmul attention). Speed is measured afterwards in
one process (dense vs exported, alternating rounds), never while training jobs share the CPU, in PyTorch
(`speed.json`) and, with the `deploy` extra, in ONNX Runtime (`ort_speed.json`, column `ort_speedup`).

Runs are folders `<out>/runs/<method>_b<budget>_s<seed>/` with `report.json`; a finished folder is never
re-run, so an interrupted benchmark continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

from uvclab.engine.config import ABLATIONS, CompressConfig, load_config
from uvclab.engine.strategies import STRATEGIES
from uvclab.errors import Preempted, UvclabError
from uvclab.io_utils import atomic_write_text
from uvclab.paths import CHECKPOINT, CONFIG, MODEL_DIR, REPORT

VARIANTS = {  # benchmark label -> config overrides; every label runs through the same `compress`
    **{("uvc" if a == "uvc" else f"uvc_{a}"): {"method": "uvc", **ABLATIONS[a]}
       for a in ("uvc", "no_kd", "prune_only", "skip_only")},
    "uvc_gates": {"method": "uvc", "uvc.gating_weight": 1.0},   # skip gates strong enough to decide (see README)
    # issue 25 (docs/uvc-experiments.md): group scores (default 'fisher'; the weight norm before), the cubic curve
    "uvc_norm": {"method": "uvc", "uvc.group_score": "group"},
    "uvc_fisher_norm": {"method": "uvc", "uvc.group_score": "fisher_norm"},
    "uvc_cubic": {"method": "uvc", "uvc.budget_curve": "cubic", "uvc.budget_schedule": 0.75},
    "uvc_no_dims": {"method": "uvc", "uvc.prune_dims": False},  # value dims kept whole: their MACs buy no time here
    **{m: {"method": m} for m in STRATEGIES if m != "uvc"},   # every one-shot method of the strategy table
    **{f"{m}_lstsq": {"method": m, "repair": "lstsq"}         # ... and each with the least-squares repair
       for m in STRATEGIES if m not in ("uvc", "depth")},      # (depth keeps whole blocks: nothing to refit)
    "uvc_lstsq": {"method": "uvc", "repair": "lstsq"},         # UVC's final cut repaired before fine-tuning
    # the searched structure cut from the teacher's weights (not the search's), repaired, then fine-tuned
    "uvc_start_lstsq": {"method": "uvc", "uvc.final_weights": "start", "repair": "lstsq"},
}
UVC_METHODS = tuple(m for m, o in VARIANTS.items() if o["method"] == "uvc")
ONE_SHOT_METHODS = tuple(m for m in VARIANTS if m not in UVC_METHODS)
METHODS = tuple(VARIANTS)
COLUMNS = ["method", "budget", "macs_ratio", "params_ratio", "top1", "teacher_top1", "speedup", "ort_speedup", "seed",
           "val_top1", "val_top1_before_finetune", "repair", "val_top1_before_repair", "search_end_macs_ratio", "macs_ratio_calculator", "blocks_kept",
           "train_images", "seconds", "dataset", "test_samples"]


@dataclasses.dataclass(frozen=True)
class Protocol:
    """What every method gets. `config` holds the shared CompressConfig fields (dataset, epochs, lr, ...)."""
    budgets: tuple = (0.7, 0.5, 0.3)
    methods: tuple = METHODS
    seeds: tuple = (0,)
    extra_seeds: tuple = (1, 2)          # more seeds at each of `seed_budgets`, for `seed_methods`
    seed_budgets: tuple = (0.5,)
    seed_methods: Optional[tuple] = None  # None: every method; "best": UVC and the best baseline on validation
    config: dict = dataclasses.field(default_factory=dict)
    speed_batch_size: int = 64
    speed_rounds: int = 15
    speed_iters: int = 3                 # batches per timed round
    speed_threads: Optional[int] = 1     # torch threads while timing (1: steadiest on a shared CPU; None: as is)
    speed_runtimes: tuple = ("torch", "onnxruntime")  # where speed is timed (ONNX Runtime: the `deploy` extra)

    def base_config(self, method: str, budget: float, seed: int) -> CompressConfig:
        if method not in METHODS:
            raise UvclabError(f"Unknown method '{method}'. Choose from: {', '.join(METHODS)}.")
        d = dict(self.config, macs_ratio=budget, seed=seed, progress=False)
        uvc = dict(d.pop("uvc", {})) if VARIANTS[method]["method"] == "uvc" else {}  # one-shot: UVC settings unused
        for k, v in VARIANTS[method].items():
            if k.startswith("uvc."):
                uvc[k[4:]] = v
            else:
                d[k] = v
        return CompressConfig.from_dict(dict(d, uvc=uvc))


def run_name(method: str, budget: float, seed: int) -> str:
    return f"{method}_b{budget:g}_s{seed}"


# ---- one run -------------------------------------------------------------------------------------------

def run_method(method: str, cfg: CompressConfig, out: str | Path) -> dict:
    """One (method, budget, seed) run into `out` through `compress`; its report gains the benchmark label and
    MACs counted independently of our calculator (FlopCounterMode on the saved model)."""
    from uvclab.engine.compress import compress, teacher_path
    from uvclab.engine.teacher import load_teacher
    from uvclab.vit.export import load_pruned
    from uvclab.vit.macs import flop_counter_macs
    out = Path(out)
    if (out / REPORT).exists() and "macs_independent" in json.loads((out / REPORT).read_text()):
        return json.loads((out / REPORT).read_text())
    if cfg.run.threads is not None:
        torch.set_num_threads(cfg.run.threads)
    report = compress(cfg, out, resume=(out / CHECKPOINT).exists())
    slim = load_pruned(out / MODEL_DIR)
    teacher = load_teacher(teacher_path(cfg))
    dense = flop_counter_macs(teacher)
    report.update(method=method, macs_ratio_calculator=report["macs_ratio"], macs_independent=flop_counter_macs(slim),
                  dense_macs_independent=dense)
    report["macs_ratio"] = report["macs_independent"] / dense
    report["params_ratio"] = sum(p.numel() for p in slim.parameters()) / sum(p.numel() for p in teacher.parameters())
    atomic_write_text(out / REPORT, json.dumps(report, indent=1))
    return report


# ---- the whole benchmark ---------------------------------------------------------------------------------

def _job(args) -> dict:
    method, cfg_dict, out = args
    cfg = CompressConfig.from_dict(cfg_dict)
    try:
        return run_method(method, cfg, out)
    except Preempted:  # a stop signal ends the whole benchmark (its runs continue from their checkpoints)
        raise
    except Exception as e:  # one failed run must not lose the others: recorded, reported, re-run next time
        atomic_write_text(Path(out) / "error.txt", f"{type(e).__name__}: {e}\n")
        return {"method": method, "budget": cfg.macs_ratio, "seed": cfg.seed, "error": str(e)}


def run_jobs(jobs: list[tuple[str, CompressConfig, Path]], workers: int = 1, log=print) -> list[dict]:
    """Run (method, config, folder) jobs, `workers` processes at a time (each with cfg.run.threads threads)."""
    args = [(m, c.to_dict(), str(o)) for m, c, o in jobs]
    done = []
    if workers <= 1:
        it = map(_job, args)
        pool = None
    else:
        pool = mp.get_context("spawn").Pool(workers, maxtasksperchild=1)
        it = pool.imap_unordered(_job, args)
    try:
        for i, r in enumerate(it, 1):
            done.append(r)
            msg = (f"error: {r['error']}" if "error" in r else
                   f"top1 {r['top1']:.2f}  MACs {r['macs_ratio']:.3f}  {r['seconds']:.0f}s")
            log(f"[{i}/{len(args)}] {r['method']} B={r['budget']} seed {r['seed']}: {msg}")
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return done


def best_baseline(reports: list[dict], budget: float) -> Optional[str]:
    """The one-shot method with the best validation accuracy at `budget` (test is never used to choose)."""
    cands = [r for r in reports if r.get("method") in ONE_SHOT_METHODS and r.get("budget") == budget
             and "val_top1" in r]
    return max(cands, key=lambda r: r["val_top1"])["method"] if cands else None


def run_benchmark(protocol: Protocol, out: str | Path, workers: int = 1, log=print) -> pd.DataFrame:
    """All (method, budget, seed) runs, then extra seeds at `seed_budgets` (for `seed_methods`), then speed;
    returns the results table (one row per run)."""
    out = Path(out)
    runs = out / "runs"

    def jobs_for(methods, budgets, seeds):
        return [(m, protocol.base_config(m, b, s), runs / run_name(m, b, s))
                for b in budgets for m in methods for s in seeds]
    reports = run_jobs(jobs_for(protocol.methods, protocol.budgets, protocol.seeds), workers, log)
    extra = []
    for budget in [b for b in protocol.seed_budgets if b in protocol.budgets] if protocol.extra_seeds else []:
        if protocol.seed_methods == "best":
            methods = [m for m in ("uvc", best_baseline(reports, budget)) if m in protocol.methods]
        else:
            methods = [m for m in protocol.methods if protocol.seed_methods is None or m in protocol.seed_methods]
        log(f"extra seeds {protocol.extra_seeds} at B={budget}: {methods}")
        extra += jobs_for(methods, [budget], protocol.extra_seeds)
    run_jobs(extra, workers, log)
    for runtime in protocol.speed_runtimes:
        measure_speed(runs, protocol, log, runtime)
    return results_table(runs)


SPEED_FILES = {"torch": "speed.json", "onnxruntime": "ort_speed.json"}


def measure_speed(runs: Path, protocol: Protocol, log=print, runtime: str = "torch") -> None:
    """Throughput of every finished run's model vs the dense teacher, one process, alternating rounds, with
    `protocol.speed_threads` threads, in PyTorch or ONNX Runtime; writes `speed.json` / `ort_speed.json` next
    to each report (skipped when present; ONNX Runtime skipped with a note without the `deploy` extra)."""
    from uvclab.compare.throughput import compare_throughput
    from uvclab.engine.compress import teacher_path
    from uvclab.engine.teacher import load_teacher
    from uvclab.vit.export import load_pruned
    if runtime == "onnxruntime":
        from uvclab.compare.deploy import OrtModel
        from uvclab.vit.onnx import require_deploy
        try:
            require_deploy()
        except UvclabError as e:
            log(f"ONNX Runtime speed not measured: {e}")
            return
    teachers = {}
    threads = torch.get_num_threads()
    if protocol.speed_threads:
        torch.set_num_threads(protocol.speed_threads)
    try:
        for rep in sorted(runs.glob(f"*/{REPORT}")):
            out = rep.parent / SPEED_FILES[runtime]
            if out.exists() or not (rep.parent / MODEL_DIR / "uvclab.json").exists():
                continue
            r = json.loads(rep.read_text())
            path = teacher_path(load_config(rep.parent / CONFIG))
            if path not in teachers:  # the dense model is loaded (and exported to ONNX) once
                teachers[path] = load_teacher(path)
                if runtime == "onnxruntime":
                    teachers[path] = OrtModel(teachers[path], protocol.speed_batch_size)
            res = compare_throughput(teachers[path], load_pruned(rep.parent / MODEL_DIR), protocol.speed_batch_size,
                                     rounds=protocol.speed_rounds, iters=protocol.speed_iters,
                                     dense_macs=r["dense_macs_independent"], exported_macs=r["macs_independent"],
                                     runtime=runtime)
            atomic_write_text(out, json.dumps(dict(res.to_dict(), threads=torch.get_num_threads())))
            log(f"speed {rep.parent.name}: {res}")
    finally:
        torch.set_num_threads(threads)


def results_table(runs: str | Path) -> pd.DataFrame:
    """One row per finished run (COLUMNS first), speedup from `speed.json` when measured."""
    rows = []
    for rep in sorted(Path(runs).glob(f"*/{REPORT}")):
        r = json.loads(rep.read_text())
        for col, name in (("speedup", "speed.json"), ("ort_speedup", "ort_speed.json")):
            sp = rep.parent / name
            r[col] = json.loads(sp.read_text())["speedup"] if sp.exists() else float("nan")
        r["repair"] = (r.get("repair") or {}).get("kind", "none")  # runs before the repair step: none
        rows.append({c: r.get(c) for c in COLUMNS})
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["method"] = pd.Categorical(df["method"], categories=METHODS)  # table order: UVC variants, then baselines
    df = df.sort_values(["budget", "method", "seed"], ascending=[False, True, True], ignore_index=True)
    return df.astype({"method": str})


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean (and std over seeds, where more than one) per (budget, method)."""
    g = df.groupby(["budget", "method"], sort=False)
    s = g.agg(top1=("top1", "mean"), top1_std=("top1", "std"), seeds=("seed", "count"),
              val_before_ft=("val_top1_before_finetune", "mean"), val_before_ft_std=("val_top1_before_finetune", "std"),
              search_end_R=("search_end_macs_ratio", "mean"), blocks_kept=("blocks_kept", "mean"),
              macs_ratio=("macs_ratio", "mean"), params_ratio=("params_ratio", "mean"),
              speedup=("speedup", "mean"), ort_speedup=("ort_speedup", "mean"),
              teacher_top1=("teacher_top1", "first")).reset_index()
    s["delta_vs_teacher"] = s["top1"] - s["teacher_top1"]
    return s


def markdown_table(df: pd.DataFrame) -> str:
    s = summary_table(df)
    lines = ["| budget | method | top-1 (%) | vs teacher | seeds | val before fine-tune | R end of search | "
             "blocks | MACs ratio | params ratio | speedup | ORT speedup | latency ratio (PyTorch / ORT) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for _, r in s.iterrows():
        spread = f" ± {r.top1_std:.2f}" if r.seeds > 1 else ""
        vspread = f" ± {r.val_before_ft_std:.2f}" if r.seeds > 1 and pd.notna(r.val_before_ft_std) else ""
        speed, ort = (f"{v:.2f}x" if pd.notna(v) else "-" for v in (r.speedup, r.ort_speedup))
        latency = " / ".join(f"{1 / v:.3f}" if pd.notna(v) else "-" for v in (r.speedup, r.ort_speedup))
        R = f"{r.search_end_R:.3f}" if pd.notna(r.search_end_R) else "-"
        lines.append(f"| {r.budget:g} | {r.method} | {r.top1:.2f}{spread} | {r.delta_vs_teacher:+.2f} | "
                     f"{r.seeds} | {r.val_before_ft:.2f}{vspread} | {R} | {r.blocks_kept:.1f} | {r.macs_ratio:.3f} | "
                     f"{r.params_ratio:.3f} | {speed} | {ort} | {latency} |")
    return "\n".join(lines) + "\n"


def regime_table(df: pd.DataFrame, uvc: str = "uvc") -> pd.DataFrame:
    """Where UVC is the better choice: per budget, `uvc` against the best one-shot method chosen on validation
    (mean val_top1 over its seeds; test never chooses), test top-1 mean ± sd over seeds, the difference and a
    verdict: 'UVC better' / 'baseline better' when the gap exceeds its standard deviation, else 'within noise'.
    With two or more seeds in common the gap is the mean per-seed difference (a seed fixes the fine-tune's data
    order for every method) and its sd over those seeds; otherwise the difference of means against the larger
    of the two methods' sds (one seed: 0)."""
    rows = []
    for budget, d in df.groupby("budget", sort=False):
        mine = d[d.method == uvc]
        base = d[d.method.isin(ONE_SHOT_METHODS)]
        if mine.empty or base.empty:
            continue
        best = base.groupby("method")["val_top1"].mean().idxmax()
        b = base[base.method == best]
        sd = max(mine.top1.std() if len(mine) > 1 else 0.0, b.top1.std() if len(b) > 1 else 0.0)
        gap = mine.top1.mean() - b.top1.mean()
        paired = (mine.set_index("seed").top1 - b.set_index("seed").top1).dropna()  # same seed: same data order
        rows.append({"budget": budget, "uvc": mine.top1.mean(), "uvc_sd": mine.top1.std(), "uvc_seeds": len(mine),
                     "baseline": best, "baseline_top1": b.top1.mean(), "baseline_sd": b.top1.std(),
                     "baseline_seeds": len(b), "gap": gap, "paired_gap": paired.mean(), "paired_sd": paired.std(),
                     "paired_seeds": len(paired)})
        if len(paired) > 1:  # seeds in common: judge the per-seed difference against its own spread
            gap, sd = paired.mean(), paired.std()
        rows[-1]["verdict"] = "UVC better" if gap > sd else "baseline better" if gap < -sd else "within noise"
    return pd.DataFrame(rows)


def regime_markdown(df: pd.DataFrame) -> str:
    r = regime_table(df)
    lines = ["| budget | uvc top-1 (seeds) | best one-shot on validation | its top-1 (seeds) | gap | paired gap, same "
             "seeds (n) | verdict |", "|---:|---:|---|---:|---:|---:|---|"]
    for x in r.itertuples():
        sd = lambda v, n: f" ± {v:.2f}" if n > 1 else ""  # noqa: E731
        lines.append(f"| {x.budget:g} | {x.uvc:.2f}{sd(x.uvc_sd, x.uvc_seeds)} ({x.uvc_seeds}) | {x.baseline} | "
                     f"{x.baseline_top1:.2f}{sd(x.baseline_sd, x.baseline_seeds)} ({x.baseline_seeds}) | "
                     f"{x.gap:+.2f} | {x.paired_gap:+.2f}{sd(x.paired_sd, x.paired_seeds)} ({x.paired_seeds}) | "
                     f"{x.verdict} |")
    return "\n".join(lines) + "\n"
