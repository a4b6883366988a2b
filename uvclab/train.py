"""The UVC pipeline: stage 1 primal-dual search, automatic structure selection, export, stage 2 fine-tune.

`compress(cfg, out_dir)` runs everything and writes the run folder: config.yaml, metrics.jsonl (one JSON
record per step/epoch: loss, MACs ratio, z, counts, gate probabilities, accuracies), structure.json, the
exported model (model/), report.json, and checkpoint.pt (atomic, every epoch; `resume=True` continues
and ends with the same result). A non-finite loss stops the run with the last good checkpoint kept.
Works data-parallel under torchrun (gloo on CPU, nccl on GPU); UVC state is kept identical by broadcast.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import __version__
from .budget import count
from .config import CompressConfig
from .distill import distillation_loss
from .errors import UvclabError
from .export import export_model, save_pruned
from .gated_vit import gate_vit, open_all_gates
from .io_utils import atomic_write, atomic_write_text
from .models import create_vit
from .paths import default_teacher
from .primal_dual import UVCPrimalDual
from .select import fit_to_budget, structure_from_counts
from .structure import Structure, apply_structure
from .teacher import evaluate, param_groups, warmup_cosine


# ---- small utilities ---------------------------------------------------------------------------------

def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_distributed(device: str) -> None:
    """Join the torchrun process group when launched with WORLD_SIZE > 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)


class MetricsLog:
    """Append-only JSON lines, written by rank 0 only."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict) -> None:
        if rank() == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def make_epoch_loader(dataset, cfg: CompressConfig, epoch: int, shuffle: bool = True):
    """Shuffle order fixed by (seed, epoch): identical after a resume; sharded across DDP ranks."""
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    if world() > 1:
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=shuffle, seed=cfg.seed, drop_last=True)
        sampler.set_epoch(epoch)
        return torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler,
                                           num_workers=cfg.num_workers, drop_last=True)
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=shuffle, generator=g,
                                       num_workers=cfg.num_workers, drop_last=shuffle)


def accuracy(model: torch.nn.Module, dataset, device=None) -> float:
    """Top-1 (%) on a dataset (eval mode, deterministic); the model's train/eval mode is restored."""
    was = model.training
    acc = evaluate(model, dataset)
    model.train(was)
    return acc


@contextmanager
def masked(model: torch.nn.Module, structure: Structure):
    """Temporarily apply a structure's hard masks to a gated model (all gates open afterwards)."""
    apply_structure(model, structure)
    try:
        yield model
    finally:
        open_all_gates(model)


def _check_finite(loss: torch.Tensor, stage: str, epoch: int, step: int, ckpt: Path) -> None:
    if not torch.isfinite(loss):
        raise UvclabError(f"Non-finite loss ({loss.item()}) in {stage} epoch {epoch} step {step}. The last good "
                          f"state is kept in '{ckpt}'. Lower the learning rate (--set lr=... / finetune_lr=...) "
                          "and continue with --resume.")


def _kd_loss(cfg: CompressConfig, out, labels, teacher_logits):
    return distillation_loss(out, labels, teacher_logits, kind=cfg.kd, alpha=cfg.kd_alpha, tau=cfg.kd_tau,
                             reduction=cfg.kd_reduction)


# ---- models ------------------------------------------------------------------------------------------

def teacher_path(cfg: CompressConfig) -> Path:
    """The teacher file a config names ('default': the dataset's committed reference teacher)."""
    return default_teacher(cfg.dataset) if cfg.teacher == "default" else Path(cfg.teacher)


