"""UVC against one-shot baselines on one dataset, under one protocol: accuracy at budget, MACs, speed.

Every method starts from the same teacher weights, sees the same number of training images (UVC: warm-up +
search + fine-tune epochs; one-shot methods: that many fine-tune epochs), distils from the same teacher with
the same fine-tune optimiser schedule, is selected on validation and reported on test. MACs are counted
independently of our calculator (FlopCounterMode, explicit-matmul attention). Speed is measured afterwards in
one process (dense vs exported, alternating rounds), never while training jobs share the CPU.

Runs are folders `<out>/runs/<method>_b<budget>_s<seed>/` with `report.json`; a finished folder is never
re-run, so an interrupted benchmark continues where it stopped.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import multiprocessing as mp
import time
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

from .config import CompressConfig, load_config
from .errors import UvclabError
from .io_utils import atomic_write, atomic_write_text

UVC_METHODS = {  # config overrides of each UVC variant
    "uvc": {},
    "uvc_no_kd": {"kd": "none"},
    "uvc_prune_only": {"uvc.block_skip": False},
    "uvc_skip_only": {"uvc.prune": False, "uvc.prune_dims": False},
}
ONE_SHOT_METHODS = ("uniform", "magnitude", "torch_pruning", "depth")
METHODS = tuple(UVC_METHODS) + ONE_SHOT_METHODS
COLUMNS = ["method", "macs_ratio_target", "macs_ratio", "params_ratio", "top1", "teacher_top1", "speedup", "seed",
           "val_top1", "macs_ratio_calculator", "blocks_kept", "train_images", "seconds"]


@dataclasses.dataclass(frozen=True)
class Protocol:
    """What every method gets. `config` holds the shared CompressConfig fields (dataset, epochs, lr, ...)."""
    budgets: tuple = (0.7, 0.5, 0.3)
    methods: tuple = METHODS
    seeds: tuple = (0,)
    extra_seeds: tuple = (1, 2)          # at each of `seed_budgets`: UVC and the best baseline (chosen on validation)
    seed_budgets: tuple = (0.5,)
    config: dict = dataclasses.field(default_factory=dict)
    speed_batch_size: int = 64
    speed_rounds: int = 15
    speed_iters: int = 3                 # batches per timed round
    speed_threads: Optional[int] = 1     # torch threads while timing (1: steadiest on a shared CPU; None: as is)

    def base_config(self, method: str, budget: float, seed: int) -> CompressConfig:
        if method not in METHODS:
            raise UvclabError(f"Unknown method '{method}'. Choose from: {', '.join(METHODS)}.")
        d = dict(self.config, macs_ratio=budget, seed=seed, progress=False)
        uvc = dict(d.pop("uvc", {}))
        for k, v in UVC_METHODS.get(method, {}).items():
            if k.startswith("uvc."):
                uvc[k[4:]] = v
            else:
                d[k] = v
        return CompressConfig.from_dict(dict(d, uvc=uvc))


def run_name(method: str, budget: float, seed: int) -> str:
    return f"{method}_b{budget:g}_s{seed}"


# ---- one run -------------------------------------------------------------------------------------------

def run_method(method: str, cfg: CompressConfig, out: str | Path) -> dict:
    """One (method, budget, seed) run into `out`; returns its report (also `out/report.json`)."""
    out = Path(out)
    if (out / "report.json").exists():
        return json.loads((out / "report.json").read_text())
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    if method in UVC_METHODS:
        from .export import load_pruned
        from .train import compress
        report = compress(cfg, out, resume=(out / "checkpoint.pt").exists())
        slim = load_pruned(out / "model")
        report = dict(report, train_images=_train_images(cfg, cfg.warmup_epochs + cfg.search_epochs
                                                          + cfg.finetune_epochs))
    else:
        report, slim = _one_shot(method, cfg, out)
    from .teacher import load_teacher
    from .budget import flop_counter_macs
    from .train import teacher_path
    teacher = load_teacher(teacher_path(cfg))
    dense = flop_counter_macs(teacher)
    report.update(method=method, seed=cfg.seed, macs_ratio_calculator=report.get("macs_ratio"),
                  macs_independent=flop_counter_macs(slim), dense_macs_independent=dense,
                  seconds=time.time() - t0)
    report["macs_ratio"] = report["macs_independent"] / dense
    report["params_ratio"] = sum(p.numel() for p in slim.parameters()) / sum(p.numel() for p in teacher.parameters())
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    return report


def _train_images(cfg: CompressConfig, epochs: int) -> Optional[int]:
    """Images seen in training (None when epochs are not capped by max_steps_per_epoch)."""
    return epochs * cfg.max_steps_per_epoch * cfg.batch_size if cfg.max_steps_per_epoch else None


def _one_shot(method: str, cfg: CompressConfig, out: Path):
    """Prune the teacher copy in one shot, then fine-tune for all the epochs UVC trains (same images seen)."""
    from . import baselines
    from .budget import count
    from .export import export_model, save_pruned
    from .train import MetricsLog, accuracy, build_models, finetune, masked, set_seed
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    model, teacher, splits = build_models(cfg)
    epochs = cfg.warmup_epochs + cfg.search_epochs + cfg.finetune_epochs
    ft_cfg = dataclasses.replace(cfg, finetune_epochs=epochs)
    cfg.save(out / "config.yaml")
    structure = None
    if method == "torch_pruning":
        from .tp_baseline import torch_pruning_to_budget
        from .train import make_epoch_loader
        plain = copy.deepcopy(teacher).requires_grad_(True)
        calib = [b for _, b in zip(range(4), make_epoch_loader(splits.train, cfg, -1))]
        slim = torch_pruning_to_budget(plain, cfg.macs_ratio, calib)
        for p in slim.parameters():
            p.requires_grad_(True)
    else:
        if method == "uniform":
            structure = baselines.uniform_structure(model, cfg.macs_ratio, cfg.layout)
        elif method == "magnitude":
            structure = baselines.magnitude_structure(model, cfg.macs_ratio, cfg.layout)
        elif method == "depth":  # greedy on validation accuracy of the masked model (a subset, for time)
            probe = torch.utils.data.Subset(splits.val, range(min(1024, len(splits.val))))

            def score(st):
                with masked(model, st):
                    return accuracy(model, probe)
            structure = baselines.depth_structure(model, cfg.macs_ratio, score=score)
        else:
            raise UvclabError(f"Unknown one-shot method '{method}'. Choose from: {', '.join(ONE_SHOT_METHODS)}.")
        structure.save(out / "structure.json")
        slim = export_model(model, structure, cfg.layout)
    log = MetricsLog(out / "metrics.jsonl")
    if log.path.exists():
        log.path.unlink()
    val_after_prune = accuracy(slim, splits.val)
    slim, best_val = finetune(ft_cfg, slim, teacher, splits, out, log, None)
    top1 = accuracy(slim, splits.test)
    report = {"method": method, "dataset": cfg.dataset, "teacher_top1": accuracy(teacher, splits.test),
              "top1": top1, "val_top1": best_val, "val_top1_after_prune": val_after_prune,
              "macs_ratio_target": cfg.macs_ratio, "train_images": _train_images(cfg, epochs),
              "test_samples": len(splits.test), "val_samples": len(splits.val)}
    if structure is not None:
        dense = count(model)
        c = count(model, structure, cfg.layout)
        report.update(macs_ratio=c["macs"] / dense["macs"], blocks_kept=sum(b.keep for b in structure.blocks))
        save_pruned(slim.cpu(), out / "model", extra={"top1": top1})
    else:
        report.update(macs_ratio=None, blocks_kept=len(slim.blocks))
        atomic_write(out / "model.pt", lambda f: torch.save(slim, f))
    (out / "checkpoint.pt").unlink(missing_ok=True)
    return report, slim


def load_run_model(run_dir: str | Path) -> torch.nn.Module:
    """The exported model of a run folder (uvclab export, or a whole pickled module for Torch-Pruning)."""
    run_dir = Path(run_dir)
    if (run_dir / "model.pt").exists():
        return torch.load(run_dir / "model.pt", weights_only=False)  # our own file, written by _one_shot
    from .export import load_pruned
    return load_pruned(run_dir / "model")


# ---- the whole benchmark ---------------------------------------------------------------------------------

def _job(args) -> dict:
    method, cfg_dict, out = args
    cfg = CompressConfig.from_dict(cfg_dict)
    try:
        return run_method(method, cfg, out)
    except Exception as e:  # one failed run must not lose the others: recorded, reported, re-run next time
        atomic_write_text(Path(out) / "error.txt", f"{type(e).__name__}: {e}\n")
        return {"method": method, "macs_ratio_target": cfg.macs_ratio, "seed": cfg.seed, "error": str(e)}


def run_jobs(jobs: list[tuple[str, CompressConfig, Path]], workers: int = 1, log=print) -> list[dict]:
    """Run (method, config, folder) jobs, `workers` processes at a time (each with cfg.threads threads)."""
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
            log(f"[{i}/{len(args)}] {r['method']} B={r['macs_ratio_target']} seed {r['seed']}: {msg}")
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return done


def best_baseline(reports: list[dict], budget: float) -> Optional[str]:
    """The one-shot method with the best validation accuracy at `budget` (test is never used to choose)."""
    cands = [r for r in reports if r.get("method") in ONE_SHOT_METHODS and r.get("macs_ratio_target") == budget
             and "val_top1" in r]
    return max(cands, key=lambda r: r["val_top1"])["method"] if cands else None


def run_benchmark(protocol: Protocol, out: str | Path, workers: int = 1, log=print) -> pd.DataFrame:
    """All (method, budget, seed) runs, then extra seeds at `seed_budgets` for UVC and the best baseline there,
    then speed; returns the results table (one row per run)."""
    out = Path(out)
    runs = out / "runs"

    def jobs_for(methods, budgets, seeds):
        return [(m, protocol.base_config(m, b, s), runs / run_name(m, b, s))
                for b in budgets for m in methods for s in seeds]
    reports = run_jobs(jobs_for(protocol.methods, protocol.budgets, protocol.seeds), workers, log)
    extra = []
    for budget in [b for b in protocol.seed_budgets if b in protocol.budgets] if protocol.extra_seeds else []:
        methods = [m for m in ("uvc", best_baseline(reports, budget)) if m in protocol.methods]
        log(f"extra seeds {protocol.extra_seeds} at B={budget}: {methods}")
        extra += jobs_for(methods, [budget], protocol.extra_seeds)
    run_jobs(extra, workers, log)
    measure_speed(runs, protocol, log)
    return results_table(runs)


def measure_speed(runs: Path, protocol: Protocol, log=print) -> None:
    """Throughput of every finished run's model vs the dense teacher, one process, alternating rounds, with
    `protocol.speed_threads` torch threads; writes `speed.json` next to each report (skipped when present)."""
    from .bench import compare_throughput
    from .teacher import load_teacher
    from .train import teacher_path
    teachers = {}
    threads = torch.get_num_threads()
    if protocol.speed_threads:
        torch.set_num_threads(protocol.speed_threads)
    try:
        for rep in sorted(runs.glob("*/report.json")):
            if (rep.parent / "speed.json").exists():
                continue
            r = json.loads(rep.read_text())
            path = teacher_path(load_config(rep.parent / "config.yaml"))
            if path not in teachers:
                teachers[path] = load_teacher(path)
            res = compare_throughput(teachers[path], load_run_model(rep.parent), protocol.speed_batch_size,
                                     rounds=protocol.speed_rounds, iters=protocol.speed_iters,
                                     dense_macs=r["dense_macs_independent"], exported_macs=r["macs_independent"])
            atomic_write_text(rep.parent / "speed.json",
                              json.dumps(dict(res.to_dict(), threads=torch.get_num_threads())))
            log(f"speed {rep.parent.name}: {res}")
    finally:
        torch.set_num_threads(threads)


def results_table(runs: str | Path) -> pd.DataFrame:
    """One row per finished run (COLUMNS first), speedup from `speed.json` when measured."""
    rows = []
    for rep in sorted(Path(runs).glob("*/report.json")):
        r = json.loads(rep.read_text())
        sp = rep.parent / "speed.json"
        r["speedup"] = json.loads(sp.read_text())["speedup"] if sp.exists() else float("nan")
        rows.append({c: r.get(c) for c in COLUMNS})
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["method"] = pd.Categorical(df["method"], categories=METHODS)  # table order: UVC variants, then baselines
    df = df.sort_values(["macs_ratio_target", "method", "seed"], ascending=[False, True, True], ignore_index=True)
    return df.astype({"method": str})


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean (and std over seeds, where more than one) per (budget, method)."""
    g = df.groupby(["macs_ratio_target", "method"], sort=False)
    s = g.agg(top1=("top1", "mean"), top1_std=("top1", "std"), seeds=("seed", "count"),
              macs_ratio=("macs_ratio", "mean"), params_ratio=("params_ratio", "mean"),
              speedup=("speedup", "mean"), teacher_top1=("teacher_top1", "first")).reset_index()
    s["delta_vs_teacher"] = s["top1"] - s["teacher_top1"]
    return s


