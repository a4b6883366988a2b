"""UVC's primal-dual optimiser (Yu et al., ICLR 2022; ECC lineage), vectorised over heads, dims and neurons.

State (`UVCState`): counts of removed groups s (L, 2) = [heads, MLP neurons] and r (L, H) = value dims per
head, used through a straight-through ceil; block-skip gate logits alpha (L, 2) = [skip, keep] sampled with
Gumbel-softmax; duals y (L, 2), p (L, H) for "the ceil(s) smallest groups are zero" and z for the budget
R(s, r, g) <= B. One `step` after each weight update: proximal shrinkage of the selected groups, then (after
warm-up) projected SGD on s, r, SGD on alpha every `gating_interval` steps, and dual ascent on y, p, z
(docs/method.md §3.2). The reference code's choices and uvclab's are functions of `uvclab.uvc.ops`, picked
once at construction.
The resource R is the expected MACs ratio, or with a `LatencyTable` the predicted latency ratio (budget_kind
'latency': the table's piecewise-linear interpolation, differentiable in the counts like the MACs formula).
Under torchrun every rank holds the same state (`uvclab.ranks`: broadcast_, mean_).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from uvclab.errors import UvclabError
from uvclab.prune.baselines import macs_budget_for_latency
from uvclab.ranks import broadcast_, mean_
from uvclab.uvc.ops import chosen, clipped, least_sum, projected_sgd, selected_mask, ste_ceil
from uvclab.uvc.importance import FisherScores, budget_target, mix_scores
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


class UVCPrimalDual:
    """Holds a `UVCState` for one gated model and performs UVC's per-iteration update at budget `budget`."""

    def __init__(self, model: torch.nn.Module, settings: UVCSettings, budget: float = 0.5,
                 dense_macs: Optional[int] = None, total_epochs: int = 1, total_steps: Optional[int] = None,
                 latency: Optional[LatencyTable] = None, layout: str = DEFAULT_LAYOUT):
        if settings.prune_dims == "auto":
            raise UvclabError("uvc.prune_dims=auto is decided from a latency table before the search: "
                              "settings, _ = uvclab.uvc.resolve_prune_dims(settings, table, shape, layout).")
        self.model, self.cfg, self.layout = model, settings, layout
        self.shape: VitShape = vit_shape(model)
        self.fn = chosen(settings)                 # the reference's or uvclab's function for each choice
        L, H = self.shape.depth, self.shape.num_heads
        dev = next(model.parameters()).device
        self.dense_macs = dense_macs or int(expected_macs(self.shape, *self._zeros(dev)).item())
        self.set_budget(budget, latency)
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

    @classmethod
    def for_search(cls, model: torch.nn.Module, settings: UVCSettings, budget: float,
                   latency: Optional[LatencyTable] = None, layout: str = DEFAULT_LAYOUT, **kw) -> "UVCPrimalDual":
        """The optimiser of a run's search at budget B: with a latency table and `search_resource: macs` on MACs,
        to the MACs ratio of the magnitude cut the table predicts at B (`final_structure` refits to latency)."""
        if latency is not None and settings.search_resource == "macs":
            return cls(model, settings, macs_budget_for_latency(model, latency, budget, layout), layout=layout, **kw)
        return cls(model, settings, budget, latency=latency, layout=layout, **kw)

    def set_budget(self, budget: float, latency: Optional[LatencyTable] = None) -> None:
        """Budget B of R <= B: expected MACs / dense (latency None) or the table's predicted ms / dense."""
        self.budget, self.latency = check_budget(budget), latency
        self.budget_kind = "macs" if latency is None else "latency"
        if latency is not None:
            latency.check_shape(self.shape)
        zeros = self._zeros(next(self.model.parameters()).device)
        self.dense_ms = None if latency is None else float(latency.expected_latency(self.shape, *zeros))

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
    def scores(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dim (L, H, Dh), head (L, H), neuron (L, M) scores (`uvc.group_score`): weight norms, or 'fisher*' the
        loss-aware scores of `uvc.importance` (the 'group' norms until the first batch's gradients are seen)."""
        norm = self.fn.scores(self.model.blocks, self.shape.num_heads, self.shape.head_dim)
        fisher = None if self.fisher is None else self.fisher.scores()
        if fisher is None:
            return norm
        return fisher if self.cfg.group_score == "fisher" else mix_scores(fisher, norm)

    # ---- gates ----------------------------------------------------------------------------------
    def gate_sample(self, warmup: bool = False) -> Optional[torch.Tensor]:
        """(L,) keep gates for the next forward: a soft Gumbel sample shared by all ranks (None = open)."""
        if not self.cfg.block_skip:
            return None
        if warmup:
            return None if self.cfg.warmup_gate == 1.0 else torch.full_like(self.alpha[:, 0], self.cfg.warmup_gate)
        gumbels = -torch.empty_like(self.alpha).exponential_().log()
        broadcast_(gumbels)  # identical noise on every rank by construction
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
        if self.cfg.block_skip:  # the gates R sees (`uvc.resource_gates`)
            g = self.fn.gates(self.alpha if alpha is None else alpha, self.cfg.gumbel_tau)
        kept = selected_mask(head_scores, s_hat[:, 0].detach(), largest=True)
        if (kind or self.budget_kind) == "latency":
            ms = self.latency.expected_latency(self.shape, s_hat[:, 0], s_hat[:, 1], r_hat, kept, block_gate=g,
                                               tie_qk=self.cfg.tie_qk, layout=self.layout)
            return ms / self.dense_ms
        macs = expected_macs(self.shape, s_hat[:, 0], s_hat[:, 1], r_hat, kept, block_gate=g,
                             formula=self.cfg.macs_formula, tie_qk=self.cfg.tie_qk)
        return macs / self.dense_macs

    def zlr(self, epoch: int) -> float:
        return self.fn.zlr(self.cfg.zlr, epoch, self.total_epochs)

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
        """The UVC update after the primal (weight) step at learning rate `lr`; returns a log record."""
        st, cfg = self.state, self.cfg
        if self.fisher is not None:  # this batch's task gradients are still in .grad (before the prox step)
            self.fisher.update(mean_)
        self.proximal_step(lr)                              # prox: shrink the ceil(count) smallest groups
        st.global_step += 1
        if warmup:
            st.alpha.grad = None
            return self._record(epoch, warmup=True)
        dims, heads, neurons = self.scores()
        task_alpha_grad = st.alpha.grad.clone() if st.alpha.grad is not None else torch.zeros_like(st.alpha)
        st.alpha.grad = None
        mean_(task_alpha_grad)  # the loss's gradient on the gate logits (forward with sampled gates), over ranks
        # count step: gradients of sum(y * LeastSum) + z * clip(R - target) w.r.t. s, r, alpha
        s = st.s.clone().requires_grad_(cfg.prune)
        r = st.r.clone().requires_grad_(cfg.prune and cfg.prune_dims)
        alpha = st.alpha.detach().clone().requires_grad_(cfg.block_skip)
        R = self.expected_macs_ratio(s, r, heads, alpha)
        target = self.target()
        st.search_step += 1
        budget_term = st.z * clipped(R - target, cfg.z_grad_clip)
        self._count_step(budget_term, R, s, r, dims, heads, neurons)
        if cfg.block_skip:  # gate step: SGD every `gating_interval` steps on the mean of the buffered gradients
            g = task_alpha_grad + cfg.gating_weight * alpha.grad
            st.gate_buffer.append(g * self.fn.gate_weight(st.global_step, cfg.gating_interval))
            if st.global_step % cfg.gating_interval == 0:
                st.alpha.grad = torch.stack(st.gate_buffer).mean(0)
                self.gate_opt.step()
                st.alpha.grad = None
                st.gate_buffer = []
        R_new = self._dual_step(dims, heads, neurons, target, epoch)  # dual updates with the new counts
        broadcast_(*st.tensors())  # every rank already agrees; this guarantees it
        return self._record(epoch, warmup=False, R=float(R_new))

    def _count_step(self, budget_term, R, s, r, dims, heads, neurons) -> None:
        """Backward of the Lagrangian (`uvc.count_grad`), then projected SGD on s and r."""
        st, cfg = self.state, self.cfg
        if not cfg.prune:  # the budget term still reaches the gates
            if budget_term.requires_grad:
                budget_term.backward()
            return
        s_grad, r_grad = self.fn.count_grads(self, budget_term, R, s, r, dims, heads, neurons)
        st.s = projected_sgd(st.s, s_grad, self.s_max, cfg.count_lr, self.fn.count_scale(self.s_max))
        if cfg.prune_dims:
            r_max = torch.full_like(st.r, self.r_max)
            st.r = self.fn.tie_dims(projected_sgd(st.r, r_grad, r_max, cfg.count_lr, self.fn.count_scale(r_max)))

    @torch.no_grad()
    def _dual_step(self, dims, heads, neurons, target: float, epoch: int) -> torch.Tensor:
        """Dual ascent on y, p (sparsity) and z (budget, `uvc.dual_update`); returns the new R."""
        st, cfg = self.state, self.cfg
        if cfg.prune:
            s_hat = torch.ceil(st.s)
            st.y[:, 0] = (st.y[:, 0] + cfg.ylr * least_sum(heads, s_hat[:, 0])).clamp_min(0)
            st.y[:, 1] = (st.y[:, 1] + cfg.ylr * least_sum(neurons, s_hat[:, 1])).clamp_min(0)
            if cfg.prune_dims:
                st.p = (st.p + cfg.ylr * least_sum(dims, torch.ceil(st.r))).clamp_min(0)
        R = self.expected_macs_ratio(st.s, st.r, heads)
        e, st.xi = self.fn.z_error(R - target, st.xi, cfg.z_kp, cfg.z_nu, first=st.search_step == 1)
        st.z = (st.z + self.zlr(epoch) * e).clamp_min(0)
        return R

    def target(self) -> float:
        """The budget the counts chase at this search step: B, or the linear walk 1.0 -> B (budget_schedule)."""
        return budget_target(self.state.search_step, self.total_steps, self.budget, self.cfg.budget_schedule,
                             self.cfg.budget_curve)

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
