"""UVC stage 1 inside the pipeline: the primal-dual search over the training loop, checkpointed per epoch.

Each step: a Gumbel gate sample, the KD loss, the weight step, then `UVCPrimalDual.step` as the loop's
post-step hook (docs/method.md §3.2). After every epoch the hard structure the counts describe is scored
on validation (`val_top1_hard`) and the whole state is checkpointed, also inside epochs (on a timer, every N
steps, on SIGTERM: `engine.checkpointing`), so `--resume` continues bit-identically from any step.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from uvclab.engine.checkpointing import StageCheckpoints
from uvclab.engine.config import CompressConfig
from uvclab.engine.distill import distillation_loss
from uvclab.engine.loop import (adamw_with_schedule, evaluate, seeded_loader, steps_per_epoch, train_one_epoch,
                                world)
from uvclab.engine.precision import TrainStep, maybe_compile, prepare_model
from uvclab.engine.recipe import stage_recipe
from uvclab.engine.runfiles import MetricsLog, nonfinite_stop
from uvclab.uvc import UVCPrimalDual, current_structure
from uvclab.vit.gated import open_all_gates
from uvclab.vit.latency import LatencyTable
from uvclab.vit.macs import count
from uvclab.vit.structure import Structure, apply_structure


@contextmanager
def masked(model: torch.nn.Module, structure: Structure):
    """Temporarily apply a structure's hard masks to a gated model (all gates open afterwards)."""
    apply_structure(model, structure)
    try:
        yield model
    finally:
        open_all_gates(model)


def masked_top1(model: torch.nn.Module, structure: Structure, dataset) -> float:
    """Top-1 of a gated model with a structure's hard masks applied (no export, no training)."""
    with masked(model, structure):
        return evaluate(model, dataset)


def kd_loss_fn(cfg: CompressConfig, model, teacher, criterion=None):
    """loss(x, y): the configured distillation loss of `model` against the frozen teacher (on the same x: with
    Mixup, `Recipe.wrap_loss` mixes x before this runs). criterion: the recipe's label loss (None: CE)."""
    def loss(x, y):
        with torch.no_grad():
            t = teacher(x)
        return distillation_loss(model(x), y, t, kind=cfg.kd, alpha=cfg.kd_alpha, tau=cfg.kd_tau,
                                 reduction=cfg.kd_reduction, criterion=criterion)
    return loss


def latency_table_for(cfg: CompressConfig, model) -> Optional[LatencyTable]:
    """The cached (or freshly measured) latency table of a latency-budget run; None for a MACs budget."""
    if cfg.budget_kind != "latency":
        return None
    from uvclab.vit.latency_build import latency_table
    return latency_table(model, cfg.latency_batch_size, cfg.latency_threads or cfg.threads, cfg.device,
                         progress=cfg.progress)