def markdown_table(df: pd.DataFrame) -> str:
    s = summary_table(df)
    lines = ["| budget | method | top-1 (%) | vs teacher | seeds | MACs ratio | params ratio | speedup |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for _, r in s.iterrows():
        spread = f" ± {r.top1_std:.2f}" if r.seeds > 1 else ""
        speed = f"{r.speedup:.2f}x" if pd.notna(r.speedup) else "-"
        lines.append(f"| {r.macs_ratio_target:g} | {r.method} | {r.top1:.2f}{spread} | {r.delta_vs_teacher:+.2f} | "
                     f"{r.seeds} | {r.macs_ratio:.3f} | {r.params_ratio:.3f} | {speed} |")
    return "\n".join(lines) + "\n"


def write_results(df: pd.DataFrame, results_dir: str | Path, name: str, note: str = "") -> dict[str, Path]:
    """`<name>.csv`, `<name>.md` (summary table, `note` above it) and `<name>_pareto.png` in results_dir."""
    from .viz import plot_pareto
    d = Path(results_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = {"csv": d / f"{name}.csv", "md": d / f"{name}.md", "png": d / f"{name}_pareto.png"}
    atomic_write_text(paths["csv"], df.to_csv(index=False, float_format="%.4f"))
    atomic_write_text(paths["md"], (note + "\n\n" if note else "") + markdown_table(df))
    s = summary_table(df)
    fig = plot_pareto(s, x="macs_ratio", y="top1", hue="method", err="top1_std",
                      teacher=float(df["teacher_top1"].iloc[0]) if len(df) else None)
    fig.savefig(paths["png"])
    return paths
