"""UVC stage 1 inside the pipeline: the primal-dual search over the training loop, checkpointed per epoch.

Each step: a Gumbel gate sample, the KD loss, the weight step, then `UVCPrimalDual.step` as the loop's
post-step hook (docs/method.md §3.2). After every epoch the hard structure the counts describe is scored
on validation (`val_top1_hard`) and the whole state is checkpointed, so `--resume` continues bit-identically.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from uvclab.engine.distill import kd_loss_fn
from uvclab.engine.loop import adamw_with_schedule, masked_top1, seeded_loader, steps_per_epoch, train_one_epoch
from uvclab.engine.runfiles import MetricsLog, nonfinite_stop, save_checkpoint
from uvclab.paths import CHECKPOINT
from uvclab.ranks import world
from uvclab.uvc import UVCPrimalDual, current_structure
from uvclab.vit.latency import LatencyTable
from uvclab.vit.macs import count


def search(cfg, model, teacher, splits, out: Path, log: MetricsLog, ckpt: Optional[dict],
           latency: Optional[LatencyTable] = None) -> UVCPrimalDual:
    """UVC stage 1 on the gated `model` (cfg: the CompressConfig; latency: the table of a latency budget).
    Returns the primal-dual optimiser at the end of the search."""
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world() > 1 else model
    epochs = cfg.warmup_epochs + cfg.search_epochs
    steps = steps_per_epoch(splits.train, cfg.batch_size, cfg.max_steps_per_epoch)
    uvc = UVCPrimalDual.for_search(model, cfg.uvc, cfg.macs_ratio, latency, cfg.layout,
                                   total_epochs=cfg.search_epochs, total_steps=cfg.search_epochs * steps)
    opt, sched = adamw_with_schedule(model, cfg.lr, cfg.weight_decay, epochs * steps, min(500, steps))
    start = 0
    if ckpt is not None and ckpt["stage"] == "search":
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        uvc.load_state_dict(ckpt["uvc"])
        torch.set_rng_state(ckpt["rng"])
        start = ckpt["epoch"]
    kd = kd_loss_fn(ddp_model, teacher, cfg.kd, cfg.kd_alpha, cfg.kd_tau, cfg.kd_reduction)
    for epoch in range(start, epochs):
        warm = epoch < cfg.warmup_epochs

        def loss_fn(x, y):
            uvc.set_model_gates(uvc.gate_sample(warmup=warm))
            return kd(x, y)

        def after_step(step, loss):
            rec = uvc.step(opt.param_groups[0]["lr"], epoch, warm)
            log.write({"stage": "search", "loss": loss.item(), "lr": opt.param_groups[0]["lr"], **rec})
            return {"R": f"{rec['R']:.3f}", "z": f"{rec['z']:.2g}"}

        train_one_epoch(model, seeded_loader(splits.train, cfg.batch_size, cfg.seed * 100_003 + epoch,
                                             num_workers=cfg.run.num_workers),
                        opt, sched, loss_fn, steps=steps, progress=cfg.run.progress, after_step=after_step,
                        desc=f"search {epoch + 1}/{epochs}" + (" (warm-up)" if warm else ""),
                        on_nonfinite=nonfinite_stop("search", epoch, out / CHECKPOINT))
        uvc.set_model_gates(None)
        st = current_structure(uvc)
        val = masked_top1(model, st, splits.val)
        log.write({"stage": "search_epoch", "epoch": epoch, "val_top1_hard": val,
                   "R": uvc.last["R"], "expected_macs_ratio": uvc.last["expected_macs_ratio"], "z": uvc.last["z"],
                   "structure_macs_ratio": count(model, st, cfg.layout)["macs"] / uvc.dense_macs})
        save_checkpoint(out / CHECKPOINT, {"stage": "search", "epoch": epoch + 1, "model": model.state_dict(),
                                                "opt": opt.state_dict(), "sched": sched.state_dict(),
                                                "uvc": uvc.state_dict(), "rng": torch.get_rng_state()})
    return uvc
