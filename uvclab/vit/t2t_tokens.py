"""The two token modules of T2T-ViT's tokens-to-token stem (Yuan et al., ICCV 2021), as the official code has them.

`TokenTransformer` = `models/token_transformer.py` (one-head softmax attention, the T2T-ViT_t models);
`TokenPerformer` = `models/token_performer.py` (one-head Performer attention with positive random features,
the T2T-ViT-7..24 models and the paper's T2T-ViT-14). Both change the token width dim -> out_dim and take
the residual from v (the input has another width). Parameter names follow the official modules, so the
official state dicts load with only the `tokens_to_token.` prefix renamed. Each reports its matmul MACs.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import Mlp, use_fused_attn

__all__ = ["TokenAttention", "TokenTransformer", "TokenPerformer"]


def _linear_macs(n: int, *linears: nn.Linear) -> int:
    return n * sum(fc.in_features * fc.out_features for fc in linears)


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
        return _linear_macs(n, self.qkv, self.proj) + 2 * n * n * self.out_dim


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
        return self.attn.macs(n) + _linear_macs(n, self.mlp.fc1, self.mlp.fc2)


class TokenPerformer(nn.Module):
    """Official Token_performer: one-head linear attention with positive random features (FAVOR+).

    softmax(q k^T) v is replaced by phi(q) (phi(k)^T v) / (phi(q) phi(k)^T 1 + eps) with
    phi(x) = exp(w x - |x|^2 / 2) / sqrt(m): m = int(out_dim * kernel_ratio) random features, `w` (m, out_dim)
    orthogonal rows scaled by sqrt(m), drawn once and frozen (a Parameter with requires_grad=False, so it is
    stored in the checkpoint), eps = 1e-8, no 1/sqrt(d) temperature. Then y = v + dropout(proj(attn)) and
    y + mlp(norm2(y)), the MLP a Sequential (Linear, GELU, Linear, Dropout) as in the official file (keys
    mlp.0 / mlp.2). The random features are computed in (at least) float32 with autocast off, as the
    official `.float()` casts intend. Dropout is 0.1 in both places, the official value.
    """

    def __init__(self, dim: int, out_dim: int, kernel_ratio: float = 0.5, drop: float = 0.1,
                 norm_layer=nn.LayerNorm, act_layer=nn.GELU, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.emb, self.epsilon = out_dim, 1e-8
        self.norm1 = norm_layer(dim, **dd)
        self.kqv = nn.Linear(dim, 3 * out_dim, **dd)  # order k, q, v; with bias (official)
        self.dp = nn.Dropout(drop)
        self.proj = nn.Linear(out_dim, out_dim, **dd)
        self.norm2 = norm_layer(out_dim, **dd)
        self.mlp = nn.Sequential(nn.Linear(out_dim, out_dim, **dd), act_layer(), nn.Linear(out_dim, out_dim, **dd),
                                 nn.Dropout(drop))
        self.m = int(out_dim * kernel_ratio)
        w = torch.randn(self.m, out_dim, **dd)  # drawn then replaced, as the official code (same RNG stream)
        self.w = nn.Parameter(nn.init.orthogonal_(w) * math.sqrt(self.m), requires_grad=False)  # (m, out_dim)

    def prm_exp(self, x: torch.Tensor) -> torch.Tensor:
        """Positive random features (B, T, out_dim) -> (B, T, m): exp(w x - |x|^2 / 2) / sqrt(m)."""
        xd = (x * x).sum(dim=-1, keepdim=True) / 2                           # (B, T, 1)
        wtx = torch.einsum("bti,mi->btm", x, self.w.to(x.dtype))              # (B, T, m)
        return torch.exp(wtx - xd) / math.sqrt(self.m)

    def single_attn(self, x: torch.Tensor) -> torch.Tensor:
        k, q, v = torch.split(self.kqv(x), self.emb, dim=-1)                # each (B, T, out_dim)
        ft = torch.promote_types(v.dtype, torch.float32)
        with _no_autocast(v.device.type):
            kp, qp = self.prm_exp(k.to(ft)), self.prm_exp(q.to(ft))          # (B, T, m)
            D = torch.einsum("bti,bi->bt", qp, kp.sum(dim=1)).unsqueeze(dim=2)  # (B, T, 1) normaliser
            kptv = torch.einsum("bin,bim->bnm", v.to(ft), kp)                # (B, out_dim, m)
            y = torch.einsum("bti,bni->btn", qp, kptv) / (D + self.epsilon)  # (B, T, out_dim)
        return v + self.dp(self.proj(y.to(v.dtype)))                        # residual on v (official)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.single_attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def macs(self, n: int) -> int:
        """Matmul MACs for n tokens: kqv; w k and w q (2 e m); the normaliser (m); phi(k)^T v and phi(q) (.)
        (2 e m); proj and the MLP (3 e^2). The |x|^2, exp, sums and division are elementwise (not counted)."""
        e, m = self.emb, self.m
        return _linear_macs(n, self.kqv, self.proj, self.mlp[0], self.mlp[2]) + n * (4 * e * m + m)


def _no_autocast(device_type: str):
    """autocast switched off where it is on (it would run the random features in half precision)."""
    on = device_type in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(device_type)
    return torch.autocast(device_type, enabled=False) if on else nullcontext()