def macs_budget_for_latency(model, table: LatencyTable, budget: float, layout: str) -> float:
    """The MACs ratio of the teacher's global magnitude cut whose predicted latency is `budget` x dense: the
    MACs target of a latency-budget search on MACs (`search_resource: macs`)."""
    from uvclab.prune.baselines import magnitude_scores
    from uvclab.prune.fit import fit_to_budget
    from uvclab.vit.macs import structure_macs, vit_shape
    s = vit_shape(model)
    heads, neurons = magnitude_scores(model)
    st = fit_to_budget(s, Structure.dense(model), heads * max(1, s.mlp_hidden // 64), neurons,
                       table.predicted_dense_ms(s.depth), budget, 0.01, layout, score_norm="raw",
                       per_mac=False, block_cost=lambda b: table.block_ms(b, layout), fixed_cost=table.fixed_ms)
    return structure_macs(s, st, layout) / count(model)["macs"]


def search(cfg: CompressConfig, model, teacher, splits, out: Path, log: MetricsLog,
           ckpt: Optional[dict]) -> UVCPrimalDual:
    """UVC stage 1 on the gated `model`. Returns the primal-dual optimiser at the end of the search."""
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world() > 1 else model
    epochs = cfg.warmup_epochs + cfg.search_epochs
    steps = steps_per_epoch(splits.train, cfg.batch_size, cfg.max_steps_per_epoch)
    table = latency_table_for(cfg, model)
    if table is not None and cfg.search_resource == "macs":  # search on MACs, select on latency (engine.selection)
        uvc = UVCPrimalDual(model, cfg.uvc, macs_budget_for_latency(model, table, cfg.macs_ratio, cfg.layout),
                            total_epochs=cfg.search_epochs, total_steps=cfg.search_epochs * steps, layout=cfg.layout)
    else:
        uvc = UVCPrimalDual(model, cfg.uvc, cfg.macs_ratio, total_epochs=cfg.search_epochs,
                            total_steps=cfg.search_epochs * steps, latency=table, layout=cfg.layout)
    opt, sched = adamw_with_schedule(model, cfg.lr, cfg.weight_decay, epochs * steps, min(500, steps))
    # issue 27: timm recipe (Mixup/CutMix, smoothing, image ops) and precision; all off by default
    rec, data = stage_recipe(cfg, "search", splits)
    step_fn = TrainStep(cfg.amp, cfg.device, cfg.channels_last)
    prepare_model(model, cfg.channels_last), prepare_model(teacher, cfg.channels_last)
    ckpts = StageCheckpoints(cfg, out, log, "search", epochs, steps, lambda: {
        "stage": "search", "model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
        "uvc": uvc.state_dict(), "uvc_last": uvc.last, "recipe": rec.state_dict(), "amp": step_fn.state_dict()})
    start, start_step = 0, 0
    if ckpt is not None and ckpt["stage"] == "search":
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        uvc.load_state_dict(ckpt["uvc"])
        uvc.last = ckpt.get("uvc_last", {})
        start, start_step = ckpts.resume(ckpt)
        if "recipe" in ckpt:
            rec.load_state_dict(ckpt["recipe"])
            step_fn.load_state_dict(ckpt["amp"])
    # the gated student is not compiled (its gates change between steps); the frozen teacher may be
    kd = rec.wrap_loss(kd_loss_fn(cfg, ddp_model, maybe_compile(teacher, cfg.compile), rec.criterion))
    for epoch in range(start, epochs):
        warm = epoch < cfg.warmup_epochs

        def loss_fn(x, y):
            uvc.set_model_gates(uvc.gate_sample(warmup=warm))
            return kd(x, y)

        def after_step(step, loss):  # outside autocast: the dual / count updates and R stay float32
            rec = uvc.step(opt.param_groups[0]["lr"], epoch, warm)
            log.write({"stage": "search", "loss": loss.item(), "lr": opt.param_groups[0]["lr"], **rec})
            return {"R": f"{rec['R']:.3f}", "z": f"{rec['z']:.2g}"}

        skip = start_step if epoch == start else 0  # a mid-epoch checkpoint: the steps already done
        train_one_epoch(model, seeded_loader(data.train, cfg.batch_size, cfg.seed * 100_003 + epoch,
                                             num_workers=cfg.num_workers, pin_memory=cfg.pin_memory,
                                             skip_batches=skip),
                        opt, sched, loss_fn, steps=steps, progress=cfg.progress,
                        after_step=ckpts.hook(epoch, after_step), step_fn=step_fn,
                        desc=f"search {epoch + 1}/{epochs}" + (" (warm-up)" if warm else ""),
                        on_nonfinite=nonfinite_stop("search", epoch, out / "checkpoint.pt"), start=skip)
        ckpts.end_epoch()
        uvc.set_model_gates(None)
        st = current_structure(uvc)
        val = masked_top1(model, st, splits.val)
        log.write({"stage": "search_epoch", "epoch": epoch, "val_top1_hard": val,
                   "R": uvc.last["R"], "expected_macs_ratio": uvc.last["expected_macs_ratio"], "z": uvc.last["z"],
                   "structure_macs_ratio": count(model, st, cfg.layout)["macs"] / uvc.dense_macs})
        ckpts.save(epoch + 1)
    return uvc
