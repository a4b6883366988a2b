"""UVC with a latency budget vs UVC with a MACs budget, compared at the same *measured* latency.

    python benchmarks/latency_budget.py fm --macs-runs runs/benchmarks/fashion_mnist/runs   # Fashion-MNIST
    python benchmarks/latency_budget.py deit_small --steps 200 --threads 1 --batch 4      # DeiT-Small at 224

fm: UVC on the committed Fashion-MNIST teacher under the Fashion-MNIST benchmark's protocol (2 search + 6
fine-tune epochs of 24 x 128 images, one thread), with `budget_kind: latency` at 0.5 and 0.3 and optionally with
MACs budgets `--macs-budgets` (default none: the MACs benchmark's UVC runs at 0.5-0.15 bracket the latency runs),
seeds `--seeds`; with --macs-runs the MACs benchmark's own runs (same protocol) join them (`--methods`: UVC and
the one-shot cuts). Afterwards every export and the dense model are timed in one process (alternating rounds, batch
64, one thread), the latency table's prediction is set next to each measurement, and each latency budget's mean
top-1 is set next to every other method's frontier read at the same measured latency
(`uvclab.compare.same_latency`; figure latency_budget_fm.png).
deit_small: a DeiT-Small-shaped model at 224 (random weights: no ImageNet offline, so no accuracy): counts-only
searches (the UVC update without weight training, `steps` steps), structure selection with the measured
feedback, export and the same timing: only the latency goals can be checked there.
Results: benchmarks/results/latency_budget_<part>.{csv,md} (fm: and .png).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from uvclab.io_utils import atomic_write_text  # noqa: E402
from uvclab.uvc import SHORT_RUN_UVC  # noqa: E402

FM = dict(dataset="fashion_mnist", batch_size=128, max_steps_per_epoch=24, warmup_epochs=0, search_epochs=2,
          finetune_epochs=6, lr=5e-4, finetune_lr=5e-4, threads=1, eval_max_samples=3000, test_max_samples=None,
          progress=False, latency_batch_size=64, latency_threads=1)


def _run(args):
    name, overrides, out = args
    torch.set_num_threads(1)
    from uvclab.engine.compress import compress
    from uvclab.engine.config import CompressConfig
    folder = Path(out) / name
    if (folder / "report.json").exists():
        return name
    overrides = dict(overrides)
    cfg = CompressConfig.from_dict(dict(FM, uvc=dict(SHORT_RUN_UVC, **overrides.pop("uvc", {})), **overrides))
    compress(cfg, folder, resume=(folder / "checkpoint.pt").exists())
    return name


def timed_rows(models: dict, dense, table, batch: int, threads: int, rounds: int = 11) -> list[dict]:
    """Predicted and measured latency ratio of each export, all timed together with the dense model."""
    from uvclab.vit.latency_build import measure_ms
    from uvclab.vit.structure import Structure
    torch.set_num_threads(threads)
    names = list(models)
    ms = measure_ms([dense] + [models[n] for n in names], batch, rounds=rounds, iters=3 if rounds > 5 else 2)
    dense_pred = table.predicted_dense_ms(len(dense.blocks))
    rows = []
    for n, t in zip(names, ms[1:]):
        meta = models[n].uvclab_export
        pred = table.structure_ms(Structure.from_dict(meta["structure"]), meta["layout"])
        rows.append({"run": n, "latency_ratio_measured": t / ms[0], "latency_ratio_predicted": pred / dense_pred,
                     "latency_ms": t, "dense_latency_ms": ms[0]})
    return rows


def fashion_mnist(a) -> pd.DataFrame:
    from uvclab.engine.teacher import load_teacher
    from uvclab.vit.export import export_model, load_pruned
    from uvclab.vit.latency_build import latency_table
    from uvclab.vit.structure import Structure
    out = Path(a.out)
    jobs = [(f"latency_b{b:g}_s{s}", {"budget_kind": "latency", "macs_ratio": b, "seed": s}, out)
            for b in (0.5, 0.3) for s in a.seeds]
    jobs += [(f"macs_b{b:g}_s{s}", {"macs_ratio": b, "seed": s}, out) for b in a.macs_budgets for s in a.seeds]
    if a.latency_r:  # the variant whose search's R is the table's prediction (`uvc.search_resource: latency`)
        jobs += [(f"uvc_latencyR_b{b:g}_s{s}", {"budget_kind": "latency", "macs_ratio": b, "seed": s,
                                                 "uvc": {"search_resource": "latency"}}, out)
                 for b in (0.5, 0.3) for s in a.seeds]
    t0 = time.time()
    with mp.get_context("spawn").Pool(a.workers) as pool:
        for name in pool.imap_unordered(_run, jobs):
            print(f"done {name} ({time.time() - t0:.0f} s)", flush=True)
    folders = {j[0]: out / j[0] for j in jobs}
    if a.macs_runs:  # the MACs benchmark's own runs (same protocol): UVC and every one-shot cut, timed alongside
        for f in sorted(Path(a.macs_runs).glob("*_s[0-9]")):
            method, rest = f.name.rsplit("_b", 1)
            if method in a.methods and (f / "model").exists():
                folders[("macs" if method == "uvc" else method) + "_b" + rest] = f
    teacher = load_teacher(ROOT / "data" / "teachers" / "fashion_mnist_vit.json")
    torch.set_num_threads(1)
    table = latency_table(teacher, 64, 1)
    dense = export_model(teacher, Structure.dense(teacher))
    models = {n: load_pruned(f / "model") for n, f in folders.items() if (f / "model").exists()}
    rows = timed_rows(models, dense, table, 64, 1, rounds=a.rounds)
    for r in rows:
        rep = json.loads((folders[r["run"]] / "report.json").read_text())
        kind = {"latency": "uvc_latency", "macs": "uvc"}.get(*[r["run"].rsplit("_b", 1)[0]] * 2)
        r.update(kind=kind, budget=rep["budget"], seed=rep["seed"], top1=rep["top1"], val_top1=rep["val_top1"],
                 macs_ratio=rep["macs_ratio"], blocks=rep["blocks_kept"], seconds=rep["seconds"])
    return pd.DataFrame(rows).sort_values(["kind", "budget", "seed"], ascending=[True, False, True])


def same_latency(df: pd.DataFrame) -> str:
    """The latency-budget UVC at its measured latency against every other method's frontier read there
    (`uvclab.compare.same_latency`): the best one-shot cut (chosen on validation), and UVC with a MACs budget."""
    from uvclab.compare.benchmark import ONE_SHOT_METHODS
    from uvclab.compare.same_latency import equal_latency_table, markdown as table_md
    d = df.rename(columns={"kind": "method", "latency_ratio_measured": "latency"})
    one_shot = [m for m in ONE_SHOT_METHODS if m in set(d.method)]
    text = ""
    for ref in sorted(m for m in set(d.method) if m.startswith("uvc_latency")):  # the default and any variant
        text += (f"{ref} against the one-shot cuts (the goal: >= the best of them + 0.5 point):\n\n"
                 + table_md(equal_latency_table(d, ref, one_shot), ref))
        for macs in [m for m in ("uvc", "uvc_start_lstsq") if m in set(d.method)]:
            text += (f"\n{ref} against {macs} (MACs budgets) read at the same latency:\n\n"
                     + table_md(equal_latency_table(d, ref, [macs]), ref))
        text += "\n"
    for ref in [m for m in ("uvc", "uvc_start_lstsq") if m in set(d.method)]:  # MACs budgets at their own latency
        text += (f"{ref} (MACs budgets) at its measured latency against the one-shot cuts there:\n\n"
                 + table_md(equal_latency_table(d, ref, one_shot), ref) + "\n")
    return text
    return text


def latency_figure(df: pd.DataFrame, path: Path) -> None:
    """Test top-1 vs measured latency ratio, one line per method (mean over seeds per budget, sd bars)."""
    from uvclab.ui.pareto import plot_pareto
    s = df.groupby(["kind", "budget"], as_index=False).agg(
        latency_ratio_measured=("latency_ratio_measured", "mean"), top1=("top1", "mean"), top1_sd=("top1", "std"),
        seeds=("seed", "count"))
    fig = plot_pareto(s.rename(columns={"kind": "method"}), x="latency_ratio_measured", y="top1", err="top1_sd",
                      emphasis=["uvc_latency", "uvc"], title="Fashion-MNIST: test top-1 (10,000 images) vs measured latency\n"
                      "(all exports timed in one process, batch 64, one thread)",
                      caption="Points: mean over seeds per budget; bars: sd over seeds. uvc_latency: UVC with a "
                      "latency budget (uvc_latencyR: its search's R is the table's prediction, `search_resource: latency`); uvc: UVC "
                      "with a MACs budget; the others: one-shot cuts at MACs budgets.")
    fig.savefig(path, bbox_inches="tight")


def deit_small(a) -> pd.DataFrame:
    """Counts-only searches (random weights, no data): 'latency' as the pipeline's default (search on MACs to the
    magnitude cut's MACs at the latency budget, fit to the predicted latency, measured feedback; no skip
    candidates without data), 'latency_R' with the table's prediction as the search's R, 'macs' a MACs budget."""
    import uvclab
    from uvclab.prune.baselines import macs_budget_for_latency
    from uvclab.uvc import UVCPrimalDual, UVCSettings, final_structure
    from uvclab.vit.latency_build import latency_table, measure_ms
    from uvclab.vit.structure import Structure
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    model = uvclab.create_vit("deit_small_patch16_224").eval()
    table = latency_table(model, a.batch, a.threads)
    models = {}
    for kind in ("latency", "latency_R", "macs"):
        for b in (0.5, 0.3):
            gated = uvclab.gate_vit(__import__("copy").deepcopy(model))
            target = macs_budget_for_latency(model, table, b, "compact") if kind == "latency" else b
            uvc = UVCPrimalDual(gated, UVCSettings(block_skip=False, **{**SHORT_RUN_UVC}), target, total_steps=a.steps,
                                latency=table if kind == "latency_R" else None)
            for _ in range(a.steps):
                rec = uvc.step(1e-4, 0, warmup=False)
            # select on latency, with the pipeline's measured feedback (no skip candidates without data)
            st, info = final_structure(uvc, gated, b, table if kind != "macs" else None, 0.02, "compact",
                                       timer=lambda ms: measure_ms(ms, a.batch, threads=a.threads))
            rounds = info.get("latency_feedback", [])
            models[f"{kind}_b{b:g}"] = uvclab.export_model(gated, st)
            print(kind, b, "search target", round(target, 3), "R end", round(rec["R"], 3), "feedback", rounds,
                  flush=True)
    rows = timed_rows(models, uvclab.export_model(model, Structure.dense(model)), table, a.batch, a.threads,
                      rounds=5)
    for r in rows:
        kind, b = r["run"].rsplit("_b", 1)
        dense_macs = uvclab.count(model)["macs"]
        r.update(kind=kind, budget=float(b), macs_ratio=uvclab.count(models[r["run"]])["macs"] / dense_macs)
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame) -> str:
    fmt = lambda v: "-" if v is None or v != v else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["fm", "deit_small"])
    p.add_argument("--out", default=str(ROOT / "runs" / "benchmarks" / "latency_budget"))
    p.add_argument("--macs-runs", default=None, help="the Fashion-MNIST benchmark's run folders (uvc_b0.5_s0, ...)")
    p.add_argument("--methods", default="uvc,uvc_start_lstsq,magnitude,magnitude_lstsq,activation,activation_lstsq,"
                   "depth,uniform,uniform_lstsq,uvc_no_dims", help="fm: which of the --macs-runs methods join the timing")
    p.add_argument("--latency-r", action="store_true", help="fm: also the latency budgets with "
                   "uvc.search_resource=latency (kind uvc_latencyR)")
    p.add_argument("--macs-budgets", default="", help="MACs budgets run here (comma-separated)")
    p.add_argument("--rounds", type=int, default=21, help="fm: timing rounds (alternating order, median)")
    p.add_argument("--seeds", default="0,1,2", help="fm: seeds of the runs made here (comma-separated)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=200, help="deit_small: counts-only search steps")
    p.add_argument("--batch", type=int, default=8, help="deit_small: batch the latency is for")
    p.add_argument("--threads", type=int, default=2, help="deit_small: torch threads when timing")
    a = p.parse_args(argv)
    a.macs_budgets = [float(b) for b in a.macs_budgets.split(",") if b]
    a.seeds = [int(x) for x in a.seeds.split(",") if x]
    a.methods = a.methods.split(",")
    t0 = time.time()
    load0 = os.getloadavg()[0]
    df = fashion_mnist(a) if a.part == "fm" else deit_small(a)
    cmd = "python benchmarks/latency_budget.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res = ROOT / "benchmarks" / "results"
    stem = f"latency_budget_{a.part}"
    atomic_write_text(res / f"{stem}.csv", df.to_csv(index=False))
    err = (df.latency_ratio_predicted / df.latency_ratio_measured - 1).abs()
    note = (f"Generated by `{cmd.strip()}` ({(time.time() - t0) / 60:.1f} min wall on {os.cpu_count()} CPU cores, "
            f"load average {load0:.1f} at the start and {os.getloadavg()[0]:.1f} at the end). Predicted vs measured "
            f"latency ratio: |error| median {err.median():.1%}, max {err.max():.1%}, within 10 %: "
            f"{(err <= 0.10).sum()} of {len(err)}.")
    text = note + "\n\n" + markdown(df) + "\n"
    if a.part == "fm":
        text += "\nAt the same measured latency (means over seeds, frontiers read by linear interpolation):\n\n"
        text += same_latency(df) + f"\n![accuracy vs measured latency]({stem}.png)\n"
        latency_figure(df, res / f"{stem}.png")
    atomic_write_text(res / f"{stem}.md", text)
    print(note)
    print(df.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
