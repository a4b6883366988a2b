"""Structure strategies of `compress`: the one table of methods (config key `method`), name -> function(job)
returning the Structure every method is then exported, fine-tuned, saved and reported with. `uvc` is the
primal-dual search over the training loop (`search`) and its `uvclab.uvc.final_structure`; the others cut the
teacher's weights in one shot: `magnitude` (global magnitude structured pruning), `uniform` (the same kept
fraction in every block), `depth` (drop whole blocks, greedily by validation accuracy), `torch_pruning`
(Torch-Pruning's global group Taylor pruning as a Structure), `isomorphic` (its Isomorphic Pruning ranking,
Fang et al., ECCV 2024), `activation` (weight x input-activation norms, ranked per MAC). A new method is a function of a `Job` and one line in `STRATEGIES`."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from uvclab.engine.checkpointing import StageCheckpoints
from uvclab.engine.distill import kd_loss_fn
from uvclab.engine.loop import (adamw_with_schedule, evaluate, masked_top1, seeded_loader, steps_per_epoch,
                                train_one_epoch)
from uvclab.engine.progress import EpochLines
from uvclab.engine.precision import TrainStep, maybe_compile, prepare_model
from uvclab.engine.recipe import stage_recipe
from uvclab.engine.runfiles import MetricsLog, nonfinite_stop
from uvclab.io_utils import atomic_write_text
from uvclab.paths import CHECKPOINT, UVC_STATE
from uvclab.prune import baselines
from uvclab.prune.activation import activation_structure
from uvclab.prune.calibration import calibration_batches
from uvclab.ranks import rank, world
from uvclab.uvc import UVCPrimalDual, current_structure, final_structure, resolve_prune_dims
from uvclab.vit.latency import LatencyTable
from uvclab.vit.latency_build import measure_ms
from uvclab.vit.macs import count, vit_shape
from uvclab.vit.structure import Structure


@dataclass
class Job:
    """What a strategy gets: the run's config, models, data and folder; `notes` go into report.json."""
    cfg: Any                             # the CompressConfig
    model: torch.nn.Module               # the gated student (the teacher's weights unless a model is named)
    teacher: torch.nn.Module             # frozen
    splits: Any                          # engine.data.Splits (validation / test already capped)
    out: Path                            # the run folder (its metrics log: `log`)
    log: MetricsLog
    ckpt: Optional[dict] = None          # the checkpoint to continue from (None: a fresh start)
    latency: Optional[LatencyTable] = None  # budget_kind latency: the table (fetched once per run)
    dims_table: Optional[LatencyTable] = None  # the table `uvc.prune_dims: auto` decides with (any budget kind)
    notes: dict = field(default_factory=dict)