def build_models(cfg: CompressConfig):
    """(student, teacher, data splits). Student starts from the teacher unless a model is named."""
    from .data import load_dataset
    from .teacher import load_teacher
    teacher = None
    if cfg.teacher is not None:
        path = teacher_path(cfg)
        if not path.exists():
            raise UvclabError(f"Teacher '{path}' not found. Train one with `uvclab teacher --dataset {cfg.dataset} "
                              "...`, or pass --set teacher=PATH (card .json or weights), or teacher=null to "
                              "distil from the starting model itself.")
        teacher = load_teacher(path)
    if cfg.model is not None:
        student = create_vit(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint, **cfg.model_kwargs)
        if teacher is None:
            teacher = copy.deepcopy(student)
    else:
        student = copy.deepcopy(teacher)
        if cfg.checkpoint is not None:
            from .models import load_state_dict_file
            load_state_dict_file(student, cfg.checkpoint)
    student.uvclab_config = teacher.uvclab_config if cfg.model is None else student.uvclab_config
    img_size = student.patch_embed.img_size
    splits = load_dataset(cfg.dataset, root=cfg.data_root, split_seed=cfg.split_seed,
                          img_size=img_size[0] if isinstance(img_size, (tuple, list)) else img_size)
    if cfg.eval_max_samples is not None:  # quick runs: the first N of the (already shuffled) val / test splits
        cap = lambda ds: torch.utils.data.Subset(ds, range(min(cfg.eval_max_samples, len(ds))))  # noqa: E731
        splits = dataclasses.replace(splits, val=cap(splits.val), test=cap(splits.test))
    if hasattr(student, "set_distilled_training"):
        student.set_distilled_training(cfg.kd != "none")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return gate_vit(student), teacher.eval(), splits


# ---- checkpoints -------------------------------------------------------------------------------------

def save_checkpoint(path: Path, state: dict) -> None:
    if rank() == 0:
        atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UvclabError(f"Cannot read checkpoint '{path}' ({e}); it is corrupt. Start a fresh run "
                          "(without --resume) in a new --out folder.") from e


# ---- stage 1 -----------------------------------------------------------------------------------------

def search(cfg: CompressConfig, model, teacher, splits, out: Path, log: MetricsLog, ckpt: Optional[dict]):
    """UVC stage 1. Returns the primal-dual state at the end."""
    device = torch.device(cfg.device)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world() > 1 else model
    epochs = cfg.warmup_epochs + cfg.search_epochs
    steps_per_epoch = _steps(splits.train, cfg)
    uvc = UVCPrimalDual(model, cfg.uvc, total_epochs=cfg.search_epochs)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(epochs * steps_per_epoch, min(500, steps_per_epoch)))
    start = 0
    if ckpt is not None and ckpt["stage"] == "search":
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        uvc.load_state_dict(ckpt["uvc"])
        torch.set_rng_state(ckpt["rng"])
        start = ckpt["epoch"]
    for epoch in range(start, epochs):
        warm = epoch < cfg.warmup_epochs
        model.train()
        bar = tqdm(make_epoch_loader(splits.train, cfg, epoch), total=steps_per_epoch, leave=False,
                   disable=not cfg.progress or rank() != 0, desc=f"search {epoch + 1}/{epochs}" + (" (warm-up)" if warm else ""))
        for step, (x, y) in enumerate(bar):
            if step >= steps_per_epoch:
                break
            x, y = x.to(device), y.to(device)
            uvc.set_model_gates(uvc.gate_sample(warmup=warm))
            with torch.no_grad():
                t = teacher(x)
            loss = _kd_loss(cfg, ddp_model(x), y, t)
            _check_finite(loss, "search", epoch, step, out / "checkpoint.pt")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            rec = uvc.step(opt.param_groups[0]["lr"], epoch, warm)
            log.write({"stage": "search", "loss": loss.item(), "lr": opt.param_groups[0]["lr"], **rec})
            bar.set_postfix(loss=f"{loss.item():.3f}", macs=f"{rec['macs_ratio']:.3f}", z=f"{rec['z']:.2g}")
        uvc.set_model_gates(None)
        st = current_structure(uvc)
        with masked(model, st):
            val = accuracy(model, splits.val, device)
        log.write({"stage": "search_epoch", "epoch": epoch, "val_top1_hard": val, "macs_ratio": uvc.last["macs_ratio"],
                   "z": uvc.last["z"], "structure_macs_ratio": count(model, st, cfg.layout)["macs"] / uvc.dense_macs})
        save_checkpoint(out / "checkpoint.pt", {"stage": "search", "epoch": epoch + 1, "model": model.state_dict(),
                                                "opt": opt.state_dict(), "sched": sched.state_dict(),
                                                "uvc": uvc.state_dict(), "rng": torch.get_rng_state()})
    return uvc


def _steps(dataset, cfg: CompressConfig) -> int:
    n = len(dataset) // (cfg.batch_size * world())
    return max(1, min(n, cfg.max_steps_per_epoch or n))


