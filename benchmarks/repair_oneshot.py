"""One-shot cuts of the committed Fashion-MNIST teacher with and without repair: validation before fine-tuning.

    python benchmarks/repair_oneshot.py                       # magnitude, activation x 0.5, 0.3 x none/mean/lstsq
    python benchmarks/repair_oneshot.py --methods magnitude --budgets 0.3 --kinds lstsq --ridge 1e-2

Structures as `uvclab compress` cuts them (teacher weights, the benchmark's split and its first 3,000
validation images unless --val-samples); calibration: --samples training images drawn with --calib-seed
(repair: mean / lstsq, uvclab.prune.repair; activation scores, uvclab.prune.activation). One CPU thread;
prints a markdown table of validation top-1 and repair seconds.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from uvclab.engine.compress import build_models  # noqa: E402
from uvclab.engine.config import CompressConfig  # noqa: E402
from uvclab.engine.loop import evaluate  # noqa: E402
from uvclab.prune.activation import activation_structure  # noqa: E402
from uvclab.prune.baselines import magnitude_structure  # noqa: E402
from uvclab.prune.calibration import CalibrationSettings, calibration_batches  # noqa: E402
from uvclab.prune.repair import repair  # noqa: E402
from uvclab.vit.export import export_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="magnitude,activation")
    p.add_argument("--budgets", default="0.5,0.3")
    p.add_argument("--kinds", default="none,mean,lstsq")
    p.add_argument("--samples", type=int, default=3200)
    p.add_argument("--ridge", type=float, default=CalibrationSettings().ridge)
    p.add_argument("--calib-seed", type=int, default=0)
    p.add_argument("--val-samples", type=int, default=3000)
    p.add_argument("--statistic", default="rms", help="activation score: rms | variance")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = CompressConfig(dataset="fashion_mnist", eval_max_samples=a.val_samples, progress=False)
    model, _, splits = build_models(cfg)
    batches, n = calibration_batches(splits.train, a.samples, 128, a.calib_seed)
    settings = CalibrationSettings(samples=a.samples, ridge=a.ridge)
    print(f"calibration images: {n}; validation images: {len(splits.val)}; ridge {a.ridge:g}\n")
    print("| method | budget | repair | val top-1 (%) | repair s | ridge fallbacks |\n|---|---|---|---|---|---|")
    for method in a.methods.split(","):
        for budget in (float(b) for b in a.budgets.split(",")):
            if method == "magnitude":
                st = magnitude_structure(model, budget, cfg.layout)
            else:
                st = activation_structure(model, budget, batches, cfg.layout, statistic=a.statistic)
            for kind in a.kinds.split(","):
                m = copy.deepcopy(model)
                t0 = time.time()
                rep = repair(m, st, batches, kind, settings, samples=n)
                sec = time.time() - t0
                acc = evaluate(export_model(m, st, cfg.layout), splits.val)  # as compress: the export
                print(f"| {method} | {budget} | {kind} | {acc:.2f} | {sec:.2f} | "
                      f"{rep.get('ridge_fallbacks', '-')} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
