"""`activation`: structured activation-aware one-shot pruning (structured Wanda / FLAP analogue).

A channel j read by attn.proj or mlp.fc2 scores ||W[:, j]||^2 x E[x_j^2] over the calibration tokens: the
mean squared output the layer loses without it (Wanda, Sun et al. ICLR 2024: |W| x ||X||, per weight; FLAP,
An et al. AAAI 2024, uses the activation variance, `statistic='variance'`: what a mean repair cannot recover).
A head scores the sum over its Dh columns, a neuron its column. Heads and neurons are then ranked globally
by score per MAC saved with the same greedy fit as every other method (`fit_to_budget`). Formulas: docs/method.md §11.
"""
from __future__ import annotations

from typing import Iterable

import torch

from uvclab.errors import UvclabError
from uvclab.prune.fit import fit_to_budget
from uvclab.prune.repair import LayerStats, collect_stats
from uvclab.vit.macs import DEFAULT_LAYOUT, Layout, check_budget, count, vit_shape
from uvclab.vit.structure import Structure

STATISTICS = ("rms", "variance")


def activation_scores(model: torch.nn.Module, stats: dict[tuple[int, str], LayerStats], statistic: str = "rms"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, H) head and (L, M) neuron scores: sum over a group's columns of ||W[:, j]||^2 x E[x_j^2] (or Var x_j)."""
    if statistic not in STATISTICS:
        raise UvclabError(f"statistic='{statistic}' is not one of {STATISTICS}.")
    s = vit_shape(model)
    heads, neurons = [], []
    for l, blk in enumerate(model.blocks):
        per = []
        for key, lin in (((l, "attn"), blk.attn.proj), ((l, "mlp"), blk.mlp.fc2)):
            st = stats[key]
            moment = st.sumsq / st.count.clamp_min(1)
            if statistic == "variance":
                moment = (moment - st.mean.pow(2)).clamp_min(0)
            per.append(lin.weight.detach().to(moment).pow(2).sum(0) * moment)  # (d,) output energy per column
        heads.append(per[0].view(s.num_heads, s.head_dim).sum(-1))
        neurons.append(per[1])
    return torch.stack(heads).float().cpu(), torch.stack(neurons).float().cpu()


def activation_structure(model: torch.nn.Module, macs_ratio: float, batches: Iterable,
                         layout: Layout = DEFAULT_LAYOUT, slack: float = 0.02, statistic: str = "rms",
                         per_mac: bool = True) -> Structure:
    """Global activation-aware structured pruning of the (gated or plain) ViT `model` to `macs_ratio` of its
    MACs: heads and chunks of M/64 neurons with the least output energy per MAC saved go first (per_mac=False:
    per group, as `magnitude_structure` ranks); no block is skipped. `batches`: calibration images (or
    (images, labels)); under torch.distributed the statistics are summed over ranks, so ranks agree."""
    check_budget(macs_ratio)
    s = vit_shape(model)
    keys = {(l, kind): False for l in range(s.depth) for kind in ("attn", "mlp")}
    heads, neurons = activation_scores(model, collect_stats(model, batches, keys), statistic)
    return fit_to_budget(s, Structure.dense(model), heads, neurons, count(s)["macs"], macs_ratio, slack, layout,
                         allow_skip=False, score_norm="raw", per_mac=per_mac)
