"""UVC's primal-dual optimiser (Yu et al., ICLR 2022; ECC lineage), vectorised over heads, dims and neurons.

State (`UVCState`): counts of removed groups s (L, 2) = [heads, MLP neurons] and r (L, H) = value dims per
head, used through a straight-through ceil; block-skip gate logits alpha (L, 2) = [skip, keep] sampled with
Gumbel-softmax; duals y (L, 2), p (L, H) for "the ceil(s) smallest groups are zero" and z for the budget
R(s, r, g) <= B. One `step` after each weight update: proximal shrinkage of the selected groups, then (after
warm-up) projected SGD on s, r, SGD on alpha every `gating_interval` steps, and dual ascent on y, p, z
(docs/method.md §3.2). Groups are ranked by squared L2 norm of attn.proj columns and fc2 columns.
The resource R is the expected MACs ratio, or with a `LatencyTable` the predicted latency ratio (budget_kind
'latency': the table's piecewise-linear interpolation, differentiable in the counts like the MACs formula).
Under torchrun every rank holds the same state: the few collective calls live in `_Collective`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from uvclab.uvc.importance import FisherScores, budget_target, mix_scores
from uvclab.uvc.ops import least_sum, nupi_error, per_mac, projected_sgd, selected_mask, ste_ceil
from uvclab.uvc.settings import UVCSettings
from uvclab.vit.latency import LatencyTable
from uvclab.vit.macs import DEFAULT_LAYOUT, VitShape, check_budget, expected_macs, vit_shape


@dataclass
class UVCState:
    """Everything the search learns besides the weights; `state_dict` is what checkpoints hold."""
    s: torch.Tensor                     # (L, 2) heads, neurons removed (continuous; used as ceil)
    r: torch.Tensor                     # (L, H) value dims removed per head
    alpha: torch.Tensor                 # (L, 2) gate logits [skip, keep] (a leaf with grad)
    y: torch.Tensor                     # (L, 2) duals of the head / neuron sparsity constraints
    p: torch.Tensor                     # (L, H) duals of the dim sparsity constraints
    z: torch.Tensor                     # () dual of the budget
    xi: torch.Tensor                    # () 'pi' controller: EMA of the budget violation
    global_step: int = 0                # every step, warm-up included
    search_step: int = 0                # steps after warm-up (the budget schedule's clock)
    gate_buffer: list = field(default_factory=list)   # gate gradients since the last gate step

    TENSORS = ("s", "r", "alpha", "y", "p", "z", "xi")

    @classmethod
    def initial(cls, L: int, H: int, init_dual: float, device) -> "UVCState":
        return cls(s=torch.zeros(L, 2, device=device), r=torch.zeros(L, H, device=device),
                   alpha=torch.tensor([[-1.0, 1.0]] * L, device=device, requires_grad=True),
                   y=torch.full((L, 2), init_dual, device=device), p=torch.full((L, H), init_dual, device=device),
                   z=torch.tensor(init_dual, device=device), xi=torch.tensor(0.0, device=device))

    def state_dict(self) -> dict:
        return {**{k: getattr(self, k).detach().clone() for k in self.TENSORS}, "global_step": self.global_step,
                "search_step": self.search_step, "gate_buffer": [t.clone() for t in self.gate_buffer]}

    def load_state_dict(self, sd: dict) -> None:
        for k in self.TENSORS:
            if k == "alpha":
                with torch.no_grad():
                    self.alpha.copy_(sd["alpha"])
            else:
                setattr(self, k, sd[k].clone().to(getattr(self, k).device))
        self.global_step, self.search_step = int(sd["global_step"]), int(sd["search_step"])
        self.gate_buffer = [t.clone() for t in sd["gate_buffer"]]

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, k).detach() if k == "alpha" else getattr(self, k) for k in self.TENSORS]


class _Collective:
    """The optimiser's only torch.distributed calls (no-ops in a single process)."""

    @staticmethod
    def active() -> bool:
        return dist.is_available() and dist.is_initialized()

    @classmethod
    def broadcast_(cls, *tensors: torch.Tensor) -> None:
        """Make every rank hold rank 0's values (Gumbel noise before use; the state after each step)."""
        if cls.active():
            for t in tensors:
                dist.broadcast(t, 0)

    @classmethod
    def mean_(cls, t: torch.Tensor) -> torch.Tensor:
        if cls.active():
            dist.all_reduce(t)
            t /= dist.get_world_size()
        return t


