"""Before fine-tuning, is it a run's *structure* or its *weights* that keeps (or loses) accuracy?

    python benchmarks/structure_vs_weights.py runs/digits-uvc-0.5-seed0 runs/digits-activation-0.5-seed0

For each finished run folder: its validation top-1 before fine-tuning (report.json), then its structure applied
to the teacher's weights (what a one-shot cut starts from), as cut and after the `lstsq` repair (3,200
calibration images or the whole training split, the run's seed), and that repaired model's test top-1 with no
fine-tuning at all. A UVC run whose structure on the teacher's
weights scores well but whose own value is low lost accuracy to the search's weight updates, not to its choice
of groups.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from uvclab.engine.compress import build_models, repair_cut  # noqa: E402
from uvclab.engine.config import load_config  # noqa: E402
from uvclab.engine.loop import masked_top1  # noqa: E402
from uvclab.paths import CONFIG, REPORT, STRUCTURE  # noqa: E402
from uvclab.vit.structure import Structure  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="finished run folders")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print("| run | method | budget | seed | val before fine-tune (its own weights) | its structure on the teacher's "
          "weights | + lstsq repair | dense teacher | test, teacher's weights + lstsq, no fine-tune |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for run in map(Path, a.runs):
        report = json.loads((run / REPORT).read_text())
        cfg = load_config(run / CONFIG, overrides=["calibration.repair=lstsq", "progress=false"])
        model, _, splits = build_models(cfg)  # the student starts as the teacher's weights
        structure = Structure.load(run / STRUCTURE)
        dense = masked_top1(model, Structure.dense(model), splits.val)
        cut = masked_top1(model, structure, splits.val)
        repair_cut(cfg, model, structure, splits, {})
        repaired = masked_top1(model, structure, splits.val)
        test = masked_top1(model, structure, splits.test)
        print(f"| {run.name} | {report['method']} | {report['budget']:g} | {report['seed']} | "
              f"{report['val_top1_before_finetune']:.2f} | {cut:.2f} | {repaired:.2f} | {dense:.2f} | {test:.2f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
