"""Teachers: train a ViT from scratch, keep its best validation epoch, save it with a JSON card.

`train_teacher(TeacherConfig)` follows the DeiT recipe scaled down for CPU (AdamW, linear warm-up then
cosine decay, label smoothing, no weight decay on norms / biases / tokens) through the one training loop
(`uvclab.engine.loop`). It writes `<out>.safetensors` (weights; the architecture also sits in the file's
metadata) and `<out>.json` (architecture, data split, val / test top-1, the config, the exact command,
uvclab version, training time). `load_teacher` rebuilds the model from either file. Run as `uvclab teacher`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shlex
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from uvclab.engine.config import TeacherConfig
from uvclab.engine.data import check_model_fits_data, load_dataset, model_kwargs_for_data
from uvclab.engine.loop import adamw_with_schedule, evaluate, seeded_loader, steps_per_epoch, train_one_epoch
from uvclab.errors import UvclabError
from uvclab.io_utils import atomic_write, atomic_write_text
from uvclab.version import __version__
from uvclab.vit.models import create_from_card, create_vit, read_state_dict

MAX_FP32_BYTES = 10 * 2 ** 20  # larger teachers are stored in fp16 (and cast back to fp32 when loaded)


def train_teacher(cfg: TeacherConfig, out_path: str | Path = "teacher", *, progress: bool = True,
                  command: Optional[str] = None, log=print) -> dict:
    """Train `cfg.model` from scratch on `cfg.dataset`, keep the best-validation epoch, write weights + card.

    Returns the card (dict). `command` is recorded in the card (default: the equivalent `uvclab teacher`
    command line). With `cfg.init` training continues from an existing teacher (card or weights, same
    architecture); its card's summary is kept in the new card's `parents`. `log` receives one line per epoch.
    """
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    img_size = cfg.model_kwargs.get("img_size")
    splits = load_dataset(cfg.dataset, root=cfg.data_root, split_seed=cfg.split_seed, val_fraction=cfg.val_fraction,
                          img_size=img_size if isinstance(img_size, int) else None, augment=cfg.augment)
    model = create_vit(cfg.model, **model_kwargs_for_data(cfg.model, cfg.model_kwargs, splits))
    check_model_fits_data(model, cfg.model, splits)
    parents = []
    if cfg.init is not None:
        start = load_teacher(cfg.init)
        try:
            model.load_state_dict(start.state_dict())
        except RuntimeError as e:
            raise UvclabError(f"--init {cfg.init} does not match the architecture given by --model/--set ({e}).") from e
        card_path = Path(cfg.init).with_suffix(".json")
        if card_path.is_file():
            prev = json.loads(card_path.read_text())
            parents = prev.get("parents", []) + [{k: prev.get(k) for k in (
                "command", "epochs", "val_top1", "test_top1", "best_epoch", "train_time_s", "threads",
                "weights_sha256")}]
    steps = steps_per_epoch(splits.train, cfg.batch_size, cfg.max_steps_per_epoch)
    opt, sched = adamw_with_schedule(model, cfg.lr, cfg.weight_decay, cfg.epochs * steps, cfg.warmup_epochs * steps)
    best = {"val_top1": -1.0}
    if cfg.init is not None:  # the starting point competes too: continuing never returns a worse teacher
        best = {"val_top1": evaluate(model, splits.val), "epoch": 0, "state": copy.deepcopy(model.state_dict())}
        log(f"start (--init {cfg.init}): val_top1 {best['val_top1']:.2f}")

    def loss_fn(x, y):
        return F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
    history = []
    for epoch in range(cfg.epochs):
        loader = seeded_loader(splits.train, cfg.batch_size, seed=cfg.seed + epoch)
        loss = train_one_epoch(model, loader, opt, sched, loss_fn, steps=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                               progress=progress, log=log)
        val = evaluate(model, splits.val)
        history.append({"epoch": epoch + 1, "train_loss": round(loss, 5), "val_top1": round(val, 3),
                        "time_s": round(time.time() - t0, 1)})
        log(f"epoch {epoch + 1}/{cfg.epochs}  train_loss {loss:.4f}  val_top1 {val:.2f}  "
            f"lr {opt.param_groups[0]['lr']:.2e}  {time.time() - t0:.0f}s")
        if val > best["val_top1"]:
            best = {"val_top1": val, "epoch": epoch + 1, "state": copy.deepcopy(model.state_dict())}
    model.load_state_dict(best["state"])
    test = evaluate(model, splits.test)
    log(f"best epoch {best['epoch']}: val_top1 {best['val_top1']:.2f}  test_top1 {test:.2f}")
    card = {"kind": "uvclab-teacher", "model": model.uvclab_config, "dataset": cfg.dataset,
            "split_seed": cfg.split_seed, "split_sizes": {k: len(getattr(splits, k)) for k in ("train", "val", "test")},
            "num_classes": splits.num_classes, "val_top1": best["val_top1"], "test_top1": test,
            "best_epoch": best["epoch"], "epochs": cfg.epochs, "recipe": cfg.to_dict(),
            "params": sum(p.numel() for p in model.parameters()), "history": history, "parents": parents,
            "command": command or cli_command(cfg, out_path), "train_time_s": round(time.time() - t0, 1),
            "threads": torch.get_num_threads(), "versions": _versions()}
    return save_teacher(model, out_path, card, cfg.fp16)


def save_teacher(model: torch.nn.Module, out_path: str | Path, card: dict, fp16: Optional[bool] = None) -> dict:
    """Write `<out>.safetensors` (architecture in its metadata) and `<out>.json`; returns the completed card."""
    from safetensors.torch import save_file
    out = Path(out_path)
    weights, card_path = out.with_name(out.name + ".safetensors"), out.with_name(out.name + ".json")
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if fp16 is None:
        fp16 = sum(v.numel() * 4 for v in sd.values()) > MAX_FP32_BYTES
    if fp16:
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    meta = {"uvclab_config": json.dumps(model.uvclab_config)}
    atomic_write(weights, lambda tmp: save_file(sd, tmp, metadata=meta))
    card = {**card, "weights": weights.name, "weights_dtype": "float16" if fp16 else "float32",
            "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    atomic_write_text(card_path, json.dumps(card, indent=1) + "\n")
    return card


def load_teacher(path: str | Path) -> torch.nn.Module:
    """A teacher in eval mode, fp32, from its card (.json), its weights (.safetensors), or the common stem."""
    path = Path(path)
    if path.suffix not in (".json", ".safetensors"):
        path = path.with_name(path.name + ".json")
    if not path.is_file():
        raise UvclabError(f"Teacher '{path}' does not exist. Train one with `uvclab teacher --dataset NAME "
                          "--out PATH` or pass the path of a teacher card (.json) or .safetensors file.")
    if path.suffix == ".json":
        try:
            card = json.loads(path.read_text())
            config, weights = card["model"], path.parent / card["weights"]
        except (ValueError, KeyError) as e:
            raise UvclabError(f"'{path}' is not a uvclab teacher card ({e}); "
                              "re-create it with `uvclab teacher`.") from e
        _check_hash(weights, card.get("weights_sha256"))
    else:
        config, weights = _config_from_metadata(path), path
    model = create_from_card(config)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in read_state_dict(weights).items()}
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise UvclabError(f"Weights '{weights}' do not fit the architecture in its card ({e}); "
                          "the card and weights come from different runs. Re-train or re-download both.") from e
    return model.eval()


def _check_hash(weights: Path, expected: Optional[str]) -> None:
    """The card records its weights' sha256: a mismatch means the two files come from different runs."""
    if expected and weights.is_file() and hashlib.sha256(weights.read_bytes()).hexdigest() != expected:
        raise UvclabError(f"'{weights}' is not the file its card was written for (sha256 differs); the card and "
                          "weights come from different runs. Re-train the teacher or restore the matching pair.")