class UVCPrimalDual:
    """Holds a `UVCState` for one gated model and performs UVC's per-iteration update at budget `budget`."""

    def __init__(self, model: torch.nn.Module, settings: UVCSettings, budget: float = 0.5,
                 dense_macs: Optional[int] = None, total_epochs: int = 1, total_steps: Optional[int] = None,
                 latency: Optional[LatencyTable] = None, layout: str = DEFAULT_LAYOUT):
        self.model, self.cfg, self.budget = model, settings, check_budget(budget)
        self.shape: VitShape = vit_shape(model)
        self.latency, self.layout = latency, layout       # latency table: R is predicted latency / dense
        self.budget_kind = "macs" if latency is None else "latency"
        if latency is not None:
            latency.check_shape(self.shape)
        L, H = self.shape.depth, self.shape.num_heads
        dev = next(model.parameters()).device
        self.dense_macs = dense_macs or int(expected_macs(self.shape, *self._zeros(dev)).item())
        self.dense_ms = None if latency is None else float(latency.expected_latency(self.shape, *self._zeros(dev)))
        self.state = UVCState.initial(L, H, settings.init_dual, dev)
        self.s_max = torch.tensor([H - 1 - 1e-8, self.shape.mlp_hidden - 1 - 1e-8], device=dev)
        self.r_max = float(self.shape.head_dim - 1 - 1e-8)
        self.gate_opt = torch.optim.SGD([self.state.alpha], lr=settings.glr, momentum=0.9, weight_decay=1e-4)
        self.total_epochs = total_epochs
        self.total_steps = total_steps          # search steps after warm-up (the budget schedule's length)
        self.last: dict = {}
        # issue 25: loss-aware group scores ('fisher*'), accumulated from the task gradients in every step
        self.fisher = (FisherScores(model.blocks, H, self.shape.head_dim, settings.score_ema)
                       if settings.group_score.startswith("fisher") else None)

    # the state's tensors, by their paper names
    s = property(lambda self: self.state.s, lambda self, v: setattr(self.state, "s", v))
    r = property(lambda self: self.state.r, lambda self, v: setattr(self.state, "r", v))
    y = property(lambda self: self.state.y, lambda self, v: setattr(self.state, "y", v))
    p = property(lambda self: self.state.p, lambda self, v: setattr(self.state, "p", v))
    z = property(lambda self: self.state.z, lambda self, v: setattr(self.state, "z", v))
    alpha = property(lambda self: self.state.alpha)
    global_step = property(lambda self: self.state.global_step)

    def _zeros(self, dev):
        L, H = self.shape.depth, self.shape.num_heads
        return (torch.zeros(L, device=dev), torch.zeros(L, device=dev), torch.zeros(L, H, device=dev),
                torch.ones(L, H, device=dev))

    # ---- group scores (vectorised) -----------------------------------------------------------------
    def scores(self, kind: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dim (L, H, Dh), head (L, H), neuron (L, M) squared L2 norms of proj / fc2 input columns ('proj'), or
        of all the group's weights ('group'); 'fisher*': the loss-aware scores of `uvc.importance` (the
        'group' norms until the first batch's gradients have been seen). kind: uvc.group_score by default."""
        H, Dh = self.shape.num_heads, self.shape.head_dim
        kind = kind or self.cfg.group_score
        if kind.startswith("fisher"):
            fisher, norm = self.fisher.scores(), self.scores("group")
            if fisher is None:
                return norm
            return fisher if kind == "fisher" else mix_scores(fisher, norm)
        if kind == "group":
            dims, heads, neurons = [], [], []
            for b in self.model.blocks:
                qkv = b.attn.qkv.weight.detach().float().pow(2).sum(1).view(3, H, Dh)   # (3, H, Dh) row norms
                d = qkv[2] + b.attn.proj.weight.detach().float().pow(2).sum(0).view(H, Dh)
                dims.append(d)
                heads.append(d.sum(-1) + qkv[0].sum(-1) + qkv[1].sum(-1))
                neurons.append(b.mlp.fc1.weight.detach().float().pow(2).sum(1)
                               + b.mlp.fc2.weight.detach().float().pow(2).sum(0))
            return torch.stack(dims), torch.stack(heads), torch.stack(neurons)
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
        _Collective.broadcast_(gumbels)  # identical noise on every rank by construction
        return F.softmax((self.alpha + gumbels) / self.cfg.gumbel_tau, dim=-1)[:, 1]

    def set_model_gates(self, gates: Optional[torch.Tensor]) -> None:
        for l, blk in enumerate(self.model.blocks):
            blk.block_gate = None if gates is None else gates[l]

    def keep_prob(self) -> torch.Tensor:
        return F.softmax(self.alpha.detach(), dim=-1)[:, 1]

    def keep_blocks(self) -> torch.Tensor:
        """(L,) bool: the argmax skip decisions (all True without block skipping)."""
        if not self.cfg.block_skip:
            return torch.ones(self.shape.depth, dtype=torch.bool)
        return (self.alpha[:, 1] > self.alpha[:, 0]).detach().cpu()

    # ---- resource ---------------------------------------------------------------------------------
    def expected_macs_ratio(self, s: torch.Tensor, r: torch.Tensor, head_scores: torch.Tensor,
                            alpha: Optional[torch.Tensor] = None, kind: Optional[str] = None) -> torch.Tensor:
        """R(ceil s, ceil r, g) / dense, differentiable in s, r (straight-through ceil) and alpha. R is the
        resource of `kind` (default: the budget's): expected MACs, or the latency table's predicted ms."""
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
        if (kind or self.budget_kind) == "latency":
            ms = self.latency.expected_latency(self.shape, s_hat[:, 0], s_hat[:, 1], r_hat, kept, block_gate=g,
                                               tie_qk=self.cfg.tie_qk, layout=self.layout)
            return ms / self.dense_ms
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
        head_scale = 1 / (1 + 2 * lr * self.y[:, 0, None, None] * sel_heads[..., None])  # (L, H, 1)
        col = col * head_scale
        sel_neurons = selected_mask(neurons, s_hat[:, 1])                      # (L, M)
        neuron_scale = 1 / (1 + 2 * lr * self.y[:, 1, None] * sel_neurons)
        whole = self.cfg.group_score != "proj"  # shrink every weight of the group, not only the proj / fc2 side
        for l, blk in enumerate(self.model.blocks):
            blk.attn.proj.weight.mul_(col[l].reshape(1, -1).to(blk.attn.proj.weight.dtype))
            blk.mlp.fc2.weight.mul_(neuron_scale[l][None].to(blk.mlp.fc2.weight.dtype))
            if whole:
                qk = head_scale[l].expand_as(col[l]).reshape(-1)               # q, k rows: the head's factor
                rows = torch.cat([qk, qk, col[l].reshape(-1)])                 # v rows: head and dim factors
                blk.attn.qkv.weight.mul_(rows[:, None].to(blk.attn.qkv.weight.dtype))
                blk.mlp.fc1.weight.mul_(neuron_scale[l][:, None].to(blk.mlp.fc1.weight.dtype))

    def step(self, lr: float, epoch: int, warmup: bool) -> dict:
        """The UVC update after the weight step at learning rate `lr`; returns a log record."""
        st = self.state
        if self.fisher is not None:  # the task gradients of this batch are still in .grad (before the prox step)
            self.fisher.update(_Collective.mean_)
        self.proximal_step(lr)
        st.global_step += 1
        if warmup:
            st.alpha.grad = None
            return self._record(epoch, warmup=True)
        cfg = self.cfg
        dims, heads, neurons = self.scores()
        task_alpha_grad = st.alpha.grad.clone() if st.alpha.grad is not None else torch.zeros_like(st.alpha)
        st.alpha.grad = None
        _Collective.mean_(task_alpha_grad)

        # gradients of sum(y * LeastSum) + z * clamp(R - B) w.r.t. s, r, alpha
        s = st.s.clone().requires_grad_(cfg.prune)
        r = st.r.clone().requires_grad_(cfg.prune and cfg.prune_dims)
        alpha = st.alpha.detach().clone().requires_grad_(cfg.block_skip)
        R = self.expected_macs_ratio(s, r, heads, alpha)
        # the value is clamped to +-z_grad_clip, the gradient always passes: a plain clamp (or torch 1.7's inclusive
        # one) would freeze every count whenever R starts more than the clip above the budget (B < 0.5)
        target = self.target()
        st.search_step += 1
        d = R - target
        Rc = d - (d - d.clamp(-cfg.z_grad_clip, cfg.z_grad_clip)).detach()
        obj = st.z * Rc
        if cfg.prune:
            s_hat, r_hat = ste_ceil(s), ste_ceil(r)
            if cfg.count_grad == "importance":  # one shared multiplier on scores normalised across group types
                yh = yn = pd = 1 / (heads.sum() + neurons.sum()).clamp_min(1e-12)
            else:
                yh, yn, pd = st.y[:, 0], st.y[:, 1], st.p
            obj = obj + (yh * least_sum(heads, s_hat[:, 0])).sum() + (yn * least_sum(neurons, s_hat[:, 1])).sum()
            if cfg.prune_dims:
                obj = obj + (pd * least_sum(dims, r_hat)).sum()
            if cfg.count_grad == "importance":  # MACs saved by the next group, for the per-MAC step
                dR = torch.autograd.grad(R, [s, r] if r.requires_grad else [s], retain_graph=True, allow_unused=True)
        if obj.requires_grad:
            obj.backward()
        if cfg.prune:
            s_grad, r_grad = s.grad, r.grad
            if cfg.count_grad == "importance":  # per MAC: grad / |dR/ds| = importance per MAC - z
                sc = self._count_scale(self.s_max)  # per_range: the step then moves the kept fraction by lr x gap
                s_grad = per_mac(s_grad, dR[0]) / (1 if sc is None else sc)
                if r.requires_grad:
                    r_grad = per_mac(r_grad, dR[1]) / (1 if sc is None else math.ceil(self.r_max))
            st.s = projected_sgd(st.s, s_grad, self.s_max, cfg.count_lr, self._count_scale(self.s_max))
            if cfg.prune_dims:
                r_max = torch.full_like(st.r, self.r_max)
                st.r = projected_sgd(st.r, r_grad, r_max, cfg.count_lr, self._count_scale(r_max))
                if cfg.tie_dims:  # one value width per layer: what the export can realise without padding
                    st.r = st.r.mean(-1, keepdim=True).expand_as(st.r).clone()
        if cfg.block_skip:
            g = task_alpha_grad + cfg.gating_weight * alpha.grad
            weight = (st.global_step - 1) % cfg.gating_interval if cfg.gate_grad_weighting == "linear" else 1.0
            st.gate_buffer.append(g * weight)
            if st.global_step % cfg.gating_interval == 0:
                st.alpha.grad = torch.stack(st.gate_buffer).mean(0)
                self.gate_opt.step()
                st.alpha.grad = None
                st.gate_buffer = []

        # dual ascent with the new counts
        with torch.no_grad():
            if cfg.prune:
                s_hat = torch.ceil(st.s)
                st.y[:, 0] = (st.y[:, 0] + cfg.ylr * least_sum(heads, s_hat[:, 0])).clamp_min(0)
                st.y[:, 1] = (st.y[:, 1] + cfg.ylr * least_sum(neurons, s_hat[:, 1])).clamp_min(0)
                if cfg.prune_dims:
                    st.p = (st.p + cfg.ylr * least_sum(dims, torch.ceil(st.r))).clamp_min(0)
            R_new = self.expected_macs_ratio(st.s, st.r, heads)
            e = R_new - target
            if cfg.dual_update == "pi":
                e, st.xi = nupi_error(e, st.xi, cfg.z_kp, cfg.z_nu, first=st.search_step == 1)
            st.z = (st.z + self.zlr(epoch) * e).clamp_min(0)
        _Collective.broadcast_(*st.tensors())  # every rank already agrees; this guarantees it
        return self._record(epoch, warmup=False, R=float(R_new))

    def target(self) -> float:
        """The budget the counts chase at this search step: B, or the linear walk 1.0 -> B (budget_schedule)."""
        return budget_target(self.state.search_step, self.total_steps, self.budget, self.cfg.budget_schedule,
                             self.cfg.budget_curve)

    def _count_scale(self, upper: torch.Tensor) -> Optional[torch.Tensor]:
        """'per_range': step on the kept *fraction* (grad x range, step x range), so that heads, dims and
        neurons move at comparable speed; 'reference': plain SGD on the counts (UVC's slr/rlr)."""
        return upper.ceil() if self.cfg.count_lr_mode == "per_range" else None

    def _record(self, epoch: int, warmup: bool, R: Optional[float] = None) -> dict:
        """The log record; R is the constrained resource ratio (`expected_macs_ratio` or, with a latency budget,
        `expected_latency_ratio`; both are logged then)."""
        with torch.no_grad():  # the group scores are only needed for a ratio not already known
            heads = self.scores()[1] if R is None or self.budget_kind != "macs" else None
            if R is None:
                R = float(self.expected_macs_ratio(self.s, self.r, heads))
            macs = R if self.budget_kind == "macs" else float(self.expected_macs_ratio(self.s, self.r, heads,
                                                                                        kind="macs"))
        lat = {} if self.budget_kind == "macs" else {"expected_latency_ratio": R}
        self.last = {"step": self.global_step, "epoch": epoch, "warmup": warmup, "R": R,
                     "budget_kind": self.budget_kind,
                     "expected_macs_ratio": macs, **lat, "budget": self.budget, "target": self.target(),
                     "z": float(self.z),
                     "heads_removed": torch.ceil(self.s[:, 0]).tolist(),
                     "neurons_removed": torch.ceil(self.s[:, 1]).tolist(),
                     "dims_removed": torch.ceil(self.r).tolist(), "keep_prob": self.keep_prob().tolist(),
                     "y_heads": self.y[:, 0].tolist(), "y_neurons": self.y[:, 1].tolist(),
                     "p_mean": self.p.mean(-1).tolist()}
        return self.last

    # ---- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        sd = {**self.state.state_dict(), "gate_opt": self.gate_opt.state_dict()}
        return sd if self.fisher is None else {**sd, "fisher": self.fisher.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.state.load_state_dict(sd)
        self.gate_opt.load_state_dict(sd["gate_opt"])
        if self.fisher is not None:
            self.fisher.load_state_dict(sd["fisher"])
