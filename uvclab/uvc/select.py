"""End of UVC's stage 1: the optimiser's state becomes the run's Structure through one verb, `final_structure`
(the reference code hand-picks a checkpoint; docs/method.md §3.5 gives the reasons for each step).

`structure_from_counts` keeps all but the ceil(s), ceil(r) smallest groups and follows the argmax skip decisions
(`current_structure`); `fit_structure` fits the *exported* count (latency budget: the table's prediction) into
[B - slack, B] (`uvclab.prune.fit.fit_to_budget`); then which blocks to skip ('gates': the search's decisions;
'validation': k = 0, 1, 2, ... blocks skipped, each candidate exported, briefly fine-tuned and scored), and with
a latency budget a measured feedback that refits lower while the export measures over B x (1 + tolerance).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Optional, Sequence

import torch

from uvclab.errors import UvclabError
from uvclab.prune.fit import fit_to_budget
from uvclab.ranks import from_rank0, rank, same_on_all_ranks
from uvclab.uvc.optimizer import UVCPrimalDual
from uvclab.vit.export import export_model
from uvclab.vit.latency import LatencyTable
from uvclab.vit.macs import DEFAULT_LAYOUT, Layout, VitShape, structure_macs
from uvclab.vit.structure import BlockStructure, Structure, masked

def _keep_largest(scores: torch.Tensor, n_keep: int) -> list[int]:
    return sorted(scores.topk(max(n_keep, 0)).indices.tolist())


def structure_from_counts(shape: VitShape, dim_scores: torch.Tensor, head_scores: torch.Tensor,
                          neuron_scores: torch.Tensor, s: torch.Tensor, r: torch.Tensor,
                          keep: torch.Tensor, tie_qk: bool = False, dims_multiple: int = 1,
                          share_head_width: bool = False) -> Structure:
    """Kept = everything but the ceil(count) lowest-scoring groups; keep (L,) bool = block runs. Kept value
    dims per head are rounded to the nearest multiple of `dims_multiple` (at least one multiple, at most all).
    share_head_width: every kept head of a layer keeps the layer's mean number of value dims (its own best
    ones), so the exported layout, which gives a layer's heads one width, pads nothing."""
    H, Dh, M = shape.num_heads, shape.head_dim, shape.mlp_hidden
    blocks = []
    for l in range(shape.depth):
        heads = _keep_largest(head_scores[l], H - int(math.ceil(s[l, 0].item())))
        widths = [Dh - int(math.ceil(r[l, h].item())) for h in heads]
        if share_head_width and heads:
            widths = [int(math.floor(sum(widths) / len(widths) + 0.5))] * len(heads)
        v_dims = [_keep_largest(dim_scores[l, h], _round_to(w, dims_multiple, Dh)) for h, w in zip(heads, widths)]
        qk_dims = [d[:] for d in v_dims] if tie_qk else [list(range(Dh)) for _ in heads]
        mlp = _keep_largest(neuron_scores[l], M - int(math.ceil(s[l, 1].item())))
        blocks.append(BlockStructure(heads, qk_dims, v_dims, mlp, keep=bool(keep[l])))
    return Structure(shape.embed_dim, H, Dh, M, blocks)


def _round_to(n: int, multiple: int, full: int) -> int:
    """n rounded to the nearest multiple (halves up), within [min(multiple, full), full]; `full` itself is
    always allowed (a head kept whole)."""
    if multiple <= 1:
        return n
    r = int(math.floor(n / multiple + 0.5)) * multiple
    return full if r >= full or full - n < abs(n - r) else max(min(multiple, full), r)


def current_structure(uvc: UVCPrimalDual) -> Structure:
    """The hard structure the counts and gates describe right now (not yet fitted to the budget)."""
    dims, heads, neurons = uvc.scores()
    r = uvc.r if uvc.cfg.prune_dims else torch.zeros_like(uvc.r)
    return structure_from_counts(uvc.shape, dims, heads, neurons, uvc.s, r, uvc.keep_blocks(),
                                 tie_qk=uvc.cfg.tie_qk, dims_multiple=uvc.cfg.dims_multiple,
                                 share_head_width=uvc.cfg.tie_dims)


