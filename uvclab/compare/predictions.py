"""Test-split predictions of a run (or of its teacher), computed once and cached in the run folder.

A *side* of a comparison is a finished run folder (its exported `model/`) or a teacher (`"teacher"`: the
teacher a run was distilled from, or a teacher card / weights path). `resolve_side` reads what it needs
(dataset, split, label set, weights file, structure); `test_logits` returns the (N, C) float32 logits on the
side's test split. They are cached in `<run>/predictions/<model|teacher>_test_logits.safetensors` (no
pickle) with the sha256 of the weights file, the dataset and the split in the file's metadata: a changed
model, teacher or split is recomputed, never read stale. A read-only run folder is computed without a cache.
"""
from __future__ import annotations

import functools
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from uvclab.compare.runs import run_config
from uvclab.engine.data import FASHION_CLASSES, fashion_mnist_test, load_dataset
from uvclab.errors import DiskFull, UvclabError
from uvclab.io_utils import atomic_write
from uvclab.paths import MODEL_DIR, REPO_ROOT, REPORT, default_teacher
from uvclab.vit.structure import Structure

TEACHER = "teacher"
CACHE_DIR = "predictions"


@dataclass
class Side:
    """One side of a comparison: what it is, where its weights are, and which test split it is judged on."""
    label: str                  # run folder name or "teacher (<card>)"
    kind: str                   # "run" | "teacher"
    weights: Path               # model/model.safetensors or the teacher's .safetensors
    dataset: str
    split_seed: int
    data_root: Optional[str]
    img_size: Optional[int]
    num_classes: int
    cache_dir: Optional[Path]   # where the predictions are cached (a run folder's predictions/)
    run_dir: Optional[Path] = None
    report: Optional[dict] = None

    @property
    def test_split(self) -> tuple:
        """What fixes the test images: the digits test split depends on split_seed, the others do not."""
        return (self.dataset, self.data_root, self.split_seed if self.dataset == "digits" else None, self.img_size)

    def load_model(self) -> torch.nn.Module:
        from uvclab.engine.teacher import load_teacher
        from uvclab.vit.export import load_pruned
        return load_pruned(self.weights.parent) if self.kind == "run" else load_teacher(self.weights)

    def structure(self) -> Structure:
        if self.kind == "run":
            return Structure.from_dict(json.loads((self.weights.parent / "uvclab.json").read_text())["structure"])
        from uvclab.engine.teacher import load_teacher
        return Structure.dense(load_teacher(self.weights))


def _img_size(model_cfg: dict) -> Optional[int]:
    size = (model_cfg or {}).get("kwargs", {}).get("img_size")
    return size if isinstance(size, int) else None


