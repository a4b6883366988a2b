"""Structure strategies of `compress`: the one table of methods (config key `method`), name -> function(job)
returning the Structure every method is then exported, fine-tuned, saved and reported with.

`uvc` is the primal-dual search (`uvclab.engine.search`) and its final structure (`uvclab.uvc.final`); the
others cut the teacher's weights in one shot: `magnitude` (global magnitude structured pruning), `uniform`
(the same kept fraction in every block), `depth` (drop whole blocks, greedily by validation accuracy),
`torch_pruning` (Torch-Pruning's global group Taylor pruning, expressed as a Structure), `isomorphic` (the same
with Isomorphic Pruning's ranking within structurally identical groups, Fang et al., ECCV 2024). A new method
is a function of a `Job` and one line in `STRATEGIES`; config validation, the CLI and the benchmark read it.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from uvclab.engine.distill import kd_loss_fn
from uvclab.engine.loop import adamw_with_schedule, evaluate, masked_top1, seeded_loader, train_one_epoch
from uvclab.engine.runfiles import MetricsLog
from uvclab.engine.search import search
from uvclab.io_utils import atomic_write_text
from uvclab.paths import UVC_STATE
from uvclab.prune import baselines
from uvclab.ranks import rank
from uvclab.uvc import final_structure
from uvclab.vit.latency import LatencyTable
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
    notes: dict = field(default_factory=dict)


def uvc(job: Job) -> Structure:
    """UVC: the primal-dual search, then `final_structure` (skip candidates, latency feedback)."""
    cfg = job.cfg
    opt = search(cfg, job.model, job.teacher, job.splits, job.out, job.log, job.ckpt, job.latency)

    def finetune(slim, steps: int) -> None:  # a skip candidate's few steps of the run's distillation
        o, sched = adamw_with_schedule(slim, cfg.finetune_lr, cfg.weight_decay, steps, max(1, steps // 4))
        train_one_epoch(slim, seeded_loader(job.splits.train, cfg.batch_size, cfg.seed * 100_003 + 5_000), o, sched,
                        kd_loss_fn(slim, job.teacher, cfg.kd, cfg.kd_alpha, cfg.kd_tau, cfg.kd_reduction),
                        steps=steps, progress=False)

    def timer(models: list) -> list[float]:  # dense vs export at the table's batch and threads
        from uvclab.vit.latency_build import measure_ms
        return measure_ms(models, cfg.uvc.latency_batch_size, device=cfg.run.device,
                          threads=job.latency.key["threads"])
    structure, selection = final_structure(opt, job.model, cfg.macs_ratio, job.latency, cfg.budget_slack,
                                           cfg.layout, job.splits.val, evaluate, finetune, timer, job.log)
    job.notes.update(search_end_macs_ratio=opt.last.get("expected_macs_ratio"), selection=selection)
    if job.latency is not None:  # searched on MACs: the prediction of its structure
        job.notes["search_end_latency_ratio"] = (opt.last.get("expected_latency_ratio")
                                                 or selection["search_structure_cost_ratio"])
    if rank() == 0:
        atomic_write_text(job.out / UVC_STATE, json.dumps(
            {**{k: v.tolist() for k, v in opt.state_dict().items() if isinstance(v, torch.Tensor)},
             "expected_macs_ratio_end": job.notes["search_end_macs_ratio"],
             "expected_latency_ratio_end": job.notes.get("search_end_latency_ratio"), "selection": selection}))
    return structure


def magnitude(job: Job) -> Structure:
    return baselines.magnitude_structure(job.model, job.cfg.macs_ratio, job.cfg.layout)


def uniform(job: Job) -> Structure:
    return baselines.uniform_structure(job.model, job.cfg.macs_ratio, job.cfg.layout)


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
    calib = [b for _, b in zip(range(4), seeded_loader(job.splits.train, cfg.batch_size, cfg.seed * 100_003 - 1))]
    return torch_pruning_structure(plain, cfg.macs_ratio, calib, isomorphic=isomorphic)


def isomorphic(job: Job) -> Structure:
    return torch_pruning(job, isomorphic=True)


# method name -> strategy (the benchmark's table order: UVC, then the one-shot methods)
STRATEGIES: dict[str, Callable[[Job], Structure]] = {
    "uvc": uvc, "uniform": uniform, "magnitude": magnitude, "torch_pruning": torch_pruning,
    "isomorphic": isomorphic, "depth": depth,
}
