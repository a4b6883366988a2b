"""UVC's primal-dual optimiser (Yu et al., ICLR 2022; ECC lineage), vectorised over heads, dims and neurons.

State: counts of removed groups s (L, 2) = [heads, MLP neurons] and r (L, H) = value dims per head, used
through a straight-through ceil; block-skip gate logits alpha (L, 2) = [skip, keep] sampled with
Gumbel-softmax; duals y (L, 2), p (L, H) for "the ceil(s) smallest groups are zero" and z for the budget
R(s, r, g) <= B. One `step` after each weight update: proximal shrinkage of the selected groups, then (after
warm-up) projected SGD on s, r, SGD on alpha every `gating_interval` steps, and dual ascent on y, p, z
(method doc 3.2). Groups are ranked by squared L2 norm of attn.proj columns and fc2 columns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .budget import VitShape, expected_macs, vit_shape

# UVC settings for searches of a few hundred steps (notebooks, benchmark, CPU runs). The reference values suit
# tens of thousands: gates would step a handful of times (gating_interval 50, weight 5e-4); the counts would
# not reach the budget before the search ends (count_lr 0.02), leaving a large blind cut to the final fit;
# and the sparsity duals y, p (ylr 1e-4) grow fast enough to pull removed groups back before the budget is
# met. ylr was chosen on validation accuracy (Fashion-MNIST benchmark, 48 search steps, B = 0.3 and 0.5)
# among 1e-4, 3e-5 and 1e-5. dims_multiple 8 (not a short-run matter: worth trying at any scale) keeps value
# widths hardware-friendly: removing 2-3 of 32 dims per head made the exported attention slower, not faster.
# README, Benchmark, has the numbers.
SHORT_RUN_UVC = {"gating_interval": 5, "glr": 1.0, "gating_weight": 0.1, "z_grad_clip": 1.0, "count_lr": 0.05,
                 "ylr": 3e-5, "dims_multiple": 8}


@dataclass(frozen=True)
class UVCSettings:
    macs_ratio: float = 0.5             # budget B: fraction of dense MACs
    prune: bool = True                  # learn head / dim / neuron counts
    prune_dims: bool = True             # learn r (dims inside heads)
    block_skip: bool = True             # learn Gumbel block-skip gates
    tie_qk: bool = False                # prune q/k dims together with v (beyond the paper; keeps fused SDPA)
    dims_multiple: int = 1              # the final structure keeps value dims per head in multiples of this
                                        # (nearest; 8 or 16: hardware-friendly widths, and a head rounded back to
                                        # the full width runs fused attention); 1: exactly the learned counts
    macs_formula: str = "exact"         # 'exact' or 'reference' (UVC calc_flops with the corrected rho)
    count_lr: float = 0.02              # slr = rlr (reference 0.02)
    count_lr_mode: str = "per_range"    # 'per_range': lr x group count (counts move as fractions); 'reference'
    ylr: float = 1e-4                   # dual lr of y (heads, neurons) and p (dims)
    zlr: float = 1.0                    # dual lr of z (budget)
    zlr_schedule: str = "constant"      # 'constant' (what the reference code really does) or 'increasing' (1,5,9,13,17)
    z_grad_clip: float = 0.5            # clamp of R - B in the count gradient
    init_dual: float = 1e-3             # y, p, z start value
    glr: float = 0.1                    # gate-logit SGD lr (momentum 0.9, wd 1e-4)
    gating_interval: int = 10           # gate step every N iterations, on the mean of the buffered grads (reference 50)
    gating_weight: float = 5e-4         # weight of z * dR/dalpha in the gate gradient
    gate_grad_weighting: str = "uniform"  # 'uniform' or 'linear' (reference quirk: weights 0..interval-1)
    gumbel_tau: float = 0.5
    resource_gates: str = "hard"        # gates inside R: 'hard' (the argmax decision the structure will use,
                                        # gradient of the probability), 'expected' (probabilities), or
                                        # 'sample' (a fresh soft Gumbel sample, as the reference code)
    warmup_gate: float = 1.0            # gate value during warm-up (reference: 0.5 mixes every block)

    def __post_init__(self):
        from .errors import UvclabError
        choices = {"macs_formula": ("exact", "reference"), "count_lr_mode": ("per_range", "reference"),
                   "zlr_schedule": ("constant", "increasing"), "gate_grad_weighting": ("uniform", "linear"),
                   "resource_gates": ("hard", "expected", "sample")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UvclabError(f"uvc.{name}={getattr(self, name)!r} is not one of {allowed}.")
        if self.dims_multiple < 1:
            raise UvclabError(f"uvc.dims_multiple={self.dims_multiple} must be >= 1.")
        if self.gating_interval < 1 or self.gumbel_tau <= 0 or not 0 <= self.warmup_gate <= 1:
            raise UvclabError("uvc.gating_interval must be >= 1, uvc.gumbel_tau > 0, uvc.warmup_gate in [0, 1].")


class UVCPrimalDual:
    """Holds s, r, alpha, y, p, z for one gated model and performs UVC's per-iteration update."""

    def __init__(self, model: torch.nn.Module, settings: UVCSettings, dense_macs: Optional[int] = None,
                 total_epochs: int = 1):
        self.model, self.cfg = model, settings
        self.shape: VitShape = vit_shape(model)
        L, H = self.shape.depth, self.shape.num_heads
        dev = next(model.parameters()).device
        self.dense_macs = dense_macs or int(expected_macs(self.shape, *self._zeros(dev)).item())
        self.s = torch.zeros(L, 2, device=dev)
        self.r = torch.zeros(L, H, device=dev)
        self.alpha = torch.tensor([[-1.0, 1.0]] * L, device=dev, requires_grad=True)
        self.y = torch.full((L, 2), settings.init_dual, device=dev)
        self.p = torch.full((L, H), settings.init_dual, device=dev)
        self.z = torch.tensor(settings.init_dual, device=dev)
        self.s_max = torch.tensor([H - 1 - 1e-8, self.shape.mlp_hidden - 1 - 1e-8], device=dev)
        self.r_max = float(self.shape.head_dim - 1 - 1e-8)
        self.gate_opt = torch.optim.SGD([self.alpha], lr=settings.glr, momentum=0.9, weight_decay=1e-4)
        self.gate_buffer: list[torch.Tensor] = []
        self.total_epochs = total_epochs
        self.global_step = 0
        self.last: dict = {}

    def _zeros(self, dev):
        L, H = self.shape.depth, self.shape.num_heads
        return (torch.zeros(L, device=dev), torch.zeros(L, device=dev), torch.zeros(L, H, device=dev),
                torch.ones(L, H, device=dev))

    # ---- group scores (vectorised) -----------------------------------------------------------------
    def scores(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dim (L, H, Dh), head (L, H), neuron (L, M) squared L2 norms of proj / fc2 input columns."""
        H, Dh = self.shape.num_heads, self.shape.head_dim
        dims = torch.stack([b.attn.proj.weight.detach().float().pow(2).sum(0).view(H, Dh) for b in self.model.blocks])
        neurons = torch.stack([b.mlp.fc2.weight.detach().float().pow(2).sum(0) for b in self.model.blocks])
        return dims, dims.sum(-1), neurons

    # ---- gates ----------------------------------------------------------------------------------
    def gate_sample(self, warmup: bool = False) -> Optional[torch.Tensor]:
        """(L,) keep gates for the next forward: a soft Gumbel sample shared by all ranks (None = open)."""
        if not self.cfg.block_skip:
            return None
        if warmup:
            return None if self.cfg.warmup_gate == 1.0 else torch.full_like(self.alpha[:, 0], self.cfg.warmup_gate)
        gumbels = -torch.empty_like(self.alpha).exponential_().log()
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(gumbels, 0)  # identical noise on every rank by construction
        return F.softmax((self.alpha + gumbels) / self.cfg.gumbel_tau, dim=-1)[:, 1]

    def set_model_gates(self, gates: Optional[torch.Tensor]) -> None:
        for l, blk in enumerate(self.model.blocks):
            blk.block_gate = None if gates is None else gates[l]

    def keep_prob(self) -> torch.Tensor:
        return F.softmax(self.alpha.detach(), dim=-1)[:, 1]

    # ---- resource ---------------------------------------------------------------------------------
    def macs_ratio(self, s: torch.Tensor, r: torch.Tensor, head_scores: torch.Tensor,
                   alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
        """R(ceil s, ceil r, g) / dense, differentiable in s, r (straight-through ceil) and alpha."""
        s_hat, r_hat = ste_ceil(s), ste_ceil(r)
        if not self.cfg.prune_dims:
            r_hat = r_hat * 0
        g = None
        if self.cfg.block_skip:
            a = self.alpha if alpha is None else alpha
            if self.cfg.resource_gates == "sample":
                g = F.gumbel_softmax(a, tau=self.cfg.gumbel_tau, hard=False)[:, 1]
            else:
                g = F.softmax(a, dim=-1)[:, 1]
                if self.cfg.resource_gates == "hard":  # straight-through: value 0/1, gradient of the probability
                    g = g + ((g > 0.5).to(g.dtype) - g).detach()
        kept = selected_mask(head_scores, s_hat[:, 0].detach(), largest=True)
        macs = expected_macs(self.shape, s_hat[:, 0], s_hat[:, 1], r_hat, kept, block_gate=g,
                             formula=self.cfg.macs_formula, tie_qk=self.cfg.tie_qk)
        return macs / self.dense_macs

    def zlr(self, epoch: int) -> float:
        if self.cfg.zlr_schedule == "constant":
            return self.cfg.zlr
        return self.cfg.zlr * (1 + 4 * min(4, int(5 * epoch / max(self.total_epochs, 1))))  # 1,5,9,13,17

    # ---- the update -------------------------------------------------------------------------------
    @torch.no_grad()
    def proximal_step(self, lr: float) -> None:
        """W_g <- W_g / (1 + 2 lr dual) for the ceil(count) smallest groups (heads, dims, neurons)."""
        if not self.cfg.prune:
            return
        dims, heads, neurons = self.scores()
        s_hat, r_hat = torch.ceil(self.s), torch.ceil(self.r)
        col = torch.ones_like(dims)                                            # (L, H, Dh)
        if self.cfg.prune_dims:
            sel_dims = selected_mask(dims, r_hat)                              # (L, H, Dh)
            col = col / (1 + 2 * lr * self.p[..., None] * sel_dims)
        sel_heads = selected_mask(heads, s_hat[:, 0])                          # (L, H)
        col = col / (1 + 2 * lr * self.y[:, 0, None, None] * sel_heads[..., None])
        sel_neurons = selected_mask(neurons, s_hat[:, 1])                      # (L, M)
        neuron_scale = 1 / (1 + 2 * lr * self.y[:, 1, None] * sel_neurons)
        for l, blk in enumerate(self.model.blocks):
            blk.attn.proj.weight.mul_(col[l].reshape(1, -1).to(blk.attn.proj.weight.dtype))
            blk.mlp.fc2.weight.mul_(neuron_scale[l][None].to(blk.mlp.fc2.weight.dtype))

    def step(self, lr: float, epoch: int, warmup: bool) -> dict:
        """The UVC update after the weight step at learning rate `lr`; returns a log record."""
        self.proximal_step(lr)
        self.global_step += 1
        if warmup:
            if self.alpha.grad is not None:
                self.alpha.grad = None
            return self._record(epoch, warmup=True)
        cfg = self.cfg
        dims, heads, neurons = self.scores()
        task_alpha_grad = self.alpha.grad.clone() if self.alpha.grad is not None else torch.zeros_like(self.alpha)
        self.alpha.grad = None
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(task_alpha_grad)
            task_alpha_grad /= dist.get_world_size()

        # gradients of sum(y * LeastSum) + z * clamp(R - B) w.r.t. s, r, alpha
        s = self.s.clone().requires_grad_(cfg.prune)
        r = self.r.clone().requires_grad_(cfg.prune and cfg.prune_dims)
        alpha = self.alpha.detach().clone().requires_grad_(cfg.block_skip)
        R = self.macs_ratio(s, r, heads, alpha)
        # the value is clamped to +-z_grad_clip, the gradient always passes: a plain clamp (or torch 1.7's inclusive
        # one) would freeze every count whenever R starts more than the clip above the budget (B < 0.5)
        d = R - cfg.macs_ratio
        Rc = d - (d - d.clamp(-cfg.z_grad_clip, cfg.z_grad_clip)).detach()
        obj = self.z * Rc
        if cfg.prune:
            s_hat, r_hat = ste_ceil(s), ste_ceil(r)
            obj = obj + (self.y[:, 0] * least_sum(heads, s_hat[:, 0])).sum() \
                + (self.y[:, 1] * least_sum(neurons, s_hat[:, 1])).sum()
            if cfg.prune_dims:
                obj = obj + (self.p * least_sum(dims, r_hat)).sum()
        if obj.requires_grad:
            obj.backward()
        if cfg.prune:
            self.s = projected_sgd(self.s, s.grad, self.s_max, cfg.count_lr, self._count_scale(self.s_max))
            if cfg.prune_dims:
                r_max = torch.full_like(self.r, self.r_max)
                self.r = projected_sgd(self.r, r.grad, r_max, cfg.count_lr, self._count_scale(r_max))
        if cfg.block_skip:
            g = task_alpha_grad + cfg.gating_weight * alpha.grad
            weight = (self.global_step - 1) % cfg.gating_interval if cfg.gate_grad_weighting == "linear" else 1.0
            self.gate_buffer.append(g * weight)
            if self.global_step % cfg.gating_interval == 0:
                self.alpha.grad = torch.stack(self.gate_buffer).mean(0)
                self.gate_opt.step()
                self.alpha.grad = None
                self.gate_buffer = []

        # dual ascent with the new counts
        with torch.no_grad():
            if cfg.prune:
                s_hat = torch.ceil(self.s)
                self.y[:, 0] = (self.y[:, 0] + cfg.ylr * least_sum(heads, s_hat[:, 0])).clamp_min(0)
                self.y[:, 1] = (self.y[:, 1] + cfg.ylr * least_sum(neurons, s_hat[:, 1])).clamp_min(0)
                if cfg.prune_dims:
                    self.p = (self.p + cfg.ylr * least_sum(dims, torch.ceil(self.r))).clamp_min(0)
            R_new = self.macs_ratio(self.s, self.r, heads)
            self.z = (self.z + self.zlr(epoch) * (R_new - cfg.macs_ratio)).clamp_min(0)
        self.sync()
        return self._record(epoch, warmup=False, macs_ratio=float(R_new))

    def _count_scale(self, upper: torch.Tensor) -> Optional[torch.Tensor]:
        """'per_range': step on the kept *fraction* (grad x range, step x range), so that heads, dims and
        neurons move at comparable speed; 'reference': plain SGD on the counts (UVC's slr/rlr)."""
        return upper.ceil() if self.cfg.count_lr_mode == "per_range" else None

    def sync(self) -> None:
        """Make every rank hold rank 0's counts, duals and gates (they already agree; this guarantees it)."""
        if dist.is_available() and dist.is_initialized():
            for t in (self.s, self.r, self.y, self.p, self.z, self.alpha.data):
                dist.broadcast(t, 0)

    def _record(self, epoch: int, warmup: bool, macs_ratio: Optional[float] = None) -> dict:
        if macs_ratio is None:
            with torch.no_grad():
                macs_ratio = float(self.macs_ratio(self.s, self.r, self.scores()[1]))
        self.last = {"step": self.global_step, "epoch": epoch, "warmup": warmup, "macs_ratio": macs_ratio,
                     "budget": self.cfg.macs_ratio, "z": float(self.z),
                     "heads_removed": torch.ceil(self.s[:, 0]).tolist(),
                     "neurons_removed": torch.ceil(self.s[:, 1]).tolist(),
                     "dims_removed": torch.ceil(self.r).tolist(), "keep_prob": self.keep_prob().tolist(),
                     "y_heads": self.y[:, 0].tolist(), "y_neurons": self.y[:, 1].tolist(),
                     "p_mean": self.p.mean(-1).tolist()}
        return self.last

    # ---- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"s": self.s, "r": self.r, "alpha": self.alpha.detach(), "y": self.y, "p": self.p, "z": self.z,
                "gate_opt": self.gate_opt.state_dict(), "gate_buffer": list(self.gate_buffer),
                "global_step": self.global_step}

    def load_state_dict(self, sd: dict) -> None:
        for k in ("s", "r", "y", "p"):
            setattr(self, k, sd[k].clone())
        self.z = sd["z"].clone()
        with torch.no_grad():
            self.alpha.copy_(sd["alpha"])
        self.gate_opt.load_state_dict(sd["gate_opt"])
        self.gate_buffer = [t.clone() for t in sd["gate_buffer"]]
        self.global_step = int(sd["global_step"])


# ---- differentiable building blocks -------------------------------------------------------------------

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