def resolve_run(run_dir: str | Path) -> Side:
    """A finished run folder as a Side; a clear error naming what is missing otherwise."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UvclabError(f"Run folder '{run_dir}' does not exist; pass a folder written by `uvclab compress` "
                          "or 'teacher'.")
    model_dir = run_dir / MODEL_DIR
    missing = [f"model/{f}" for f in ("model.safetensors", "uvclab.json") if not (model_dir / f).is_file()]
    if missing:
        raise UvclabError(f"'{run_dir}' has no exported model ({' and '.join(missing)} missing): the run has not "
                          "finished or was interrupted. Finish it with `uvclab compress --resume --out "
                          f"{run_dir}` (same config), or compare another run.")
    cfg = run_config(run_dir)
    report = json.loads((run_dir / REPORT).read_text()) if (run_dir / REPORT).is_file() else {}
    card = json.loads((model_dir / "uvclab.json").read_text())
    dataset = cfg.get("dataset") or report.get("dataset")
    if dataset is None:
        raise UvclabError(f"'{run_dir}' has neither config.yaml nor report.json: its dataset is unknown. Compare "
                          "run folders written by `uvclab compress`.")
    kwargs = card.get("model", {}).get("kwargs", {})
    return Side(run_dir.name, "run", model_dir / "model.safetensors", dataset, int(cfg.get("split_seed", 0)),
                cfg.get("data_root"), _img_size(card.get("model")), int(kwargs.get("num_classes", 0)) or None,
                run_dir / CACHE_DIR, run_dir, report)


def teacher_file(run: Side) -> Path:
    """The teacher card a run was distilled from (config `teacher`; 'default': the dataset's reference)."""
    name = run_config(run.run_dir).get("teacher", "default")
    if name is None:
        raise UvclabError(f"Run '{run.label}' was distilled from its own starting model (teacher: null); there is "
                          "no teacher file to compare with. Pass the teacher card path instead of 'teacher'.")
    path = default_teacher(run.dataset) if name == "default" else Path(name)
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    return path


def resolve_teacher(path: str | Path, cache_dir: Optional[Path]) -> Side:
    """A teacher card (.json) or its weights as a Side; predictions cached in `cache_dir` (a run's folder)."""
    path = Path(path)
    card_path = path if path.suffix == ".json" else path.with_suffix(".json")
    if not card_path.is_file():
        raise UvclabError(f"Teacher card '{card_path}' not found; pass the .json card written by `uvclab teacher`.")
    card = json.loads(card_path.read_text())
    recipe = card.get("recipe", {})
    return Side(f"teacher ({card_path.stem})", "teacher", card_path.parent / card["weights"], card["dataset"],
                int(card.get("split_seed", 0)), recipe.get("data_root"), _img_size(card.get("model")),
                int(card.get("num_classes") or card["model"]["kwargs"].get("num_classes")), cache_dir,
                report={"top1": card.get("test_top1"), "macs_ratio": 1.0})


def resolve_pair(a, b) -> tuple[Side, Side]:
    """Both sides of a comparison; 'teacher' on one side means the other run's teacher."""
    if str(a) == TEACHER and str(b) == TEACHER:
        raise UvclabError("Both sides are 'teacher': pass at least one run folder.")
    sa = None if str(a) == TEACHER else (resolve_teacher(a, None) if str(a).endswith(".json") else resolve_run(a))
    sb = None if str(b) == TEACHER else (resolve_teacher(b, None) if str(b).endswith(".json") else resolve_run(b))
    run = sa if sa is not None and sa.kind == "run" else sb
    if (sa is None or sb is None) and (run is None or run.kind != "run"):
        raise UvclabError("'teacher' means the teacher of the run on the other side: pass a run folder there.")
    if sa is None:
        sa = resolve_teacher(teacher_file(run), run.cache_dir)
    if sb is None:
        sb = resolve_teacher(teacher_file(run), run.cache_dir)
    for s in (sa, sb):                        # a teacher card passed by path caches with the run it meets
        if s.cache_dir is None and run is not None:
            s.cache_dir = run.cache_dir
    check_comparable(sa, sb)
    return sa, sb


def check_comparable(a: Side, b: Side) -> None:
    """Same dataset, test split and label set, or a clear error saying what differs."""
    if a.dataset != b.dataset:
        raise UvclabError(f"'{a.label}' was made on {a.dataset} and '{b.label}' on {b.dataset}: their test sets "
                          "differ, so their predictions cannot be compared. Compare runs of one dataset.")
    if a.num_classes != b.num_classes:
        raise UvclabError(f"'{a.label}' predicts {a.num_classes} classes and '{b.label}' {b.num_classes}: the label "
                          "sets differ. Compare runs made with the same label set (num_classes).")
    if a.test_split != b.test_split:
        raise UvclabError(f"'{a.label}' and '{b.label}' use different {a.dataset} test splits ((dataset, data_root, "
                          f"split_seed, img_size) = {a.test_split} vs {b.test_split}). Compare runs made with the "
                          "same data settings.")


# ---- the test split and the logits -------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def load_test_split(dataset: str, data_root: Optional[str], split_seed: int, img_size: Optional[int]):
    """(test Dataset, labels (N,) int64, class names) of a dataset; kept in memory for the session."""
    if dataset == "fashion_mnist":                 # the test images only: 10k instead of 70k to read
        test, num_classes = fashion_mnist_test(data_root, img_size), 10
    else:
        splits = load_dataset(dataset, root=data_root, split_seed=split_seed, img_size=img_size, augment=False)
        test, num_classes = splits.test, splits.num_classes
    labels = (test.labels.numpy() if hasattr(test, "labels")
              else np.asarray([int(y) for _, y in test]))
    names = (FASHION_CLASSES if dataset == "fashion_mnist" else getattr(test, "classes", None)
             or [str(i) for i in range(num_classes)])
    return test, labels.astype(np.int64), list(names)


def side_test_split(side: Side):
    return load_test_split(side.dataset, side.data_root, side.split_seed, side.img_size)


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def weights_sha256(path: Path) -> str:
    st = path.stat()
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


def _cache_path(side: Side) -> Optional[Path]:
    return None if side.cache_dir is None else side.cache_dir / f"{'model' if side.kind == 'run' else 'teacher'}_test_logits.safetensors"


def _key(side: Side, n: int) -> dict:
    return {"weights_sha256": weights_sha256(side.weights), "test_split": json.dumps(side.test_split), "n": str(n)}


def _cache_matches(path: Path, key: dict) -> bool:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="numpy") as f:
            return dict(f.metadata() or {}) == key
    except Exception:  # noqa: BLE001 - missing or corrupt: no match
        return False


