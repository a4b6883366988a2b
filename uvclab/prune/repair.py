"""Closed-form repair of the layers that read pruned channels: attn.proj (heads, value dims) and mlp.fc2 (neurons).

`mean` folds the pruned channels' mean contribution into the bias (FLAP, An et al. AAAI 2024; Variance-Based
Pruning, arXiv 2507.12988); `lstsq` refits the kept columns and the bias by ridge least squares so the layer's
output matches the unpruned layer's on calibration inputs (Kwon et al. NeurIPS 2022 "mask tuning"; CORP,
arXiv 2602.05243). Statistics come from the dense model (all gates open): per layer the Gram matrix of the
input with a constant 1 appended, in float64, all-reduced under torch.distributed so every rank computes the
same weights. Repair edits the gated model's weights in place and never its shapes: the masked model and its
export carry the repaired weights. Formulas: docs/method.md §11.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from uvclab.errors import UvclabError
from uvclab.prune.calibration import REPAIRS, CalibrationSettings  # noqa: F401 (REPAIRS re-exported)
from uvclab.vit.structure import Structure

MAX_RIDGE_TRIES = 8        # a failed Cholesky raises the ridge x10, at most this many times
MIN_PIVOT = 1e-12          # Cholesky pivot^2 / largest diagonal entry below this counts as failed (ill-conditioned)


# ---- which columns a structure keeps -----------------------------------------------------------------

def kept_inputs(structure: Structure) -> dict[tuple[int, str], list[int]]:
    """{(block, 'attn' | 'mlp'): kept input columns of attn.proj / mlp.fc2} for every layer that runs and has
    something pruned (head h, value dim d is column h * Dh + d, as `export_model` keeps them)."""
    Dh, out = structure.head_dim, {}
    for l, b in enumerate(structure.blocks):
        if b.runs_attn:
            cols = [h * Dh + d for h, dims in zip(b.heads, b.v_dims) for d in dims]
            if len(cols) < structure.num_heads * Dh:
                out[(l, "attn")] = cols
        if b.runs_mlp and len(b.mlp) < structure.mlp_hidden:
            out[(l, "mlp")] = list(b.mlp)
    return out


def _layer(model: torch.nn.Module, key: tuple[int, str]) -> torch.nn.Linear:
    blk = model.blocks[key[0]]
    return blk.attn.proj if key[1] == "attn" else blk.mlp.fc2


# ---- calibration statistics ---------------------------------------------------------------------------

class LayerStats:
    """Sums over calibration tokens of one layer's input x (d,): count, sum x, sum x^2 and, when asked, the Gram
    matrix of [x, 1] ((d+1, d+1), float64; its last row/column are sum x and the count)."""

    def __init__(self, d: int, gram: bool, device):
        self.d, self.count = d, torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(d, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros(d, dtype=torch.float64, device=device)
        self.gram = torch.zeros(d, d, dtype=torch.float64, device=device) if gram else None

    def add(self, x: torch.Tensor) -> None:
        X = x.detach().reshape(-1, self.d).to(torch.float64)  # (tokens, d)
        self.count += X.shape[0]
        self.sum += X.sum(0)
        if self.gram is not None:
            self.gram.addmm_(X.t(), X)
        else:
            self.sumsq += X.pow(2).sum(0)

    def finish(self) -> "LayerStats":
        if self.gram is not None:
            self.sumsq = self.gram.diagonal().clone()
        return self

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.count, self.sum, self.sumsq, self.gram) if t is not None]

    def augmented_gram(self) -> torch.Tensor:
        """(d+1, d+1) Gram matrix of [x, 1]."""
        G = self.gram.new_empty(self.d + 1, self.d + 1)
        G[:self.d, :self.d], G[:self.d, self.d], G[self.d, :self.d], G[self.d, self.d] = \
            self.gram, self.sum, self.sum, self.count
        return G

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count.clamp_min(1)


def gram_megabytes(model: torch.nn.Module, keys: Iterable[tuple[int, str]]) -> float:
    """Memory of the float64 Gram matrices for these layers (MB)."""
    return sum(_layer(model, k).in_features ** 2 * 8 for k in keys) / 2 ** 20


@contextmanager
def gates_open(model: torch.nn.Module):
    """Temporarily open every gate of a gated model (the dense model), in eval mode; restored afterwards."""
    names = (("block_gate", "attn_gate", "mlp_gate"), ("head_gate", "v_gate", "qk_gate"), ("neuron_gate",))
    mods = [(m, n) for blk in model.blocks for m, ns in zip((blk, blk.attn, blk.mlp), names) for n in ns]
    saved = [getattr(m, n, None) for m, n in mods]
    was_training = model.training
    for m, n in mods:
        setattr(m, n, None)
    model.eval()
    try:
        yield model
    finally:
        for (m, n), g in zip(mods, saved):
            setattr(m, n, g)
        model.train(was_training)


def _images(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def collect_stats(model: torch.nn.Module, batches: Iterable, layers: dict[tuple[int, str], bool],
                  max_gram_mb: Optional[float] = None) -> dict[tuple[int, str], LayerStats]:
    """Input statistics of the dense model (gates open) for `layers` = {(block, 'attn'|'mlp'): want Gram},
    summed over the batches (images, or (images, labels)) and, under torch.distributed, over ranks."""
    gram_keys = [k for k, g in layers.items() if g]
    need = gram_megabytes(model, gram_keys)
    if max_gram_mb is not None and need > max_gram_mb:
        raise UvclabError(
            f"lstsq repair needs {need:.0f} MB of float64 Gram matrices ({len(gram_keys)} layers, up to "
            f"{max(_layer(model, k).in_features for k in gram_keys) + 1}^2 entries each), over "
            f"calibration.max_gram_mb={max_gram_mb:g}. Raise it (--set calibration.max_gram_mb={need * 1.1:.0f}) "
            "if the memory is there, or use repair=mean, which needs no Gram matrix.")
    device = next(model.parameters()).device
    stats = {k: LayerStats(_layer(model, k).in_features, g, device) for k, g in layers.items()}
    hooks = [_layer(model, k).register_forward_pre_hook(lambda m, args, s=s: s.add(args[0]))
             for k, s in stats.items()]
    try:
        with gates_open(model):
            for batch in batches:
                model(_images(batch).to(device))
    finally:
        for h in hooks:
            h.remove()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for s in stats.values():
            for t in s.tensors():
                dist.all_reduce(t)
    return {k: s.finish() for k, s in stats.items()}


# ---- the closed forms ------------------------------------------------------------------------------------

def ridge_refit(W: torch.Tensor, b: Optional[torch.Tensor], G: torch.Tensor, kept: list[int], ridge: float
                ) -> tuple[torch.Tensor, Optional[torch.Tensor], float]:
    """Refit of y = W x + b using only x[kept]: (new W[:, kept], new b, ridge used).

    G: (d+1, d+1) Gram of [x, 1]. Minimises sum ||W' x[kept] + b' - (W x + b)||^2 + lam ||W' - W[:, kept]||^2
    (the ridge pulls toward the unpruned weights; the bias is not regularised): with K = kept + [bias],
    [W', b'] = ([W, b] G[:, K] + lam [W[:, kept], 0]) (G[K, K] + lam I')^-1, lam = ridge x mean(diag G[kept]).
    A failed (or ill-conditioned) Cholesky factor raises the ridge x10, up to MAX_RIDGE_TRIES times."""
    d = W.shape[1]
    Wa = torch.cat([W.to(G), (b.to(G) if b is not None else G.new_zeros(W.shape[0]))[:, None]], 1)  # (O, d+1)
    K = list(kept) + ([d] if b is not None else [])
    A, R = G[K][:, K], Wa @ G[:, K]                          # (k+1, k+1), (O, k+1)
    k = len(kept)
    scale = A.diagonal()[:k].mean().clamp_min(1e-300)
    prior = torch.cat([W.to(G)[:, kept], G.new_zeros(W.shape[0], len(K) - k)], 1)
    reg = torch.cat([G.new_ones(k), G.new_zeros(len(K) - k)])
    peak = A.diagonal().max().clamp_min(1e-300)
    r = ridge
    for _ in range(MAX_RIDGE_TRIES + 1):
        lam = r * scale
        L, info = torch.linalg.cholesky_ex(A + torch.diag(lam * reg))
        if int(info) == 0 and bool(torch.isfinite(L).all()) and float(L.diagonal().pow(2).min() / peak) > MIN_PIVOT:
            sol = torch.cholesky_solve((R + lam * prior).t(), L).t()  # (O, k+1)
            return sol[:, :k].to(W), (sol[:, k].to(b) if b is not None else None), r
        r = max(10 * r, 1e-9)
    raise UvclabError(f"lstsq repair: the calibration Gram matrix stays singular up to ridge {r / 10:g} (the kept "
                      "inputs are degenerate on the calibration images). Use more calibration samples, a larger "
                      "calibration.ridge, or repair=mean.")


def mean_bias(W: torch.Tensor, b: torch.Tensor, mean: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """b + W[:, pruned] @ mean(x[pruned]): the pruned channels' mean contribution, folded into the bias."""
    pruned = torch.ones(W.shape[1], dtype=torch.bool, device=W.device)
    pruned[kept] = False
    return b + (W.to(mean)[:, pruned] @ mean[pruned]).to(b)


# ---- the step ------------------------------------------------------------------------------------------

@torch.no_grad()
def repair(model: torch.nn.Module, structure: Structure, batches: Iterable, kind: str = "lstsq",
           settings: CalibrationSettings = CalibrationSettings(), samples: Optional[int] = None) -> dict:
    """Repair the gated `model` in place for `structure`; returns the report entry (`repair_report`).

    kind: 'none' (nothing), 'mean' or 'lstsq'. `batches`: calibration images (or (images, labels)), this
    rank's share. Skipped blocks, skipped branches and layers with nothing pruned are left bit-identical.
    `samples`: the number of calibration images over all ranks, for the report."""
    if kind not in REPAIRS:
        raise UvclabError(f"repair='{kind}' is not one of {REPAIRS}.")
    t0 = time.time()
    structure.validate(model)
    keys = kept_inputs(structure) if kind != "none" else {}
    fallbacks = {"attn": 0, "mlp": 0}
    ridges = {}
    if keys:
        stats = collect_stats(model, batches, {k: kind == "lstsq" for k in keys},
                              settings.max_gram_mb if kind == "lstsq" else None)
        for key, kept in keys.items():
            lin = _layer(model, key)
            if kind == "mean":
                if lin.bias is not None:
                    lin.bias.copy_(mean_bias(lin.weight, lin.bias, stats[key].mean, kept))
                continue
            w, b, used = ridge_refit(lin.weight, lin.bias, stats[key].augmented_gram(), kept, settings.ridge)
            lin.weight[:, kept] = w
            if b is not None:
                lin.bias.copy_(b)
            ridges[f"{key[0]}.{key[1]}"] = used
            fallbacks[key[1]] += used != settings.ridge
    return repair_report(kind, samples, len(keys), ridges, fallbacks, settings, time.time() - t0)


def repair_report(kind: str, samples: Optional[int], layers: int, ridges: dict, fallbacks: dict,
                  settings: CalibrationSettings, seconds: float) -> dict:
    """The report's `repair` entry: kind, calibration images, layers repaired, ridge fallbacks, seconds."""
    out = {"kind": kind, "samples": samples, "layers": layers, "seconds": round(seconds, 3)}
    if kind == "lstsq":
        out.update(ridge=settings.ridge, ridge_fallbacks=dict(fallbacks),
                   ridge_used={k: v for k, v in ridges.items() if v != settings.ridge})
    return out
