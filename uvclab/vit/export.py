"""Physical export: a smaller, faster ViT built from (model, Structure), and its safetensors save/load.

The exported model is the same timm VisionTransformer with its blocks replaced by `SlimBlock`s: skipped
blocks are gone, skipped branches are None, qkv/proj/fc1/fc2 are sliced to the kept heads, head dims and
neurons (explicit kept indices, as in Torch-Pruning's `prune_linear_out_channels`). Heads of one layer share
a width; narrower heads are zero-padded (see `budget.head_widths` for the 'fused' and 'compact' layouts).
Its output equals the masked gated model's. Files: `model.safetensors` + `uvclab.json` (structure, model
config, layout, uvclab version); loading unpickles nothing and reproduces outputs bit for bit.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from uvclab.version import __version__
from uvclab.vit.macs import DEFAULT_LAYOUT, Layout, count_exported, head_widths
from uvclab.errors import UvclabError
from uvclab.io_utils import atomic_write, atomic_write_text, payload_bytes
from uvclab.vit.structure import BlockStructure, Structure


class SlimAttention(nn.Module):
    """Multi-head attention with h heads of q/k width `qk_dim` and v width `v_dim` (original scale kept)."""

    def __init__(self, dim: int, num_heads: int, qk_dim: int, v_dim: int, scale: float,
                 qkv_bias: bool, proj_bias: bool):
        super().__init__()
        self.num_heads, self.qk_dim, self.v_dim, self.scale = num_heads, qk_dim, v_dim, scale
        self.fused_attn = True
        self.qkv = nn.Linear(dim, num_heads * (2 * qk_dim + v_dim), bias=qkv_bias)
        self.proj = nn.Linear(num_heads * v_dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        h, a, b = self.num_heads, self.qk_dim, self.v_dim
        q, k, v = self.qkv(x).split([h * a, h * a, h * b], dim=-1)
        q, k = (t.reshape(B, N, h, a).transpose(1, 2) for t in (q, k))  # (B, h, N, a)
        v = v.reshape(B, N, h, b).transpose(1, 2)                       # (B, h, N, b)
        if self.fused_attn and a == b:
            x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:  # explicit matmuls: faster on CPU than unfused SDPA when b != a, and visible to FlopCounterMode
            x = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, h * b))


class SlimBlock(nn.Module):
    """Pre-norm ViT block whose attention and/or MLP branch may be absent."""

    def __init__(self, norm1, attn, ls1, norm2, mlp, ls2):
        super().__init__()
        self.norm1, self.attn, self.ls1 = (norm1, attn, ls1) if attn is not None else (None, None, None)
        self.norm2, self.mlp, self.ls2 = (norm2, mlp, ls2) if mlp is not None else (None, None, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn is not None:
            x = x + self.ls1(self.attn(self.norm1(x)))
        if self.mlp is not None:
            x = x + self.ls2(self.mlp(self.norm2(x)))
        return x


def _padded_rows(weight: torch.Tensor, bias: Optional[torch.Tensor], base: int, head_dim: int,
                 heads: list[int], dims: list[list[int]], width: int):
    """Rows [base + h*Dh + d] for each kept head and dim, zero-padded to `width` rows per head."""
    D = weight.shape[1]
    w = weight.new_zeros(len(heads), width, D)
    bb = None if bias is None else bias.new_zeros(len(heads), width)
    for i, (h, idx) in enumerate(zip(heads, dims)):
        rows = torch.tensor([base + h * head_dim + d for d in idx], dtype=torch.long)
        w[i, :len(idx)] = weight[rows]
        if bb is not None:
            bb[i, :len(idx)] = bias[rows]
    return w.reshape(-1, D), None if bb is None else bb.reshape(-1)


def _slim_block(blk: nn.Module, b: BlockStructure, layout: Layout) -> SlimBlock:
    attn = mlp = None
    if b.runs_attn:
        src = blk.attn
        H, Dh = src.num_heads, src.head_dim
        h, a, v = head_widths(b, layout)
        W, bias = src.qkv.weight.detach(), None if src.qkv.bias is None else src.qkv.bias.detach()
        parts = [_padded_rows(W, bias, off * H * Dh, Dh, b.heads, dims, width)
                 for off, dims, width in ((0, b.qk_dims, a), (1, b.qk_dims, a), (2, b.v_dims, v))]
        attn = SlimAttention(W.shape[1], h, a, v, src.scale, bias is not None, src.proj.bias is not None)
        attn.qkv.weight.data.copy_(torch.cat([p[0] for p in parts]))
        if bias is not None:
            attn.qkv.bias.data.copy_(torch.cat([p[1] for p in parts]))
        proj_cols, _ = _padded_rows(src.proj.weight.detach().t(), None, 0, Dh, b.heads, b.v_dims, v)
        attn.proj.weight.data.copy_(proj_cols.t())
        if src.proj.bias is not None:
            attn.proj.bias.data.copy_(src.proj.bias.detach())
    if b.runs_mlp:
        from timm.layers import Mlp
        src = blk.mlp
        keep = torch.tensor(b.mlp, dtype=torch.long)
        mlp = Mlp(src.fc1.in_features, len(b.mlp), src.fc2.out_features, act_layer=type(src.act),
                  bias=(src.fc1.bias is not None, src.fc2.bias is not None))
        mlp.fc1.weight.data.copy_(src.fc1.weight.detach()[keep])
        if src.fc1.bias is not None:
            mlp.fc1.bias.data.copy_(src.fc1.bias.detach()[keep])
        mlp.fc2.weight.data.copy_(src.fc2.weight.detach()[:, keep])
        if src.fc2.bias is not None:
            mlp.fc2.bias.data.copy_(src.fc2.bias.detach())
    return SlimBlock(copy.deepcopy(blk.norm1), attn, copy.deepcopy(blk.ls1),
                     copy.deepcopy(blk.norm2), mlp, copy.deepcopy(blk.ls2))


def export_model(model: nn.Module, structure: Structure, layout: Layout = DEFAULT_LAYOUT) -> nn.Module:
    """A physically smaller copy of `model` (gated or plain timm ViT) keeping only what `structure` keeps."""
    structure.validate(model)
    slim = copy.copy(model)  # shallow: shares stem/head modules until we deep-copy below
    slim._modules = dict(model._modules)
    slim.blocks = nn.Sequential(*[_slim_block(blk, b, layout) for blk, b in zip(model.blocks, structure.blocks)
                                  if b.keep and (b.runs_attn or b.runs_mlp)])
    slim = copy.deepcopy(slim)
    slim.uvclab_export = {"structure": structure.to_dict(), "layout": layout,
                          "model": getattr(model, "uvclab_config", None)}
    return slim.eval()


# ---- save / load -------------------------------------------------------------------------------------

def save_pruned(model: nn.Module, path: str | Path, extra: Optional[dict] = None) -> Path:
    """Write an exported model to folder `path` (model.safetensors + uvclab.json), atomically."""
    from safetensors.torch import save_file
    meta = getattr(model, "uvclab_export", None)
    if meta is None or meta.get("model") is None:
        raise UvclabError("save_pruned needs a model returned by export_model() from a model made with "
                          "uvclab.create_vit (its config is what rebuilds it at load time).")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path / "model.safetensors", lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}),
                 size=payload_bytes(sd))
    card = {"uvclab_version": __version__, **meta, **count_exported(model), **(extra or {})}
    atomic_write_text(path / "uvclab.json", json.dumps(card, indent=1))
    return path


def load_pruned(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an exported model from `save_pruned`'s folder; no pickle is involved."""
    from safetensors.torch import load_file
    from uvclab.vit.models import create_from_card
    path = Path(path)
    if path.is_file():
        path = path.parent
    card_path, weights_path = path / "uvclab.json", path / "model.safetensors"
    if not card_path.is_file() or not weights_path.is_file():
        raise UvclabError(f"'{path}' is not an exported uvclab model: it needs uvclab.json and model.safetensors "
                          "(write them with uvclab.save_pruned or `uvclab compress`).")
    try:
        card = json.loads(card_path.read_text())
        cfg, structure, layout = card["model"], Structure.from_dict(card["structure"]), card["layout"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UvclabError(f"'{card_path}' is corrupt or truncated ({e}); export the model again.") from e
    base = create_from_card(cfg)
    slim = export_model(base, structure, layout)
    try:
        sd = load_file(str(weights_path))
    except Exception as e:
        raise UvclabError(f"Cannot read '{weights_path}': {e}. The file is corrupt or truncated; export again.") from e
    try:
        slim.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise UvclabError(f"'{weights_path}' does not match its uvclab.json ({str(e)[:300]}); export again.") from e
    return slim.to(device).eval()
