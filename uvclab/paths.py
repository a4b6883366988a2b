"""Where data, reference teachers and runs live, and the names of a run folder's files: here and nowhere else.

UVCLAB_DATA overrides the data folder (default: the repository's `data/`), UVCLAB_RUNS the runs folder
(default: `runs/` in the current directory).
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
REPORT, CONFIG, CHECKPOINT, METRICS = "report.json", "config.yaml", "checkpoint.pt", "metrics.jsonl"  # a run
STRUCTURE, UVC_STATE, MODEL_DIR = "structure.json", "uvc_state.json", "model"  # folder's files, by role


def data_dir() -> Path:
    return Path(os.environ.get("UVCLAB_DATA", REPO_ROOT / "data"))


def teachers_dir() -> Path:
    return REPO_ROOT / "data" / "teachers"


def runs_dir() -> Path:
    return Path(os.environ.get("UVCLAB_RUNS", "runs"))


def default_teacher(dataset: str) -> Path:
    return teachers_dir() / f"{dataset}_vit.json"


def notebook_runs(runs_root: str = "") -> Path:
    """Where the notebooks read and write runs: `runs_root` ("" = runs_dir()/notebooks); relative paths are
    taken from the repository root, so a notebook finds the same folder wherever its kernel starts."""
    root = Path(runs_root) if runs_root else runs_dir() / "notebooks"
    return root if root.is_absolute() else REPO_ROOT / root


def cache_dir() -> Path:
    """Measured, re-creatable data (latency tables): UVCLAB_CACHE, default ~/.cache/uvclab."""
    return Path(os.environ.get("UVCLAB_CACHE", Path.home() / ".cache" / "uvclab"))