def search(job: Job) -> UVCPrimalDual:
    """UVC stage 1: each step a Gumbel gate sample, the KD loss, the weight step, then `UVCPrimalDual.step` as the
    loop's post-step hook (docs/method.md §3.2); each epoch the counts' hard structure scored on validation and
    the whole state checkpointed (`--resume` continues bit-identically). Returns the optimiser."""
    cfg, model, splits, out, log, ckpt = job.cfg, job.model, job.splits, job.out, job.log, job.ckpt
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world() > 1 else model
    epochs = cfg.warmup_epochs + cfg.search_epochs
    steps = steps_per_epoch(splits.train, cfg.batch_size, cfg.max_steps_per_epoch)
    settings, decided = resolve_prune_dims(cfg.uvc, job.dims_table or job.latency, vit_shape(model), cfg.layout)
    job.notes.update({"prune_dims_auto": decided} if decided else {})
    uvc = UVCPrimalDual.for_search(model, settings, cfg.macs_ratio, job.latency, cfg.layout,
                                   total_epochs=cfg.search_epochs, total_steps=cfg.search_epochs * steps)
    opt, sched = adamw_with_schedule(model, cfg.lr, cfg.weight_decay, epochs * steps, min(500, steps))
    rec, data = stage_recipe(cfg, "search", splits)  # timm's recipe (Mixup/CutMix, smoothing, ...): off by default
    step_fn = TrainStep(cfg.run.amp, cfg.run.device, cfg.run.channels_last)
    prepare_model(model, cfg.run.channels_last), prepare_model(job.teacher, cfg.run.channels_last)
    ckpts = StageCheckpoints(cfg.run, out, log, "search", epochs, steps, lambda: {
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
    line = EpochLines("search", epochs, start, cfg.run.epoch_lines)
    # the gated student is not compiled (its gates change between steps); the frozen teacher may be
    kd = rec.wrap_loss(kd_loss_fn(ddp_model, maybe_compile(job.teacher, cfg.run.compile), cfg.kd, cfg.kd_alpha,
                                  cfg.kd_tau, cfg.kd_reduction, rec.criterion))
    for epoch in range(start, epochs):
        warm = epoch < cfg.warmup_epochs

        def loss_fn(x, y):
            uvc.set_model_gates(uvc.gate_sample(warmup=warm))
            return kd(x, y)

        def after_step(step, loss):  # outside autocast: the dual / count updates and R stay float32
            r = uvc.step(opt.param_groups[0]["lr"], epoch, warm)
            log.write({"stage": "search", "loss": loss.item(), "lr": opt.param_groups[0]["lr"], **r})
            return {"R": f"{r['R']:.3f}", "z": f"{r['z']:.2g}"}

        skip = start_step if epoch == start else 0  # a mid-epoch checkpoint: the steps already done
        train_one_epoch(model, seeded_loader(data.train, cfg.batch_size, cfg.seed * 100_003 + epoch,
                                             num_workers=cfg.run.num_workers, pin_memory=cfg.run.pin_memory,
                                             skip_batches=skip),
                        opt, sched, loss_fn, steps=steps, progress=cfg.run.progress,
                        after_step=ckpts.hook(epoch, after_step), step_fn=step_fn, start=skip,
                        desc=f"search {epoch + 1}/{epochs}" + (" (warm-up)" if warm else ""),
                        on_nonfinite=nonfinite_stop("search", epoch, out / CHECKPOINT))
        ckpts.end_epoch()
        uvc.set_model_gates(None)
        st = current_structure(uvc)
        val = masked_top1(model, st, splits.val)
        log.write({"stage": "search_epoch", "epoch": epoch, "val_top1_hard": val,
                   "R": uvc.last["R"], "expected_macs_ratio": uvc.last["expected_macs_ratio"], "z": uvc.last["z"],
                   "structure_macs_ratio": count(uvc.shape, st, cfg.layout)["macs"] / uvc.dense_macs})
        ckpts.save(epoch + 1)
        line(epoch, R=uvc.last["R"], val=val)
    return uvc


def uvc(job: Job) -> Structure:
    """UVC: the primal-dual search, then `final_structure` (skip candidates, latency feedback)."""
    cfg = job.cfg
    opt = search(job)

    def finetune(slim, steps: int) -> None:  # a skip candidate's few steps of the run's distillation
        o, sched = adamw_with_schedule(slim, cfg.finetune_lr, cfg.weight_decay, steps, max(1, steps // 4))
        train_one_epoch(slim, seeded_loader(job.splits.train, cfg.batch_size, cfg.seed * 100_003 + 5_000), o, sched,
                        kd_loss_fn(slim, job.teacher, cfg.kd, cfg.kd_alpha, cfg.kd_tau, cfg.kd_reduction),
                        steps=steps, progress=False)

    timer = lambda models: measure_ms(models, cfg.uvc.latency_batch_size, device=cfg.run.device,  # noqa: E731
                                      threads=job.latency.key["threads"])  # at the table's batch and threads
    structure, selection = final_structure(opt, job.model, cfg.macs_ratio, job.latency, cfg.budget_slack,
                                           cfg.layout, job.splits.val, evaluate, finetune, timer, job.log)
    job.notes.update(search_end_macs_ratio=opt.last.get("expected_macs_ratio"), selection=selection)
    if job.latency is not None:  # searched on MACs: the prediction of its structure
        job.notes["search_end_latency_ratio"] = (opt.last.get("expected_latency_ratio")
                                                 or selection["search_structure_cost_ratio"])
    if rank() == 0:  # the optimiser's end state and the notes (a resume in stage 2 reads them from its checkpoint)
        scores = dict(zip(("dims", "heads", "neurons"), (t.tolist() for t in opt.scores())))  # the ranking kept
        atomic_write_text(job.out / UVC_STATE, json.dumps(
            {**{k: v.tolist() for k, v in opt.state_dict().items() if isinstance(v, torch.Tensor)}, **job.notes,
             "scores": scores}))
    return structure


def depth(job: Job) -> Structure:
    """Greedy on validation accuracy of the masked model (a subset, for time)."""
    probe = torch.utils.data.Subset(job.splits.val, range(min(1024, len(job.splits.val))))
    return baselines.depth_structure(job.model, job.cfg.macs_ratio,
                                     score=lambda st: masked_top1(job.model, st, probe))


def torch_pruning(job: Job, isomorphic: bool = False) -> Structure:
    from uvclab.prune.tp import torch_pruning_structure
    cfg = job.cfg
    plain = copy.deepcopy(job.teacher)                 # a plain timm model with the student's weights
    plain.load_state_dict(job.model.state_dict())
    plain.requires_grad_(True)
    calib, job.notes["calibration_samples"] = calibration(job, shard=False)  # the same images on every rank
    return torch_pruning_structure(plain, cfg.macs_ratio, calib, isomorphic=isomorphic)


def calibration(job: Job, shard: bool = True):
    """(batches, images): `calibration.samples` training images (Isomorphic Pruning ranks with 3,200), drawn with
    a seed of their own; `shard`: each torchrun rank takes its share (statistics are summed over ranks)."""
    return calibration_batches(job.splits.train, job.cfg.calibration.samples, job.cfg.batch_size,
                               job.cfg.seed * 100_003 - 1, shard=shard)


def activation(job: Job) -> Structure:
    """Structured activation-aware cut (Wanda / FLAP analogue, docs/method.md §11): per MAC, globally."""
    batches, job.notes["calibration_samples"] = calibration(job)
    return activation_structure(job.model, job.cfg.macs_ratio, batches, job.cfg.layout, job.cfg.budget_slack)


# method name -> strategy (the benchmark's table order: UVC, then the one-shot methods)
STRATEGIES: dict[str, Callable[[Job], Structure]] = {
    "uvc": uvc,
    "uniform": lambda job: baselines.uniform_structure(job.model, job.cfg.macs_ratio, job.cfg.layout),
    "magnitude": lambda job: baselines.magnitude_structure(job.model, job.cfg.macs_ratio, job.cfg.layout),
    "torch_pruning": torch_pruning,
    "isomorphic": lambda job: torch_pruning(job, isomorphic=True),
    "depth": depth,
    "activation": activation,
}
