"""Gated timm Vision Transformers: multiplicative gates on heads, head dims, MLP neurons, branches, blocks.

`gate_vit(model)` turns a timm VisionTransformer into a gated one *in place* by switching its Block,
Attention and Mlp modules to the subclasses below. Parameters and state-dict keys are untouched, so
pretrained timm weights load unchanged. Gates are plain attributes (None = open, the exact timm path):

  attn.head_gate  (H,)      whole heads                      (UVC s[l,0])
  attn.v_gate     (H, Dh)   value/output dims of each head    (UVC r[l,h])
  attn.qk_gate    (H, Dh)   query/key dims of each head       (beyond the paper: tied q/k/v pruning)
  mlp.neuron_gate (M,)      MLP hidden neurons               (UVC s[l,1])
  blk.block_gate  ()        whole block: x + g * (Block(x) - x)   (UVC Gumbel skip gate)
  blk.attn_gate / blk.mlp_gate  ()   attention / MLP branch only   (beyond the paper)
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from uvclab.vit.models import check_supported


class GatedAttention(Attention):
    head_gate: Optional[torch.Tensor] = None
    v_gate: Optional[torch.Tensor] = None
    qk_gate: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, Dh)
        if self.qk_gate is not None:
            q = q * self.qk_gate[:, None, :]  # masking q's dims removes them from q.k
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                               dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if attn_mask is not None:
                attn = attn + attn_mask
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v  # (B, H, N, Dh)
        out_gate = self.output_gate()
        if out_gate is not None:
            x = x * out_gate[:, None, :]  # attention is linear in v: gating the output gates v's dims
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj(x))

    def output_gate(self) -> Optional[torch.Tensor]:
        """(H, Dh) product of head and v-dim gates, or None when both are open."""
        g = self.v_gate
        if self.head_gate is not None:
            hg = self.head_gate[:, None].expand(self.num_heads, self.head_dim)
            g = hg if g is None else g * hg
        return g


class GatedMlp(Mlp):
    neuron_gate: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(self.fc1(x)))  # (B, N, M)
        if self.neuron_gate is not None:
            x = x * self.neuron_gate
        return self.drop2(self.fc2(self.norm(x)))


class GatedBlock(Block):
    _uvclab_gated = True
    block_gate: Optional[torch.Tensor] = None
    attn_gate: Optional[torch.Tensor] = None
    mlp_gate: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if _is_closed(self.block_gate):
            return x
        x_in = x
        if not _is_closed(self.attn_gate):
            a = self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
            x = x + (a if self.attn_gate is None else self.attn_gate * a)
        if not _is_closed(self.mlp_gate):
            m = self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
            x = x + (m if self.mlp_gate is None else self.mlp_gate * m)
        if self.block_gate is not None:
            x = x_in + self.block_gate * (x - x_in)
        return x


def _is_closed(gate: Optional[torch.Tensor]) -> bool:
    """A hard 0 gate with no gradient: the branch is skipped, not computed and multiplied by zero."""
    return gate is not None and not gate.requires_grad and gate.numel() == 1 and float(gate) == 0.0


def gate_vit(model: VisionTransformer) -> VisionTransformer:
    """Make `model` gated in place (idempotent) and return it. Outputs are unchanged while gates are open."""
    check_supported(model)
    for blk in model.blocks:
        blk.__class__ = GatedBlock
        blk.attn.__class__ = GatedAttention
        blk.mlp.__class__ = GatedMlp
    return model


def is_gated(model: torch.nn.Module) -> bool:
    return isinstance(model, VisionTransformer) and all(isinstance(b, GatedBlock) for b in model.blocks)


def open_all_gates(model: VisionTransformer) -> None:
    for blk in model.blocks:
        blk.block_gate = blk.attn_gate = blk.mlp_gate = None
        blk.attn.head_gate = blk.attn.v_gate = blk.attn.qk_gate = None
        blk.mlp.neuron_gate = None


@contextmanager
def explicit_attention(model: torch.nn.Module) -> Iterator[None]:
    """Compute attention with explicit matmuls (FlopCounterMode cannot see the fused CPU SDPA kernel)."""
    mods = [m for m in model.modules() if hasattr(m, "fused_attn")]
    saved = [m.fused_attn for m in mods]
    for m in mods:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, s in zip(mods, saved):
            m.fused_attn = s
