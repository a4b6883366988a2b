"""GPU check: training throughput of the paper-scale steps and the wall time the params files would take.

    python benchmarks/gpu_check.py --device cuda                      # DeiT-Tiny and DeiT-Small at 224, ~3 min
    python benchmarks/gpu_check.py --device cuda --models deit_base_patch16_224 t2t_vit_14
    python benchmarks/gpu_check.py --device cpu --img-size 32 --depth 2 --steps 2 --batch-size 4 --out /tmp/g

For each model (timm, random weights) on synthetic ImageFolder data (PNGs in a temp folder, read by torchvision's
ImageFolder through the recipe's timm transform), and for amp none and bf16, it times (a) a dense KD step
(student + frozen teacher, Mixup/CutMix + smoothing), (b) a UVC search step (gate sample, KD, weight step,
`UVCPrimalDual.step`), (c) a fine-tune KD step of the 0.5-MACs magnitude export, and records peak memory
(CUDA: max_memory_allocated; CPU: the process's peak RSS so far). Each notebooks/params/*.yaml is projected to
ImageNet-1k (1,281,167 training images): stage 1 = (warm-up + search epochs) at rate (b), stage 2 = fine-tune
epochs at rate (c); validation, data-loading stalls and the latency/selection passes are not included.
Writes <out>/gpu_check.json and <out>/gpu_check.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from uvclab.engine.distill import distillation_loss  # noqa: E402
from uvclab.engine.precision import TrainStep  # noqa: E402
from uvclab.engine.recipe import RecipeSettings, build_recipe, train_transform  # noqa: E402
from uvclab.prune.baselines import magnitude_structure  # noqa: E402
from uvclab.uvc import UVCPrimalDual  # noqa: E402
from uvclab.uvc.settings import UVCSettings  # noqa: E402
from uvclab.vit.export import export_model  # noqa: E402
from uvclab.vit.gated import gate_vit  # noqa: E402
from uvclab.vit.models import create_vit  # noqa: E402

IMAGENET_TRAIN = 1_281_167
STAGE1 = RecipeSettings(mixup=0.8, cutmix=1.0, mixup_prob=0.8, smoothing=0.1)   # the reference stage 1
STAGE2 = RecipeSettings(aa="rand-m9-mstd0.5-inc1", reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1)  # DeiT


def write_imagefolder(root: Path, classes: int = 4, per_class: int = 8, size: int = 64, seed: int = 0) -> Path:
    """root/train/<class>/*.png and root/val/<class>/*.png of random RGB noise (ImageNet layout)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in range(classes):
            d = Path(root) / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return Path(root)


def batches(root: Path, img_size: int, batch_size: int, n: int, workers: int) -> tuple[list, float]:
    """n training batches through torchvision ImageFolder + the stage-2 timm transform; also the loader's img/s."""
    from torchvision.datasets import ImageFolder
    ds = ImageFolder(str(root / "train"), transform=train_transform(STAGE2, img_size, (0.485, 0.456, 0.406),
                                                                    (0.229, 0.224, 0.225)))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, generator=torch.Generator().manual_seed(0))
    out, t0 = [], time.perf_counter()
    while len(out) < n:
        out += [b for b in loader][: n - len(out)]
    return out, n * batch_size / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def time_steps(kind: str, student, teacher, data, amp: str, device, warmup: int) -> dict:
    """img/s of `kind` (kd | search | finetune) over `data` after `warmup` untimed steps."""
    student = copy.deepcopy(student).to(device).train().requires_grad_(True)
    step_fn, rec = TrainStep(amp, device), build_recipe(STAGE1, num_classes=student.num_classes)
    uvc = None
    if kind == "search":
        gate_vit(student)
        uvc = UVCPrimalDual(student, UVCSettings(), 0.5, total_epochs=1, total_steps=len(data) + warmup)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.05)

    def loss(x, y):
        if uvc is not None:
            uvc.set_model_gates(uvc.gate_sample(warmup=False))
        with torch.no_grad():
            t = teacher(x)
        return distillation_loss(student(x), y, t, alpha=0.1, criterion=rec.criterion)
    loss = rec.wrap_loss(loss)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seen = 0
    for i, (x, y) in enumerate(data[:warmup] + data):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        value = step_fn.loss(loss, x, y)
        step_fn.update(value, student, opt, 1.0)
        if uvc is not None:
            uvc.step(opt.param_groups[0]["lr"], 0, False)
        seen += len(x) if i >= warmup else 0
    _sync(device)
    return {"img_per_s": seen / (time.perf_counter() - t0), "peak_mem_mb": _peak_mb(device),
            "final_loss": value.item(), "finite": bool(torch.isfinite(value).item())}


def measure(args) -> list[dict]:
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = write_imagefolder(Path(tmp), classes=4, per_class=max(2, args.batch_size // 2),
                                 size=max(args.img_size + 8, 40))
        data, loader_rate = batches(root, args.img_size, args.batch_size, args.steps + args.warmup, args.workers)
    data = data[: args.steps + args.warmup]
    for name in args.models:
        kw = dict(img_size=args.img_size, num_classes=1000, **({"depth": args.depth} if args.depth else {}))
        torch.manual_seed(0)
        dense = create_vit(name, **kw)
        teacher = copy.deepcopy(dense).to(device).eval().requires_grad_(False)
        slim = export_model(dense, magnitude_structure(dense, 0.5))
        for amp in args.amp:
            for kind, student in (("kd", dense), ("search", dense), ("finetune", slim)):
                r = time_steps(kind, student, teacher, data[args.warmup:], amp, device, args.warmup)
                rows.append({"model": name, "step": kind, "amp": amp, "batch_size": args.batch_size,
                             "img_size": args.img_size, "loader_img_per_s": loader_rate, **r})
                print(f"{name:28s} {kind:9s} amp={amp:5s} {r['img_per_s']:9.1f} img/s  "
                      f"peak {r['peak_mem_mb']:8.0f} MB", flush=True)
    return rows


def projections(rows: list[dict], params_dir: Path) -> list[dict]:
    """Hours of stage 1 and stage 2 on ImageNet-1k for each params file, at each measured amp."""
    rate = {(r["model"], r["step"], r["amp"]): r["img_per_s"] for r in rows}
    out = []
    for f in sorted(params_dir.glob("*.yaml")):
        p = yaml.safe_load(f.read_text())
        for amp in sorted({r["amp"] for r in rows}):
            s1, s2 = rate.get((p["model"], "search", amp)), rate.get((p["model"], "finetune", amp))
            e1 = p.get("warmup_epochs", 0) + p.get("search_epochs", 0)
            h1 = e1 * IMAGENET_TRAIN / s1 / 3600 if s1 else None
            h2 = p.get("finetune_epochs", 0) * IMAGENET_TRAIN / s2 / 3600 if s2 else None
            out.append({"params": f.name, "model": p["model"], "amp": amp, "stage1_epochs": e1,
                        "finetune_epochs": p.get("finetune_epochs", 0), "stage1_h": h1, "stage2_h": h2,
                        "total_h": h1 + h2 if h1 and h2 else None})
    return out


def markdown(info: dict, rows: list[dict], proj: list[dict]) -> str:
    fmt = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = [f"# GPU check ({info['device_name']})", "", info["note"], "",
             f"Command: `{info['command']}`; torch {info['torch']}, batch {info['batch_size']}, "
             f"image {info['img_size']}, {info['steps']} timed steps after {info['warmup']} warm-up steps.", "",
             "| model | step | amp | img/s | peak memory (MB) | final loss |", "|---|---|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['step']} | {r['amp']} | {fmt(r['img_per_s'])} | {fmt(r['peak_mem_mb'], 0)} | "
              f"{fmt(r['final_loss'], 3)} |" for r in rows]
    lines += ["", f"Data loader (ImageFolder + RandAugment/erasing, {info['workers']} workers): "
              f"{fmt(rows[0]['loader_img_per_s'] if rows else None)} img/s.", "",
              "Projected wall time on ImageNet-1k (1,281,167 images per epoch; stage 1 at the search-step rate, "
              "stage 2 at the fine-tune-step rate; no validation or loader stalls):", "",
              "| params file | amp | stage-1 epochs | stage-2 epochs | stage 1 (h) | stage 2 (h) | total (h) |",
              "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {p['params']} | {p['amp']} | {p['stage1_epochs']} | {p['finetune_epochs']} | {fmt(p['stage1_h'])} | "
              f"{fmt(p['stage2_h'])} | {fmt(p['total_h'])} |" for p in proj]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", nargs="+", default=["deit_tiny_patch16_224", "deit_small_patch16_224"])
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--depth", type=int, default=None, help="shrink the models (tests); default: the full depth")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (cuDNN / allocator warm-up)")
    ap.add_argument("--amp", nargs="+", default=["none", "bf16"])
    ap.add_argument("--workers", type=int, default=0, help="data loader workers for the loader rate")
    ap.add_argument("--params", default=str(ROOT / "notebooks" / "params"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.batch_size % 2:
        ap.error("--batch-size must be even (Mixup/CutMix)")
    rows = measure(args)
    proj = projections(rows, Path(args.params))
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    info = {"device": args.device, "device_name": torch.cuda.get_device_name(device) if gpu else
            f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "note": "Measured on a GPU." if gpu else "Unmeasured on GPU: these are CPU numbers (see the command); "
            "run `python benchmarks/gpu_check.py --device cuda` on a GPU for the params files' wall time.",
            "shrunk": bool(args.depth) or args.img_size != 224,
            "command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "torch": torch.__version__, **{k: getattr(args, k) for k in ("batch_size", "img_size", "steps",
                                                                         "warmup", "workers")}}
    if info["shrunk"]:
        info["note"] += " Models shrunk (--depth / --img-size): the projections do not describe the params files."
    result = {"info": info, "steps": rows, "projections": proj}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    (out / "gpu_check.md").write_text(markdown(info, rows, proj))
    return result


if __name__ == "__main__":
    main()
