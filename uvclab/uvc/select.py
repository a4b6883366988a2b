"""End of UVC's stage 1: the optimiser's state becomes a Structure that provably fits the budget.

The reference code leaves this to a hand-picked checkpoint (docs/method.md §3.5). Here it is automatic:
`structure_from_counts` keeps all but the ceil(s), ceil(r) smallest groups and follows the argmax skip
decisions (`current_structure`), then `select_structure` fits the *exported* count (or, with a latency
budget, the latency table's prediction for the exported layout) into [B - slack, B]
(`uvclab.prune.fit.fit_to_budget`). `ranks_agree` checks that every torchrun rank ends identical.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Sequence

import torch
import torch.distributed as dist

from uvclab.prune.fit import fit_to_budget
from uvclab.uvc.optimizer import UVCPrimalDual
from uvclab.vit.macs import DEFAULT_LAYOUT, Layout, VitShape
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


def select_structure(uvc: UVCPrimalDual, slack: float = 0.02, layout: Layout = DEFAULT_LAYOUT) -> Structure:
    """Counts + gates -> Structure, fitted so that exported MACs (latency budget: predicted ms) lie in
    [B - slack, B] x dense (`fit_structure`). Under torchrun, rank 0's structure is the structure (identical
    anyway)."""
    return broadcast_structure(fit_structure(uvc, slack, layout))


def fit_structure(uvc: UVCPrimalDual, slack: float = 0.02, layout: Layout = DEFAULT_LAYOUT,
                  budget: float | None = None, skip: Sequence[int] = (), start: Structure | None = None) -> Structure:
    """`select_structure` on this process alone. `budget` replaces B (the measured-latency feedback aims
    lower); `skip`: blocks skipped whatever the gates say (the skip candidates of `engine.selection`);
    `start`: fit this structure instead of the counts' own."""
    dims, heads, neurons = uvc.scores()
    cost = {}
    if uvc.latency is not None:
        cost = dict(block_cost=lambda b: uvc.latency.block_ms(b, layout), fixed_cost=uvc.latency.fixed_ms)
    dense = uvc.dense_macs if uvc.latency is None else uvc.latency.predicted_dense_ms(uvc.shape.depth)
    start = current_structure(uvc) if start is None else start
    for l in skip:
        start.blocks[l].keep = False
    return fit_to_budget(uvc.shape, start, heads, neurons, dense, uvc.budget if budget is None else budget, slack,
                         layout, dim_scores=dims, keep_prob=uvc.keep_prob(), tie_qk=uvc.cfg.tie_qk,
                         allow_prune=uvc.cfg.prune, allow_skip=uvc.cfg.block_skip, **cost)


def broadcast_structure(st: Structure) -> Structure:
    """Rank 0's structure on every rank (itself without torchrun)."""
    if dist.is_available() and dist.is_initialized():
        box = [st.to_dict()]
        dist.broadcast_object_list(box, 0)
        st = Structure.from_dict(box[0])
    return st


def ranks_agree(uvc: UVCPrimalDual, structure: Structure) -> bool:
    """True when every rank holds bit-identical counts, duals, gates and structure (checked, not assumed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return True
    h = hashlib.sha256(json.dumps(structure.to_dict()).encode())
    for t in uvc.state.tensors():
        h.update(t.detach().cpu().numpy().tobytes())
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, h.hexdigest())
    return len(set(digests)) == 1
