"""Dense vs slim throughput in PyTorch and in ONNX Runtime (CPU): the README "Deploy" table.

    python benchmarks/deploy.py                    # Fashion-MNIST exports + DeiT-Small at 0.5 (224x224), 1 thread
    python benchmarks/deploy.py --threads 2 --skip-deit

Rows: exported models of the Fashion-MNIST benchmark's run folders (--runs; magnitude at 0.7, where no UVC run
exists, and UVC at 0.5 and 0.3, seed 0) against the dense teacher, and DeiT-Small (random weights, timing only)
cut to 0.5 by the uniform structure `uvclab bench` uses. Per model: a verified ONNX export (max abs diff of
ONNX Runtime vs PyTorch: real test images for the runs, random ones for DeiT-Small), then dense vs slim timed in
PyTorch and in ONNX Runtime (alternating rounds in one process, medians; the same `compare_throughput`), and for
ORT's per-operator profile (dense and slim). Writes <results>/deploy.json and deploy.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from uvclab.compare.deploy import OrtModel, export_onnx, ort_op_profile  # noqa: E402
from uvclab.compare.throughput import compare_throughput  # noqa: E402
from uvclab.engine.compress import teacher_path  # noqa: E402
from uvclab.engine.config import load_config  # noqa: E402
from uvclab.engine.teacher import load_teacher  # noqa: E402
from uvclab.io_utils import atomic_write_text  # noqa: E402
from uvclab.prune.baselines import uniform_structure  # noqa: E402
from uvclab.vit.export import export_model, load_pruned  # noqa: E402
from uvclab.vit.models import create_vit  # noqa: E402

FM_RUNS = ("magnitude_b0.7_s0", "uvc_b0.5_s0", "uvc_b0.3_s0")


def time_both(name, dense, slim, batch_size, rounds, iters, threads, ort_dense=None, **macs):
    """PyTorch then ONNX Runtime, dense vs slim (each alternating); returns the row and the slim OrtModel."""
    pt = compare_throughput(dense, slim, batch_size, rounds=rounds, iters=iters, **macs)
    ort_slim = OrtModel(slim, batch_size, threads)
    ort = compare_throughput(ort_dense or OrtModel(dense, batch_size, threads), ort_slim, batch_size, rounds=rounds,
                             iters=iters, runtime="onnxruntime", threads=threads, **macs)
    print(f"{name}\n  {pt}\n  {ort}", flush=True)
    return {"model": name, "batch_size": batch_size, "macs_ratio": pt.exported_macs / pt.dense_macs,
            "ideal_speedup": pt.macs_speedup, "torch": pt.to_dict(), "ort": ort.to_dict()}, ort_slim


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=str(ROOT / "runs" / "benchmarks" / "fashion_mnist" / "runs"))
    p.add_argument("--threads", type=int, default=1, help="PyTorch and ONNX Runtime intra-op threads")
    p.add_argument("--rounds", type=int, default=9, help="alternating timing rounds (median)")
    p.add_argument("--fm-batch", type=int, default=64)
    p.add_argument("--deit-batch", type=int, default=8)
    p.add_argument("--skip-deit", action="store_true")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0, rows, profiles, load0 = time.time(), [], {}, os.getloadavg()[0]
    runs = [Path(a.runs) / r for r in FM_RUNS if (Path(a.runs) / r / "model").is_dir()]
    ort_teacher = None
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            ver = export_onnx(run, Path(tmp) / f"{run.name}.onnx")
            report = json.loads((run / "report.json").read_text())
            teacher = load_teacher(teacher_path(load_config(run / "config.yaml")))
            ort_teacher = ort_teacher or OrtModel(teacher, a.fm_batch, a.threads)
            row, ort_slim = time_both(f"Fashion-MNIST {run.name}", teacher, load_pruned(run / "model"), a.fm_batch,
                                      a.rounds, 3, a.threads, ort_teacher, dense_macs=report["dense_macs_independent"],
                                      exported_macs=report["macs_independent"])
            rows.append(dict(row, top1=report["top1"], max_abs_diff=ver.max_abs_diff, verified_on=ver.verified_on,
                             exporter=ver.exporter))
            profiles[f"Fashion-MNIST {run.name}"] = ort_op_profile(ort_slim, runs=5).to_dict(orient="records")
        if ort_teacher is not None:
            profiles["Fashion-MNIST teacher (dense)"] = ort_op_profile(ort_teacher, runs=5).to_dict(orient="records")
        if not a.skip_deit:
            torch.manual_seed(0)
            dense = create_vit("deit_small_patch16_224").eval()
            slim = export_model(dense, uniform_structure(dense, 0.5, "compact"), "compact")
            ver = export_onnx(slim, Path(tmp) / "deit_small.onnx", num_images=4)
            ort_dense = OrtModel(dense, a.deit_batch, a.threads)
            row, ort_slim = time_both("DeiT-Small 224x224, uniform 0.5 (random weights)", dense, slim, a.deit_batch,
                                      max(3, a.rounds // 2), 1, a.threads, ort_dense)
            rows.append(dict(row, max_abs_diff=ver.max_abs_diff, verified_on=ver.verified_on, exporter=ver.exporter))
            for name, m in (("dense", ort_dense), ("slim", ort_slim)):
                profiles[f"DeiT-Small {name}"] = ort_op_profile(m, runs=2).to_dict(orient="records")
    import onnxruntime
    env = {"threads": a.threads, "cpu_count": os.cpu_count(), "load_avg_1min_start_end": [load0, os.getloadavg()[0]],
           "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "machine": platform.machine(),
           "wall_s": round(time.time() - t0)}
    out = {"env": env, "rows": rows, "op_profiles": profiles}
    res = Path(a.results)
    atomic_write_text(res / "deploy.json", json.dumps(out, indent=1))
    atomic_write_text(res / "deploy.md", markdown(out))
    print(markdown(out))
    return 0


def markdown(out: dict) -> str:
    lines = ["| model | MACs ratio | ideal | PyTorch dense / slim img/s | PyTorch speedup | ORT dense / slim img/s | "
             "ORT speedup | ORT / ideal | ONNX max abs diff |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in out["rows"]:
        pt, ort = r["torch"], r["ort"]
        lines.append(f"| {r['model']} (batch {r['batch_size']}) | {r['macs_ratio']:.3f} | {r['ideal_speedup']:.2f}x | "
                     f"{pt['dense_img_per_s']:.1f} / {pt['exported_img_per_s']:.1f} | {pt['speedup']:.2f}x | "
                     f"{ort['dense_img_per_s']:.1f} / {ort['exported_img_per_s']:.1f} | {ort['speedup']:.2f}x | "
                     f"{ort['efficiency']:.2f} | {r['max_abs_diff']:.1e} |")
    for name, prof in out["op_profiles"].items():
        lines += ["", f"ORT profile, {name} (ms per batch by op type):", "",
                  "| op | ms | share | nodes |", "|---|---:|---:|---:|"]
        lines += [f"| {o['op']} | {o['ms']:.1f} | {o['share']:.1%} | {o['nodes']} |" for o in prof[:8]]
    return "\n".join(lines) + f"\n\nConditions: {json.dumps(out['env'])}\n"


if __name__ == "__main__":
    sys.exit(main())