def current_structure(uvc: UVCPrimalDual) -> Structure:
    """The hard structure the counts and gates describe right now (not yet fitted to the budget)."""
    dims, heads, neurons = uvc.scores()
    keep = uvc.alpha[:, 1] > uvc.alpha[:, 0] if uvc.cfg.block_skip else torch.ones(uvc.shape.depth, dtype=torch.bool)
    r = uvc.r if uvc.cfg.prune_dims else torch.zeros_like(uvc.r)
    return structure_from_counts(uvc.shape, dims, heads, neurons, uvc.s, r, keep, tie_qk=uvc.cfg.tie_qk,
                                 dims_multiple=uvc.cfg.dims_multiple)


def select_structure(cfg: CompressConfig, uvc: UVCPrimalDual) -> Structure:
    """Counts + gates -> Structure, fitted so that exported MACs lie in [B - slack, B] x dense."""
    dims, heads, neurons = uvc.scores()
    st = fit_to_budget(uvc.shape, current_structure(uvc), heads, neurons, uvc.dense_macs, cfg.macs_ratio,
                       cfg.budget_slack, cfg.layout, dim_scores=dims, keep_prob=uvc.keep_prob(), tie_qk=cfg.uvc.tie_qk,
                       allow_prune=cfg.uvc.prune, allow_skip=cfg.uvc.block_skip)
    if world() > 1:  # rank 0's structure is the structure (identical anyway, guaranteed here)
        box = [st.to_dict()]
        dist.broadcast_object_list(box, 0)
        st = Structure.from_dict(box[0])
    return st


def ranks_agree(uvc: UVCPrimalDual, structure: Structure) -> bool:
    """True when every rank holds bit-identical counts, duals, gates and structure (checked, not assumed)."""
    if world() == 1:
        return True
    import hashlib
    h = hashlib.sha256(json.dumps(structure.to_dict()).encode())
    for t in (uvc.s, uvc.r, uvc.y, uvc.p, uvc.z, uvc.alpha.detach()):
        h.update(t.detach().cpu().numpy().tobytes())
    digests = [None] * world()
    dist.all_gather_object(digests, h.hexdigest())
    return len(set(digests)) == 1


# ---- stage 2 -----------------------------------------------------------------------------------------

def finetune(cfg: CompressConfig, slim, teacher, splits, out: Path, log: MetricsLog, ckpt: Optional[dict]):
    """Fine-tune the exported model with KD; best epoch chosen on validation. Returns (best model, best val)."""
    device = torch.device(cfg.device)
    ddp_model = torch.nn.parallel.DistributedDataParallel(slim) if world() > 1 else slim
    steps_per_epoch = _steps(splits.train, cfg)
    opt = torch.optim.AdamW(param_groups(slim, cfg.weight_decay), lr=cfg.finetune_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(max(1, cfg.finetune_epochs * steps_per_epoch), min(500, steps_per_epoch)))
    best_val, best_state, start = accuracy(slim, splits.val, device), copy.deepcopy(slim.state_dict()), 0
    log.write({"stage": "finetune_epoch", "epoch": -1, "val_top1": best_val})
    if ckpt is not None and ckpt["stage"] == "finetune":
        slim.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        torch.set_rng_state(ckpt["rng"])
        best_val, best_state, start = ckpt["best_val"], ckpt["best_model"], ckpt["epoch"]
    for epoch in range(start, cfg.finetune_epochs):
        slim.train()
        bar = tqdm(make_epoch_loader(splits.train, cfg, 10_000 + epoch), total=steps_per_epoch, leave=False,
                   disable=not cfg.progress or rank() != 0, desc=f"fine-tune {epoch + 1}/{cfg.finetune_epochs}")
        for step, (x, y) in enumerate(bar):
            if step >= steps_per_epoch:
                break
            x, y = x.to(device), y.to(device)
            with torch.no_grad():
                t = teacher(x)
            loss = _kd_loss(cfg, ddp_model(x), y, t)
            _check_finite(loss, "fine-tune", epoch, step, out / "checkpoint.pt")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(slim.parameters(), 1.0)
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        val = accuracy(slim, splits.val, device)
        if val > best_val:
            best_val, best_state = val, copy.deepcopy(slim.state_dict())
        log.write({"stage": "finetune_epoch", "epoch": epoch, "loss": loss.item(), "val_top1": val,
                   "best_val_top1": best_val})
        save_checkpoint(out / "checkpoint.pt", {"stage": "finetune", "epoch": epoch + 1, "model": slim.state_dict(),
                                                "opt": opt.state_dict(), "sched": sched.state_dict(),
                                                "rng": torch.get_rng_state(), "best_val": best_val,
                                                "best_model": best_state})
    slim.load_state_dict(best_state)
    return slim.eval(), best_val


