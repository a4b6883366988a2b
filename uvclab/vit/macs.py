"""MACs and params of dense, structured and exported ViTs, and the differentiable expected MACs for UVC.

Counting convention (DeiT / UVC "FLOPs" = multiply-accumulates of matmuls only): patch embedding (or the
T2T stem), qkv, q.k^T, attn.v, proj, fc1, fc2, classifier head(s). LayerNorm, softmax, GELU, adds and
biases are not counted. At 224x224 this gives DeiT-Tiny 1,253,683,200 MACs, equal to FlopCounterMode / 2
with explicit-matmul attention. `structure_macs` counts the *exported* layout (padding included), so the
number every budget check uses is the one that actually runs. `expected_macs` is the Lagrangian's
R(s, r, g): UVC's reference formula (method doc 2.2, corrected `rho`) or the exact closed form.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import pandas as pd
import torch

from uvclab.errors import UvclabError
from uvclab.vit.structure import BlockStructure, Structure

Layout = Literal["fused", "compact"]
LAYOUTS = ("fused", "compact")
DEFAULT_LAYOUT: Layout = "compact"  # UVC prunes v only: keep q/k and v widths apart (see head_widths)


@dataclass(frozen=True)
class VitShape:
    """Everything the calculator needs to know about a ViT, read once from the model."""
    num_patches: int
    num_prefix: int          # class (+ distillation) tokens
    embed_dim: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    depth: int
    stem_macs: int           # patch embedding conv or T2T stem
    head_macs: int           # classifier head(s)
    qkv_bias: bool
    proj_bias: bool
    fc1_bias: bool
    fc2_bias: bool
    norm_params: int         # params of one block LayerNorm
    layerscale_params: int   # params of one LayerScale (0 without)
    stem_params: int
    head_params: int         # classifier head(s) and fc_norm
    fixed_params: int        # other params outside the blocks: class/dist tokens, pos embed, final norm

    @property
    def tokens(self) -> int:
        return self.num_patches + self.num_prefix


def vit_shape(model: torch.nn.Module) -> VitShape:
    """Read the shape of a (dense, gated or not) timm VisionTransformer."""
    blk = model.blocks[0]
    attn, mlp = blk.attn, blk.mlp
    pe = model.patch_embed
    if hasattr(pe, "macs"):
        stem_macs = int(pe.macs())
    else:
        conv = pe.proj
        stem_macs = pe.num_patches * conv.out_channels * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    heads = [m for m in (getattr(model, "head", None), getattr(model, "head_dist", None)) if isinstance(m, torch.nn.Linear)]
    head_macs = sum(h.in_features * h.out_features for h in heads)
    block_params = sum(p.numel() for b in model.blocks for p in b.parameters())
    stem_params = sum(p.numel() for p in pe.parameters())
    head_params = sum(p.numel() for m in heads + [getattr(model, "fc_norm", None)] if m is not None
                      for p in m.parameters())
    return VitShape(
        num_patches=pe.num_patches, num_prefix=model.num_prefix_tokens, embed_dim=model.embed_dim,
        num_heads=attn.num_heads, head_dim=attn.head_dim, mlp_hidden=mlp.fc1.out_features, depth=len(model.blocks),
        stem_macs=stem_macs, head_macs=head_macs, qkv_bias=attn.qkv.bias is not None,
        proj_bias=attn.proj.bias is not None, fc1_bias=mlp.fc1.bias is not None, fc2_bias=mlp.fc2.bias is not None,
        norm_params=sum(p.numel() for p in blk.norm1.parameters()),
        layerscale_params=sum(p.numel() for p in blk.ls1.parameters()),
        stem_params=stem_params, head_params=head_params,
        fixed_params=sum(p.numel() for p in model.parameters()) - block_params - stem_params - head_params)


def head_widths(b: BlockStructure, layout: Layout = DEFAULT_LAYOUT) -> tuple[int, int, int]:
    """(kept heads h, q/k width a, v width b) of one exported attention layer.

    Heads of a layer share one width so attention runs batched: narrower heads are zero-padded.
    'compact' keeps separate q/k and v widths (attention by explicit matmuls when they differ: on this CPU as
    fast as fused SDPA at full width, and SDPA itself is ~3x slower when v is narrower than q/k); 'fused'
    pads q/k and v to one common width, which keeps PyTorch's fused kernel (the right choice with tie_qk).
    """
    if layout not in LAYOUTS:
        raise UvclabError(f"Unknown attention layout '{layout}'; choose one of {LAYOUTS}.")
    if not b.runs_attn:
        return 0, 0, 0
    a, v = max(map(len, b.qk_dims)), max(map(len, b.v_dims))
    if layout == "fused":
        a = v = max(a, v)
    return len(b.heads), a, v


def _block_rows(s: VitShape, h: int, a: int, v: int, m: int, runs_attn: bool, runs_mlp: bool) -> list[tuple]:
    """(component, macs, params) of one block with h heads of q/k width a and v width v, m MLP neurons."""
    N, D = s.tokens, s.embed_dim
    rows = []
    if runs_attn:
        qkv_out = h * (2 * a + v)
        rows += [("norm1", 0, s.norm_params),
                 ("qkv", N * D * qkv_out, D * qkv_out + (qkv_out if s.qkv_bias else 0)),
                 ("q@k", N * N * h * a, 0), ("attn@v", N * N * h * v, 0),
                 ("proj", N * h * v * D, h * v * D + (D if s.proj_bias else 0) + s.layerscale_params)]
    if runs_mlp:
        rows += [("norm2", 0, s.norm_params),
                 ("fc1", N * D * m, D * m + (m if s.fc1_bias else 0)),
                 ("fc2", N * m * D, m * D + (D if s.fc2_bias else 0) + s.layerscale_params)]
    return rows


def block_macs(s: VitShape, b: BlockStructure, layout: Layout = DEFAULT_LAYOUT) -> int:
    """Exported MACs of one block (fast path for greedy structure fitting)."""
    if not b.keep:
        return 0
    h, a, v = head_widths(b, layout)
    return sum(mac for _, mac, _ in _block_rows(s, h, a, v, len(b.mlp), b.runs_attn, b.runs_mlp))


def macs_table(model_or_shape, structure: Optional[Structure] = None, layout: Layout = DEFAULT_LAYOUT) -> pd.DataFrame:
    """Per-component MACs and params (block -1: stem; block `depth`: head, and tokens/pos embed/final norm)."""
    s = model_or_shape if isinstance(model_or_shape, VitShape) else vit_shape(model_or_shape)
    rows = [(-1, "stem", s.stem_macs, s.stem_params)]
    for l in range(s.depth):
        if structure is None:
            H, Dh, M = s.num_heads, s.head_dim, s.mlp_hidden
            comps = _block_rows(s, H, Dh, Dh, M, True, True)
        else:
            b = structure.blocks[l]
            h, a, v = head_widths(b, layout)
            comps = _block_rows(s, h, a, v, len(b.mlp), b.runs_attn, b.runs_mlp)
        rows += [(l, c, mac, par) for c, mac, par in comps]
    rows += [(s.depth, "head", s.head_macs, s.head_params), (s.depth, "other", 0, s.fixed_params)]
    return pd.DataFrame(rows, columns=["block", "component", "macs", "params"])


def count(model_or_shape, structure: Optional[Structure] = None, layout: Layout = DEFAULT_LAYOUT) -> dict[str, int]:
    """{'macs': int, 'params': int} of the dense model (structure None) or of the exported structure.
    An exported model (`export_model`, `load_pruned`) counts as what it is: its own structure and layout."""
    if getattr(model_or_shape, "uvclab_export", None) is not None:
        if structure is not None:
            raise UvclabError("This model is already exported: count(model) gives its MACs; a structure applies "
                              "to the dense model it came from.")
        return count_exported(model_or_shape)
    t = macs_table(model_or_shape, structure, layout)
    return {"macs": int(t.macs.sum()), "params": int(t.params.sum())}


def count_exported(model: torch.nn.Module) -> dict[str, int]:
    """MACs / params of an exported model, from its structure and the dense architecture it was cut from."""
    meta = model.uvclab_export
    if not meta.get("model"):
        raise UvclabError("This export does not record its dense architecture (the model was not made by "
                          "uvclab.create_vit); count the dense model with its structure: count(dense, structure).")
    base = _skeleton_base(meta["model"])
    return count(base, Structure.from_dict(meta["structure"]), meta["layout"])


def _skeleton_base(cfg: dict) -> torch.nn.Module:
    from uvclab.vit.models import create_from_card
    with torch.device("meta"):
        return create_from_card(cfg)


def dense_macs(model_or_shape) -> int:
    return count(model_or_shape)["macs"]


def structure_macs(model_or_shape, structure: Structure, layout: Layout = DEFAULT_LAYOUT) -> int:
    """Exported MACs of a structure (the same number as `count`, without building the table)."""
    s = model_or_shape if isinstance(model_or_shape, VitShape) else vit_shape(model_or_shape)
    return s.stem_macs + s.head_macs + sum(block_macs(s, b, layout) for b in structure.blocks)


def check_budget(macs_ratio: float) -> float:
    if not (isinstance(macs_ratio, (int, float)) and 0 < macs_ratio <= 1):
        raise UvclabError(f"Budget macs_ratio={macs_ratio!r} is outside (0, 1]. Give the fraction of the dense "
                          "model's MACs to keep, e.g. 0.5 for half.")
    return float(macs_ratio)


def _clamp01(x: torch.Tensor) -> torch.Tensor:
    """clamp to [0, 1] whose gradient also passes at the bounds (torch's clamp gives 0 at exactly 1, which
    would freeze counts that start at 0)."""
    return x - (x - x.clamp(0, 1)).detach()


def expected_macs(s: VitShape, heads_removed: torch.Tensor, neurons_removed: torch.Tensor,
                  dims_removed: torch.Tensor, head_kept: torch.Tensor, block_gate: Optional[torch.Tensor] = None,
                  formula: Literal["exact", "reference"] = "exact", tie_qk: bool = False,
                  attn_gate: Optional[torch.Tensor] = None, mlp_gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Differentiable MACs R(s, r, g) of UVC's continuous state (per image, stem and head included).

    heads_removed (L,), neurons_removed (L,), dims_removed (L, H): ceiled counts (straight-through, so
    gradients reach s and r); head_kept (L, H) 0/1: which heads survive (their r counts); block_gate,
    attn_gate, mlp_gate (L,): keep probabilities or Gumbel samples (None = 1).
    'reference' is UVC's calc_flops (qkv and q.k scale with heads only, out-proj and attn.v with rho);
    'exact' counts q/k width, v width and neurons separately; tie_qk prunes q/k dims together with v.
    """
    N, D, H, Dh, M = s.tokens, s.embed_dim, s.num_heads, s.head_dim, s.mlp_hidden
    kept_heads = H - heads_removed                                   # (L,)
    v = kept_heads * Dh - (dims_removed * head_kept).sum(-1)        # (L,) total kept v width
    m = M - neurons_removed
    if formula == "reference":
        head_keep = _clamp01(kept_heads / H)
        rho = _clamp01(v / D)
        attn = 3 * N * D * D * head_keep + N * N * D * head_keep + (N * N * D + N * D * D) * rho
    elif formula == "exact":
        qk = v if tie_qk else kept_heads * Dh
        attn = N * D * (2 * qk + v) + N * N * qk + N * N * v + N * D * v
    else:
        raise UvclabError(f"Unknown MACs formula '{formula}'; choose 'exact' or 'reference'.")
    mlp = 2 * N * D * m
    if attn_gate is not None:
        attn = attn * attn_gate
    if mlp_gate is not None:
        mlp = mlp * mlp_gate
    per_block = attn + mlp
    if block_gate is not None:
        per_block = per_block * block_gate
    return s.stem_macs + s.head_macs + per_block.sum()


def flop_counter_macs(model: torch.nn.Module, shape: Optional[tuple[int, int, int]] = None) -> int:
    """MACs of one image measured by torch's FlopCounterMode (flops / 2) with explicit-matmul attention:
    a count independent of this calculator, for any model (ours, exported, or pruned by another tool)."""
    from torch.utils.flop_counter import FlopCounterMode

    from uvclab.vit.gated import explicit_attention
    from uvclab.vit.models import input_shape
    p = next(model.parameters())
    x = torch.zeros(1, *(shape or input_shape(model)), dtype=p.dtype, device=p.device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), explicit_attention(model), FlopCounterMode(display=False) as fc:
            model(x)
    finally:
        model.train(was)
    return fc.get_total_flops() // 2
