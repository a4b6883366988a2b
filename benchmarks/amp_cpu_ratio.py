"""bf16 autocast vs float32 training-step time on CPU for the benchmark model (the Fashion-MNIST teacher).

    python benchmarks/amp_cpu_ratio.py                 # KD and UVC search steps, 7 alternating rounds
    python benchmarks/amp_cpu_ratio.py --rounds 3 --steps 5 --out /tmp/amp.json

One process; rounds alternate the order (none, bf16), (bf16, none), ... so drift on a shared machine falls on
both; the ratio is the median over rounds of (bf16 seconds per step) / (float32 seconds per step). The steps
are gpu_check.py's: a dense KD step and a UVC search step, with Mixup/CutMix + smoothing, on random batches of
the model's input shape (synthetic: the step time does not depend on the pixels).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from uvclab.engine.teacher import load_teacher  # noqa: E402


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=str(ROOT / "data" / "teachers" / "fashion_mnist_vit.json"))
    ap.add_argument("--batch-size", type=int, default=128)   # the Fashion-MNIST benchmark's batch
    ap.add_argument("--threads", type=int, default=1)        # the benchmark's threads
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--kinds", nargs="+", default=["kd", "search"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gc = _gpu_check()
    teacher = load_teacher(args.teacher).requires_grad_(False)
    kw = teacher.uvclab_config["kwargs"]
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(args.batch_size, kw["in_chans"], kw["img_size"], kw["img_size"], generator=g),
             torch.randint(0, kw["num_classes"], (args.batch_size,), generator=g)) for _ in range(args.steps + 1)]
    result = {"teacher": Path(args.teacher).name, "batch_size": args.batch_size, "threads": args.threads,
              "steps": args.steps, "rounds": args.rounds, "torch": torch.__version__}
    for kind in args.kinds:
        times = {"none": [], "bf16": []}
        for r in range(args.rounds):
            for amp in (("none", "bf16") if r % 2 == 0 else ("bf16", "none")):
                rate = gc.time_steps(kind, teacher, teacher, data[1:], amp, torch.device("cpu"), warmup=1)
                times[amp].append(args.batch_size / rate["img_per_s"])  # seconds per step
        ratios = [b / n for n, b in zip(times["none"], times["bf16"])]
        result[kind] = {"float32_s_per_step": statistics.median(times["none"]),
                        "bf16_s_per_step": statistics.median(times["bf16"]),
                        "bf16_over_float32": statistics.median(ratios), "ratios": ratios}
        r = result[kind]
        print(f"{kind:7s} float32 {r['float32_s_per_step']:.3f} s/step  bf16 {r['bf16_s_per_step']:.3f} s/step  "
              f"ratio bf16/float32 {r['bf16_over_float32']:.2f}  (rounds: {', '.join(f'{x:.2f}' for x in ratios)})",
              flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
