"""One-shot structures at a MACs budget: the baselines UVC is measured against (and bench inputs).

`uniform_structure` keeps the same fraction of heads and MLP neurons in every block (the highest-norm ones);
`magnitude_structure` ranks heads and neurons globally by weight norm (global magnitude structured pruning);
`depth_structure` drops whole blocks (from the end, or greedily by a score such as validation accuracy).
Each picks the largest structure whose exported MACs fit the budget. `macs_budget_for_latency` turns a
latency budget into the MACs ratio of the magnitude cut the latency table predicts at it.
"""
from __future__ import annotations

import torch

from typing import Callable, Optional

from uvclab.vit.macs import DEFAULT_LAYOUT, Layout, check_budget, count, structure_macs, vit_shape
from uvclab.errors import UvclabError
from uvclab.prune.fit import fit_to_budget
from uvclab.vit.structure import BlockStructure, Structure


def _ranked(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.topk(scores, k).indices.tolist())


def uniform_structure(model: torch.nn.Module, macs_ratio: float, layout: Layout = DEFAULT_LAYOUT) -> Structure:
    """Same kept fraction of heads and neurons in every block; the largest one within the budget."""
    check_budget(macs_ratio)
    s = vit_shape(model)
    dense = count(s)["macs"]
    H, Dh, M = s.num_heads, s.head_dim, s.mlp_hidden
    full = list(range(Dh))
    # (L, H) head scores from attn.proj column groups, (L, M) neuron scores from fc2 columns
    head_scores = [blk.attn.proj.weight.detach().float().pow(2).sum(0).view(H, Dh).sum(-1) for blk in model.blocks]
    neuron_scores = [blk.mlp.fc2.weight.detach().float().pow(2).sum(0) for blk in model.blocks]
    best = None
    for f in torch.linspace(1.0, 0.0, 401).tolist():
        h, m = max(1, round(H * f)), max(1, round(M * f))
        blocks = []
        for hs, ns in zip(head_scores, neuron_scores):
            heads = _ranked(hs, h)
            blocks.append(BlockStructure(heads, [full[:] for _ in heads], [full[:] for _ in heads], _ranked(ns, m)))
        st = Structure(s.embed_dim, H, Dh, M, blocks)
        if structure_macs(s, st, layout) <= macs_ratio * dense:
            best = st
            break
    if best is None:
        raise UvclabError(f"No uniform structure fits macs_ratio={macs_ratio}; the stem and head alone cost more. "
                          "Use a larger budget or allow block skipping.")
    return best


def magnitude_scores(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, H) head and (L, M) neuron mean squared weights over the whole group (q, k, v rows and proj columns
    of a head; fc1 row and fc2 column of a neuron): per-weight magnitudes, comparable across group types."""
    s = vit_shape(model)
    H, Dh = s.num_heads, s.head_dim
    heads, neurons = [], []
    for blk in model.blocks:
        qkv = blk.attn.qkv.weight.detach().float().pow(2).view(3, H, Dh, -1).mean((0, 2, 3))
        proj = blk.attn.proj.weight.detach().float().pow(2).view(-1, H, Dh).mean((0, 2))
        heads.append((3 * qkv + proj) / 4)
        fc1 = blk.mlp.fc1.weight.detach().float().pow(2).mean(1)
        neurons.append((fc1 + blk.mlp.fc2.weight.detach().float().pow(2).mean(0)) / 2)
    return torch.stack(heads), torch.stack(neurons)


def magnitude_structure(model: torch.nn.Module, macs_ratio: float, layout: Layout = DEFAULT_LAYOUT,
                        slack: float = 0.02) -> Structure:
    """Global magnitude structured pruning: remove the heads and MLP neurons (chunks of M/64) with the smallest
    mean squared weight, ranked across all layers and both group types, until the exported MACs fit the
    budget; no block is skipped."""
    check_budget(macs_ratio)
    s = vit_shape(model)
    heads, neurons = magnitude_scores(model)
    chunk = max(1, s.mlp_hidden // 64)
    # a chunk's score is the sum of its neurons': compare heads with the mean neuron of a chunk
    return fit_to_budget(s, Structure.dense(model), heads * chunk, neurons, count(s)["macs"], macs_ratio, slack,
                         layout, allow_skip=False, score_norm="raw", per_mac=False)


def macs_budget_for_latency(model: torch.nn.Module, table, budget: float, layout: Layout = DEFAULT_LAYOUT) -> float:
    """The MACs ratio of the global magnitude cut whose predicted latency (`table`, a LatencyTable) is `budget`
    x dense: the MACs target of a latency-budget UVC search on MACs (`uvc.search_resource: macs`)."""
    s = vit_shape(model)
    heads, neurons = magnitude_scores(model)
    st = fit_to_budget(s, Structure.dense(model), heads * max(1, s.mlp_hidden // 64), neurons,
                       table.predicted_dense_ms(s.depth), budget, 0.01, layout, score_norm="raw",
                       per_mac=False, block_cost=lambda b: table.block_ms(b, layout), fixed_cost=table.fixed_ms)
    return structure_macs(s, st, layout) / count(s)["macs"]


def depth_structure(model: torch.nn.Module, macs_ratio: float,
                    score: Optional[Callable[[Structure], float]] = None) -> Structure:
    """Drop whole blocks until the budget fits. Without `score`: keep the first k blocks (largest k within the
    budget). With `score(structure) -> float` (higher is better, e.g. validation accuracy of the masked
    model): greedily drop the block whose removal scores best."""
    check_budget(macs_ratio)
    s = vit_shape(model)
    dense = count(s)["macs"]
    st = Structure.dense(model)
    while structure_macs(s, st) > macs_ratio * dense:
        kept = [l for l, b in enumerate(st.blocks) if b.keep]
        if not kept:
            raise UvclabError(f"Even with every block dropped the model exceeds macs_ratio={macs_ratio}.")
        if score is None:
            drop = kept[-1]
        else:
            def without(l):
                trial = Structure.from_dict(st.to_dict())
                trial.blocks[l].keep = False
                return score(trial)
            drop = max(kept, key=without)
        st.blocks[drop].keep = False
    return st
