"""UVC's building blocks (docs/method.md §1.3): straight-through ceil, the "sum of the k smallest group scores"
with its next-group gradient, selection masks, box-projected SGD on counts; then the reference code's choices
and uvclab's as named functions (§3; why they differ: `uvclab.uvc.settings`), one per role picked once by
`chosen`. Reference (VITA-Group/UVC, `REFERENCE_UVC`): proj / fc2 column scores, per-layer duals in the count
gradient, plain SGD on counts, dual ascent on z, constant zlr, gate weights 0..interval-1, Gumbel samples in R."""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F


def ste_ceil(x: torch.Tensor) -> torch.Tensor:
    """ceil(x) forward, identity backward (straight-through)."""
    return x + (torch.ceil(x) - x).detach()


class _LeastSum(torch.autograd.Function):
    """Sum of the k smallest scores per row; d/dk = the (k+1)-th smallest score (the next group's cost)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        srt = scores.sort(dim=-1).values                                   # (..., n)
        csum = F.pad(srt.cumsum(-1), (1, 0))                               # (..., n+1): sums of 0..n smallest
        ki = k.detach().round().long().clamp(0, srt.shape[-1])
        ctx.save_for_backward(srt, ki)
        return csum.gather(-1, ki[..., None]).squeeze(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        srt, ki = ctx.saved_tensors
        nxt = srt.gather(-1, ki.clamp(max=srt.shape[-1] - 1)[..., None]).squeeze(-1)
        return None, grad * nxt


def least_sum(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """scores (..., n), integer-valued k (...) -> (...). No gradient to the scores (the prox step handles W)."""
    return _LeastSum.apply(scores.detach(), k)


def selected_mask(scores: torch.Tensor, k: torch.Tensor, largest: bool = False) -> torch.Tensor:
    """0/1 mask (..., n) of the k smallest (or, with largest=True, all but the k smallest) entries per row."""
    rank = scores.argsort(dim=-1).argsort(dim=-1)                          # rank 0 = smallest
    sel = (rank < k.detach()[..., None]).to(scores.dtype)
    return 1 - sel if largest else sel


def projected_sgd(x: torch.Tensor, grad: Optional[torch.Tensor], upper: torch.Tensor, lr: float,
                  scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """UVC's box-projected SGD on counts: blocked directions at the bounds, inf-norm clip 1, clamp to [0, upper].

    With `scale` (the group counts), the step is taken on x / scale: grad * scale, clipped, then x moves by
    lr * scale * clipped grad."""
    if grad is None:
        return x
    g = grad.clone() if scale is None else grad * scale
    at_top, at_zero = x >= upper, x <= 0
    g = torch.where(at_top & (g < 0), torch.zeros_like(g), g)
    g = torch.where(at_zero & (g > 0), torch.zeros_like(g), g)
    norm = g.abs().max()
    if norm > 1:
        g = g / norm
    new = (x - lr * (g if scale is None else g * scale)).clamp_min(0)
    return torch.minimum(new, upper.expand_as(new) if upper.dim() else upper)


def clipped(d: torch.Tensor, clip: float) -> torch.Tensor:
    """d's value clamped to +-clip, its gradient always passing: a plain clamp (or torch 1.7's inclusive one)
    would freeze every count whenever R starts more than the clip above the budget (B < 0.5)."""
    return d - (d - d.clamp(-clip, clip)).detach()


def per_mac(grad: Optional[torch.Tensor], dR: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """grad / |dR| elementwise (0 where the count saves no MACs): a count step in units of the price z."""
    if grad is None or dR is None:
        return grad
    mag = dR.abs()
    return torch.where(mag > 0, grad / mag.clamp_min(1e-30), torch.zeros_like(grad))


def nupi_error(e: torch.Tensor, xi: torch.Tensor, kp: float, nu: float, first: bool):
    """nuPI (Sohrabi et al., ICML 2024) for a dual ascended as  lambda <- lambda + lr * e_pi:
    e_pi = e + kp (1 - nu) (e - xi), then xi <- nu xi + (1 - nu) e. As cooper-optim's `nuPI` (Ki = 1, SGD
    initialisation): the first step is plain gradient ascent and leaves xi at 0. Returns (e_pi, new xi)."""
    if first:
        return e, torch.zeros_like(xi)
    return e + kp * (1 - nu) * (e - xi), nu * xi + (1 - nu) * e


# ---- the reference code's choices and uvclab's, by role (`chosen` picks one of each) ----------------

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
    sc = uvc.fn.count_scale(uvc.s_max)  # per_range: the step then moves the kept fraction by lr x gap
    s_grad = per_mac(s.grad, dR[0]) / (1 if sc is None else sc)
    if not r.requires_grad:
        return s_grad, r.grad
    return s_grad, per_mac(r.grad, dR[1]) / (1 if sc is None else math.ceil(uvc.r_max))


def chosen(cfg) -> SimpleNamespace:
    """The functions `cfg` (UVCSettings) selects, by role (the reference's first)."""
    return SimpleNamespace(
        scores={"proj": proj_scores, "group": group_scores, "fisher": group_scores,  # fisher*: norms until the
                "fisher_norm": group_scores}[cfg.group_score],                       # first gradients are seen
        gates={"sample": lambda a, tau: F.gumbel_softmax(a, tau=tau, hard=False)[:, 1],   # a fresh Gumbel sample
               "expected": lambda a, tau: F.softmax(a, dim=-1)[:, 1], "hard": hard_gates}[cfg.resource_gates],
        count_grads={"dual": dual_count_grads, "importance": importance_count_grads}[cfg.count_grad],
        # plain SGD on the counts (slr / rlr), or on the kept *fraction*: all group types move at comparable speed
        count_scale={"reference": lambda upper: None, "per_range": lambda upper: upper.ceil()}[cfg.count_lr_mode],
        # one value width per layer: r onto its per-layer mean (what the export realises unpadded)
        tie_dims=(lambda r: r.mean(-1, keepdim=True).expand_as(r).clone()) if cfg.tie_dims else (lambda r: r),
        z_error={"ascent": lambda e, xi, kp, nu, first: (e, xi), "pi": nupi_error}[cfg.dual_update],
        zlr={"constant": lambda zlr, epoch, epochs: zlr,  # 'increasing': x 1, 5, 9, 13, 17 over five stages
             "increasing": lambda zlr, epoch, epochs: zlr * (1 + 4 * min(4, int(5 * epoch / max(epochs, 1))))
             }[cfg.zlr_schedule],
        # the reference weights its gate buffer 0..interval-1
        gate_weight={"uniform": lambda step, n: 1.0, "linear": lambda step, n: (step - 1) % n}[cfg.gate_grad_weighting])
