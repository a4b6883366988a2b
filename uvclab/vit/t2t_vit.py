"""T2T-ViT (Tokens-to-Token ViT, Yuan et al., ICCV 2021) as a timm VisionTransformer with a T2T stem.

Follows the official code (github.com/yitu-opensource/T2T-ViT, `models/t2t_vit.py`, `token_transformer.py`)
with the *transformer* tokens-to-token module (the repo's `tokens_type='transformer'`, its T2T-ViT_t models).
Only the stem is new: `T2TStem` is passed to timm's VisionTransformer as `embed_layer`, so the backbone blocks
are plain timm Block/Attention/Mlp and uvclab's gating, MACs calculator and export work unchanged.
`load_official_t2t_checkpoint` reads the official release files (torch.load(weights_only=True), never plain
unpickling). The Performer stem of the official `t2t_vit_14` (81.5 % checkpoint) is not implemented.
"""
from __future__ import annotations

import argparse
import math
from functools import partial
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import Format, Mlp, to_2tuple, use_fused_attn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from uvclab.errors import UvclabError

__all__ = ["T2TStem", "TokenTransformer", "T2TViT", "load_official_t2t_checkpoint", "sinusoid_table"]

STRIDE = 16  # effective patch size: soft splits of stride 4, 2, 2
_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))  # (kernel, stride, padding) of soft_split0..2


def _split_size(n: int, kernel: int, stride: int, pad: int) -> int:
    return (n + 2 * pad - kernel) // stride + 1  # nn.Unfold output positions along one side


