"""Hand-made structures at a MACs budget: uniform width and depth-only (baselines, and bench inputs).

`uniform_structure` keeps the same fraction of heads and MLP neurons in every block (highest-norm ones when
a model is given, as global magnitude pruning would rank them); `depth_structure` drops whole blocks from the
end. Both pick the largest structure whose exported MACs fit the budget.
"""
from __future__ import annotations

import torch

from .budget import DEFAULT_LAYOUT, Layout, check_budget, count, structure_macs, vit_shape
from .errors import UvclabError
from .structure import BlockStructure, Structure


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


def depth_structure(model: torch.nn.Module, macs_ratio: float) -> Structure:
    """Keep the first k blocks (largest k within the budget)."""
    check_budget(macs_ratio)
    s = vit_shape(model)
    dense = count(s)["macs"]
    st = Structure.dense(model)
    for l in reversed(range(s.depth)):
        if structure_macs(s, st) <= macs_ratio * dense:
            break
        st.blocks[l].keep = False
    if structure_macs(s, st) > macs_ratio * dense:
        raise UvclabError(f"Even with every block dropped the model exceeds macs_ratio={macs_ratio}.")
    return st
