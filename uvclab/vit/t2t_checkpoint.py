"""Official T2T-ViT release files (github.com/yitu-opensource/T2T-ViT) into uvclab's T2TViT, strictly.

The release files are timm training checkpoints: `state_dict_ema` / `state_dict` (optionally 'module.'
prefixed, with an argparse.Namespace of the run's args) or a plain state dict, keys `tokens_to_token.*` for
the stem. They are read with torch.load(weights_only=True) (never plain unpickling); the stem kind is read
from the keys, so a Performer file given to a Transformer-stem model (or the reverse) says which name to use.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from uvclab.errors import UvclabError

__all__ = ["load_official_t2t_checkpoint", "official_to_uvclab", "stem_of_state_dict"]


def stem_of_state_dict(sd: dict) -> str | None:
    """'performer' / 'transformer' for a T2T-ViT state dict (uvclab or official keys), else None."""
    if any(k.endswith("attention1.kqv.weight") for k in sd):
        return "performer"
    return "transformer" if any(k.endswith("attention1.attn.qkv.weight") for k in sd) else None


def _read_official(path: Path, use_ema: bool) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UvclabError(f"Checkpoint '{path}' does not exist. Download the official T2T-ViT checkpoint "
                          "(github.com/yitu-opensource/T2T-ViT) and pass its path.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            ck = load_file(str(path))
        else:  # timm training files also hold an argparse.Namespace of the run's args: a harmless container
            with torch.serialization.safe_globals([argparse.Namespace]):
                ck = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or pickled objects beyond tensors and plain containers
        raise UvclabError(f"Cannot read checkpoint '{path}': {e}. The file is corrupt or truncated, or it holds "
                          "pickled objects; re-download it, or save only its state dict (torch.save(sd, ...)) "
                          "where you trust the file.") from e
    if isinstance(ck, dict):
        for key in (("state_dict_ema", "state_dict") if use_ema else ("state_dict", "state_dict_ema")) + ("model", "model_state"):
            if isinstance(ck.get(key), dict):
                ck = ck[key]
                break
    if not isinstance(ck, dict) or not ck or not all(isinstance(v, torch.Tensor) for v in ck.values()):
        raise UvclabError(f"'{path}' does not hold a T2T-ViT state dict of tensors (looked for state_dict_ema, "
                          "state_dict, or a plain dict).")
    return ck


def official_to_uvclab(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename official keys (optionally 'module.'-prefixed) to this module's: tokens_to_token. -> patch_embed."""
    out = {}
    for k, v in sd.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if k.startswith("tokens_to_token."):
            k = "patch_embed." + k[len("tokens_to_token."):]
        out[k] = v
    return out


def load_official_t2t_checkpoint(model: nn.Module, path: str | Path, use_ema: bool = True) -> nn.Module:
    """Load an official T2T-ViT release file (or a uvclab-layout state dict) into a T2TViT, strictly.

    Either stem: Performer files (81.5_T2T_ViT_14.pth.tar; keys kqv, w, mlp.0...) into a Performer-stem model,
    T2T-ViT_t files (81.7_T2T_ViTt_14.pth.tar) into a Transformer-stem one. Reads `state_dict_ema` (use_ema)
    or `state_dict` or a plain dict; a mismatch raises UvclabError naming the keys and the fix. Returns the model.
    """
    path = Path(path)
    sd = official_to_uvclab(_read_official(path, use_ema))
    file_stem, own_stem = stem_of_state_dict(sd), getattr(model, "tokens_type", None)
    if file_stem and own_stem and file_stem != own_stem:
        fix = ("t2t_vit_7/10/12/14/19/24 (the official Performer-stem names)" if file_stem == "performer" else
               "t2t_vit_t_14/19/24 (the official T2T-ViT_t names)")
        raise UvclabError(f"'{path}' is a {file_stem}-stem T2T-ViT checkpoint but the model has the {own_stem} stem. "
                          f"Create the model as {fix}, or pass tokens_type='{file_stem}' (--set "
                          f"model_kwargs.tokens_type={file_stem}).")
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{what} {keys[:4]}{'...' if len(keys) > 4 else ''}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        parts += ["shape mismatch " + ", ".join(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                                                for k in wrong[:3])] if wrong else []
        raise UvclabError(f"Checkpoint '{path}' does not fit this T2T-ViT ({'; '.join(parts)}). Create the model "
                          "with the checkpoint's architecture (e.g. t2t_vit_14 with img_size=224, num_classes=1000), "
                          "or use the checkpoint made for it.")
    model.load_state_dict(sd, strict=True)
    return model
