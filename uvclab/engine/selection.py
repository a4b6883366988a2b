"""End of UVC's search inside the pipeline: which blocks to skip (checked on validation) and, with a latency
budget, a measured-latency feedback so that the export lands inside the budget on this device.

Skip selection ('validation'): in short searches the Gumbel gates never skip a block (README, "The search"),
and the width fit alone then has to reach the budget: at a latency budget of 0.3 it cut every block to one
head and a few neurons (validation 31.7 % before fine-tuning) where dropping whole blocks removes their
per-block time (LayerNorm, softmax, reshapes) that no width cut removes. So the candidates are the fitted
structures with k = 0, 1, 2, ... blocks skipped, each next block the one whose removal costs the least
validation accuracy; each candidate is exported from the searched weights, gets
`select_finetune_steps` steps of the run's distillation fine-tuning and is scored on validation, and the best
is kept (fewer skips on ties). Scored as exported instead, block-skipped candidates look far better than they
end. 'gates' keeps the gates' own decisions (the search alone, as before).

Measured feedback (latency budget): the table predicts time, the device decides it. The selected structure
is exported and timed against dense (alternating rounds, median); while the measured ratio exceeds
B x (1 + latency_tolerance), the fit is repeated on a lower predicted target, the achieved prediction scaled
by B / measured, with the same blocks skipped.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.distributed as dist

from uvclab.engine.config import CompressConfig
from uvclab.engine.loop import adamw_with_schedule, evaluate, seeded_loader, train_one_epoch
from uvclab.engine.search import kd_loss_fn, latency_table_for, masked_top1
from uvclab.errors import UvclabError
from uvclab.uvc import UVCPrimalDual, current_structure
from uvclab.uvc.select import fit_structure
from uvclab.vit.export import export_model
from uvclab.vit.macs import structure_macs
from uvclab.vit.structure import Structure


def skip_mode(cfg: CompressConfig) -> str:
    """'validation' or 'gates' ('auto': validation for a latency budget, the gates for a MACs budget)."""
    if cfg.select_skips != "auto":
        return cfg.select_skips
    return "validation" if cfg.budget_kind == "latency" else "gates"


def choose_structure(cfg: CompressConfig, uvc: UVCPrimalDual, model, teacher, splits,
                     log=None) -> tuple[Structure, dict]:
    """The final structure of a UVC search and what led to it (for report.json): skip candidates and, with a
    latency budget, the feedback rounds. Under torchrun rank 0 decides and every rank gets its result."""
    searched_on = None
    if cfg.budget_kind == "latency" and uvc.latency is None:  # searched on MACs (search_resource): select on latency
        searched_on, uvc.latency, uvc.budget = uvc.budget, latency_table_for(cfg, model), cfg.macs_ratio

    def decide():
        info: dict = {"select_skips": skip_mode(cfg)}
        if searched_on is not None:
            info["search_macs_budget"] = searched_on
        info["search_structure_cost_ratio"] = cost_ratio(uvc, current_structure(uvc), cfg.layout)  # before the fit
        skip: list[int] = []
        if info["select_skips"] == "validation" and uvc.cfg.block_skip:
            n = cfg.select_eval_samples
            val = splits.val if n is None else torch.utils.data.Subset(splits.val, range(min(n, len(splits.val))))
            score = candidate_score(cfg, model, teacher, splits.train, val)
            st, skip, info["skip_candidates"] = skips_by_validation(uvc, model, score, val, cfg.budget_slack,
                                                                    cfg.layout, cfg.select_patience, log)
        else:
            st = fit_structure(uvc, cfg.budget_slack, cfg.layout)
        if cfg.budget_kind == "latency" and cfg.latency_feedback > 0:
            st, info["latency_feedback"] = measured_feedback(
                uvc, model, st, skip, cfg.macs_ratio, cfg.budget_slack, cfg.layout, rounds=cfg.latency_feedback,
                tolerance=cfg.latency_tolerance, batch_size=cfg.latency_batch_size,
                threads=uvc.latency.key["threads"], device=cfg.device, log=log)
        info["skipped_blocks"] = [l for l, b in enumerate(st.blocks) if not b.keep]
        return st.to_dict(), info
    st, info = _on_rank0(decide)
    return Structure.from_dict(st), info


def candidate_score(cfg: CompressConfig, model, teacher, train_set, val_set):
    """score(structure) -> validation top-1 of the structure exported from the searched weights after
    `select_finetune_steps` steps of the run's distillation fine-tuning (0: as exported). Before any
    fine-tuning, block-skipped structures look far better than they end (Fashion-MNIST, latency 0.5: 79 vs
    58-60 % for width-pruned ones that end 0.2 points above them); after 24 steps the order is the final one's."""
    steps = cfg.select_finetune_steps

    def score(st: Structure) -> float:
        if steps == 0:
            return masked_top1(model, st, val_set)
        slim = export_model(model, st, cfg.layout)
        opt, sched = adamw_with_schedule(slim, cfg.finetune_lr, cfg.weight_decay, steps, max(1, steps // 4))
        train_one_epoch(slim, seeded_loader(train_set, cfg.batch_size, cfg.seed * 100_003 + 5_000),
                        opt, sched, kd_loss_fn(cfg, slim, teacher), steps=steps, progress=False)
        return evaluate(slim, val_set)
    return score


def skips_by_validation(uvc: UVCPrimalDual, model, score, val_set, slack: float, layout: str,
                        patience: Optional[int] = None, log=None) -> tuple[Structure, list[int], list[dict]]:
    """(best structure, its forced skips, every candidate's record). Candidate k skips k blocks, chosen greedily:
    the next is the block whose removal keeps the most validation accuracy of the searched weights at full
    width (no fine-tuning: a ranking of blocks, as the `depth` baseline's; ranked with the search's pruned
    widths instead, Fashion-MNIST at latency 0.3 / 0.5 ended at 80.3 / 85.7 % validation instead of 82.0 /
    85.9); each candidate is fitted to the budget and scored by `score`.
    Stops when a candidate falls below the budget band (its kept blocks are whole: more skips only lose),
    when no structure fits, or after `patience` candidates in a row below the best so far."""
    base = current_structure(uvc)
    skip: list[int] = [l for l, b in enumerate(base.blocks) if not b.keep]  # the gates' own skips stay skipped
    best, records, worse = None, [], 0
    while True:
        try:
            with warnings.catch_warnings():  # a candidate below the band is expected (and ends the candidates)
                warnings.filterwarnings("ignore", message="The selected structure uses")
                st = fit_candidate(uvc, slack, layout, skip)
        except UvclabError:  # skipping this many blocks leaves no structure inside the budget
            break
        rec = {"skipped": list(skip), "cost_ratio": cost_ratio(uvc, st, layout), "val_top1": score(st)}
        records.append(rec)
        if log is not None:
            log.write({"stage": "select_skips", **rec})
        if best is None or rec["val_top1"] > best[0]:
            best, worse = (rec["val_top1"], st, list(skip)), 0
        else:
            worse += 1
        kept = [l for l, b in enumerate(base.blocks) if l not in skip]
        if (patience is not None and worse >= patience) or len(kept) <= 1 \
                or rec["cost_ratio"] < uvc.budget - slack:
            break
        trial = Structure.dense(model)
        for l in skip:
            trial.blocks[l].keep = False

        def without(l: int) -> float:
            trial.blocks[l].keep = False
            try:
                return masked_top1(model, trial, val_set)
            finally:
                trial.blocks[l].keep = True
        skip = sorted(skip + [max(kept, key=without)])
    if best is None:
        raise UvclabError("No structure fits the budget; use a larger budget.")
    return best[1], best[2], records


def fit_candidate(uvc: UVCPrimalDual, slack: float, layout: str, skip: list[int],
                  budget: Optional[float] = None) -> Structure:
    """The counts' structure with `skip` skipped, fitted to the budget; then kept blocks get their heads' full
    width back where the budget allows, and the room left is refilled. The fit's refill adds heads and
    neurons, never dims: with most blocks skipped, the few kept ones would otherwise keep the search's narrow
    heads (Fashion-MNIST, latency 0.3: blocks 0, 2, 7 with 8-16 of 32 value dims, under the budget band)."""
    budget = uvc.budget if budget is None else budget
    st = fit_structure(uvc, slack, layout, budget=budget, skip=skip)
    full = list(range(uvc.shape.head_dim))
    widened = False
    for b in st.blocks:
        if not b.keep or all(len(d) == len(full) for d in b.v_dims + b.qk_dims):
            continue
        narrow = b.qk_dims, b.v_dims
        b.qk_dims, b.v_dims = [full[:] for _ in b.heads], [full[:] for _ in b.heads]
        if cost_ratio(uvc, st, layout) > budget:
            b.qk_dims, b.v_dims = narrow
        else:
            widened = True
    return fit_structure(uvc, slack, layout, budget=budget, start=st) if widened else st


def cost_ratio(uvc: UVCPrimalDual, st: Structure, layout: str) -> float:
    """The structure's budgeted cost as a fraction of dense: exported MACs, or the table's predicted latency."""
    if uvc.latency is None:
        return structure_macs(uvc.shape, st, layout) / uvc.dense_macs
    return uvc.latency.structure_ms(st, layout) / uvc.latency.predicted_dense_ms(uvc.shape.depth)


def measured_feedback(uvc: UVCPrimalDual, model, st: Structure, skip: list[int], budget: float, slack: float,
                      layout: str, rounds: int = 3, tolerance: float = 0.02, batch_size: int = 64,
                      threads: Optional[int] = None, device: str = "cpu", log=None) -> tuple[Structure, list[dict]]:
    """Refit `st` until its export's measured latency ratio is <= budget x (1 + tolerance), at most `rounds`
    refits (on this process alone). Returns (structure, one record per timing)."""
    table = uvc.latency
    dense_pred = table.predicted_dense_ms(uvc.shape.depth)
    dense = export_model(model, Structure.dense(model), layout)
    records = []
    for i in range(rounds + 1):
        ratio = _measured_ratio(dense, export_model(model, st, layout), batch_size, threads, device)
        pred = table.structure_ms(st, layout) / dense_pred
        records.append({"round": i, "predicted": pred, "measured": ratio})
        if log is not None:
            log.write({"stage": "latency_feedback", **records[-1]})
        if ratio <= budget * (1 + tolerance) or i == rounds:
            break
        target = pred * budget / ratio
        try:
            st = fit_candidate(uvc, slack, layout, skip, budget=target)
        except UvclabError:
            break
        records[-1]["next_target"] = target
    return st, records


def _measured_ratio(dense, slim, batch_size: int, threads: Optional[int], device: str) -> float:
    """Measured ms of `slim` / ms of `dense`, timed together (alternating rounds, median)."""
    from uvclab.vit.latency_build import measure_ms
    d, s = measure_ms([dense, slim], batch_size, device=device, threads=threads)
    return s / d


def _on_rank0(compute):
    """compute() on rank 0 alone, its value on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return compute()
    box = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, 0)
    return box[0]
