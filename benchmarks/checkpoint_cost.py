"""What does a periodic checkpoint cost? One UVC search step vs one `checkpoint.pt` write (issue 28).

    python benchmarks/checkpoint_cost.py                      # Fashion-MNIST teacher (benchmark model), batch 128
    python benchmarks/checkpoint_cost.py --model deit_small --batch 32 --steps 3   # DeiT-Small at 224, random init

A search step as `engine.strategies.search` runs it: a Gumbel gate sample, the student's and the frozen teacher's forward
pass (the teacher is a copy of the student), soft KD, backward, clip, AdamW, `UVCPrimalDual.step`, on random
images (data loading left out). The checkpoint is the one `engine.checkpointing` writes mid-epoch (model,
AdamW, scheduler, UVC state, RNG), atomically into --dir (default: a temporary folder; pass the file system a
run folder lives on). Prints the medians, the write as a ratio of the step, and the share of run time it adds
at the default timer (one write per 10 minutes) and at one write every 100 steps.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def build(name: str):
    from uvclab.engine.teacher import load_teacher
    from uvclab.paths import default_teacher
    from uvclab.vit.models import create_vit
    if name == "fashion_mnist":
        student = load_teacher(default_teacher("fashion_mnist"))
    else:
        torch.manual_seed(0)
        student = create_vit("deit_small_patch16_224")
    return student


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fashion_mnist", choices=["fashion_mnist", "deit_small"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed steps (after 1 untimed)")
    p.add_argument("--writes", type=int, default=5, help="timed checkpoint writes")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--dir", default=None, help="folder the checkpoints are written to (default: a temp folder)")
    args = p.parse_args(argv)
    from uvclab.engine.distill import distillation_loss
    from uvclab.engine.loop import adamw_with_schedule
    from uvclab.engine.runfiles import save_checkpoint
    from uvclab.uvc import UVCPrimalDual
    from uvclab.uvc.settings import UVCSettings
    from uvclab.vit.gated import gate_vit
    if args.threads:
        torch.set_num_threads(args.threads)
    student = build(args.model)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    model = gate_vit(student).train()
    uvc = UVCPrimalDual(model, UVCSettings(), 0.5, total_epochs=10, total_steps=1000)
    opt, sched = adamw_with_schedule(model, 5e-4, 0.05, 1000, 10)
    c = model.patch_embed.proj.in_channels
    size = model.patch_embed.img_size
    x, y = torch.randn(args.batch, c, *size), torch.randint(0, model.num_classes, (args.batch,))

    def step():
        uvc.set_model_gates(uvc.gate_sample())
        with torch.no_grad():
            t = teacher(x)
        loss = distillation_loss(model(x), y, t, kind="soft", alpha=0.5, tau=1.0, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        uvc.step(opt.param_groups[0]["lr"], 1, False)
        return loss.item()

    step()
    steps = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        steps.append(time.perf_counter() - t0)
    folder = Path(args.dir or tempfile.mkdtemp(prefix="uvclab-ckpt-"))
    writes = []
    for _ in range(args.writes):
        t0 = time.perf_counter()
        save_checkpoint(folder / "checkpoint.pt", {
            "stage": "search", "model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
            "uvc": uvc.state_dict(), "uvc_last": uvc.last, "rng": torch.get_rng_state(), "epoch": 0, "step": 1})
        writes.append(time.perf_counter() - t0)
    mb = (folder / "checkpoint.pt").stat().st_size / 2 ** 20
    s, w = statistics.median(steps), statistics.median(writes)
    res = {"model": args.model, "batch": args.batch, "threads": torch.get_num_threads(), "step_s": s,
           "checkpoint_s": w, "checkpoint_mb": mb, "ratio_to_step": w / s,
           "added_at_10_min": w / 600, "added_every_100_steps": w / (100 * s)}
    print(f"{args.model} batch {args.batch}, {res['threads']} threads: step {s * 1000:.1f} ms (median of "
          f"{len(steps)}), checkpoint {mb:.1f} MB written in {w * 1000:.1f} ms (median of {len(writes)}) = "
          f"{w / s:.2f} steps; adds {100 * w / 600:.3f} % at one write per 10 min, "
          f"{100 * w / (100 * s):.2f} % at one per 100 steps  [{folder}]")
    return res


if __name__ == "__main__":
    main()