def _config_from_metadata(path: Path) -> dict:
    """The architecture saved in a uvclab .safetensors header (or the sibling .json card)."""
    from safetensors import safe_open
    card = path.with_suffix(".json")
    if card.is_file():
        return json.loads(card.read_text())["model"]
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})["uvclab_config"])
    except Exception as e:
        raise UvclabError(f"'{path}' holds no uvclab architecture metadata and has no .json card next to it; "
                          "pass the teacher card, or create the model with create_vit(..., checkpoint=PATH).") from e


def available_cpus() -> int:
    """CPUs this process may run on (container/affinity aware), at least 1."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _versions() -> dict:
    import timm
    return {"uvclab": __version__, "torch": torch.__version__, "timm": timm.__version__}


def cli_command(cfg: TeacherConfig, out_path) -> str:
    """The `uvclab teacher` command line that reproduces a config (defaults left out)."""
    default = TeacherConfig()
    args = ["uvclab", "teacher", "--model", cfg.model, "--dataset", cfg.dataset]
    for key, value in cfg.to_dict().items():
        if key in ("model", "dataset", "model_kwargs", "augment", "fp16") or value is None:
            continue
        if value != getattr(default, key):
            args += ["--set", f"{key}={value}"]
    if not cfg.augment:
        args += ["--set", "augment=false"]
    for k, v in cfg.model_kwargs.items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    return " ".join(shlex.quote(a) for a in args + ["--out", str(out_path)])
