"""Small real runs on the embedded digits data (a few seconds each), shared by the comparison and browser tests."""
from __future__ import annotations

from pathlib import Path

from uvclab.engine.compress import compress
from uvclab.engine.config import load_config

SHORT = ["warmup_epochs=0", "search_epochs=1", "finetune_epochs=1", "max_steps_per_epoch=3", "progress=false",
         "threads=1"]
# folder (relative to the runs root) -> method, budget: a UVC budget sweep and a baseline at one budget
RUNS = {"sweep/uvc_b0.50": ("uvc", 0.5), "sweep/uvc_b0.30": ("uvc", 0.3), "baselines/magnitude_b0.50": ("magnitude", 0.5)}


def make_small_runs(root: Path, which=tuple(RUNS)) -> dict[str, Path]:
    """Run `compress` for each of `which` under root; returns name -> run folder."""
    out = {}
    for name in which:
        method, budget = RUNS[name]
        out[name] = root / name
        compress(load_config(overrides=SHORT + [f"method={method}", f"macs_ratio={budget}"]), out[name])
    return out
