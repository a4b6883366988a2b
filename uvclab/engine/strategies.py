"""Structure strategies of `compress`: where the Structure comes from (config key `method`).

`uvc` is the primal-dual search (`uvclab.engine.search`); the others cut the teacher's weights in one shot:
`magnitude` (global magnitude structured pruning), `uniform` (the same kept fraction in every block),
`depth` (drop whole blocks, greedily by validation accuracy), `torch_pruning` (Torch-Pruning's global group
Taylor pruning, expressed as a Structure), `isomorphic` (the same with Isomorphic Pruning's ranking within
structurally identical groups, Fang et al., ECCV 2024). Every strategy returns a Structure, so every method is exported,
fine-tuned, saved and reported the same way.
"""
from __future__ import annotations

import copy

import torch

from uvclab.engine.config import CompressConfig
from uvclab.engine.search import masked_top1
from uvclab.errors import UvclabError
from uvclab.prune import baselines
from uvclab.prune.calibration import calibration_batches
from uvclab.vit.structure import Structure

ONE_SHOT = ("magnitude", "uniform", "depth", "torch_pruning", "isomorphic")


def one_shot_structure(cfg: CompressConfig, model: torch.nn.Module, teacher: torch.nn.Module, splits) -> Structure:
    """The structure of a one-shot method for the gated `model` (a copy of the teacher's weights)."""
    if cfg.method == "magnitude":
        return baselines.magnitude_structure(model, cfg.macs_ratio, cfg.layout)
    if cfg.method == "uniform":
        return baselines.uniform_structure(model, cfg.macs_ratio, cfg.layout)
    if cfg.method == "depth":  # greedy on validation accuracy of the masked model (a subset, for time)
        probe = torch.utils.data.Subset(splits.val, range(min(1024, len(splits.val))))

        return baselines.depth_structure(model, cfg.macs_ratio, score=lambda st: masked_top1(model, st, probe))
    if cfg.method in ("torch_pruning", "isomorphic"):
        from uvclab.prune.tp import torch_pruning_structure
        plain = copy.deepcopy(teacher)                 # a plain timm model with the student's weights
        plain.load_state_dict(model.state_dict())
        plain.requires_grad_(True)
        # cfg.calibration.samples training images (Isomorphic Pruning ranks with 3,200), the same on every rank
        calib, _ = calibration_batches(splits.train, cfg.calibration.samples, cfg.batch_size, cfg.seed * 100_003 - 1,
                                       shard=False)
        return torch_pruning_structure(plain, cfg.macs_ratio, calib, isomorphic=cfg.method == "isomorphic")
    raise UvclabError(f"'{cfg.method}' is not a one-shot method; choose one of {ONE_SHOT}.")
