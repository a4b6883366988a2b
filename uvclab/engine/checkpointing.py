"""Checkpoints inside an epoch: every N steps, on a timer and on a stop signal, with the place in the epoch.

A stage (the UVC search, the fine-tune) hands `StageCheckpoints` a function returning its state; the training
loop's post-step hook then writes `checkpoint.pt` after every `checkpoint_every_steps` steps (counted from
the stage's start, so a resumed run writes at the same steps), when `checkpoint_every_minutes` have passed
since the last write, and when a stop signal came (`engine.preempt`; then every rank raises `Preempted`).
Besides the stage's state a checkpoint holds `epoch` and `step` (the steps of that epoch already done; 0 at
an epoch end, where `epoch` is the next one), the epoch's running loss, the RNG states (CPU, and CUDA when in
use) and `metrics_bytes`, the length of metrics.jsonl then: a resume cuts the log back to it, so no step is
logged twice. With `seeded_loader(skip_batches=step)` a resumed run continues bit for bit.
"""
from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from uvclab.engine.loop import world
from uvclab.engine.preempt import agree, stop_requested
from uvclab.engine.runfiles import MetricsLog, save_checkpoint
from uvclab.errors import Preempted
from uvclab.paths import CHECKPOINT


def rng_state() -> dict:
    """The global RNG states a step draws from: the CPU generator (the search's Gumbel noise on CPU) and,
    once CUDA is in use, every CUDA generator (the noise on a GPU)."""
    cuda = {"cuda_rng": torch.cuda.get_rng_state_all()} if torch.cuda.is_initialized() else {}
    return {"rng": torch.get_rng_state(), **cuda}


def restore_rng(ckpt: dict) -> None:
    torch.set_rng_state(ckpt["rng"])
    if ckpt.get("cuda_rng") and torch.cuda.is_available() and len(ckpt["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])


class StageCheckpoints:
    """The checkpoints of one stage of `steps` steps per epoch and `epochs` epochs; `state()` returns the
    stage's own part (stage name, model, optimiser, scheduler, ...)."""

    def __init__(self, run, out: Path, log: MetricsLog, stage: str, epochs: int, steps: int,
                 state: Callable[[], dict]):
        self.path, self.log, self.stage, self.epochs, self.steps, self.state = \
            Path(out) / CHECKPOINT, log, stage, epochs, steps, state
        self.every_steps = run.checkpoint_every_steps or 0             # 0: off
        self.every_s = 60.0 * (run.checkpoint_every_minutes or 0)      # 0: off
        self.last_write = time.monotonic()
        self.loss = [0.0, 0]  # this epoch's summed loss and steps (its mean is logged; continues after a resume)

    def resume(self, ckpt: dict) -> tuple[int, int]:
        """(epoch, step) to continue from; restores the RNG states and the epoch's running loss."""
        restore_rng(ckpt)
        self.loss = list(ckpt.get("epoch_loss") or [0.0, 0])
        return ckpt["epoch"], ckpt.get("step", 0)

    def hook(self, epoch: int, inner: Optional[Callable] = None) -> Callable:
        """The loop's `after_step`: `inner` (the stage's own hook) first, then the checkpoint decision."""
        def after_step(step: int, loss: torch.Tensor):
            extra = inner(step, loss) if inner is not None else None
            self.step_done(epoch, step, loss)
            return extra
        return after_step

    def step_done(self, epoch: int, step: int, loss: torch.Tensor) -> None:
        self.loss = [self.loss[0] + loss.item(), self.loss[1] + 1]
        done = step + 1
        due = (self.every_steps and (epoch * self.steps + done) % self.every_steps == 0) or (
            self.every_s and time.monotonic() - self.last_write >= self.every_s)
        stop, due = agree(stop_requested(), due)  # every rank: the same decision, each step
        if stop or (due and done < self.steps):  # the last step of an epoch: the epoch-end checkpoint follows
            self.save(epoch, done)
        if stop:
            if world() > 1:
                dist.barrier()  # rank 0 has written the checkpoint before any rank exits
            raise Preempted(f"Stopped by {signal.Signals(stop).name} after {self.stage} "
                            f"epoch {epoch + 1}/{self.epochs} step {done}/{self.steps}; checkpoint '{self.path}' "
                            f"written. Continue with the same command and --resume (Python: resume='auto').")

    def end_epoch(self) -> float:
        """The epoch's mean loss; the running sum starts again for the next epoch."""
        mean = self.loss[0] / max(self.loss[1], 1)
        self.loss = [0.0, 0]
        return mean

    def save(self, epoch: int, step: int = 0) -> None:
        """Write the checkpoint at `step` steps into `epoch` (step 0: the start of that epoch)."""
        save_checkpoint(self.path, {**self.state(), **rng_state(), "epoch": epoch, "step": step,
                                    "epoch_loss": list(self.loss), "metrics_bytes": self.log.size()})
        self.last_write = time.monotonic()
