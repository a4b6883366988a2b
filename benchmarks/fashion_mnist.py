"""UVC vs one-shot baselines on Fashion-MNIST with the committed DeiT-Tiny-shaped teacher.

    python benchmarks/fashion_mnist.py            # full protocol (see PROTOCOLS); README states its wall time
    python benchmarks/fashion_mnist.py --quick    # every method at B=0.5, reduced training, ~4 min
    python benchmarks/fashion_mnist.py --long --methods uvc,activation_lstsq   # 5x the steps at 0.3, 0.2
    python benchmarks/fashion_mnist.py --device cuda --scale 10 --workers 1   # GPU: 10x the training
    python benchmarks/fashion_mnist.py --retime   # no training: time the existing run folders' models where a
                                                  # speed file is missing (e.g. ONNX Runtime), rewrite the results

Writes run folders under --out (default runs/benchmarks/fashion_mnist[_quick|_long]) and, from them,
<results>/fashion_mnist[_quick|_long].csv, .md and _pareto.png. Re-running continues: finished runs are kept.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from uvclab.compare.benchmark import METHODS, Protocol, measure_speed, results_table, run_benchmark  # noqa: E402
from uvclab.ui.pareto import write_results  # noqa: E402
from uvclab.uvc import SHORT_RUN_UVC  # noqa: E402

# UVC: search 2 epochs (no warm-up: the student starts as the trained teacher), then fine-tune 6; one-shot
# methods fine-tune all 8. Same images for every method. Test: the full 10,000 images; validation: 3,000.
# Seeds 0, 1, 2 at 0.5 and 0.3 for UVC, magnitude and Isomorphic Pruning (the other baselines and the UVC variants:
# seed 0 only, for time on 2 CPU cores).
PROTOCOLS = {
    "full": dict(budgets=(0.7, 0.5, 0.3), seeds=(0,), extra_seeds=(1, 2), seed_budgets=(0.5, 0.3),
                 seed_methods=("uvc", "magnitude", "isomorphic"),
                 config=dict(dataset="fashion_mnist", batch_size=128, max_steps_per_epoch=24, warmup_epochs=0,
                             search_epochs=2, finetune_epochs=6, lr=5e-4, finetune_lr=5e-4, threads=1,
                             eval_max_samples=3000, test_max_samples=None, uvc=SHORT_RUN_UVC)),
    # issue 25: where structure matters, with 5x the steps (search 2 x 120, fine-tune 6 x 120 steps)
    "long": dict(budgets=(0.3, 0.2), seeds=(0, 1, 2), extra_seeds=(),
                 config=dict(dataset="fashion_mnist", batch_size=128, max_steps_per_epoch=120, warmup_epochs=0,
                             search_epochs=2, finetune_epochs=6, lr=5e-4, finetune_lr=5e-4, threads=1,
                             eval_max_samples=3000, test_max_samples=None, uvc=SHORT_RUN_UVC)),
    "quick": dict(budgets=(0.5,), seeds=(0,), extra_seeds=(),
                  config=dict(dataset="fashion_mnist", batch_size=64, max_steps_per_epoch=25, warmup_epochs=0,
                              search_epochs=2, finetune_epochs=3, lr=5e-4, finetune_lr=5e-4, threads=1,
                              eval_max_samples=2000, test_max_samples=2000, uvc=SHORT_RUN_UVC)),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced protocol (< 10 min on 2 cores)")
    p.add_argument("--long", action="store_true", help="5x the steps of the full protocol, budgets 0.3, 0.2")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--budgets", default=None, help="comma-separated MACs ratios (default: the protocol's)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds for every listed method and budget "
                   "(default: the protocol's seeds, plus its extra seeds for its seed methods)")
    p.add_argument("--workers", type=int, default=2, help="runs in parallel (processes, 1 thread each on CPU)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the training steps per epoch (GPU runs)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a protocol config key (e.g. --set max_steps_per_epoch=5)")
    p.add_argument("--retime", action="store_true", help="train nothing: measure missing speed files (PyTorch, "
                   "ONNX Runtime) of the finished runs in --out and rewrite the results")
    p.add_argument("--out", default=None, help="run folders (default runs/benchmarks/fashion_mnist[_quick|_long])")
    p.add_argument("--results", default=None, help="results folder (default benchmarks/results; quick: the --out)")
    a = p.parse_args(argv)
    kind = "quick" if a.quick else "long" if a.long else "full"
    name = {"quick": "fashion_mnist_quick", "long": "fashion_mnist_long", "full": "fashion_mnist"}[kind]
    spec = dict(PROTOCOLS[kind])
    config = dict(spec.pop("config"), device=a.device)
    config["max_steps_per_epoch"] = max(1, round(config["max_steps_per_epoch"] * a.scale))
    if a.device != "cpu":
        config["threads"] = None
    import yaml
    for item in a.set:
        key, _, value = item.partition("=")
        config[key] = yaml.safe_load(value)
    if a.budgets:
        spec["budgets"] = tuple(float(b) for b in a.budgets.split(","))
    if a.seeds:
        spec.update(seeds=tuple(int(s) for s in a.seeds.split(",")), extra_seeds=())
    protocol = Protocol(methods=tuple(m.strip() for m in a.methods.split(",")), config=config, **spec)
    out = Path(a.out) if a.out else ROOT / "runs" / "benchmarks" / name
    results = Path(a.results) if a.results else (out if a.quick else ROOT / "benchmarks" / "results")
    t0 = time.time()
    if a.retime:
        for runtime in protocol.speed_runtimes:
            measure_speed(out / "runs", protocol, runtime=runtime)
        df = results_table(out / "runs")
    else:
        df = run_benchmark(protocol, out, workers=a.workers)
    wall = time.time() - t0
    cmd = "python benchmarks/fashion_mnist.py " + " ".join(argv if argv is not None else sys.argv[1:])
    note = (f"Generated by `{cmd.strip()}` ({wall / 60:.1f} min wall this time; finished runs are reused). "
            f"Protocol: {protocol}.")
    paths = write_results(results_table(out / "runs"), results, name, note)
    print(open(paths["md"]).read())
    print("wrote " + ", ".join(str(v) for v in paths.values()))
    return 0 if len(df) else 1


if __name__ == "__main__":
    sys.exit(main())
