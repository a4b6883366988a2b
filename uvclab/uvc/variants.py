"""The reference code's choices and uvclab's, as small named functions (docs/method.md §3).

`UVCPrimalDual` picks one function per choice from its `UVCSettings` once, at construction (`chosen`), so
that its `step` reads as the algorithm. The reference (VITA-Group/UVC, `REFERENCE_UVC`): proj / fc2 column
scores, per-layer duals in the count gradient, plain SGD on counts, dual ascent on z, a constant zlr, gate
gradients weighted 0..interval-1 (`linear`), a fresh Gumbel sample inside R; why uvclab differs is in
`uvclab.uvc.settings`.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from uvclab.uvc.ops import least_sum, nupi_error, per_mac, ste_ceil


# ---- group scores: dims (L, H, Dh), heads (L, H), neurons (L, M) -------------------------------------

def proj_scores(blocks, H: int, Dh: int):
    """Squared L2 norms of attn.proj / fc2 input columns (reference)."""
    dims = torch.stack([b.attn.proj.weight.detach().float().pow(2).sum(0).view(H, Dh) for b in blocks])
    neurons = torch.stack([b.mlp.fc2.weight.detach().float().pow(2).sum(0) for b in blocks])
    return dims, dims.sum(-1), neurons


def group_scores(blocks, H: int, Dh: int):
    """Squared L2 norms of all a group's weights: q, k, v rows + proj columns of a head, v row + proj column of
    a dim, fc1 row + fc2 column of a neuron (comparable across group types)."""
    dims, heads, neurons = [], [], []
    for b in blocks:
        qkv = b.attn.qkv.weight.detach().float().pow(2).sum(1).view(3, H, Dh)   # (3, H, Dh) row norms
        d = qkv[2] + b.attn.proj.weight.detach().float().pow(2).sum(0).view(H, Dh)
        dims.append(d)
        heads.append(d.sum(-1) + qkv[0].sum(-1) + qkv[1].sum(-1))
        neurons.append(b.mlp.fc1.weight.detach().float().pow(2).sum(1) + b.mlp.fc2.weight.detach().float().pow(2).sum(0))
    return torch.stack(dims), torch.stack(heads), torch.stack(neurons)


# ---- block gates inside R: (L, 2) logits -> (L,) keep values ------------------------------------------

def hard_gates(alpha: torch.Tensor, tau: float) -> torch.Tensor:
    """The argmax decision the structure will use (0/1), with the gradient of the probability."""
    g = F.softmax(alpha, dim=-1)[:, 1]
    return g + ((g > 0.5).to(g.dtype) - g).detach()


def expected_gates(alpha: torch.Tensor, tau: float) -> torch.Tensor:
    return F.softmax(alpha, dim=-1)[:, 1]


def sampled_gates(alpha: torch.Tensor, tau: float) -> torch.Tensor:
    """A fresh soft Gumbel sample (reference)."""
    return F.gumbel_softmax(alpha, tau=tau, hard=False)[:, 1]


# ---- the count gradient: backward of the Lagrangian, returns (ds, dr) ---------------------------------

def _with_least_sums(obj, s, r, yh, yn, pd, dims, heads, neurons, prune_dims: bool):
    """obj + sum(y * LeastSum) over heads, neurons (and dims): the sparsity terms of the counts."""
    s_hat, r_hat = ste_ceil(s), ste_ceil(r)
    obj = obj + (yh * least_sum(heads, s_hat[:, 0])).sum() + (yn * least_sum(neurons, s_hat[:, 1])).sum()
    return obj + (pd * least_sum(dims, r_hat)).sum() if prune_dims else obj


def dual_count_grads(uvc, obj, R, s, r, dims, heads, neurons):
    """Per-layer duals y_l (p for dims) x the next group's score (reference)."""
    st = uvc.state
    _with_least_sums(obj, s, r, st.y[:, 0], st.y[:, 1], st.p, dims, heads, neurons, uvc.cfg.prune_dims).backward()
    return s.grad, r.grad


def importance_count_grads(uvc, obj, R, s, r, dims, heads, neurons):
    """One shared multiplier x the next group's score / total score of all heads + neurons, per MAC saved:
    grad / |dR/ds| = importance per MAC - z, so counts settle where importance per MAC = z."""
    w = 1 / (heads.sum() + neurons.sum()).clamp_min(1e-12)
    obj = _with_least_sums(obj, s, r, w, w, w, dims, heads, neurons, uvc.cfg.prune_dims)
    dR = torch.autograd.grad(R, [s, r] if r.requires_grad else [s], retain_graph=True, allow_unused=True)
    obj.backward()
    sc = uvc.count_scale(uvc.s_max)  # per_range: the step then moves the kept fraction by lr x gap
    s_grad = per_mac(s.grad, dR[0]) / (1 if sc is None else sc)
    if not r.requires_grad:
        return s_grad, r.grad
    return s_grad, per_mac(r.grad, dR[1]) / (1 if sc is None else math.ceil(uvc.r_max))


# ---- the rest: count step scale, dim tying, the budget dual, gate gradient weights -----------------------

def per_range_scale(upper: torch.Tensor) -> torch.Tensor:
    """Step on the kept *fraction* (grad x range, step x range): heads, dims, neurons move at comparable speed."""
    return upper.ceil()


def no_scale(upper: torch.Tensor) -> None:
    """Plain SGD on the counts (reference slr / rlr)."""
    return None


def tied_dims(r: torch.Tensor) -> torch.Tensor:
    """One value width per layer: r projected onto its per-layer mean (what the export realises unpadded)."""
    return r.mean(-1, keepdim=True).expand_as(r).clone()


def untied_dims(r: torch.Tensor) -> torch.Tensor:
    return r


def ascent_error(e: torch.Tensor, xi: torch.Tensor, kp: float, nu: float, first: bool):
    """Plain dual ascent on z: the violation itself (reference); xi unused."""
    return e, xi


def constant_zlr(zlr: float, epoch: int, total_epochs: int) -> float:
    return zlr


def increasing_zlr(zlr: float, epoch: int, total_epochs: int) -> float:
    return zlr * (1 + 4 * min(4, int(5 * epoch / max(total_epochs, 1))))  # 1, 5, 9, 13, 17


def uniform_weight(step: int, interval: int) -> float:
    return 1.0


def linear_weight(step: int, interval: int) -> float:
    """The reference's gate buffer weights 0..interval-1 (a quirk)."""
    return (step - 1) % interval


def chosen(cfg) -> SimpleNamespace:
    """The functions `cfg` (UVCSettings) selects, by role."""
    return SimpleNamespace(
        scores={"proj": proj_scores, "group": group_scores}[cfg.group_score],
        gates={"hard": hard_gates, "expected": expected_gates, "sample": sampled_gates}[cfg.resource_gates],
        count_grads={"dual": dual_count_grads, "importance": importance_count_grads}[cfg.count_grad],
        count_scale={"per_range": per_range_scale, "reference": no_scale}[cfg.count_lr_mode],
        tie_dims=tied_dims if cfg.tie_dims else untied_dims,
        z_error={"ascent": ascent_error, "pi": nupi_error}[cfg.dual_update],
        zlr={"constant": constant_zlr, "increasing": increasing_zlr}[cfg.zlr_schedule],
        gate_weight={"uniform": uniform_weight, "linear": linear_weight}[cfg.gate_grad_weighting])
