"""Cost of calibration repair (uvclab.prune.repair): seconds for mean and lstsq at a magnitude cut.

    python benchmarks/repair_cost.py                                  # Fashion-MNIST teacher, 3,200 images
    python benchmarks/repair_cost.py --model deit_small --samples 256 # DeiT-Small 224, random weights

Wall and CPU seconds (time.process_time: with one thread, the time the process itself computed, which a
shared machine does not inflate) of the whole repair call: one forward pass of the calibration images with
hooks plus, for lstsq, the float64 Gram matrices and the Cholesky solves.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from uvclab.prune.baselines import magnitude_structure  # noqa: E402
from uvclab.prune.calibration import CalibrationSettings  # noqa: E402
from uvclab.prune.repair import repair  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fashion", help="fashion (the committed teacher) | deit_small")
    p.add_argument("--samples", type=int, default=3200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.model == "fashion":
        from uvclab.engine.teacher import load_teacher
        from uvclab.paths import default_teacher
        from uvclab.vit.gated import gate_vit
        model = gate_vit(load_teacher(default_teacher("fashion_mnist")))
        shape = (1, 28, 28)
    else:
        import uvclab
        from uvclab.vit.gated import gate_vit
        model = gate_vit(uvclab.create_vit("deit_small_patch16_224", pretrained=False))
        shape = (3, 224, 224)
    model = model.to(a.device).eval()
    st = magnitude_structure(model, a.budget)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(min(a.batch, a.samples - i), *shape, generator=g) for i in range(0, a.samples, a.batch)]
    print(f"{a.model}: {a.samples} images, batch {a.batch}, {a.threads} thread(s), {a.device}, magnitude cut {a.budget}")
    for kind in ("mean", "lstsq"):
        w0, c0 = time.time(), time.process_time()
        rep = repair(model, st, batches, kind, CalibrationSettings(samples=a.samples), samples=a.samples)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        print(f"  {kind}: {time.time() - w0:.2f} s wall, {time.process_time() - c0:.2f} s CPU, "
              f"{rep['layers']} layers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
