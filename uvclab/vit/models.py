"""Model creation: timm Vision Transformers (DeiT, ViT, their distilled variants) and local checkpoints.

`create_vit` is the single entry point. Extra kwargs (img_size, patch_size, in_chans, depth, embed_dim,
num_heads, num_classes, mlp_ratio...) flow through to timm, so a real architecture can be shrunk for tests
and CPU runs. `pretrained=True` downloads timm weights (online users); `checkpoint=PATH` loads a local
safetensors / PyTorch state dict without unpickling arbitrary objects.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Optional

import timm
import torch
from timm.layers import Mlp
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from uvclab.errors import UvclabError


def _known_names() -> list[str]:
    return sorted(set(timm.list_models("deit*") + timm.list_models("vit_*") + timm.list_models("t2t_vit*")))


def create_vit(name: str, pretrained: bool = False, checkpoint: Optional[str | Path] = None,
               **kwargs) -> VisionTransformer:
    """Build a timm VisionTransformer by name; kwargs shrink or adapt it (img_size, depth, num_classes...)."""
    from . import t2t_vit  # registers the T2T-ViT family with timm
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, _known_names(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UvclabError(f"Unknown model '{name}'.{hint} Supported: timm DeiT/ViT names such as "
                          "deit_tiny_patch16_224, deit_small_distilled_patch16_224, vit_base_patch16_224, "
                          "and t2t_vit_14 (list them with timm.list_models('deit*')).")
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise UvclabError(f"Model '{name}' does not accept these arguments ({e}). "
                          "Use timm kwargs such as img_size, patch_size, in_chans, depth, embed_dim, "
                          "num_heads, num_classes, mlp_ratio.") from e
    check_supported(model, name)
    if isinstance(model, t2t_vit.T2TViT):  # cards name the stem: t2t_vit_N meant the Transformer stem before
        kwargs = {**kwargs, "tokens_type": model.tokens_type}
    model.uvclab_config = {"name": name, "kwargs": dict(kwargs)}  # rebuilds the skeleton when loading exports
    if checkpoint is not None:
        load_state_dict_file(model, checkpoint)
    return model


def create_from_card(config: dict, **overrides) -> VisionTransformer:
    """The model a card's {'name', 'kwargs'} describes (teacher cards, exported models' uvclab.json); cards
    written before T2T-ViT had the Performer stem keep building the Transformer stem they were made with."""
    from .t2t_vit import card_kwargs
    try:
        name, kwargs = config["name"], config.get("kwargs", {})
    except (KeyError, TypeError, AttributeError) as e:
        raise UvclabError(f"The model card {config!r} names no model ({e}); write it again with uvclab.") from e
    return create_vit(name, **{**card_kwargs(name, kwargs), **overrides})


def check_supported(model: torch.nn.Module, name: str = "model") -> None:
    """uvclab gates plain pre-norm ViT blocks: timm Block + Attention + Mlp (no qk/scale norm, no GLU)."""
    if not isinstance(model, VisionTransformer):
        raise UvclabError(f"{name} is a {type(model).__name__}, not a timm VisionTransformer; "
                          "uvclab compresses DeiT/ViT/T2T-ViT models.")
    for i, blk in enumerate(model.blocks):
        attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
        ok = (isinstance(blk, Block) and isinstance(attn, Attention) and type(mlp) in (Mlp,)
              or getattr(blk, "_uvclab_gated", False))
        if not ok:
            raise UvclabError(f"{name}: block {i} ({type(blk).__name__}) is not a plain timm ViT block; "
                              "uvclab supports pre-norm Block/Attention/Mlp models (deit_*, vit_*).")
        if not isinstance(attn.norm, torch.nn.Identity) or not isinstance(attn.q_norm, torch.nn.Identity) \
                or getattr(attn, "gate", None) is not None:
            raise UvclabError(f"{name}: block {i} uses qk_norm/scale_norm/gated attention, which uvclab "
                              "cannot slim yet. Create the model without those options.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file (.safetensors, or .pth/.pt/.bin via torch.load(weights_only=True))."""
    path = Path(path)
    if not path.is_file():
        raise UvclabError(f"Checkpoint '{path}' does not exist. Pass the path of a .safetensors or .pth file.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated or pickled-object files all land here
        raise UvclabError(f"Cannot read checkpoint '{path}': {e}. The file is corrupt or truncated, or it is not "
                          "a plain state dict; re-download or re-export it (safetensors preferred).") from e
    for key in ("model", "state_dict", "model_state"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UvclabError(f"'{path}' does not hold a state dict of tensors.")
    return sd


def load_state_dict_file(model: torch.nn.Module, path: str | Path) -> None:
    """Load a local weights file strictly; a mismatch names the keys and the likely fix."""
    from uvclab.vit.t2t_vit import T2TViT, load_official_t2t_checkpoint
    if isinstance(model, T2TViT):  # official T2T-ViT release files (tokens_to_token.*, EMA) or uvclab layout
        load_official_t2t_checkpoint(model, path)
        return
    sd = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
        if wrong:
            parts.append("shape mismatch " + ", ".join(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                                                      for k in wrong[:3]))
        raise UvclabError(f"Checkpoint '{path}' does not fit the model ({'; '.join(parts)}). Create the model with "
                          "the same architecture arguments (depth, embed_dim, num_heads, num_classes, img_size) "
                          "as the checkpoint.")
    model.load_state_dict(sd, strict=True)


def input_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of the images a ViT expects."""
    pe = model.patch_embed
    in_chans = getattr(pe, "in_chans", None) or pe.proj.in_channels
    h, w = pe.img_size if isinstance(pe.img_size, (tuple, list)) else (pe.img_size, pe.img_size)
    return int(in_chans), int(h), int(w)
