"""One compact line per epoch (stage, epoch, R, validation, elapsed, ETA) on rank 0: readable in a terminal, in
JupyterLab and in papermill's output, where tqdm bars are off (`run.epoch_lines`)."""
from __future__ import annotations

import time
from typing import Callable

from uvclab.ranks import rank


def clock(seconds: float) -> str:
    """'m:ss' (or 'h:mm:ss')."""
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


class EpochLines:
    """`line(epoch, R=0.512, val=84.3)` prints e.g. 'search    epoch 2/5  R 0.512  val 84.30 %  elapsed 1:20  ETA
    2:00'; the ETA extrapolates the epochs run in this process (a resumed stage starts its clock at the resume)."""

    def __init__(self, stage: str, epochs: int, start: int = 0, enabled: bool = True, out: Callable = print):
        self.stage, self.epochs, self.start, self.enabled, self.out = stage, epochs, start, enabled, out
        self.t0 = time.monotonic()

    def __call__(self, epoch: int, **values) -> None:
        if not self.enabled or rank() != 0:
            return
        elapsed = time.monotonic() - self.t0
        done = max(1, epoch + 1 - self.start)
        eta = elapsed / done * (self.epochs - epoch - 1)
        shown = "  ".join(f"{k} {v:.2f} %" if k == "val" else f"{k} {v:.3f}" for k, v in values.items()
                          if v is not None)
        self.out(f"{self.stage:<9} epoch {epoch + 1}/{self.epochs}  {shown}  elapsed {clock(elapsed)}  "
                 f"ETA {clock(eta)}", flush=True)
