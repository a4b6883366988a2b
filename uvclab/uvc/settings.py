"""UVC settings: one frozen dataclass (config section `uvc.`), every reference-code quirk a named field
(docs/method.md), and how the final structure is chosen (skip candidates, a latency budget's feedback)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from uvclab.errors import UvclabError, at_least_one, one_of

# UVC settings for searches of a few hundred steps (notebooks, benchmark, CPU runs). The reference gate settings
# suit tens of thousands of steps: gates would step a handful of times (gating_interval 50, weight 5e-4).
# ylr 3e-5 keeps the prox shrinkage of the selected groups gentle (chosen on validation among 1e-4, 3e-5, 1e-5).
# dims_multiple 8 keeps value widths hardware-friendly: 2-3 pruned dims of 32 made the exported attention slower.
# The budget schedule stays at its default 0.5: 0.25 brought R closer to B = 0.3 in ~50 steps but overshot and
# stuck below B at 0.5 and 0.7 (validation before fine-tuning 85.7 vs 86.6 % at 0.5). README, "The search".
SHORT_RUN_UVC = {"gating_interval": 5, "glr": 1.0, "gating_weight": 0.1, "ylr": 3e-5, "dims_multiple": 8}

# The reference optimiser (VITA-Group/UVC, docs/method.md §3): per-layer sparsity duals in the count gradient,
# proj / fc2 column scores, a constant budget, plain dual ascent on z. `UVCSettings(**REFERENCE_UVC)`.
REFERENCE_UVC = {"group_score": "proj", "count_grad": "dual", "budget_schedule": 0.0, "dual_update": "ascent",
                 "z_kp": 0.0, "z_nu": 0.0, "zlr": 1.0, "count_lr": 0.02, "tie_dims": False}


@dataclass(frozen=True)
class UVCSettings:
    prune: bool = True                  # learn head / dim / neuron counts
    prune_dims: bool | str = True       # learn r (dims inside heads); 'auto': only where the latency table says
                                        # narrowing value dims saves time (`resolve_prune_dims`, issue 25)
    block_skip: bool = True             # learn Gumbel block-skip gates
    tie_qk: bool = False                # prune q/k dims together with v (beyond the paper; keeps fused SDPA)
    dims_multiple: int = 1              # the final structure keeps value dims per head in multiples of this
                                        # (nearest; 8 or 16: hardware-friendly widths, and a head rounded back to
                                        # the full width runs fused attention); 1: exactly the learned counts
    macs_formula: str = "exact"         # 'exact' or 'reference' (UVC calc_flops with the corrected rho)
    count_lr: float = 0.05              # slr = rlr (reference 0.02); with count_grad 'importance': kept fraction
                                        # moved per step per unit gap (importance per MAC - z)
    count_lr_mode: str = "per_range"    # 'per_range': lr x group count (counts move as fractions); 'reference'
    ylr: float = 1e-4                   # dual lr of y (heads, neurons) and p (dims)
    zlr: float = 0.2                    # dual lr of z (budget; reference 1.0)
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
    group_score: str = "fisher"         # what ranks (and the prox step shrinks) a group: 'proj' (reference: squared
                                        # norm of attn.proj / fc2 input columns) or 'group' (all its weights: q, k,
                                        # v rows + proj columns of a head, v row + proj column of a dim, fc1 row +
                                        # fc2 column of a neuron; comparable across group types), 'fisher'
                                        # (loss-aware: EMA of the squared mask gradient sum(w dL/dw) over the
                                        # same group, accumulated over the search's own batches; uvc.importance)
                                        # or 'fisher_norm' (sqrt(fisher x 'group'))
    score_ema: float = 0.9              # 'fisher*': EMA decay of the squared mask gradients per step (bias-corrected)
    count_grad: str = "importance"      # sparsity term of the count gradient: 'dual' (reference: per-layer dual
                                        # y_l x next group's score) or 'importance' (one shared multiplier x next
                                        # group's score / total score of all heads + neurons, per MAC saved: counts
                                        # settle where importance per MAC = z, a global ranking; y, p then drive
                                        # only the prox shrinkage)
    budget_schedule: float = 0.5        # fraction of the search steps over which the target walks linearly from
                                        # 1.0 down to B (then holds B); 0: the target is B from the start (reference)
    budget_curve: str = "linear"        # shape of that walk: 'linear' or 'cubic' (Zhu & Gupta: B + (1-B)(1-t)^3)
    dual_update: str = "pi"             # budget dual z: 'ascent' (reference, pure integral) or 'pi' (nuPI, Sohrabi
                                        # et al. 2024: z <- max(0, z + zlr (e_t + z_kp (1 - z_nu)(e_t - xi_{t-1}))),
                                        # xi an EMA of the violation e = R - target; as cooper-optim's nuPI)
    z_kp: float = 10.0                  # 'pi': proportional gain (damping) on the EMA'd violation
    z_nu: float = 0.5                   # 'pi': EMA coefficient of xi (0: xi = e, plain PI)
    tie_dims: bool = True               # one value-dim count per layer (r projected onto its per-layer mean after
                                        # each step, one width per layer in the final structure): the export pads
                                        # v to the widest kept head, so dims removed from narrower heads save no
                                        # MACs (with tied dims R equals the exported count)
    final_weights: str = "search"       # the weights the chosen structure is cut from (then repaired and
                                        # fine-tuned): 'search' (the paper: the weights the search trained) or
                                        # 'start' (the weights the run started from, e.g. the teacher's: the
                                        # search only chooses the structure; with `repair: lstsq`, issue 25)
    # ---- the final structure (`uvclab.uvc.select`) and a latency budget (budget_kind latency)
    search_resource: str = "macs"       # latency budget: the search's R: macs (to the MACs ratio of the magnitude
                                        # cut predicted at the budget) | latency (the table); the final fit is on
                                        # the latency either way
    select_skips: str = "auto"          # blocks skipped: gates (the search's decisions) | validation (the best of
                                        # 0, 1, 2.. skipped) | auto (validation for a latency budget, else gates)
    select_eval_samples: Optional[int] = 1000  # validation images per skip candidate (null: all)
    select_finetune_steps: int = 24     # distillation steps each skip candidate gets before it is scored (0: none)
    select_patience: Optional[int] = None  # stop after N candidates in a row below the best (null: below the band)
    latency_batch_size: int = 64        # the batch the latency table is measured (and the export timed) at
    latency_threads: Optional[int] = None  # torch threads when timing (None: run.threads, else torch's)
    latency_feedback: int = 3           # refits when the export measures over the latency budget (0: off)
    latency_tolerance: float = 0.02     # measured latency ratio accepted up to B x (1 + this)

    def __post_init__(self):
        one_of(self, {"macs_formula": ("exact", "reference"), "count_lr_mode": ("per_range", "reference"),
                      "zlr_schedule": ("constant", "increasing"), "gate_grad_weighting": ("uniform", "linear"),
                      "resource_gates": ("hard", "expected", "sample"), "group_score": ("proj", "group", "fisher", "fisher_norm"),
                      "budget_curve": ("linear", "cubic"),
                      "count_grad": ("dual", "importance"), "dual_update": ("ascent", "pi"),
                      "search_resource": ("macs", "latency"), "select_skips": ("auto", "gates", "validation"),
                      "prune_dims": (True, False, "auto"), "final_weights": ("search", "start")}, "uvc.")
        if self.dims_multiple < 1:
            raise UvclabError(f"uvc.dims_multiple={self.dims_multiple} must be >= 1.")
        if self.gating_interval < 1 or self.gumbel_tau <= 0 or not 0 <= self.warmup_gate <= 1:
            raise UvclabError("uvc.gating_interval must be >= 1, uvc.gumbel_tau > 0, uvc.warmup_gate in [0, 1].")
        if not 0 <= self.budget_schedule <= 1 or not 0 <= self.z_nu < 1:
            raise UvclabError("uvc.budget_schedule must be in [0, 1] and uvc.z_nu in [0, 1).")
        at_least_one(self, ("latency_threads", "latency_batch_size", "select_eval_samples", "select_patience"), "uvc.")
        if self.latency_feedback < 0 or self.latency_tolerance < 0 or self.select_finetune_steps < 0:
            raise UvclabError("uvc.latency_feedback, latency_tolerance and select_finetune_steps must be >= 0.")
        if not 0 <= self.score_ema < 1:
            raise UvclabError(f"uvc.score_ema={self.score_ema} must be in [0, 1) (0: the last batch only).")


# `prune_dims: auto` keeps value dims whole when a MAC cut from them buys less time than this share of what a MAC
# cut from heads or MLP neurons (the better of the two) buys (LatencyTable.time_per_mac). The committed
# Fashion-MNIST model on one CPU thread: 0.69 (dims 0.68 of a block's time per MAC, heads 0.98, neurons 0.86).
DIMS_MIN_TIME_PER_MAC = 0.8


def resolve_prune_dims(settings: UVCSettings, table, shape, layout: str) -> tuple[UVCSettings, dict]:
    """`prune_dims: auto` -> True or False from the latency table: the MACs a budget spends on value dims should
    buy about the time that the same MACs cut from heads or neurons would. Returns the settings to search with
    and what was decided (the report's `prune_dims_auto`)."""
    from dataclasses import replace
    if settings.prune_dims != "auto":
        return settings, {}
    if table is None:
        raise UvclabError("uvc.prune_dims=auto needs a latency table (built and cached by `compress`); with the "
                          "Python API pass one, or set uvc.prune_dims to true or false.")
    per_mac = table.time_per_mac(shape, layout)
    best_other = max(per_mac["heads"], per_mac["neurons"])
    ratio = per_mac["dims"] / best_other if best_other > 0 else 0.0
    keep = ratio >= DIMS_MIN_TIME_PER_MAC
    return replace(settings, prune_dims=keep), {"prune_dims": keep, "dims_vs_other_cuts": ratio,
                                                "time_per_mac": per_mac, "threshold": DIMS_MIN_TIME_PER_MAC}
