"""Teachers: train a ViT from scratch, keep its best validation epoch, save it with a JSON card.

`train_teacher` follows the DeiT recipe scaled down for CPU (AdamW, linear warm-up then cosine decay, label
smoothing, no weight decay on norms / biases / tokens). It writes `<out>.safetensors` (weights; the
architecture also sits in the file's metadata) and `<out>.json` (architecture, data split, val / test top-1,
recipe, the exact command, uvclab version, training time). `load_teacher` rebuilds the model from either
file; `evaluate` gives top-1 %. Run as `uvclab teacher ...` or `python -m uvclab.teacher ...`.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import Splits, load_dataset, make_loader
from .errors import UvclabError
from .io_utils import atomic_write, atomic_write_text
from .models import create_vit, read_state_dict

MAX_FP32_BYTES = 10 * 2 ** 20  # larger teachers are stored in fp16 (and cast back to fp32 when loaded)


def evaluate(model: torch.nn.Module, dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy (%) on a dataset, in eval mode, without gradients."""
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    with torch.no_grad():
        for x, y in make_loader(dataset, batch_size, shuffle=False):
            correct += (model(x.to(device)).argmax(-1).cpu() == y).sum().item()
            total += len(y)
    return 100.0 * correct / max(total, 1)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """timm/DeiT convention: no weight decay on 1-d parameters (norms, biases) and on pos_embed / tokens."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.01):
    """lr multiplier per step: linear ramp to 1 over warm-up, then cosine down to `min_ratio`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return factor


def build_teacher_model(model_name: str, model_kwargs: dict, splits: Splits) -> torch.nn.Module:
    """create_vit with img_size / in_chans / num_classes filled in from the dataset unless given."""
    kwargs = {"img_size": splits.img_size, "in_chans": splits.in_chans, "num_classes": splits.num_classes}
    kwargs.update(model_kwargs)
    if kwargs["num_classes"] != splits.num_classes:
        raise UvclabError(f"num_classes={kwargs['num_classes']} but {splits.name} has {splits.num_classes} classes; "
                          "drop the num_classes setting.")
    return create_vit(model_name, **kwargs)


