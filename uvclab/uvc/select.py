"""The optimiser's state as a Structure, and its fit into the budget (docs/method.md §3.5).

`structure_from_counts` keeps all but the ceil(s), ceil(r) smallest groups and follows the argmax skip
decisions (`current_structure`: the hard structure during the search); `fit_structure` fits the *exported*
count (or, with a latency budget, the latency table's prediction for the exported layout) into [B - slack,
B] (`uvclab.prune.fit.fit_to_budget`). The final structure of a search is `uvclab.uvc.final`'s.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from uvclab.prune.fit import fit_to_budget
from uvclab.uvc.optimizer import UVCPrimalDual
from uvclab.vit.macs import DEFAULT_LAYOUT, Layout, VitShape, structure_macs
from uvclab.vit.structure import BlockStructure, Structure


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
                  budget: float | None = None, skip: Sequence[int] = (), widen: bool = False,
                  start: Structure | None = None) -> Structure:
    """The counts' structure (or `start`) with the blocks `skip` skipped whatever the gates say, fitted so that
    exported MACs (latency budget: the table's predicted ms) lie in [B - slack, B] x dense; `budget` replaces B
    (the measured-latency feedback aims lower). widen: then kept blocks get their heads' full width back where
    the budget allows, and the room left is refilled. The fit's refill adds heads and neurons, never dims:
    with most blocks skipped, the few kept ones would otherwise keep the search's narrow heads
    (Fashion-MNIST, latency 0.3: blocks 0, 2, 7 with 8-16 of 32 value dims, under the budget band)."""
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
    st = current_structure(uvc) if start is None else start
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
