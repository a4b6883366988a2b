"""End of UVC's stage 1: the one verb `final_structure` turns the optimiser's state into the run's Structure.

The reference code leaves this to a hand-picked checkpoint (docs/method.md §3.5, the reasons for each step).
Here: the counts' structure fitted to the budget (`uvclab.uvc.select`); which blocks to skip ('gates': the
search's own decisions; 'validation': candidates with k = 0, 1, 2, ... blocks skipped, each exported, briefly
fine-tuned and scored on validation); with a latency budget, a measured-latency feedback that refits to a
lower predicted target while the export measures over B x (1 + latency_tolerance). What it needs from the
pipeline comes as callables: `evaluate(model, dataset)`, `finetune(slim, steps)`, `timer(models)`. Under
torchrun rank 0 decides, every rank gets its result, and the ranks' states are checked to be bit-identical.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

from uvclab.errors import UvclabError
from uvclab.ranks import from_rank0, rank, same_on_all_ranks
from uvclab.uvc.optimizer import UVCPrimalDual
from uvclab.uvc.select import cost_ratio, current_structure, fit_structure
from uvclab.vit.export import export_model
from uvclab.vit.latency import LatencyTable
from uvclab.vit.macs import DEFAULT_LAYOUT
from uvclab.vit.structure import Structure, masked

Evaluate = Callable[[torch.nn.Module, object], float]   # (model, dataset) -> top-1 %


def final_structure(uvc: UVCPrimalDual, model: torch.nn.Module, budget: float,
                    latency: Optional[LatencyTable] = None, slack: float = 0.02, layout: str = DEFAULT_LAYOUT,
                    val_set=None, evaluate: Optional[Evaluate] = None,
                    finetune: Optional[Callable[[torch.nn.Module, int], None]] = None,
                    timer: Optional[Callable[[list], list]] = None, log=None) -> tuple[Structure, dict]:
    """The final structure at budget B (of the table's predicted latency, or of MACs without `latency`) and
    what led to it, for report.json. A search run on MACs for a latency budget is refitted on latency here.
    val_set, evaluate, finetune: the skip candidates' validation (`uvc.select_skips`); timer: the measured
    feedback of a latency budget (`uvc.latency_feedback`)."""
    cfg = uvc.cfg
    searched_on = uvc.budget if latency is not None and uvc.latency is None else None
    uvc.set_budget(budget, latency)
    mode = cfg.select_skips if cfg.select_skips != "auto" else "validation" if latency is not None else "gates"

    def decide() -> tuple[dict, dict]:
        info: dict = {"select_skips": mode}
        if searched_on is not None:
            info["search_macs_budget"] = searched_on
        info["search_structure_cost_ratio"] = cost_ratio(uvc, current_structure(uvc), layout)  # before the fit
        skip: list[int] = []
        if mode == "validation" and cfg.block_skip:
            n = cfg.select_eval_samples
            val = val_set if n is None else torch.utils.data.Subset(val_set, range(min(n, len(val_set))))
            score = candidate_score(model, layout, val, evaluate, finetune, cfg.select_finetune_steps)
            st, skip, info["skip_candidates"] = skips_by_validation(
                uvc, model, score, lambda st: masked_top1(model, st, val, evaluate), slack, layout,
                cfg.select_patience, log)
        else:
            st = fit_structure(uvc, slack, layout)
        if latency is not None and cfg.latency_feedback > 0:
            st, info["latency_feedback"] = measured_feedback(uvc, model, st, skip, budget, slack, layout, timer,
                                                             cfg.latency_feedback, cfg.latency_tolerance, log)
        info["skipped_blocks"] = [l for l, b in enumerate(st.blocks) if not b.keep]
        return st.to_dict(), info
    st, info = from_rank0(decide() if rank() == 0 else None)
    st = Structure.from_dict(st)
    if not same_on_all_ranks((st.to_dict(), [t.tolist() for t in uvc.state.tensors()])):  # counts, duals, gates
        raise RuntimeError("UVC state differs between ranks; please report this as a bug.")
    return st, info


def masked_top1(model: torch.nn.Module, st: Structure, dataset, evaluate: Evaluate) -> float:
    """Top-1 of the gated model with the structure's hard masks (no export, no training)."""
    with masked(model, st):
        return evaluate(model, dataset)


def candidate_score(model, layout: str, val_set, evaluate: Evaluate, finetune, steps: int):
    """score(structure) -> validation top-1 of the structure exported from the searched weights after `steps`
    steps of the run's distillation fine-tuning (0: masked, as searched). Unfine-tuned, block-skipped structures
    look far better than they end (Fashion-MNIST, latency 0.5: 79 vs 58-60 % for width-pruned ones that end
    0.2 points above them); after 24 steps the order is the final one's."""
    def score(st: Structure) -> float:
        if steps == 0:
            return masked_top1(model, st, val_set, evaluate)
        slim = export_model(model, st, layout)
        finetune(slim, steps)
        return evaluate(slim, val_set)
    return score


def skips_by_validation(uvc: UVCPrimalDual, model, score, top1, slack: float, layout: str,
                        patience: Optional[int] = None, log=None) -> tuple[Structure, list[int], list[dict]]:
    """(best structure, its forced skips, every candidate's record). Candidate k skips k blocks, chosen greedily:
    the next is the block whose removal keeps the most `top1(structure)` of the searched weights at full width
    (ranked with the search's pruned widths instead, Fashion-MNIST at latency 0.3 / 0.5 ended at 80.3 / 85.7 %
    validation instead of 82.0 / 85.9); each candidate is fitted to the budget and scored by `score`. Stops
    when a candidate falls below the budget band (its kept blocks are whole: more skips only lose), when no
    structure fits, or after `patience` candidates in a row below the best so far."""
    base = current_structure(uvc)
    skip: list[int] = [l for l, b in enumerate(base.blocks) if not b.keep]  # the gates' own skips stay skipped
    best, records, worse = None, [], 0
    while True:
        try:
            with warnings.catch_warnings():  # a candidate below the band is expected (and ends the candidates)
                warnings.filterwarnings("ignore", message="The selected structure uses")
                st = fit_structure(uvc, slack, layout, skip=skip, widen=True)
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
                return top1(trial)
            finally:
                trial.blocks[l].keep = True
        skip = sorted(skip + [max(kept, key=without)])
    if best is None:
        raise UvclabError("No structure fits the budget; use a larger budget.")
    return best[1], best[2], records


def measured_feedback(uvc: UVCPrimalDual, model, st: Structure, skip: list[int], budget: float, slack: float,
                      layout: str, timer, rounds: int = 3, tolerance: float = 0.02,
                      log=None) -> tuple[Structure, list[dict]]:
    """Refit `st` until its export's measured latency ratio is <= budget x (1 + tolerance), at most `rounds`
    refits (on this process alone); timer([dense, slim]) -> their ms. Returns (structure, one record per timing)."""
    table = uvc.latency
    dense_pred = table.predicted_dense_ms(uvc.shape.depth)
    dense = export_model(model, Structure.dense(model), layout)
    records = []
    for i in range(rounds + 1):
        d, s = timer([dense, export_model(model, st, layout)])
        ratio = s / d
        pred = table.structure_ms(st, layout) / dense_pred
        records.append({"round": i, "predicted": pred, "measured": ratio})
        if log is not None:
            log.write({"stage": "latency_feedback", **records[-1]})
        if ratio <= budget * (1 + tolerance) or i == rounds:
            break
        target = pred * budget / ratio
        try:
            st = fit_structure(uvc, slack, layout, budget=target, skip=skip, widen=True)
        except UvclabError:
            break
        records[-1]["next_target"] = target
    return st, records