# ---- the whole job -----------------------------------------------------------------------------------

def compress(cfg: CompressConfig, out: str | Path, resume: bool = False) -> dict:
    """Run UVC end to end; returns the report (also written to out/report.json)."""
    out = Path(out)
    init_distributed(cfg.device)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UvclabError("device='cuda' but no GPU is visible; use --set device=cpu.")
    ckpt_path = out / "checkpoint.pt"
    if (out / "report.json").exists() and not resume:
        raise UvclabError(f"'{out}' already holds a finished run; choose another --out folder.")
    if ckpt_path.exists() and not resume:
        raise UvclabError(f"'{out}' holds an interrupted run; continue it with --resume or choose another --out.")
    ckpt = load_checkpoint(ckpt_path) if resume and ckpt_path.exists() else None
    if resume and (out / "config.yaml").exists():
        saved = CompressConfig.from_dict(__import__("yaml").safe_load((out / "config.yaml").read_text()))
        if saved.to_dict() != cfg.to_dict():
            raise UvclabError(f"--resume with a different config than the one saved in '{out}/config.yaml'; "
                              "resume with the same settings, or start a new --out folder.")
    if rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
    if ckpt is not None and ckpt.get("stage") == "done" and (out / "report.json").exists():
        return json.loads((out / "report.json").read_text())
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    t0 = time.time()
    model, teacher, splits = build_models(cfg)
    device = torch.device(cfg.device)
    model.to(device)
    teacher.to(device)
    log = MetricsLog(out / "metrics.jsonl")
    if ckpt is None and rank() == 0 and log.path.exists():
        log.path.unlink()
    teacher_top1 = accuracy(teacher, splits.test, device)
    dense = count(model)

    agree = None  # checked right after the search (not re-checked when resuming in stage 2)
    if ckpt is None or ckpt["stage"] == "search":
        uvc = search(cfg, model, teacher, splits, out, log, ckpt)
        structure = select_structure(cfg, uvc)
        agree = ranks_agree(uvc, structure)
        if not agree:
            raise RuntimeError("UVC state differs between ranks; please report this as a bug.")
        if rank() == 0:
            structure.save(out / "structure.json")
            atomic_write_text(out / "uvc_state.json", json.dumps(
                {k: v.tolist() for k, v in uvc.state_dict().items() if isinstance(v, torch.Tensor)}))
        slim = export_model(model, structure, cfg.layout).to(device)
        ckpt = None
    else:
        structure = Structure.load(out / "structure.json")
        base = copy.deepcopy(model)
        slim = export_model(base, structure, cfg.layout).to(device)
    searched_val = accuracy(slim, splits.val, device)
    slim, best_val = finetune(cfg, slim, teacher, splits, out, log, ckpt)
    top1 = accuracy(slim, splits.test, device)
    slim_count = count(model, structure, cfg.layout)
    report = {"uvclab_version": __version__, "model": model.uvclab_config, "dataset": cfg.dataset,
              "teacher_top1": teacher_top1, "top1": top1, "val_top1": best_val, "val_top1_after_search": searched_val,
              "macs_ratio_target": cfg.macs_ratio, "macs": slim_count["macs"], "dense_macs": dense["macs"],
              "macs_ratio": slim_count["macs"] / dense["macs"], "params": slim_count["params"],
              "dense_params": dense["params"], "params_ratio": slim_count["params"] / dense["params"],
              "blocks_kept": sum(b.keep for b in structure.blocks), "depth": structure.depth,
              "layout": cfg.layout, "seconds": time.time() - t0, "world_size": world(), "ranks_agree": agree,
              "val_samples": len(splits.val), "test_samples": len(splits.test)}
    if rank() == 0:
        save_pruned(slim.cpu(), out / "model", extra={"top1": top1, "teacher_top1": teacher_top1})
        atomic_write_text(out / "report.json", json.dumps(report, indent=1))
        save_checkpoint(ckpt_path, {"stage": "done"})
    return report
