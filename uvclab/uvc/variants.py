"""The reference code's choices and uvclab's, as small named functions (docs/method.md §3; why uvclab differs:
`uvclab.uvc.settings`). `UVCPrimalDual` picks one per choice from its `UVCSettings` once (`chosen`), so that
its `step` reads as the algorithm. Reference (VITA-Group/UVC, `REFERENCE_UVC`): proj / fc2 column scores,
per-layer duals in the count gradient, plain SGD on counts, dual ascent on z, a constant zlr; its gate
buffer weights 0..interval-1 (`linear`) and a fresh Gumbel sample inside R are further quirks.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from uvclab.uvc.ops import least_sum, nupi_error, per_mac, ste_ceil


def proj_scores(blocks, H: int, Dh: int):
    """dims (L, H, Dh), heads (L, H), neurons (L, M): squared L2 norms of attn.proj / fc2 input columns."""
    dims = torch.stack([b.attn.proj.weight.detach().float().pow(2).sum(0).view(H, Dh) for b in blocks])
    neurons = torch.stack([b.mlp.fc2.weight.detach().float().pow(2).sum(0) for b in blocks])
    return dims, dims.sum(-1), neurons


def group_scores(blocks, H: int, Dh: int):
    """As `proj_scores`, of all a group's weights: q, k, v rows + proj columns of a head, v row + proj column
    of a dim, fc1 row + fc2 column of a neuron (comparable across group types)."""
    dims, heads, neurons = [], [], []
    for b in blocks:
        qkv = b.attn.qkv.weight.detach().float().pow(2).sum(1).view(3, H, Dh)   # (3, H, Dh) row norms
        d = qkv[2] + b.attn.proj.weight.detach().float().pow(2).sum(0).view(H, Dh)
        dims.append(d)
        heads.append(d.sum(-1) + qkv[0].sum(-1) + qkv[1].sum(-1))
        neurons.append(b.mlp.fc1.weight.detach().float().pow(2).sum(1)
                       + b.mlp.fc2.weight.detach().float().pow(2).sum(0))
    return torch.stack(dims), torch.stack(heads), torch.stack(neurons)


def hard_gates(alpha: torch.Tensor, tau: float) -> torch.Tensor:
    """(L, 2) logits -> (L,) gates inside R: the argmax decision (0/1) with the gradient of the probability."""
    g = F.softmax(alpha, dim=-1)[:, 1]
    return g + ((g > 0.5).to(g.dtype) - g).detach()


def _with_least_sums(obj, s, r, yh, yn, pd, dims, heads, neurons, prune_dims: bool):
    """obj + sum(y * LeastSum) over heads, neurons (and dims): the sparsity terms of the counts."""
    s_hat, r_hat = ste_ceil(s), ste_ceil(r)
    obj = obj + (yh * least_sum(heads, s_hat[:, 0])).sum() + (yn * least_sum(neurons, s_hat[:, 1])).sum()
    return obj + (pd * least_sum(dims, r_hat)).sum() if prune_dims else obj


def dual_count_grads(uvc, obj, R, s, r, dims, heads, neurons):
    """Backward of the Lagrangian -> (ds, dr): per-layer duals y_l (p for dims) x the next group's score."""
    st = uvc.state
    _with_least_sums(obj, s, r, st.y[:, 0], st.y[:, 1], st.p, dims, heads, neurons, uvc.cfg.prune_dims).backward()
    return s.grad, r.grad


def importance_count_grads(uvc, obj, R, s, r, dims, heads, neurons):
    """As `dual_count_grads` with one shared multiplier x the next group's score / total score of all heads +
    neurons, per MAC saved: grad / |dR/ds| = importance per MAC - z, so counts settle where that is z."""
    w = 1 / (heads.sum() + neurons.sum()).clamp_min(1e-12)
    obj = _with_least_sums(obj, s, r, w, w, w, dims, heads, neurons, uvc.cfg.prune_dims)
    dR = torch.autograd.grad(R, [s, r] if r.requires_grad else [s], retain_graph=True, allow_unused=True)
    obj.backward()
    sc = uvc.count_scale(uvc.s_max)  # per_range: the step then moves the kept fraction by lr x gap
    s_grad = per_mac(s.grad, dR[0]) / (1 if sc is None else sc)
    if not r.requires_grad:
        return s_grad, r.grad
    return s_grad, per_mac(r.grad, dR[1]) / (1 if sc is None else math.ceil(uvc.r_max))


def chosen(cfg) -> SimpleNamespace:
    """The functions `cfg` (UVCSettings) selects, by role (the reference's first)."""
    return SimpleNamespace(
        scores={"proj": proj_scores, "group": group_scores}[cfg.group_score],
        gates={"sample": lambda a, tau: F.gumbel_softmax(a, tau=tau, hard=False)[:, 1],   # a fresh Gumbel sample
               "expected": lambda a, tau: F.softmax(a, dim=-1)[:, 1], "hard": hard_gates}[cfg.resource_gates],
        count_grads={"dual": dual_count_grads, "importance": importance_count_grads}[cfg.count_grad],
        # plain SGD on the counts (slr / rlr), or on the kept *fraction* (grad x range, step x range): heads,
        # dims and neurons then move at comparable speed
        count_scale={"reference": lambda upper: None, "per_range": lambda upper: upper.ceil()}[cfg.count_lr_mode],
        # one value width per layer: r onto its per-layer mean (what the export realises unpadded)
        tie_dims=(lambda r: r.mean(-1, keepdim=True).expand_as(r).clone()) if cfg.tie_dims else (lambda r: r),
        z_error={"ascent": lambda e, xi, kp, nu, first: (e, xi), "pi": nupi_error}[cfg.dual_update],
        zlr={"constant": lambda zlr, epoch, epochs: zlr,  # 'increasing': x 1, 5, 9, 13, 17 over five stages
             "increasing": lambda zlr, epoch, epochs: zlr * (1 + 4 * min(4, int(5 * epoch / max(epochs, 1))))
             }[cfg.zlr_schedule],
        # the reference weights its gate buffer 0..interval-1
        gate_weight={"uniform": lambda step, n: 1.0, "linear": lambda step, n: (step - 1) % n}[cfg.gate_grad_weighting])
