"""Fit a structure into a budget: greedy trim and refill on the *exported* layout's cost.

`fit_to_budget` trims the least important groups per unit of cost saved until the structure is within the
budget, then refills the most important per unit of cost until it lands in [B - slack, B]. The cost is the
exported MACs by default, or any per-block cost (`block_cost`, e.g. a latency table's predicted ms). Used by
UVC's structure selection (docs/method.md §3.5) and by the one-shot baselines (global magnitude ranks by raw score).
"""
from __future__ import annotations

import dataclasses
import warnings

import torch

from uvclab.vit.macs import DEFAULT_LAYOUT, Layout, VitShape, block_macs
from uvclab.errors import UvclabError
from uvclab.vit.structure import BlockStructure, Structure


class _Fitter:
    """Greedy trim/refill on whole heads and chunks of MLP neurons, ranked by layer-normalised score per MAC."""

    def __init__(self, shape, structure, head_scores, neuron_scores, layout, dim_scores, tie_qk, score_norm="layer",
                 per_mac=True, block_cost=None, fixed_cost=None):
        self.shape, self.st, self.layout, self.per_mac = shape, structure, layout, per_mac
        self.cost = block_cost or (lambda b: block_macs(shape, b, layout))
        self.hs, self.ns = head_scores, neuron_scores
        if score_norm != "raw":  # 'layer': one scale per layer; 'global': one per group type across all layers
            dims = -1 if score_norm == "layer" else (0, 1)
            self.hs = head_scores / head_scores.mean(dims, keepdim=True).clamp_min(1e-12)
            self.ns = neuron_scores / neuron_scores.mean(dims, keepdim=True).clamp_min(1e-12)
        self.ds, self.tie_qk = dim_scores, tie_qk
        self.chunk = max(1, shape.mlp_hidden // 64)
        self.fixed = shape.stem_macs + shape.head_macs if fixed_cost is None else fixed_cost

    def total(self) -> float:
        return self.fixed + sum(self.cost(b) for b in self.st.blocks)

    def _with(self, l: int, heads=None, mlp=None) -> BlockStructure:
        b = self.st.blocks[l]
        nb = BlockStructure(b.heads[:], [d[:] for d in b.qk_dims], [d[:] for d in b.v_dims], b.mlp[:], b.keep,
                            b.attn, b.mlp_branch)
        if heads is not None:
            old = dict(zip(b.heads, zip(b.qk_dims, b.v_dims)))
            Dh = self.shape.head_dim
            full = list(range(Dh))
            nb.heads = heads
            nb.qk_dims = [old[h][0] if h in old else (full if not self.tie_qk else self._top_dims(l)) for h in heads]
            nb.v_dims = [old[h][1] if h in old else self._top_dims(l) for h in heads]
        if mlp is not None:
            nb.mlp = mlp
        return nb

    def _top_dims(self, l: int) -> list[int]:
        # a head brought back keeps as many dims as the layer's widest kept head (all, if none is kept)
        b = self.st.blocks[l]
        width = max(map(len, b.v_dims)) if b.heads else self.shape.head_dim
        return list(range(width))


def fit_to_budget(shape: VitShape, structure: Structure, head_scores: torch.Tensor, neuron_scores: torch.Tensor,
                  dense_macs: int, macs_ratio: float, slack: float = 0.02, layout: Layout = DEFAULT_LAYOUT,
                  dim_scores: torch.Tensor | None = None, keep_prob: torch.Tensor | None = None,
                  tie_qk: bool = False, allow_prune: bool = True, allow_skip: bool = True,
                  score_norm: str = "layer", per_mac: bool = True, block_cost=None,
                  fixed_cost: float | None = None) -> Structure:
    """Trim until exported MACs <= B * dense, then refill while staying <= B (target: >= (B - slack) * dense).

    block_cost(BlockStructure) -> cost and fixed_cost (stem + head) replace the MACs count (then `dense_macs`
    is the dense model's cost in the same unit, `macs_ratio` the budget as a fraction of it).
    allow_prune=False only drops / restores whole blocks (skipping only); allow_skip=False never drops a block.
    score_norm: 'layer' divides scores by their layer's mean (UVC's counts already chose the layer widths),
    'global' by one mean per group type, 'raw' uses them as given. per_mac=False ranks moves by score alone
    (a neuron chunk: the sum of its neurons), not by score per MAC.
    """
    if score_norm not in ("layer", "global", "raw"):
        raise UvclabError(f"score_norm must be 'layer', 'global' or 'raw', not {score_norm!r}.")
    f = _Fitter(shape, structure, head_scores, neuron_scores, layout, dim_scores, tie_qk, score_norm, per_mac,
                block_cost, fixed_cost)
    budget = macs_ratio * dense_macs
    by_keep = (lambda l: keep_prob[l].item()) if keep_prob is not None else (lambda l: -l)
    # trim: cheapest importance per MAC saved first; drop whole blocks if in-block trimming is exhausted
    while f.total() > budget:
        moves = _scored(f, shrink=True) if allow_prune else []
        if not moves:
            kept = [l for l, b in enumerate(f.st.blocks) if b.keep]
            if not kept or not allow_skip:
                what = "the stem and head alone cost" if not kept else "without skipping blocks the minimum is"
                unit = "MACs" if block_cost is None else "cost"
                raise UvclabError(f"No structure fits the budget {macs_ratio}: {what} {f.total() / dense_macs:.3f} "
                                  f"of the dense {unit}. Use a larger budget"
                                  + ("." if allow_skip else " or allow block skipping."))
            f.st.blocks[min(kept, key=by_keep)].keep = False
            continue
        _, l, nb, _ = min(moves, key=lambda m: m[0])
        f.st.blocks[l] = nb
    # refill: most importance per MAC first, only moves that keep us within budget
    while f.total() < (macs_ratio - slack / 4) * dense_macs:
        room = budget - f.total()
        if allow_prune:
            moves = [m for m in _scored(f, shrink=False) if m[3] <= room]
            if moves:
                _, l, nb, _ = max(moves, key=lambda m: m[0])
                f.st.blocks[l] = nb
                continue
        else:  # skipping only: bring back the most wanted skipped block that fits
            back = [l for l, b in enumerate(f.st.blocks)
                    if not b.keep and f.cost(dataclasses.replace(b, keep=True)) <= room]
            if back:
                f.st.blocks[max(back, key=by_keep)].keep = True
                continue
        break
    if f.total() < (macs_ratio - slack) * dense_macs:
        warnings.warn(f"The selected structure uses {f.total() / dense_macs:.3f} of the dense "
                      f"{'MACs' if block_cost is None else 'cost'}, below the "
                      f"target band [{macs_ratio - slack:.3f}, {macs_ratio:.3f}]"
                      + (" (whole blocks are too coarse to fill it)." if not allow_prune else
                         " (skipped blocks cannot be refilled)."))
    return f.st


def _scored(f: _Fitter, shrink: bool):
    """Moves as (importance per MAC, layer, new block, MACs added) -- MACs added < 0 when shrinking."""
    out = []
    for imp, l, nb in _raw_moves(f, shrink):
        delta = f.cost(nb) - f.cost(f.st.blocks[l])
        if delta != 0:
            out.append((imp / abs(delta) if f.per_mac else imp, l, nb, delta))
    return out


def _raw_moves(f: _Fitter, shrink: bool):
    for l, b in enumerate(f.st.blocks):
        if not b.keep:
            continue
        if shrink:
            if len(b.heads) > 1:
                h = min(b.heads, key=lambda i: f.hs[l, i].item())
                yield f.hs[l, h].item(), l, f._with(l, heads=[i for i in b.heads if i != h])
            if len(b.mlp) > f.chunk:
                kept = torch.tensor(b.mlp)
                drop = kept[f.ns[l, kept].sort(stable=True).indices[:f.chunk]]   # the chunk of lowest scores
                gone = set(drop.tolist())
                yield sum(f.ns[l, i].item() for i in gone), l, f._with(l, mlp=[i for i in b.mlp if i not in gone])
        else:
            back_h = [i for i in range(f.shape.num_heads) if i not in set(b.heads)]
            if back_h:
                h = max(back_h, key=lambda i: f.hs[l, i].item())
                yield f.hs[l, h].item(), l, f._with(l, heads=sorted(b.heads + [h]))
            out = torch.ones(f.shape.mlp_hidden, dtype=torch.bool)
            out[b.mlp] = False
            idx = out.nonzero().flatten()
            back_n = idx[f.ns[l, idx].sort(descending=True, stable=True).indices[:f.chunk]].tolist()
            if back_n:
                yield sum(f.ns[l, i].item() for i in back_n), l, f._with(l, mlp=sorted(b.mlp + back_n))
