"""A measured latency table for one ViT shape on one device, and its differentiable interpolation.

The cost model is separable (as NViT's per-block latency grid, Yang et al., CVPR 2023, and HALP's lookup
table, Shen et al., NeurIPS 2022): a block costs attn(h, a, v) + mlp(m) + a per-block overhead, where attn
is the measured pre-norm attention branch (norm1, qkv, attention, proj, residual add) with h heads of q/k
width a and v width v, and mlp the MLP branch (norm2, fc1, GELU, fc2, add) with m neurons; the model adds a
fixed part (stem, tokens, final norm, head). Between grid points the table is piecewise linear in every axis
(trilinear for attention): that is the predicted latency (R's value). Its gradient, the price of one more group,
comes from a smooth fit of the same grid (attention ~ c0 + c1 h + c2 h a + c3 h v, MLP ~ d0 + d1 m, non-negative
least squares): a measured grid is noisy, and a flat or falling segment would make a group look free to keep
forever. A calibration fitted on whole exported models corrects the sum of the parts: a running block costs
scale x (its parts) + block_ms (`fit_calibration`; identity until fitted). The measurements and the cache live
in `uvclab.vit.latency_build`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from uvclab.errors import UvclabError
from uvclab.vit.macs import DEFAULT_LAYOUT, Layout, VitShape, head_widths
from uvclab.vit.structure import BlockStructure, Structure

FORMAT = 4  # bump when the measured quantities change: older cached tables are rebuilt


@dataclass
class LatencyTable:
    key: dict                    # what the numbers depend on (device, torch, threads, batch, tokens, widths, grid)
    heads: list[int]             # grid of kept heads (1..H)
    qk_widths: list[int]         # grid of q/k widths per head
    v_widths: list[int]          # grid of v widths per head
    attn_ms: list                # (len(heads), len(qk_widths), len(v_widths)) attention branch, ms per batch
    mlp_widths: list[int]        # grid of MLP neurons
    mlp_ms: list                 # (len(mlp_widths),) MLP branch, ms per batch
    block_overhead_ms: float     # per block running both branches: dense block - its two branches (signed)
    fixed_ms: float              # the model without blocks: stem, tokens, final norm, head
    dense_ms: float              # the whole dense model, measured (compare with predicted_dense_ms)
    build_seconds: float = 0.0
    # whole-model correction of a running block: scale x (attn + mlp + overhead) + block_ms (`fit_calibration`)
    calibration: dict = field(default_factory=lambda: {"scale": 1.0, "block_ms": 0.0})

    # ---- (de)serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyTable":
        try:
            t = cls(**d)
        except TypeError as e:
            raise UvclabError(f"Not a uvclab latency table ({e}); rebuild it with `uvclab latency-table`.") from e
        if torch.tensor(t.attn_ms).shape != (len(t.heads), len(t.qk_widths), len(t.v_widths)) \
                or len(t.mlp_ms) != len(t.mlp_widths):
            raise UvclabError("Latency table grids and values disagree; rebuild it with `uvclab latency-table`.")
        return t

    def save(self, path: str | Path) -> None:
        from uvclab.io_utils import atomic_write_text
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UvclabError(f"Cannot read latency table '{path}' ({e}); rebuild it with "
                              "`uvclab latency-table`.") from e

    # ---- checks -----------------------------------------------------------------------------------
    def check_shape(self, s: VitShape) -> None:
        """Raise a clear error when this table was measured for another architecture or token count."""
        want = {"embed_dim": s.embed_dim, "num_heads": s.num_heads, "head_dim": s.head_dim,
                "mlp_hidden": s.mlp_hidden, "tokens": s.tokens}
        diff = {k: (self.key.get(k), v) for k, v in want.items() if self.key.get(k) != v}
        if diff:
            raise UvclabError(f"Latency table does not fit the model ({diff}: table vs model); build one for this "
                              "model with `uvclab latency-table` or `uvclab.vit.latency_build.latency_table`.")

    # ---- prediction (torch, differentiable) --------------------------------------------------------
    def _t(self, name: str, like: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(getattr(self, name), dtype=like.dtype if like.is_floating_point() else torch.float32,
                               device=like.device)

    def attn(self, h: torch.Tensor, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention branch ms for h heads of q/k width a and v width v (tensors of one shape; h >= 1)."""
        h, a, v = (torch.as_tensor(x, dtype=torch.float32) for x in (h, a, v))
        T = self._t("attn_ms", h)
        (ih, wh), (ia, wa), (iv, wv) = (_segment(self._t(g, h), x) for g, x in
                                        (("heads", h), ("qk_widths", a), ("v_widths", v)))
        out = torch.zeros_like(h)
        for ch, fh in ((0, 1 - wh), (1, wh)):
            for ca, fa in ((0, 1 - wa), (1, wa)):
                for cv, fv in ((0, 1 - wv), (1, wv)):
                    out = out + fh * fa * fv * T[ih + ch, ia + ca, iv + cv]
        return out

    def mlp(self, m: torch.Tensor) -> torch.Tensor:
        """MLP branch ms for m kept neurons (piecewise linear between the grid's widths)."""
        m = torch.as_tensor(m, dtype=torch.float32)
        T = self._t("mlp_ms", m)
        i, w = _segment(self._t("mlp_widths", m), m)
        return (1 - w) * T[i] + w * T[i + 1]

    def _fit(self) -> tuple[list[float], list[float]]:
        """Non-negative least-squares coefficients (c0..c3 of attention, d0, d1 of the MLP) of the grid."""
        memo = self.__dict__.setdefault("_memo", {})
        if "fit" not in memo:
            import numpy as np
            from scipy.optimize import nnls
            hav = np.array([(h, a, v) for h in self.heads for a in self.qk_widths for v in self.v_widths], float)
            X = np.column_stack([np.ones(len(hav)), hav[:, 0], hav[:, 0] * hav[:, 1], hav[:, 0] * hav[:, 2]])
            c = nnls(X, np.asarray(self.attn_ms, float).reshape(-1))[0]
            m = np.asarray(self.mlp_widths, float)
            d = nnls(np.column_stack([np.ones_like(m), m]), np.asarray(self.mlp_ms, float))[0]
            memo["fit"] = (c.tolist(), d.tolist())
        return memo["fit"]

    def _smooth_grad(self, exact: torch.Tensor, smooth: torch.Tensor) -> torch.Tensor:
        """The exact value with the smooth fit's gradient (straight-through)."""
        return exact.detach() + smooth - smooth.detach()

    def expected_latency(self, s: VitShape, heads_removed: torch.Tensor, neurons_removed: torch.Tensor,
                         dims_removed: torch.Tensor, head_kept: torch.Tensor,
                         block_gate: Optional[torch.Tensor] = None, tie_qk: bool = False,
                         layout: Layout = DEFAULT_LAYOUT, attn_gate: Optional[torch.Tensor] = None,
                         mlp_gate: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Predicted ms of UVC's continuous state; the arguments are those of `macs.expected_macs`.

        A layer's v width per head is its total kept v width / kept heads (tied dims make the heads equal);
        q/k keep the full head width unless tie_qk; the 'fused' layout pads q/k and v to one width."""
        H, Dh, M = s.num_heads, s.head_dim, s.mlp_hidden
        h = H - heads_removed                                            # (L,)
        v = (h * Dh - (dims_removed * head_kept).sum(-1)) / h.detach().clamp_min(1)
        a = v if tie_qk else torch.full_like(v, float(Dh))
        if layout == "fused":
            a = v = torch.maximum(a, v)
        (c0, c1, c2, c3), (d0, d1) = self._fit()
        attn = self._smooth_grad(self.attn(h, a, v), c0 + c1 * h + c2 * h * a + c3 * h * v)
        m = M - neurons_removed
        mlp = self._smooth_grad(self.mlp(m), d0 + d1 * m)
        if attn_gate is not None:
            attn = attn * attn_gate
        if mlp_gate is not None:
            mlp = mlp * mlp_gate
        k, c = self._calib()
        per_block = k * (attn + mlp + self.block_overhead_ms) + c
        if block_gate is not None:
            per_block = per_block * block_gate
        return self.fixed_ms + per_block.sum()

    # ---- prediction of a structure (floats; the fit's cost) -----------------------------------------
    def block_ms(self, b: BlockStructure, layout: Layout = DEFAULT_LAYOUT) -> float:
        """Predicted ms of one exported block (0 when skipped)."""
        if not b.keep or not (b.runs_attn or b.runs_mlp):
            return 0.0
        return self._block_ms(head_widths(b, layout) if b.runs_attn else None, len(b.mlp) if b.runs_mlp else None)

    def _block_ms(self, hav: Optional[tuple[int, int, int]], m: Optional[int]) -> float:
        memo = self.__dict__.setdefault("_memo", {})  # the greedy fit asks for the same blocks many times
        if (hav, m) not in memo:
            ms = self.block_overhead_ms if (hav and m) else 0.0
            if hav:
                ms += float(self.attn(*(torch.tensor(float(x)) for x in hav)))
            if m:
                ms += float(self.mlp(torch.tensor(float(m))))
            k, c = self._calib()
            memo[hav, m] = k * ms + c
        return memo[hav, m]

    def structure_ms(self, structure: Structure, layout: Layout = DEFAULT_LAYOUT) -> float:
        """Predicted ms of the exported model of `structure`."""
        return self.fixed_ms + sum(self.block_ms(b, layout) for b in structure.blocks)

    def time_per_mac(self, s: VitShape, layout: Layout = DEFAULT_LAYOUT) -> dict[str, float]:
        """What each kind of cut buys in a dense block: the share of the block's predicted time it saves over the
        share of its MACs (1.0: time falls with MACs, as when the whole block goes; ~0: the MACs go, the time
        stays), floored at 0 (a measured grid can rise where a width falls). 'dims': every head's v width halved
        (0 with the `fused` layout, which pads v back to the q/k width); 'heads': one head removed; 'neurons':
        half the MLP removed."""
        from uvclab.vit.macs import _block_rows
        H, Dh, M = s.num_heads, s.head_dim, s.mlp_hidden

        def cost(h: int, v: int, m: int) -> tuple[float, int]:
            a = Dh
            if layout == "fused":
                a = v = max(a, v)
            ms = self._block_ms((h, a, v) if h else None, m)
            return ms, sum(mac for _, mac, _ in _block_rows(s, h, a, v, m, h > 0, True))
        t0, m0 = cost(H, Dh, M)
        out = {}
        for kind, cut in (("dims", (H, max(1, Dh // 2), M)), ("heads", (H - 1, Dh, M)), ("neurons", (H, Dh, M // 2))):
            t1, m1 = cost(*cut)
            out[kind] = 0.0 if m1 >= m0 else max(0.0, (t0 - t1) / t0) / ((m0 - m1) / m0)
        return out

    def predicted_dense_ms(self, depth: int) -> float:
        H, Dh, M = self.heads[-1], self.qk_widths[-1], self.mlp_widths[-1]
        full = float(self.attn(torch.tensor(float(H)), torch.tensor(float(Dh)), torch.tensor(float(Dh))))
        k, c = self._calib()
        block = full + float(self.mlp(torch.tensor(float(M)))) + self.block_overhead_ms
        return self.fixed_ms + depth * (k * block + c)

    def _calib(self) -> tuple[float, float]:
        return float(self.calibration.get("scale", 1.0)), float(self.calibration.get("block_ms", 0.0))

    def parts_ms(self, structure: Structure, layout: Layout = DEFAULT_LAYOUT) -> tuple[float, int]:
        """(sum over running blocks of the uncalibrated table's block ms, number of running blocks)."""
        saved, self.calibration = self.calibration, {"scale": 1.0, "block_ms": 0.0}
        self.__dict__.pop("_memo", None)
        try:
            run = [b for b in structure.blocks if b.keep and (b.runs_attn or b.runs_mlp)]
            return sum(self.block_ms(b, layout) for b in run), len(run)
        finally:
            self.calibration = saved
            self.__dict__.pop("_memo", None)


def fit_calibration(table: LatencyTable, structures: Sequence[Structure], measured_ms: Sequence[float],
                    layout: Layout = DEFAULT_LAYOUT) -> dict:
    """The calibration (scale, block_ms) that makes fixed + sum(scale x parts + block_ms) fit whole models.

    `measured_ms`: whole exports of `structures` (the dense one among them), timed together in alternating
    rounds. Every model is one point (a ratio to one dense timing would carry that timing's noise into every
    point: one session's ratios were 10-15 % off the next one's); robust least squares (soft L1) on relative
    errors, scale bounded to 0.5..2 and block_ms to 0..1 dense block (a cost the parts miss; a negative one
    fitted on DeiT-Small made its smallest model 14 % too cheap), so that a disturbed timing cannot pull it far."""
    import numpy as np
    from scipy.optimize import least_squares
    if len(structures) != len(measured_ms) or len(structures) < 3:
        raise UvclabError("fit_calibration needs at least three structures, each with one measured time.")
    X, m = np.array([table.parts_ms(s, layout) for s in structures], float), np.asarray(measured_ms, float)
    block = max(X[:, 0].max() / max(X[:, 1].max(), 1), 1e-6)
    err = lambda p: (table.fixed_ms + X @ p) / m - 1  # noqa: E731
    p = least_squares(err, [1.0, 0.01 * block], loss="soft_l1", f_scale=0.05, bounds=([0.5, 0.0], [2.0, block])).x
    return {"scale": float(p[0]), "block_ms": float(p[1]), "measured_ms": m.tolist(),
            "errors_before": err([1.0, 0.0]).tolist(), "errors_after": err(p).tolist()}


def _segment(grid: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, w): x lies on segment [grid[i], grid[i+1]] at fraction w (linear extrapolation outside the grid).
    The segment ends at x (left of it) on a grid point, so the value there is exactly the table's and the
    gradient is the cost of the last unit kept: what removing one more group saves."""
    i = (torch.searchsorted(grid, x.detach().contiguous(), right=False) - 1).clamp(0, len(grid) - 2)
    x0, x1 = grid[i], grid[i + 1]
    return i, (x - x0) / (x1 - x0)