def train_epoch(model, loader, opt, sched, label_smoothing: float, max_steps: Optional[int], desc: str,
                progress: bool, log=None) -> float:
    """One pass over the training loader; returns the mean training loss.
    Without progress bars, `log` gets a line every quarter epoch (background runs)."""
    model.train()
    total, n = 0.0, 0
    steps = len(loader) if max_steps is None else min(len(loader), max_steps)
    bar = tqdm(loader, total=steps, desc=desc, leave=False, disable=not progress)
    for step, (x, y) in enumerate(bar):
        if step >= steps:
            break
        loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
        if not torch.isfinite(loss):
            raise UvclabError(f"Non-finite training loss at {desc} step {step}; lower --lr.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        total, n = total + loss.item(), n + 1
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if log is not None and not progress and (step + 1) % max(1, steps // 4) == 0 and step + 1 < steps:
            log(f"  {desc} step {step + 1}/{steps}  train_loss {total / n:.4f}")
    return total / max(n, 1)


def train_teacher(model_name: str, model_kwargs: dict, dataset: str, epochs: int, batch_size: int = 64,
                  lr: float = 1e-3, weight_decay: float = 0.05, seed: int = 0, out_path: str | Path = "teacher",
                  *, data_root: Optional[str] = None, split_seed: int = 0, val_fraction: Optional[float] = None,
                  warmup_epochs: int = 1, label_smoothing: float = 0.1, augment: bool = True,
                  max_steps_per_epoch: Optional[int] = None, progress: bool = True, fp16: Optional[bool] = None,
                  command: Optional[str] = None, init: Optional[str | Path] = None, log=print) -> dict:
    """Train `model_name` from scratch on `dataset`, keep the best-validation epoch, write weights + card.

    Returns the card (dict). fp16=None stores fp32 unless that exceeds 10 MB. `command` is recorded in the
    card (default: the equivalent `uvclab teacher` command line). `init`: continue training from an existing
    teacher (card or weights, same architecture) instead of from scratch; its card's summary is kept in the
    new card's `parents`. `log` receives one line per epoch.
    """
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise UvclabError("epochs, batch_size and lr must be positive.")
    t0 = time.time()
    torch.manual_seed(seed)
    img_size = model_kwargs.get("img_size")
    splits = load_dataset(dataset, root=data_root, split_seed=split_seed, val_fraction=val_fraction,
                          img_size=img_size if isinstance(img_size, int) else None, augment=augment)
    model = build_teacher_model(model_name, model_kwargs, splits)
    parents = []
    if init is not None:
        start = load_teacher(init)
        try:
            model.load_state_dict(start.state_dict())
        except RuntimeError as e:
            raise UvclabError(f"--init {init} does not match the architecture given by --model/--set ({e}).") from e
        card_path = Path(init).with_suffix(".json")
        if card_path.is_file():
            prev = json.loads(card_path.read_text())
            parents = prev.get("parents", []) + [{k: prev.get(k) for k in (
                "command", "epochs", "val_top1", "test_top1", "best_epoch", "train_time_s", "threads",
                "weights_sha256")}]
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)
    steps = len(make_loader(splits.train, batch_size, True, drop_last=True))
    steps = steps if max_steps_per_epoch is None else min(steps, max_steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(epochs * steps, warmup_epochs * steps))
    best = {"val_top1": -1.0}
    if init is not None:  # the starting point competes too: continuing never returns a worse teacher
        best = {"val_top1": evaluate(model, splits.val), "epoch": 0, "state": copy.deepcopy(model.state_dict())}
        log(f"start (--init {init}): val_top1 {best['val_top1']:.2f}")
    history = []
    for epoch in range(epochs):
        loader = make_loader(splits.train, batch_size, True, seed=seed + epoch, drop_last=True)
        loss = train_epoch(model, loader, opt, sched, label_smoothing, max_steps_per_epoch,
                           f"epoch {epoch + 1}/{epochs}", progress, log)
        val = evaluate(model, splits.val)
        history.append({"epoch": epoch + 1, "train_loss": round(loss, 5), "val_top1": round(val, 3),
                        "time_s": round(time.time() - t0, 1)})
        log(f"epoch {epoch + 1}/{epochs}  train_loss {loss:.4f}  val_top1 {val:.2f}  "
            f"lr {opt.param_groups[0]['lr']:.2e}  {time.time() - t0:.0f}s")
        if val > best["val_top1"]:
            best = {"val_top1": val, "epoch": epoch + 1, "state": copy.deepcopy(model.state_dict())}
    model.load_state_dict(best["state"])
    test = evaluate(model, splits.test)
    log(f"best epoch {best['epoch']}: val_top1 {best['val_top1']:.2f}  test_top1 {test:.2f}")
    recipe = dict(model_name=model_name, model_kwargs=model_kwargs, dataset=dataset, epochs=epochs,
                  batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed, data_root=data_root,
                  split_seed=split_seed, val_fraction=val_fraction, warmup_epochs=warmup_epochs,
                  label_smoothing=label_smoothing, augment=augment, max_steps_per_epoch=max_steps_per_epoch,
                  init=str(init) if init is not None else None)
    card = {"kind": "uvclab-teacher", "model": model.uvclab_config, "dataset": dataset, "split_seed": split_seed,
            "split_sizes": {k: len(getattr(splits, k)) for k in ("train", "val", "test")},
            "num_classes": splits.num_classes, "val_top1": best["val_top1"], "test_top1": test,
            "best_epoch": best["epoch"], "epochs": epochs, "recipe": recipe,
            "params": sum(p.numel() for p in model.parameters()), "history": history, "parents": parents,
            "command": command or cli_command(recipe, out_path), "train_time_s": round(time.time() - t0, 1),
            "threads": torch.get_num_threads(), "versions": _versions()}
    return save_teacher(model, out_path, card, fp16)


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
    model = create_vit(config["name"], **config["kwargs"])
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
    from . import __version__
    return {"uvclab": __version__, "torch": torch.__version__, "timm": timm.__version__}


def cli_command(recipe: dict, out_path) -> str:
    """The `uvclab teacher` command line that reproduces a recipe."""
    args = ["uvclab", "teacher", "--model", recipe["model_name"], "--dataset", recipe["dataset"]]
    for key in ("epochs", "batch_size", "lr", "weight_decay", "seed", "split_seed", "warmup_epochs",
                "label_smoothing", "data_root", "val_fraction", "max_steps_per_epoch", "init"):
        if recipe.get(key) is not None:
            args += ["--" + key.replace("_", "-"), str(recipe[key])]
    if not recipe.get("augment", True):
        args.append("--no-augment")
    for k, v in recipe["model_kwargs"].items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    return " ".join(shlex.quote(a) for a in args + ["--out", str(out_path)])


def parse_set(items: list[str]) -> dict:
    """`key=value` pairs; values parsed as JSON (numbers, true/false, lists), else kept as strings."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UvclabError(f"--set '{item}' is not key=value (e.g. --set embed_dim=96).")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uvclab teacher", description="Train a ViT teacher from scratch; writes "
                                "OUT.safetensors and the card OUT.json.")
    p.add_argument("--model", default="deit_tiny_patch16_224", help="timm ViT name (shrunk with --set)")
    p.add_argument("--dataset", default="digits", help="digits | fashion_mnist | cifar10 | cifar100 | imagefolder")
    p.add_argument("--data-root", default=None, help="dataset folder (fashion_mnist, cifar, imagefolder)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="model kwarg, e.g. --set embed_dim=96 --set depth=6 (repeatable)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=int, default=5)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0, help="weights init, shuffling and augmentation")
    p.add_argument("--split-seed", type=int, default=0, help="fixes the train/val/test split")
    p.add_argument("--val-fraction", type=float, default=None)
    p.add_argument("--no-augment", action="store_true", help="train without crop/flip augmentation")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap for timing probes")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the CPUs we may use; use 1 when other jobs share the CPUs: "
                        "oversubscribed OpenMP threads can run 10x slower)")
    p.add_argument("--init", default=None, help="continue from this teacher (card .json or weights) instead of "
                   "from scratch; the architecture must match")
    p.add_argument("--fp16", action="store_true", help="store the weights in float16")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars (logs, background runs)")
    p.add_argument("--out", required=True, help="output stem: writes OUT.safetensors and OUT.json")
    return p


def teacher_cli(argv: Optional[list[str]] = None) -> dict:
    """`uvclab teacher ...`: parse arguments, set CPU threads, train, print the card summary."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads or available_cpus())
    card = train_teacher(args.model, parse_set(args.set), args.dataset, args.epochs, args.batch_size, args.lr,
                         args.weight_decay, args.seed, args.out, data_root=args.data_root, split_seed=args.split_seed,
                         val_fraction=args.val_fraction, warmup_epochs=args.warmup_epochs,
                         label_smoothing=args.label_smoothing, augment=not args.no_augment,
                         max_steps_per_epoch=args.max_steps_per_epoch, progress=not args.no_progress,
                         fp16=True if args.fp16 else None, command="uvclab teacher " + shlex.join(argv), init=args.init,
                         log=tqdm.write)
    print(f"wrote {args.out}.safetensors and {args.out}.json: val_top1 {card['val_top1']:.2f}  "
          f"test_top1 {card['test_top1']:.2f}  ({card['train_time_s']:.0f}s)", flush=True)
    return card


if __name__ == "__main__":
    try:
        teacher_cli()
    except UvclabError as e:
        print(f"uvclab: error: {e}", file=sys.stderr)
        sys.exit(2)