class TokenAttention(nn.Module):
    """One-head attention that changes the width, (B, N, dim) -> (B, N, out_dim); the residual adds v.

    As in the official Token_transformer: qkv without bias, scale = dim ** -0.5 with dim the *input* width
    (not out_dim), and no skip from the input (its width differs), so the output is v + proj(attn @ v).
    """

    def __init__(self, dim: int, out_dim: int, qkv_bias: bool = False, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.out_dim, self.scale = out_dim, dim ** -0.5
        self.fused_attn = use_fused_attn()  # uvclab.explicit_attention switches this off for FLOP counting
        self.qkv = nn.Linear(dim, 3 * out_dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(out_dim, out_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each (B, N, t): a single head, no head axis needed
        if self.fused_attn:
            a = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            a = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v  # (B, N, N) @ (B, N, t)
        return v + self.proj(a)  # (B, N, t)

    def macs(self, n: int) -> int:
        """Matmul MACs for n tokens: qkv, q@k^T, attn@v, proj."""
        return n * self.qkv.in_features * self.qkv.out_features + 2 * n * n * self.out_dim \
            + n * self.proj.in_features * self.proj.out_features


class TokenTransformer(nn.Module):
    """Official Token_transformer: x = attn(norm1(x)); x = x + mlp(norm2(x)); width dim -> out_dim."""

    def __init__(self, dim: int, out_dim: int, mlp_ratio: float = 1.0, norm_layer=nn.LayerNorm,
                 act_layer=nn.GELU, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.attn = TokenAttention(dim, out_dim, **dd)
        self.norm2 = norm_layer(out_dim, **dd)
        self.mlp = Mlp(out_dim, int(out_dim * mlp_ratio), out_dim, act_layer=act_layer, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def macs(self, n: int) -> int:
        return self.attn.macs(n) + n * sum(fc.in_features * fc.out_features for fc in (self.mlp.fc1, self.mlp.fc2))


class T2TStem(nn.Module):
    """Tokens-to-Token stem: image (B, C, H, W) -> tokens (B, H/16 * W/16, embed_dim).

    soft_split0 (unfold 7x7, stride 4, pad 2) -> attention1 (token transformer C*49 -> token_dim)
    -> re-fold to a grid -> soft_split1 (3x3, s2, p1) -> attention2 (9*token_dim -> token_dim)
    -> soft_split2 (3x3, s2, p1) -> project (Linear 9*token_dim -> embed_dim).
    Accepts the kwargs timm's VisionTransformer passes to `embed_layer`; patch_size must be 16.
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: Union[int, Tuple[int, int]] = 16,
                 in_chans: int = 3, embed_dim: int = 384, token_dim: int = 64, token_mlp_ratio: float = 1.0,
                 norm_layer=None, bias: bool = True, output_fmt: Optional[str] = None, strict_img_size: bool = True,
                 dynamic_img_pad: bool = False, token_norm_layer=nn.LayerNorm, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if to_2tuple(patch_size) != (STRIDE, STRIDE):
            raise UvclabError(f"T2T-ViT's soft splits (strides 4, 2, 2) fix the patch size at 16, got patch_size="
                              f"{patch_size}. Leave patch_size out; shrink the model with img_size instead.")
        self.patch_size, self.in_chans, self.embed_dim, self.token_dim = (STRIDE, STRIDE), in_chans, embed_dim, token_dim
        self.output_fmt = Format(output_fmt) if output_fmt is not None else None  # None: (B, N, D)
        self.strict_img_size, self.dynamic_img_pad = strict_img_size, dynamic_img_pad
        self.soft_split0, self.soft_split1, self.soft_split2 = (
            nn.Unfold(kernel_size=k, stride=s, padding=p) for k, s, p in _SPLITS)
        self.attention1 = TokenTransformer(in_chans * 7 * 7, token_dim, token_mlp_ratio, token_norm_layer, **dd)
        self.attention2 = TokenTransformer(token_dim * 3 * 3, token_dim, token_mlp_ratio, token_norm_layer, **dd)
        self.project = nn.Linear(token_dim * 3 * 3, embed_dim, bias=bias, **dd)
        self.norm = norm_layer(embed_dim, **dd) if norm_layer else nn.Identity()
        self.set_input_size(img_size)

    # ---- sizes (the attributes timm and uvclab read) ------------------------------------------------
    def set_input_size(self, img_size=None, patch_size=None) -> None:
        if patch_size is not None and to_2tuple(patch_size) != self.patch_size:
            raise UvclabError("T2T-ViT's patch size is fixed at 16 by its soft splits; it cannot be changed.")
        if img_size is not None:
            self.img_size = to_2tuple(img_size)
            self.grid_size = self.dynamic_feat_size(self.img_size)
            self.num_patches = self.grid_size[0] * self.grid_size[1]

    def feat_ratio(self, as_scalar: bool = True) -> Union[int, Tuple[int, int]]:
        return STRIDE if as_scalar else self.patch_size

    def grids(self, img_size: Tuple[int, int]) -> list[Tuple[int, int]]:
        """Token grids after soft_split0, 1, 2 (e.g. 224 -> 56, 28, 14)."""
        h, w = img_size
        if self.dynamic_img_pad:
            h, w = math.ceil(h / STRIDE) * STRIDE, math.ceil(w / STRIDE) * STRIDE
        out = []
        for k, s, p in _SPLITS:
            h, w = _split_size(h, k, s, p), _split_size(w, k, s, p)
            out.append((h, w))
        return out

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        return self.grids(img_size)[-1]

    def macs(self) -> int:
        """Matmul MACs per image at `img_size`: both token transformers and the projection (unfold is free)."""
        (h0, w0), (h1, w1), (h2, w2) = self.grids(self.img_size)
        return self.attention1.macs(h0 * w0) + self.attention2.macs(h1 * w1) \
            + h2 * w2 * self.project.in_features * self.project.out_features

    # ---- forward --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        if self.strict_img_size:
            torch._assert((H, W) == self.img_size, f"Input size ({H}, {W}) doesn't match model {self.img_size}.")
        if self.dynamic_img_pad:
            x = F.pad(x, (0, (-W) % STRIDE, 0, (-H) % STRIDE))
        (h0, w0), (h1, w1), (h2, w2) = self.grids((H, W))
        x = self.soft_split0(x).transpose(1, 2)                             # (B, h0*w0, C*49)
        x = self.attention1(x)                                              # (B, h0*w0, t)
        x = self.soft_split1(x.transpose(1, 2).reshape(B, -1, h0, w0)).transpose(1, 2)  # (B, h1*w1, 9t)
        x = self.attention2(x)                                              # (B, h1*w1, t)
        x = self.soft_split2(x.transpose(1, 2).reshape(B, -1, h1, w1)).transpose(1, 2)  # (B, h2*w2, 9t)
        x = self.norm(self.project(x))                                      # (B, h2*w2, D)
        if self.output_fmt == Format.NHWC:
            x = x.reshape(B, h2, w2, -1)
        elif self.output_fmt == Format.NCHW:
            x = x.transpose(1, 2).reshape(B, -1, h2, w2)
        return x


def sinusoid_table(n_position: int, dim: int) -> torch.Tensor:
    """(1, n_position, dim) fixed position table of the official code: sin on even, cos on odd channels."""
    pos = torch.arange(n_position, dtype=torch.float64, device="cpu")[:, None]
    freq = 10000.0 ** (2 * (torch.arange(dim, dtype=torch.float64, device="cpu") // 2) / dim)
    angle = pos / freq                                                      # (n_position, dim)
    angle[:, 0::2], angle[:, 1::2] = angle[:, 0::2].sin(), angle[:, 1::2].cos()
    return angle.float()[None]


class T2TViT(VisionTransformer):
    """timm VisionTransformer with the T2T stem and the official T2T-ViT defaults.

    Defaults: no qkv bias, class token, torch nn.LayerNorm (eps 1e-5, as the official code), and a fixed
    sinusoidal position table stored in timm's `pos_embed` Parameter with requires_grad=False (as the
    official code; `fixed_pos_embed=False` makes it trainable, initialised with the same table).
    """

    def __init__(self, img_size=224, patch_size=16, embed_dim: int = 384, depth: int = 14, num_heads: int = 6,
                 mlp_ratio: float = 3.0, qkv_bias: bool = False, token_dim: int = 64, token_mlp_ratio: float = 1.0,
                 fixed_pos_embed: bool = True, norm_layer=nn.LayerNorm, **kwargs):
        if "embed_layer" in kwargs:
            raise UvclabError("T2TViT builds its own stem; do not pass embed_layer.")
        stem = partial(T2TStem, token_dim=token_dim, token_mlp_ratio=token_mlp_ratio, token_norm_layer=norm_layer)
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, norm_layer=norm_layer,
                         embed_layer=stem, **kwargs)
        if self.pos_embed is not None:
            self.pos_embed.requires_grad_(not fixed_pos_embed)

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        super().init_weights(mode, needs_reset)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)  # official init (timm uses normal std 1e-6)
        self.reset_pos_embed()

    def reset_pos_embed(self) -> None:
        """Fill pos_embed with the sinusoid table (one row per token, class token included)."""
        if self.pos_embed is not None:
            with torch.no_grad():
                table = sinusoid_table(self.pos_embed.shape[1], self.pos_embed.shape[2])
                self.pos_embed.copy_(table.to(self.pos_embed.device, self.pos_embed.dtype))

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        self.reset_pos_embed()  # a fixed table is regenerated, not interpolated


# ---- timm registration ----------------------------------------------------------------------------------

def _cfg(**kwargs) -> dict:
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
            "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "first_conv": "patch_embed.attention1.attn.qkv", "classifier": "head", **kwargs}


_ARCHS = {  # official T2T-ViT sizes (embed_dim, depth, num_heads, mlp_ratio); all use token_dim 64
    "t2t_vit_7": (256, 7, 4, 2.0), "t2t_vit_10": (256, 10, 4, 2.0), "t2t_vit_12": (256, 12, 4, 2.0),
    "t2t_vit_14": (384, 14, 6, 3.0), "t2t_vit_19": (448, 19, 7, 3.0), "t2t_vit_24": (512, 24, 8, 3.0),
    "t2t_vit_t_14": (384, 14, 6, 3.0), "t2t_vit_t_19": (448, 19, 7, 3.0), "t2t_vit_t_24": (512, 24, 8, 3.0),
}
default_cfgs = generate_default_cfgs({name: _cfg() for name in _ARCHS})


def _create(variant: str, pretrained: bool = False, **kwargs) -> T2TViT:
    if pretrained:
        raise UvclabError(f"No downloadable weights exist for {variant} (timm hosts no T2T-ViT). Download the official "
                          "checkpoint (github.com/yitu-opensource/T2T-ViT, e.g. 81.7_T2T_ViTt_14.pth.tar for the "
                          "transformer-stem T2T-ViT-14) and pass it as create_vit(name, checkpoint=PATH) or "
                          "load_official_t2t_checkpoint(model, PATH).")
    embed_dim, depth, num_heads, mlp_ratio = _ARCHS[variant]
    args = dict(dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio), **kwargs)
    out_indices = args.pop("out_indices", 3)
    return build_model_with_cfg(T2TViT, variant, False, feature_cfg=dict(out_indices=out_indices,
                                                                         feature_cls="getter"), **args)


@register_model
def t2t_vit_7(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT-7 (embed 256, depth 7, 4 heads, MLP x2), transformer T2T stem: a small CPU/test size."""
    return _create("t2t_vit_7", pretrained, **kwargs)


@register_model
def t2t_vit_10(pretrained: bool = False, **kwargs) -> T2TViT:
    return _create("t2t_vit_10", pretrained, **kwargs)


@register_model
def t2t_vit_12(pretrained: bool = False, **kwargs) -> T2TViT:
    return _create("t2t_vit_12", pretrained, **kwargs)


@register_model
def t2t_vit_14(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT-14 (embed 384, depth 14, 6 heads, MLP x3) with the transformer T2T stem (= official T2T-ViT_t-14)."""
    return _create("t2t_vit_14", pretrained, **kwargs)


@register_model
def t2t_vit_19(pretrained: bool = False, **kwargs) -> T2TViT:
    return _create("t2t_vit_19", pretrained, **kwargs)


@register_model
def t2t_vit_24(pretrained: bool = False, **kwargs) -> T2TViT:
    return _create("t2t_vit_24", pretrained, **kwargs)


@register_model
def t2t_vit_t_14(pretrained: bool = False, **kwargs) -> T2TViT:
    """Official name of the transformer-stem T2T-ViT-14 (same architecture as t2t_vit_14 here)."""
    return _create("t2t_vit_t_14", pretrained, **kwargs)


@register_model
def t2t_vit_t_19(pretrained: bool = False, **kwargs) -> T2TViT:
    return _create("t2t_vit_t_19", pretrained, **kwargs)


@register_model
def t2t_vit_t_24(pretrained: bool = False, **kwargs) -> T2TViT:
    return _create("t2t_vit_t_24", pretrained, **kwargs)


# ---- official checkpoints -------------------------------------------------------------------------------

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


def load_official_t2t_checkpoint(model: T2TViT, path: str | Path, use_ema: bool = True) -> T2TViT:
    """Load an official T2T-ViT release file (or a uvclab-layout state dict) into `model`, strictly.

    Reads `state_dict_ema` (use_ema) or `state_dict` or a plain dict; a mismatch raises UvclabError naming
    the keys and the fix. Returns the model.
    """
    path = Path(path)
    sd = official_to_uvclab(_read_official(path, use_ema))
    if any(".kqv." in k for k in sd):
        raise UvclabError(f"'{path}' is a Performer-stem T2T-ViT checkpoint (e.g. 81.5_T2T_ViT_14.pth.tar); uvclab "
                          "implements the transformer stem. Download the T2T-ViT_t checkpoint instead (e.g. "
                          "81.7_T2T_ViTt_14.pth.tar for t2t_vit_14 / t2t_vit_t_14).")
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
