"""UVC's differentiable building blocks (docs/method.md §1.3): straight-through ceil, the "sum of the k
smallest group scores" with its next-group gradient, selection masks, and box-projected SGD on counts."""
from __future__ import annotations

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
