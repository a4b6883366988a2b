"""The files of a run folder that change while it runs: the atomic checkpoint and the metrics log.

`checkpoint.pt` is written atomically (rank 0) after every epoch and read with `weights_only=True`, so a
killed run resumes and a corrupt file is a clear error; `metrics.jsonl` gets one JSON record per step/epoch.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from uvclab.engine.loop import rank
from uvclab.errors import UvclabError
from uvclab.io_utils import atomic_write


class MetricsLog:
    """Append-only JSON lines, written by rank 0 only."""

    def __init__(self, path: Path, fresh: bool = False):
        self.path = Path(path)
        if fresh and rank() == 0 and self.path.exists():
            self.path.unlink()

    def write(self, record: dict) -> None:
        if rank() == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def save_checkpoint(path: Path, state: dict) -> None:
    if rank() == 0:
        atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UvclabError(f"Cannot read checkpoint '{path}' ({e}); it is corrupt. Start a fresh run "
                          "(without --resume) in a new --out folder.") from e


def nonfinite_stop(stage: str, epoch: int, ckpt: Path):
    """An `on_nonfinite` hook for the training loop: stop with the last good checkpoint named."""
    def stop(step: int, loss: torch.Tensor) -> None:
        raise UvclabError(f"Non-finite loss ({loss.item()}) in {stage} epoch {epoch} step {step}. The last good "
                          f"state is kept in '{ckpt}'. Lower the learning rate (--set lr=... / finetune_lr=...) "
                          "and continue with --resume.")
    return stop