def fit_structure(uvc: UVCPrimalDual, slack: float = 0.02, layout: Layout = DEFAULT_LAYOUT,
                  budget: float | None = None, skip: Sequence[int] = (), widen: bool = False) -> Structure:
    """The counts' structure, blocks `skip` skipped, fitted so that exported MACs (latency budget: predicted ms)
    lie in [B - slack, B] x dense (`budget` replaces B). widen: then kept blocks get their heads' full width back
    where the budget allows, and the room left is refilled (the refill adds heads and neurons, never dims: with
    most blocks skipped, the kept ones kept the search's narrow heads, 8-16 of 32 dims at latency 0.3)."""
    budget = uvc.budget if budget is None else budget
    dims, heads, neurons = uvc.scores()
    cost = {}
    if uvc.latency is not None:
        cost = dict(block_cost=lambda b: uvc.latency.block_ms(b, layout), fixed_cost=uvc.latency.fixed_ms)
    dense = uvc.dense_macs if uvc.latency is None else uvc.latency.predicted_dense_ms(uvc.shape.depth)

    def fit(st: Structure) -> Structure:
        return fit_to_budget(uvc.shape, st, heads, neurons, dense, budget, slack, layout, dim_scores=dims,
                             keep_prob=uvc.keep_prob(), tie_qk=uvc.cfg.tie_qk, allow_prune=uvc.cfg.prune,
                             allow_skip=uvc.cfg.block_skip, **cost)
    st = current_structure(uvc)
    for l in skip:
        st.blocks[l].keep = False
    st = fit(st)
    full, widened = list(range(uvc.shape.head_dim)), False
    for b in st.blocks if widen else []:
        if not b.keep or all(len(d) == len(full) for d in b.v_dims + b.qk_dims):
            continue
        narrow = b.qk_dims, b.v_dims
        b.qk_dims, b.v_dims = [full[:] for _ in b.heads], [full[:] for _ in b.heads]
        if cost_ratio(uvc, st, layout) > budget:
            b.qk_dims, b.v_dims = narrow
        else:
            widened = True
    return fit(st) if widened else st


def cost_ratio(uvc: UVCPrimalDual, st: Structure, layout: Layout = DEFAULT_LAYOUT) -> float:
    """The structure's budgeted cost as a fraction of dense: exported MACs, or the table's predicted latency."""
    if uvc.latency is None:
        return structure_macs(uvc.shape, st, layout) / uvc.dense_macs
    return uvc.latency.structure_ms(st, layout) / uvc.latency.predicted_dense_ms(uvc.shape.depth)


def final_structure(uvc: UVCPrimalDual, model: torch.nn.Module, budget: float,
                    latency: Optional[LatencyTable] = None, slack: float = 0.02, layout: str = DEFAULT_LAYOUT,
                    val_set=None, evaluate: Optional[Callable] = None,
                    finetune: Optional[Callable[[torch.nn.Module, int], None]] = None,
                    timer: Optional[Callable[[list], list]] = None, log=None) -> tuple[Structure, dict]:
    """The final structure at budget B (of the table's predicted latency, or of MACs without `latency`) and
    what led to it, for report.json. A search run on MACs for a latency budget is refitted on latency here.
    val_set, evaluate(model, dataset) -> top-1, finetune(slim, steps): the skip candidates' validation
    (`uvc.select_skips`); timer(models) -> ms each: the measured feedback (`uvc.latency_feedback`)."""
    cfg = uvc.cfg
    searched_on = uvc.budget if latency is not None and uvc.latency is None else None
    uvc.set_budget(budget, latency)
    mode = cfg.select_skips if cfg.select_skips != "auto" else "validation" if latency is not None else "gates"
    st = info = None
    if rank() == 0:  # rank 0 decides, every rank gets its result
        info = {"select_skips": mode}
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
        st = st.to_dict()
    st, info = from_rank0((st, info))
    st = Structure.from_dict(st)
    if not same_on_all_ranks((st.to_dict(), [t.tolist() for t in uvc.state.tensors()])):  # counts, duals, gates
        raise RuntimeError("UVC state differs between ranks; please report this as a bug.")
    return st, info


def masked_top1(model: torch.nn.Module, st: Structure, dataset, evaluate) -> float:
    """Top-1 of the gated model with the structure's hard masks (no export, no training)."""
    with masked(model, st):
        return evaluate(model, dataset)


def candidate_score(model, layout: str, val_set, evaluate, finetune, steps: int):
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
