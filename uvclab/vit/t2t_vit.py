"""T2T-ViT (Tokens-to-Token ViT, Yuan et al., ICCV 2021) as a timm VisionTransformer with a T2T stem.

Follows the official code (github.com/yitu-opensource/T2T-ViT, `models/t2t_vit.py`) with both token modules
(`t2t_tokens.py`): `tokens_type='performer'` (the official t2t_vit_7/10/12/14/19/24, the paper's T2T-ViT-14 at
4.8 G MACs) and `'transformer'` (the official T2T-ViT_t models, t2t_vit_t_14/19/24). Only the stem is new:
`T2TStem` is passed to timm's VisionTransformer as `embed_layer`, so the backbone blocks are plain timm
Block/Attention/Mlp and uvclab's gating, MACs calculator and export work unchanged; the stem is a fixed cost.
Official release files load through `t2t_checkpoint.load_official_t2t_checkpoint`.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import Format, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from uvclab.errors import UvclabError
from uvclab.vit.t2t_checkpoint import load_official_t2t_checkpoint  # noqa: F401  (re-exported)
from uvclab.vit.t2t_tokens import TokenPerformer, TokenTransformer

__all__ = ["T2TStem", "T2TViT", "TOKENS_TYPES", "load_official_t2t_checkpoint", "sinusoid_table", "card_kwargs",
           "stem_for"]

TOKENS_TYPES = ("performer", "transformer")

STRIDE = 16  # effective patch size: soft splits of stride 4, 2, 2
_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))  # (kernel, stride, padding) of soft_split0..2


def _split_size(n: int, kernel: int, stride: int, pad: int) -> int:
    return (n + 2 * pad - kernel) // stride + 1  # nn.Unfold output positions along one side


class T2TStem(nn.Module):
    """Tokens-to-Token stem: image (B, C, H, W) -> tokens (B, H/16 * W/16, embed_dim).

    soft_split0 (unfold 7x7, stride 4, pad 2) -> attention1 (token module C*49 -> token_dim)
    -> re-fold to a grid -> soft_split1 (3x3, s2, p1) -> attention2 (9*token_dim -> token_dim)
    -> soft_split2 (3x3, s2, p1) -> project (Linear 9*token_dim -> embed_dim). The token modules are
    Performers (`tokens_type='performer'`, kernel_ratio and dropout as the official 0.5 and 0.1) or
    Token_transformers (`'transformer'`, MLP ratio `token_mlp_ratio`).
    Accepts the kwargs timm's VisionTransformer passes to `embed_layer`; patch_size must be 16.
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: Union[int, Tuple[int, int]] = 16,
                 in_chans: int = 3, embed_dim: int = 384, token_dim: int = 64, tokens_type: str = "performer",
                 token_mlp_ratio: float = 1.0, performer_kernel_ratio: float = 0.5, performer_drop_rate: float = 0.1,
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
        if tokens_type == "performer":
            token = partial(TokenPerformer, kernel_ratio=performer_kernel_ratio, drop=performer_drop_rate)
        elif tokens_type == "transformer":
            token = partial(TokenTransformer, mlp_ratio=token_mlp_ratio)
        else:
            raise UvclabError(f"tokens_type={tokens_type!r}: choose one of {TOKENS_TYPES} (T2T-ViT's token modules).")
        self.tokens_type = tokens_type
        self.attention1 = token(in_chans * 7 * 7, token_dim, norm_layer=token_norm_layer, **dd)
        self.attention2 = token(token_dim * 3 * 3, token_dim, norm_layer=token_norm_layer, **dd)
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
        """Matmul MACs per image at `img_size`: both token modules and the projection (unfold is free)."""
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

    Defaults: the Performer stem (official `T2T_ViT`'s tokens_type), no qkv bias, class token, torch
    nn.LayerNorm (eps 1e-5, as the official code), and a fixed sinusoidal position table stored in timm's
    `pos_embed` Parameter with requires_grad=False (as the official code; `fixed_pos_embed=False` makes it
    trainable, initialised with the same table).
    """

    def __init__(self, img_size=224, patch_size=16, embed_dim: int = 384, depth: int = 14, num_heads: int = 6,
                 mlp_ratio: float = 3.0, qkv_bias: bool = False, tokens_type: str = "performer", token_dim: int = 64,
                 token_mlp_ratio: float = 1.0, performer_kernel_ratio: float = 0.5, performer_drop_rate: float = 0.1,
                 fixed_pos_embed: bool = True, norm_layer=nn.LayerNorm, **kwargs):
        if "embed_layer" in kwargs:
            raise UvclabError("T2TViT builds its own stem; do not pass embed_layer.")
        stem = partial(T2TStem, token_dim=token_dim, tokens_type=tokens_type, token_mlp_ratio=token_mlp_ratio,
                       performer_kernel_ratio=performer_kernel_ratio, performer_drop_rate=performer_drop_rate,
                       token_norm_layer=norm_layer)
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, norm_layer=norm_layer,
                         embed_layer=stem, **kwargs)
        self.tokens_type = tokens_type
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

_ARCHS = {  # official T2T-ViT sizes (embed_dim, depth, num_heads, mlp_ratio, tokens_type); all use token_dim 64
    "t2t_vit_7": (256, 7, 4, 2.0, "performer"), "t2t_vit_10": (256, 10, 4, 2.0, "performer"),
    "t2t_vit_12": (256, 12, 4, 2.0, "performer"), "t2t_vit_14": (384, 14, 6, 3.0, "performer"),
    "t2t_vit_19": (448, 19, 7, 3.0, "performer"), "t2t_vit_24": (512, 24, 8, 3.0, "performer"),
    "t2t_vit_t_14": (384, 14, 6, 3.0, "transformer"), "t2t_vit_t_19": (448, 19, 7, 3.0, "transformer"),
    "t2t_vit_t_24": (512, 24, 8, 3.0, "transformer"),
}
_FIRST = {"performer": "patch_embed.attention1.kqv", "transformer": "patch_embed.attention1.attn.qkv"}


def _cfg(tokens_type: str) -> dict:
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
            "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "first_conv": _FIRST[tokens_type], "classifier": "head"}


default_cfgs = generate_default_cfgs({name: _cfg(arch[4]) for name, arch in _ARCHS.items()})
_RELEASES = {"t2t_vit_7": "71.7_T2T_ViT_7", "t2t_vit_10": "75.2_T2T_ViT_10", "t2t_vit_12": "76.5_T2T_ViT_12",
             "t2t_vit_14": "81.5_T2T_ViT_14", "t2t_vit_19": "81.9_T2T_ViT_19", "t2t_vit_24": "82.3_T2T_ViT_24",
             "t2t_vit_t_14": "81.7_T2T_ViTt_14", "t2t_vit_t_19": "82.4_T2T_ViTt_19", "t2t_vit_t_24": "82.6_T2T_ViTt_24"}


def _create(variant: str, pretrained: bool = False, **kwargs) -> T2TViT:
    if pretrained:
        raise UvclabError(f"No downloadable weights exist for {variant} (timm hosts no T2T-ViT). Download the official "
                          f"checkpoint (github.com/yitu-opensource/T2T-ViT: {_RELEASES[variant]}.pth.tar) and pass it "
                          "as create_vit(name, checkpoint=PATH) or load_official_t2t_checkpoint(model, PATH).")
    embed_dim, depth, num_heads, mlp_ratio, tokens_type = _ARCHS[variant]
    args = dict(dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                     tokens_type=tokens_type), **kwargs)
    out_indices = args.pop("out_indices", 3)
    return build_model_with_cfg(T2TViT, variant, False, feature_cfg=dict(out_indices=out_indices,
                                                                         feature_cls="getter"), **args)


def card_kwargs(name: str, kwargs: dict) -> dict:
    """The kwargs that rebuild a model from a card's {'name', 'kwargs'}. Cards written before uvclab had the
    Performer stem record no tokens_type, and then every t2t_vit_* name meant the Transformer stem: such a
    card keeps building what it was written for. create_vit records tokens_type in every new T2T-ViT card."""
    if name in _ARCHS and "tokens_type" not in kwargs:
        return {**kwargs, "tokens_type": "transformer"}
    return dict(kwargs)


def stem_for(name: str, kwargs: dict) -> str | None:
    """The stem `create_vit(name, **kwargs)` builds: 'performer' / 'transformer', None for other models."""
    return kwargs.get("tokens_type", _ARCHS[name][4]) if name in _ARCHS else None


def _register(variant: str, doc: str):
    def fn(pretrained: bool = False, **kwargs) -> T2TViT:
        return _create(variant, pretrained, **kwargs)
    fn.__name__ = fn.__qualname__ = variant
    fn.__doc__ = doc
    return register_model(fn)


for _name, (_d, _depth, _h, _r, _tt) in _ARCHS.items():
    globals()[_name] = _register(_name, f"T2T-ViT-{_name.rsplit('_', 1)[1]} (embed {_d}, depth {_depth}, {_h} heads, "
                                        f"MLP x{_r:g}) with the {_tt} T2T stem (official {_name}, "
                                        f"release {_RELEASES[_name]}.pth.tar).")
