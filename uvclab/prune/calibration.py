"""Calibration: the training images that activation scores, Taylor importance and repair look at.

`CalibrationSettings` (config group `calibration.`) and `calibration_batches`, which draws a fixed number of
training images with a seed of its own (Isomorphic Pruning, Fang et al. ECCV 2024, ranks with 50 x 64 =
3,200 ImageNet images; FLAP and Kwon et al. calibrate on a few thousand). The draw does not touch the
global RNG; under torch.distributed each rank takes its share, so the ranks see the images once in all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from uvclab.errors import UvclabError


REPAIRS = ("none", "mean", "lstsq")


@dataclass(frozen=True)
class CalibrationSettings:
    repair: str = "none"         # after the structure is chosen, before fine-tuning (every method): none | mean
                                 # (the pruned channels' mean folded into the bias) | lstsq (ridge refit of the
                                 # kept columns of attn.proj / mlp.fc2 onto the unpruned output); `--set repair=`
    samples: int = 3200          # calibration images from the training split (activation scores, Taylor
                                 # importance, repair); capped at the split's size
    ridge: float = 1e-3          # lstsq repair: ridge as a fraction of the mean kept Gram diagonal (pulls
                                 # the refit toward the unpruned weights; raised x10 where Cholesky fails)
    max_gram_mb: float = 4096.0  # lstsq repair: refuse (before allocating) Gram matrices above this size (MB)

    def __post_init__(self):
        if self.repair not in REPAIRS:
            raise UvclabError(f"repair={self.repair!r} is not one of {REPAIRS}.")
        if self.samples < 1:
            raise UvclabError(f"calibration.samples={self.samples} must be >= 1.")
        if not self.ridge >= 0:
            raise UvclabError(f"calibration.ridge={self.ridge} must be >= 0 (e.g. 1e-3).")
        if not self.max_gram_mb > 0:
            raise UvclabError(f"calibration.max_gram_mb={self.max_gram_mb} must be positive.")


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def calibration_batches(dataset, samples: int, batch_size: int, seed: int, shard: bool = True,
                        ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """(list of (images, labels) batches, number of images used in all ranks together).

    `min(samples, len(dataset))` images are drawn without replacement by a generator seeded with `seed`
    (the same on every rank); the dataset's own augmentation runs under a forked RNG seeded from `seed`,
    so the batches are deterministic and the caller's RNG stream is untouched. With `shard` and an
    initialised process group, rank r keeps every world-th image from position r (statistics are summed
    over ranks afterwards); without `shard` every rank gets all of them (e.g. ranking on each rank)."""
    if samples < 1 or batch_size < 1:
        raise UvclabError(f"calibration needs samples >= 1 and batch_size >= 1 (got {samples}, {batch_size}).")
    n = min(samples, len(dataset))
    if n == 0:
        raise UvclabError("The calibration dataset is empty; calibrate on the training split.")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:n].tolist()
    r, w = _rank_world() if shard else (0, 1)
    mine = idx[r::w]
    batches = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(mine), batch_size):
            items = [dataset[i] for i in mine[start:start + batch_size]]
            batches.append((torch.stack([torch.as_tensor(x) for x, _ in items]),
                            torch.tensor([int(y) for _, y in items])))
    return batches, n
