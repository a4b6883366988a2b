"""Run settings of `uvclab compress`: one frozen dataclass, YAML in and out, `--set key=value` overrides.

The same field names appear in YAML files, notebook parameters and CLI `--set` flags; UVC optimiser
settings live under `uvc.` (see `primal_dual.UVCSettings`). Defaults are the embedded job: the digits
reference teacher compressed to half its MACs in about a minute on 2 CPU cores.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .budget import LAYOUTS, check_budget
from .errors import UvclabError
from .primal_dual import UVCSettings

KD_KINDS = ("soft", "hard", "none")


@dataclass(frozen=True)
class CompressConfig:
    model: Optional[str] = None          # timm name; None = the teacher's architecture
    model_kwargs: dict = field(default_factory=dict)  # timm kwargs (img_size, depth, num_classes, ...)
    pretrained: bool = False             # start from timm's pretrained weights (online)
    checkpoint: Optional[str] = None     # local weights to start the student from
    teacher: Optional[str] = "default"   # teacher card/weights; 'default': data/teachers/<dataset>_vit.json;
                                         # null: the uncompressed starting model (UVC's choice)
    dataset: str = "digits"              # digits | fashion_mnist | cifar10 | cifar100 | imagefolder
    data_root: Optional[str] = None      # dataset folder (fashion_mnist, cifar, imagefolder)
    split_seed: int = 0                  # fixes the train/validation/test split
    macs_ratio: float = 0.5              # budget B: exported MACs / dense MACs
    seed: int = 0
    device: str = "cpu"                  # cpu | cuda | cuda:N
    batch_size: int = 64
    lr: float = 5e-4                     # stage-1 AdamW lr (reference: 1e-4 at batch 256 on ImageNet)
    weight_decay: float = 0.05
    warmup_epochs: int = 1               # stage-1 warm-up: weights only (reference: 5)
    search_epochs: int = 12              # stage-1 epochs after warm-up (reference: 26)
    finetune_epochs: int = 10            # stage 2 (reference: 120-150)
    finetune_lr: float = 5e-4
    kd: str = "soft"                     # soft | hard | none (DeiT distillation token: automatic for _distilled)
    kd_alpha: float = 0.5                # weight of the KD term
    kd_tau: float = 1.0
    kd_reduction: str = "batchmean"      # batchmean | numel (reference: numel, ~1000x weaker on ImageNet)
    layout: str = "compact"              # exported attention layout: compact (v narrower than q/k, explicit
                                         # matmuls) | fused (one padded width per layer, fused SDPA)
    budget_slack: float = 0.02           # the final structure lands in [B - slack, B]
    max_steps_per_epoch: Optional[int] = None  # cap for quick runs
    eval_max_samples: Optional[int] = None  # cap on validation and test images (quick runs; in report.json)
    threads: Optional[int] = None        # torch CPU threads (None: torch's default)
    num_workers: int = 0
    progress: bool = True                # tqdm bars
    uvc: UVCSettings = field(default_factory=UVCSettings)

    def __post_init__(self):
        check_budget(self.macs_ratio)
        if self.uvc.macs_ratio != self.macs_ratio:
            object.__setattr__(self, "uvc", dataclasses.replace(self.uvc, macs_ratio=self.macs_ratio))
        from .data import DATASETS
        if self.dataset not in DATASETS:
            raise UvclabError(f"Unknown dataset '{self.dataset}'. Choose one of: {', '.join(DATASETS)}.")
        if self.kd not in KD_KINDS:
            raise UvclabError(f"kd='{self.kd}' is not one of {KD_KINDS}.")
        if self.layout not in LAYOUTS:
            raise UvclabError(f"layout='{self.layout}' is not one of {LAYOUTS}.")
        for name in ("warmup_epochs", "search_epochs", "finetune_epochs"):
            if getattr(self, name) < 0:
                raise UvclabError(f"{name} must be >= 0.")
        if self.batch_size < 1 or self.lr <= 0 or self.finetune_lr <= 0:
            raise UvclabError("batch_size, lr and finetune_lr must be positive.")
        for name in ("max_steps_per_epoch", "eval_max_samples", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UvclabError(f"{name} must be >= 1 (or null for no limit).")
        if not 0 <= self.kd_alpha <= 1:
            raise UvclabError(f"kd_alpha={self.kd_alpha} must be in [0, 1].")
        if self.model is None and self.teacher is None:
            raise UvclabError("Give a model (timm name) or a teacher card to start from.")

    # ---- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CompressConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UvclabError(f"Unknown config key(s) {unknown}. Known keys: {sorted(known)}.")
        uvc = d.pop("uvc", None) or {}
        if isinstance(uvc, dict):
            uvc_known = {f.name for f in dataclasses.fields(UVCSettings)}
            bad = sorted(set(uvc) - uvc_known)
            if bad:
                raise UvclabError(f"Unknown uvc setting(s) {bad}. Known: {sorted(uvc_known)}.")
            uvc = UVCSettings(**_numbers(UVCSettings, uvc, "uvc."))
        d = _numbers(cls, d)
        try:
            return cls(uvc=uvc, **d)
        except TypeError as e:
            raise UvclabError(f"Bad config: {e}") from e

    def save(self, path: str | Path) -> None:
        from .io_utils import atomic_write_text
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def _numbers(cls, d: dict, prefix: str = "") -> dict:
    """Number fields as numbers: floats accept ints and numeric strings (YAML 1.1 reads `3e-5` as a string);
    anything else is a clear error here, not a crash deep inside a run."""
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    out = dict(d)
    for k, v in d.items():
        t = types.get(k)
        if t not in ("float", "int", "Optional[int]") or (v is None and t == "Optional[int]"):
            continue
        try:
            if isinstance(v, bool):
                raise ValueError
            num = float(v)
            if t != "float" and num != int(num):
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            kind = "a number" if t == "float" else "an integer" + (" or null" if t.startswith("Optional") else "")
            raise UvclabError(f"{prefix}{k}={v!r} must be {kind}.") from None
        out[k] = num if t == "float" else int(num)
    return out


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                **kwargs: Any) -> CompressConfig:
    """Defaults <- YAML file <- kwargs <- `key=value` overrides (dotted keys reach `uvc.`)."""
    d: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UvclabError(f"Config file '{p}' does not exist.")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UvclabError(f"Config file '{p}' is not valid YAML: {e}") from e
        if not isinstance(d, dict):
            raise UvclabError(f"Config file '{p}' must hold a mapping of keys to values.")
    d.update(kwargs)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UvclabError(f"--set expects key=value, got '{item}'.")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        target = d
        *parents, leaf = key.strip().split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise UvclabError(f"--set {key}: '{part}' is not a group of settings.")
        target[leaf] = parsed
    return CompressConfig.from_dict(d)