def _read_cache(path: Optional[Path], key: dict) -> Optional[np.ndarray]:
    from safetensors import safe_open
    if path is None or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as f:
            if dict(f.metadata() or {}) != key:      # another model, teacher or split: stale
                return None
            return f.get_tensor("logits")
    except Exception:  # noqa: BLE001 - a corrupt cache file is recomputed
        return None


def _write_cache(path: Optional[Path], logits: np.ndarray, key: dict) -> None:
    from safetensors.numpy import save_file
    if path is None:
        return
    try:
        atomic_write(path, lambda tmp: save_file({"logits": logits}, tmp, metadata=key), size=logits.nbytes)
    except (OSError, DiskFull) as e:  # a read-only or full run folder: compute each time
        warnings.warn(f"predictions not cached in '{path.parent}' ({e}); they are recomputed next time")


def compute_logits(model: torch.nn.Module, dataset, n: int, batch_size: int = 500) -> np.ndarray:
    """(n, C) float32 logits of the first n images of `dataset`, in eval mode, no gradients."""
    subset = torch.utils.data.Subset(dataset, range(n)) if n < len(dataset) else dataset
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False)
    out = []
    with torch.inference_mode():
        for x, _ in loader:
            y = model(x)
            out.append((y[0] if isinstance(y, tuple) else y).float().numpy())
    return np.concatenate(out).astype(np.float32)


# in-process memo: (weights, sha256, split, n) -> logits; the explorer re-reads nothing it has seen
_MEMO: dict[tuple, np.ndarray] = {}


def test_logits(side: Side, max_samples: Optional[int] = None) -> np.ndarray:
    """(N, C) float32 test logits of a side (N = the whole test split, or its first max_samples images):
    from memory, else from the run folder's cache when it matches the weights' sha256 and the split, else
    computed (and cached)."""
    test, labels, _ = side_test_split(side)
    n = len(labels) if max_samples is None else min(int(max_samples), len(labels))
    key = _key(side, n)
    memo_key = (str(side.weights), key["weights_sha256"], key["test_split"], n)
    path = _cache_path(side)
    if memo_key in _MEMO:                      # seen in this session; still leave a cache in this run folder
        if path is not None and not _cache_matches(path, key):
            _write_cache(path, _MEMO[memo_key], key)
        return _MEMO[memo_key]
    logits = _read_cache(path, key)
    if logits is None:
        logits = compute_logits(side.load_model(), test, n)
        _write_cache(path, logits, key)
    if len(_MEMO) > 64:
        _MEMO.clear()
    _MEMO[memo_key] = logits
    return logits
