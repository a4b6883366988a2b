"""Loss-aware group importance for the UVC search, and the search's budget curves.

Fisher score of a group (Kwon et al., NeurIPS 2022, "A Fast Post-Training Pruning Framework for Transformers";
first-order Taylor, Molchanov et al., CVPR 2019): the gradient of the loss w.r.t. a mask m that scales all
the group's weights, dL/dm = sum over them of w * dL/dw, squared and averaged over the search's own batches
(an EMA with bias correction: per-batch squares are a cheap proxy of Kwon's per-sample sum). Groups as in
`UVCPrimalDual.scores` 'group': a head = its q, k, v rows (+ biases) and proj columns, a value dim = its v row
and proj column, an MLP neuron = its fc1 row (+ bias) and fc2 column. Budget curves: the target the counts
chase walks from 1 to B linearly or along Zhu & Gupta's cubic (ICLR-W 2018, "To prune, or not to prune").
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

Scores = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # dims (L, H, Dh), heads (L, H), neurons (L, M)


def _wg(mod: torch.nn.Linear, dim: int) -> Optional[torch.Tensor]:
    """sum of w * dL/dw of a Linear over `dim` of its weight (1: per output row, bias added; 0: per input column);
    None when the weight holds no gradient."""
    w = mod.weight
    if w.grad is None:
        return None
    out = (w.detach().float() * w.grad.float()).sum(dim)
    b = mod.bias
    if dim == 1 and b is not None and b.grad is not None:
        out = out + b.detach().float() * b.grad.float()
    return out


@torch.no_grad()
def mask_gradients(blocks, num_heads: int, head_dim: int) -> Optional[Scores]:
    """One batch's mask gradient of every group: dims (L, H, Dh), heads (L, H), neurons (L, M); None when the
    model holds no gradients (e.g. before the first backward)."""
    H, Dh = num_heads, head_dim
    dims, heads, neurons = [], [], []
    for b in blocks:
        qkv, proj = _wg(b.attn.qkv, 1), _wg(b.attn.proj, 0)
        fc1, fc2 = _wg(b.mlp.fc1, 1), _wg(b.mlp.fc2, 0)
        if qkv is None or proj is None or fc1 is None or fc2 is None:
            return None
        qkv = qkv.view(3, H, Dh)
        d = qkv[2] + proj.view(H, Dh)                            # v row + proj column of each value dim
        dims.append(d)
        heads.append(d.sum(-1) + qkv[0].sum(-1) + qkv[1].sum(-1))
        neurons.append(fc1 + fc2)
    return torch.stack(dims), torch.stack(heads), torch.stack(neurons)


class FisherScores:
    """EMA of squared per-batch mask gradients (decay `ema`), bias-corrected like Adam's moments.

    `update` after each backward (UVC: in its step, before the prox shrinkage), `scores` for the ranking;
    `state_dict` goes into the search checkpoint so that a resumed search is bit-identical."""

    def __init__(self, blocks, num_heads: int, head_dim: int, ema: float = 0.9):
        self.blocks, self.H, self.Dh, self.ema = blocks, num_heads, head_dim, ema
        self.m: Optional[list[torch.Tensor]] = None   # EMAs of the squares [dims, heads, neurons]
        self.n = 0                                    # batches accumulated

    def update(self, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> bool:
        """Fold in the current batch's gradients; `reduce` averages the mask gradients over ranks (before
        squaring: every rank then holds identical scores). False when there were no gradients."""
        g = mask_gradients(self.blocks, self.H, self.Dh)
        if g is None:
            return False
        flat = reduce(torch.cat([t.reshape(-1) for t in g]))
        parts = list(flat.split([t.numel() for t in g]))
        sq = [p.view_as(t).pow(2) for p, t in zip(parts, g)]
        if self.m is None:
            self.m = [torch.zeros_like(t) for t in sq]
        self.m = [self.ema * m + (1 - self.ema) * x for m, x in zip(self.m, sq)]
        self.n += 1
        return True

    def scores(self) -> Optional[Scores]:
        """Bias-corrected EMAs (dims, heads, neurons), or None before the first update."""
        if self.m is None:
            return None
        c = 1 - self.ema ** self.n
        return tuple(m / c for m in self.m)

    def state_dict(self) -> dict:
        return {"n": self.n, "m": None if self.m is None else [t.clone() for t in self.m]}

    def load_state_dict(self, sd: dict) -> None:
        self.n = int(sd["n"])
        self.m = None if sd["m"] is None else [t.clone() for t in sd["m"]]


def mix_scores(fisher: Scores, norm: Scores) -> Scores:
    """'fisher_norm': the geometric mean sqrt(fisher x squared norm) of each group (ranks like their product;
    comparable across group types as both factors are)."""
    return tuple((f * n).sqrt() for f, n in zip(fisher, norm))


def budget_target(step: int, total_steps: Optional[int], budget: float, frac: float, curve: str = "linear") -> float:
    """The resource target at search step `step`: 1 -> B over the first `frac` x total_steps steps, then B.
    'linear': 1 - (1 - B) t; 'cubic' (Zhu & Gupta): B + (1 - B)(1 - t)^3, t = step / window in [0, 1]
    (prunes fast while much is redundant, slowly near B)."""
    if frac <= 0 or not total_steps:
        return budget
    t = min(1.0, step / max(1.0, frac * total_steps))
    if curve == "cubic":
        return budget + (1.0 - budget) * (1.0 - t) ** 3
    return 1.0 - (1.0 - budget) * t
