"""`compress`: the one pipeline every method runs through.

config -> data + teacher -> gated student -> structure strategy (`strategies.STRATEGIES[cfg.method]`) ->
Structure -> export -> validation before fine-tuning -> fine-tune with distillation (best epoch on
validation) -> report. The run folder holds config.yaml, metrics.jsonl, structure.json, uvc_state.json
(UVC), model/ (safetensors + uvclab.json), report.json and checkpoint.pt (atomic, every epoch and inside
epochs: `engine.checkpointing`; `resume=True` continues from any step and ends with the same result).
SIGTERM / SIGUSR1 stop a run after the current step with a checkpoint (`Preempted`, `engine.preempt`); a
non-finite loss, a full disk or running out of memory stop it with one clear line, the last good checkpoint
kept. Works data-parallel under torchrun (gloo on CPU, nccl on GPU); a torchrun restart (`--max-restarts`)
continues from the last checkpoint by itself (`runfiles.open_run_folder`).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import torch

from uvclab.engine.checkpointing import StageCheckpoints
from uvclab.engine.config import CompressConfig
from uvclab.engine.data import check_model_fits_data, load_dataset, model_kwargs_for_data
from uvclab.engine.distill import kd_loss_fn
from uvclab.engine.loop import (adamw_with_schedule, evaluate, init_distributed, masked_top1, seeded_loader,
                                set_seed, steps_per_epoch, train_one_epoch)
from uvclab.engine.progress import EpochLines
from uvclab.engine.precision import TrainStep, maybe_compile, prepare_model
from uvclab.engine.preempt import StopSignals, oom_guard
from uvclab.engine.recipe import recipe_report, stage_recipe
from uvclab.engine.runfiles import MetricsLog, nonfinite_stop, open_run_folder, save_checkpoint
from uvclab.engine.strategies import STRATEGIES, Job
from uvclab.engine.teacher import load_teacher
from uvclab.errors import UvclabError
from uvclab.io_utils import atomic_write_text
from uvclab.prune.calibration import calibration_batches
from uvclab.prune.repair import repair
from uvclab.paths import CHECKPOINT, METRICS, MODEL_DIR, REPORT, STRUCTURE, default_teacher
from uvclab.ranks import rank, world
from uvclab.version import __version__
from uvclab.vit.export import export_model, save_pruned
from uvclab.vit.latency import LatencyTable
from uvclab.vit import latency_build
from uvclab.vit.gated import gate_vit
from uvclab.vit.macs import count
from uvclab.vit.models import create_vit, load_state_dict_file
from uvclab.vit.structure import Structure
from uvclab.vit.t2t_checkpoint import stem_of_state_dict
from uvclab.vit.t2t_vit import stem_for


# ---- models and data ---------------------------------------------------------------------------------

def teacher_path(cfg: CompressConfig) -> Path:
    """The teacher file a config names ('default': the dataset's committed reference teacher)."""
    return default_teacher(cfg.dataset) if cfg.teacher == "default" else Path(cfg.teacher)


def build_models(cfg: CompressConfig):
    """(gated student, frozen teacher, data splits). The student starts from the teacher unless a model is
    named; a named model takes in_chans / num_classes / img_size from the data unless model_kwargs set them."""
    teacher = None
    if cfg.teacher is not None:
        path = teacher_path(cfg)
        if not path.exists():
            raise UvclabError(f"Teacher '{path}' not found. Train one with `uvclab teacher --dataset {cfg.dataset} "
                              "...`, or pass --set teacher=PATH (card .json or weights), or teacher=null to "
                              "distil from the starting model itself.")
        teacher = load_teacher(path)
    arch = teacher.uvclab_config["kwargs"] if cfg.model is None else cfg.model_kwargs
    img_size = arch.get("img_size")
    splits = load_dataset(cfg.dataset, root=cfg.data_root, split_seed=cfg.split_seed,
                          img_size=img_size if isinstance(img_size, int) else None)
    if cfg.model is not None:
        student = create_vit(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint,
                             **model_kwargs_for_data(cfg.model, cfg.model_kwargs, splits))
        check_model_fits_data(student, cfg.model, splits)
        if teacher is None:
            teacher = copy.deepcopy(student)
    else:
        student = copy.deepcopy(teacher)
        if cfg.checkpoint is not None:
            load_state_dict_file(student, cfg.checkpoint)
        student.uvclab_config = teacher.uvclab_config
    check_model_fits_data(teacher, "the teacher", splits)
    # quick runs: the first N of the (already shuffled) validation / test splits
    cap = lambda ds, n: ds if n is None else torch.utils.data.Subset(ds, range(min(n, len(ds))))  # noqa: E731
    splits = dataclasses.replace(splits, val=cap(splits.val, cfg.eval_max_samples),
                                 test=cap(splits.test, cfg.test_max_samples))
    if hasattr(student, "set_distilled_training"):
        student.set_distilled_training(cfg.kd != "none")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return gate_vit(student), teacher.eval(), splits


def finetune_epochs(cfg: CompressConfig) -> int:
    """UVC fine-tunes `finetune_epochs`; one-shot methods also get the warm-up + search epochs (same images)."""
    return cfg.finetune_epochs + (0 if cfg.method == "uvc" else cfg.warmup_epochs + cfg.search_epochs)


def train_images(cfg: CompressConfig) -> Optional[int]:
    """Images seen in training (None when epochs are not capped by max_steps_per_epoch)."""
    epochs = cfg.warmup_epochs + cfg.search_epochs + cfg.finetune_epochs
    return epochs * cfg.max_steps_per_epoch * cfg.batch_size * world() if cfg.max_steps_per_epoch else None


def repair_cut(cfg: CompressConfig, model, structure: Structure, splits, notes: dict) -> dict:
    """The repair step between the structure and the export (`calibration.repair`, docs/method.md §11): the
    cut's validation top-1 before it goes into `notes`, then the closed-form refit of the layers that read
    pruned channels, in the gated model's weights (the export carries it). Returns the report's entry."""
    if cfg.calibration.repair == "none":
        return {"kind": "none"}
    notes["val_top1_before_repair"] = masked_top1(model, structure, splits.val)
    batches, n = calibration_batches(splits.train, cfg.calibration.samples, cfg.batch_size, cfg.seed * 100_003 - 2)
    return repair(model, structure, batches, cfg.calibration.repair, cfg.calibration, samples=n)


# ---- stage 2 -----------------------------------------------------------------------------------------

def finetune(cfg: CompressConfig, slim, teacher, splits, out: Path, log: MetricsLog, ckpt: Optional[dict],
             notes: dict):
    """Fine-tune the exported model with KD; best epoch chosen on validation (`notes`: the strategy's report
    entries, kept in the checkpoint for a resume). Returns (best model, its validation top-1, the validation
    top-1 before fine-tuning)."""
    epochs = finetune_epochs(cfg)
    ddp_model = torch.nn.parallel.DistributedDataParallel(slim) if world() > 1 else slim
    steps = steps_per_epoch(splits.train, cfg.batch_size, cfg.max_steps_per_epoch)
    opt, sched = adamw_with_schedule(slim, cfg.finetune_lr, cfg.weight_decay, epochs * steps, min(500, steps))
    # issue 27: timm recipe (Mixup/CutMix, smoothing, image ops, EMA) and precision; all off by default
    step_fn = TrainStep(cfg.run.amp, cfg.run.device, cfg.run.channels_last)
    rec, data = stage_recipe(cfg, "finetune", splits, prepare_model(slim, cfg.run.channels_last))
    ckpts = StageCheckpoints(cfg.run, out, log, "fine-tune", epochs, steps, lambda: {
        "stage": "finetune", "model": slim.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
        "best_val": best_val, "best_model": best_state, "start_val": start_val, "notes": notes,
        "recipe": rec.state_dict(), "amp": step_fn.state_dict()})
    start_step = 0
    if ckpt is None:
        start_val = evaluate(slim, splits.val)
        best_val, best_state, start = start_val, copy.deepcopy(slim.state_dict()), 0
        log.write({"stage": "finetune_epoch", "epoch": -1, "val_top1": start_val})
    if ckpt is not None and ckpt["stage"] == "finetune":
        slim.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        best_val, best_state, start_val = ckpt["best_val"], ckpt["best_model"], ckpt["start_val"]
        start, start_step = ckpts.resume(ckpt)
        if "recipe" in ckpt:
            rec.load_state_dict(ckpt["recipe"])
            step_fn.load_state_dict(ckpt["amp"])
    loss_fn = rec.wrap_loss(kd_loss_fn(maybe_compile(ddp_model, cfg.run.compile), maybe_compile(teacher, cfg.run.compile),
                                       cfg.kd, cfg.kd_alpha, cfg.kd_tau, cfg.kd_reduction, rec.criterion))
    line = EpochLines("fine-tune", epochs, start, cfg.run.epoch_lines)
    for epoch in range(start, epochs):
        skip = start_step if epoch == start else 0  # a mid-epoch checkpoint: the steps already done
        hook = ckpts.hook(epoch, lambda step, loss: rec.after_step(slim))  # EMA (None: no bar values)
        train_one_epoch(slim, seeded_loader(data.train, cfg.batch_size, cfg.seed * 100_003 + 10_000 + epoch,
                                            num_workers=cfg.run.num_workers, pin_memory=cfg.run.pin_memory,
                                            skip_batches=skip),
                        opt, sched, loss_fn, steps=steps, progress=cfg.run.progress, after_step=hook,
                        desc=f"fine-tune {epoch + 1}/{epochs}", start=skip, step_fn=step_fn,
                        on_nonfinite=nonfinite_stop("fine-tune", epoch, out / CHECKPOINT))
        loss = ckpts.end_epoch()  # the whole epoch's mean loss, also when it was resumed mid-way
        val = evaluate(rec.eval_model(slim), splits.val)  # with EMA: the averaged weights are validated and kept
        if val > best_val:
            best_val, best_state = val, copy.deepcopy(rec.eval_model(slim).state_dict())
        log.write({"stage": "finetune_epoch", "epoch": epoch, "loss": loss, "val_top1": val, "best_val_top1": best_val})
        ckpts.save(epoch + 1)
        line(epoch, loss=loss, val=val)
    slim.load_state_dict(best_state)
    return slim.eval(), best_val, start_val


def latency_report(table: LatencyTable, model, structure: Structure, slim, layout: str, device: str) -> dict:
    """Predicted (the table) and measured (dense vs export, alternating rounds) latency at the table's batch."""
    dense_pred, pred = table.predicted_dense_ms(structure.depth), table.structure_ms(structure, layout)
    batch, threads = table.key["batch_size"], table.key["threads"]
    dense_ms, ms = latency_build.measure_ms([export_model(model, Structure.dense(model), layout),
                                             copy.deepcopy(slim)], batch, device=device, threads=threads)
    return {"latency_ratio_predicted": pred / dense_pred, "latency_ratio_measured": ms / dense_ms,
            "latency_ms_predicted": pred, "dense_latency_ms_predicted": dense_pred, "latency_ms": ms,
            "dense_latency_ms": dense_ms, "latency_batch_size": batch, "latency_threads": threads,
            "latency_device": table.key["device"]}


# ---- the whole job -----------------------------------------------------------------------------------

def _check_t2t_stem(cfg: CompressConfig, state: dict, out: Path) -> None:
    """Runs made before uvclab had the Performer stem name t2t_vit_N for the Transformer stem; say how to resume."""
    have, want = stem_of_state_dict(state), stem_for(cfg.model, cfg.model_kwargs)
    if have and want and have != want:
        raise UvclabError(f"'{out}' holds a {have}-stem T2T-ViT checkpoint but the config builds {cfg.model} with "
                          f"the {want} stem (before the Performer stem existed, t2t_vit_N meant the Transformer "
                          f"stem). Add `tokens_type: {have}` under model_kwargs in '{out}/config.yaml' and resume "
                          f"with --set model_kwargs.tokens_type={have}.")


def compress(cfg: CompressConfig, out: str | Path, resume: bool | str = False) -> dict:
    """Run one method end to end; returns the report (also written to out/report.json).
    resume: False, True or 'auto' (see `runfiles.resume_mode`); a torchrun restart continues by itself.
    SIGTERM / SIGUSR1 end the run after the current step with a checkpoint and raise `Preempted` (the same
    call with resume='auto' continues it); out of memory and a full disk raise a `UvclabError` naming the fix."""
    with StopSignals(), oom_guard(Path(out) / CHECKPOINT):
        return _compress(cfg, Path(out), resume)


def _compress(cfg: CompressConfig, out: Path, resume: bool | str) -> dict:
    init_distributed(cfg.run.device)
    if cfg.run.device.startswith("cuda") and not torch.cuda.is_available():
        raise UvclabError("device='cuda' but no GPU is visible; use --set device=cpu.")
    ckpt = open_run_folder(cfg, out, resume)
    if ckpt is not None and cfg.model is not None:
        _check_t2t_stem(cfg, ckpt.get("model") or {}, out)
    if ckpt is not None and ckpt.get("stage") == "done" and (out / REPORT).exists():
        return json.loads((out / REPORT).read_text())
    if cfg.run.threads is not None:
        torch.set_num_threads(cfg.run.threads)
    set_seed(cfg.seed)
    t0 = time.time()
    model, teacher, splits = build_models(cfg)
    device = torch.device(cfg.run.device)
    model.to(device)
    teacher.to(device)
    log = MetricsLog(out / METRICS, fresh=ckpt is None, resume_at=(ckpt or {}).get("metrics_bytes"))
    teacher_top1 = evaluate(teacher, splits.test)
    dense = count(model)
    needs_table = cfg.budget_kind == "latency" or (cfg.method == "uvc" and cfg.uvc.prune_dims == "auto")
    table = None if not needs_table else latency_build.latency_table(  # cached, or measured now
        model, cfg.uvc.latency_batch_size, cfg.uvc.latency_threads or cfg.run.threads, cfg.run.device,
        progress=cfg.run.progress)
    if ckpt is not None and ckpt["stage"] == "finetune":
        structure, notes = Structure.load(out / STRUCTURE), ckpt.get("notes", {})
    else:
        job = Job(cfg, model, teacher, splits, out, log, ckpt, table if cfg.budget_kind == "latency" else None,
                  dims_table=table)
        # uvc.final_weights start: the structure is cut from the weights the run started from (build_models
        # rebuilds them on a resume too), not from the ones the search trained
        start = copy.deepcopy(model.state_dict()) if cfg.method == "uvc" and cfg.uvc.final_weights == "start" else None
        structure, notes, ckpt = STRATEGIES[cfg.method](job), job.notes, None
        if start is not None:
            model.load_state_dict(start)
            notes["final_weights"] = "start"
        notes["repair"] = repair_cut(cfg, model, structure, splits, notes)
        if rank() == 0:
            structure.save(out / STRUCTURE)
    slim = export_model(model, structure, cfg.layout).to(device)
    slim, best_val, val_before_finetune = finetune(cfg, slim, teacher, splits, out, log, ckpt, notes)
    top1 = evaluate(slim, splits.test)
    slim_count = count(model, structure, cfg.layout)
    report = {"uvclab_version": __version__, "method": cfg.method, "model": model.uvclab_config,
              "dataset": cfg.dataset, "seed": cfg.seed, "teacher_top1": teacher_top1, "top1": top1,
              "val_top1": best_val, "val_top1_before_finetune": val_before_finetune, "budget": cfg.macs_ratio,
              "search_end_macs_ratio": None, "selection": None, "calibration_samples": None,
              "val_top1_before_repair": None,
              "macs": slim_count["macs"], "dense_macs": dense["macs"], "macs_ratio": slim_count["macs"] / dense["macs"],
              "params": slim_count["params"], "dense_params": dense["params"],
              "params_ratio": slim_count["params"] / dense["params"],
              "blocks_kept": sum(b.keep for b in structure.blocks), "depth": structure.depth,
              "layout": cfg.layout, "train_images": train_images(cfg), "seconds": time.time() - t0,
              "world_size": world(), "val_samples": len(splits.val), "test_samples": len(splits.test),
              "budget_kind": cfg.budget_kind, **notes, **recipe_report(cfg)}
    if table is not None:
        report.update(latency_report(table, model, structure, slim, cfg.layout, cfg.run.device))
    if rank() == 0:
        save_pruned(slim.cpu(), out / MODEL_DIR, extra={"top1": top1, "teacher_top1": teacher_top1})
        atomic_write_text(out / REPORT, json.dumps(report, indent=1))
        save_checkpoint(out / CHECKPOINT, {"stage": "done"})
    return report
