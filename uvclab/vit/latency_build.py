"""Measure a `LatencyTable` on this device, and cache it keyed by everything the numbers depend on.

Each grid point is the exported model's own code (`SlimAttention`, timm `Mlp` inside a `SlimBlock`) on a
(batch, tokens, width) input: warm-up, then `rounds` rounds over all points in alternating order (forward,
then reversed), each timing at least `iters` calls and 20 ms, and the median over rounds per point, so drifts
of a shared machine hit all points alike (the fastest single call instead was tried: on a loaded CPU it lets
short calls dodge the other processes where long ones cannot, and the parts no longer add up); every
group of points is timed with the dense block as a reference and rescaled to the last group's load. The
attention grid is heads x q/k width x v width, the MLP grid widths; the fixed parts (the model without
blocks: stem, head) is measured, the per-block overhead is the dense block minus its two branches (timed
together in one group; clamped at 0: a difference of three noisy timings, it came out at -27 % to +18 % of a
block from one build to the next, and a negative one made every pruned model look 15-20 % cheaper), and the
whole dense model is measured for comparison (`dense_ms`; a long call on a loaded machine is stretched by the
other processes where the short calls of the grid mostly are not, so ratios, not absolute ms, are what
carry over). With `calibrate` = K, K exported models of random structures (`calibration_structures`,
spanning the budget range) are timed afterwards with the dense model, on their own, and fit the table's
calibration (`fit_calibration`; off by default: on this shared CPU it helped the Fashion-MNIST teacher a
little and hurt DeiT-Small, see the README). `latency_table` returns the
cached table when its key matches (device, torch version, threads, batch, tokens, widths, grid, format) and
rebuilds it otherwise. `measure_ms` times whole models the same way (dense vs export in the report).
"""
from __future__ import annotations

import copy
import hashlib
import math
import json
import platform
import random
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from uvclab.errors import UvclabError
from uvclab.paths import cache_dir
from uvclab.vit.export import SlimBlock, _slim_block, export_model
from uvclab.vit.latency import FORMAT, LatencyTable, fit_calibration
from uvclab.vit.macs import vit_shape
from uvclab.vit.models import input_shape
from uvclab.vit.structure import BlockStructure, Structure


def device_name(device: str | torch.device = "cpu") -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _widths(full: int, points: int) -> list[int]:
    """`points` evenly spaced widths ending at `full` (at least 2 distinct, for interpolation)."""
    ws = sorted({max(1, round(full * i / points)) for i in range(1, points + 1)})
    return ws if len(ws) > 1 else [ws[0], ws[0] + 1]


def table_grid(model: nn.Module, width_points: int = 8, mlp_points: int = 16, qk_points: int = 4) -> dict:
    """Heads 1..H; v widths in `width_points` even steps (8: every multiple of Dh/8, as `dims_multiple`);
    q/k widths coarser (they change only with tie_qk or the fused layout); MLP widths in `mlp_points` steps."""
    s = vit_shape(model)
    heads = list(range(1, s.num_heads + 1)) if s.num_heads > 1 else [1, 2]
    mlp = sorted(set(_widths(s.mlp_hidden, mlp_points)) | {max(1, s.mlp_hidden // 64)})
    return {"heads": heads, "qk_widths": _widths(s.head_dim, qk_points), "v_widths": _widths(s.head_dim, width_points),
            "mlp_widths": mlp}


def calibration_structures(model: nn.Module, k: int, grid: dict, seed: int = 0) -> list[Structure]:
    """`k` random structures from about 0.15 to 0.9 of the dense model, as a budgeted search leaves them: kept
    heads, v widths on the grid, MLP widths anywhere, a few blocks or branches skipped."""
    rng, s = random.Random(seed), vit_shape(model)
    out = []
    for i in range(k):
        f = 0.15 + 0.75 * i / max(k - 1, 1)
        st = Structure.dense(model)
        for b in st.blocks:
            u = lambda: min(1.0, max(0.0, rng.uniform(f - 0.25, f + 0.25)))  # noqa: E731
            h = max(1, round(s.num_heads * u()))
            v = min(grid["v_widths"], key=lambda w: abs(w - s.head_dim * u()))
            b.heads, b.qk_dims, b.v_dims = list(range(h)), [list(range(s.head_dim))] * h, [list(range(v))] * h
            b.mlp = list(range(max(1, round(s.mlp_hidden * u()))))
            b.keep = rng.random() > 0.3 * (1 - f)
            b.attn, b.mlp_branch = rng.random() > 0.1 * (1 - f), rng.random() > 0.05 * (1 - f)
        out.append(st)
    return out


def table_key(model: nn.Module, batch_size: int, threads: int, device: str, grid: dict,
              calibrate: int = 0) -> dict:
    s = vit_shape(model)
    cfg = getattr(model, "uvclab_config", None) or {"name": type(model).__name__, "kwargs": {}}
    return ({"calibrate": calibrate} if calibrate else {}) | {
            "format": FORMAT, "model": cfg["name"], "model_kwargs": cfg.get("kwargs", {}),
            "device": device_name(device), "device_type": torch.device(device).type, "torch": torch.__version__,
            "threads": threads, "batch_size": batch_size, "tokens": s.tokens, "embed_dim": s.embed_dim,
            "num_heads": s.num_heads, "head_dim": s.head_dim, "mlp_hidden": s.mlp_hidden, "depth": s.depth,
            "dtype": str(next(model.parameters()).dtype), "grid": grid}


def cache_path(key: dict, folder: Optional[Path] = None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return (folder or cache_dir() / "latency") / f"{key['model']}-b{key['batch_size']}-t{key['threads']}-{digest}.json"


# ---- timing ---------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_calls(fns: Sequence[Callable[[], object]], rounds: int = 7, iters: int = 2, warmup: int = 1,
               device: str | torch.device = "cpu", progress: Optional[Callable[[int], None]] = None,
               min_ms: float = 20.0) -> list[float]:
    """ms per call of each fn: warm-up, then `rounds` alternating-order rounds, each timing `iters` calls in a
    row (more for fast fns, so that one timing lasts >= min_ms: a loaded machine then stretches short and long
    calls alike); per fn the median over rounds."""
    device = torch.device(device)
    n = []
    for fn in fns:
        for _ in range(warmup):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
        n.append(max(iters, math.ceil(min_ms / max((time.perf_counter() - t0) * 1000, 1e-3))))
    times: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(n[i]):
                fns[i]()
            _sync(device)
            times[i].append((time.perf_counter() - t0) * 1000 / n[i])
            if progress is not None:
                progress(1)
    return [sorted(t)[len(t) // 2] for t in times]


def measure_ms(models: Sequence[nn.Module], batch_size: int, rounds: int = 9, iters: int = 2,
               device: str | torch.device = "cpu", threads: Optional[int] = None) -> list[float]:
    """Median ms per batch of each model on one random batch, timed in alternating rounds (e.g. dense, export);
    with `threads` torch's CPU threads for the timing only (a latency table's own count)."""
    models = [m.eval().to(device) for m in models]
    x = torch.randn(batch_size, *input_shape(models[0]), device=device)
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return time_calls([lambda m=m: m(x) for m in models], rounds=rounds, iters=iters, device=device)
    finally:
        torch.set_num_threads(saved)


# ---- the table ------------------------------------------------------------------------------------------

def _branch_block(model: nn.Module, h: int = 0, a: int = 0, v: int = 0, m: int = 0) -> SlimBlock:
    """The exported block (`SlimBlock`, compact layout) of the model's middle block with h heads of q/k width a
    and v width v (h = 0: no attention) and m MLP neurons (m = 0: no MLP). Real weights, not random ones:
    GELU and softmax time depends a little on the values (random weights ran 13 % slower here)."""
    b = BlockStructure(list(range(h)), [list(range(a))] * h, [list(range(v))] * h, list(range(m)),
                       attn=h > 0, mlp_branch=m > 0)
    return _slim_block(model.blocks[len(model.blocks) // 2], b, "compact").eval()


@torch.inference_mode()
def _chain(block: nn.Module, x: torch.Tensor, depth: int, min_ms: float = 20.0) -> nn.Sequential:
    """Up to `depth` copies of `block` in a row, enough for `min_ms` per call: a block then runs as inside the
    model, after other blocks' weights, not with its own weights hot in the cache on every call (timed alone,
    the Fashion-MNIST teacher's blocks summed to 0.6 of the whole model)."""
    t0 = time.perf_counter()
    block(x)
    k = min(depth, max(1, math.ceil(min_ms / max((time.perf_counter() - t0) * 1000, 1e-3))))
    return nn.Sequential(block, *[copy.deepcopy(block) for _ in range(k - 1)])


def build_table(model: nn.Module, batch_size: int = 64, threads: Optional[int] = None, device: str = "cpu",
                rounds: int = 5, iters: int = 1, width_points: int = 8, mlp_points: int = 16, qk_points: int = 4,
                calibrate: int = 0, progress: bool = True) -> LatencyTable:
    """Measure the latency table of `model`'s shape (any timm ViT uvclab supports) on `device`."""
    from tqdm.auto import tqdm
    if batch_size < 1 or rounds < 1 or iters < 1:
        raise UvclabError("batch_size, rounds and iters must be >= 1.")
    threads = threads or torch.get_num_threads()
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.time()
    try:
        grid = table_grid(model, width_points, mlp_points, qk_points)
        key = table_key(model, batch_size, threads, device, grid, calibrate)
        s = vit_shape(model)
        attn_pts = [(h, a, v) for h in grid["heads"] for a in grid["qk_widths"] for v in grid["v_widths"]]
        dense_struct = Structure.dense(model)
        no_blocks = copy.deepcopy(dense_struct)
        for b in no_blocks.blocks:
            b.keep = False
        base = copy.deepcopy(model).float().eval()
        calib = calibration_structures(model, calibrate, grid) if calibrate >= 1 else []
        wholes = [export_model(base, st).to(device) for st in [no_blocks, dense_struct] + calib]
        img = torch.randn(batch_size, *input_shape(model), device=device)
        with torch.inference_mode():
            d = wholes[1]  # the middle block's real input activations (B, N, D)
            x = d.blocks[:s.depth // 2](d.norm_pre(d._pos_embed(d.patch_embed(img))))
        n_calls = (rounds * (len(attn_pts) + len(grid["mlp_widths"]) + len(grid["heads"]) + 6)
                   + 9 * (len(calib) + 1) * bool(calib))
        bar = tqdm(total=n_calls, desc=f"latency table ({key['model']}, batch {batch_size}, {threads} thr)",
                   disable=not progress, unit="t")

        ref = _chain(_branch_block(model, s.num_heads, s.head_dim, s.head_dim, s.mlp_hidden).to(device), x, s.depth)

        def timed(blocks: list[nn.Module]) -> list[float]:
            """ms of each block, and of the dense reference block timed with them (the last entry)."""
            chains = [_chain(b.to(device), x, s.depth) for b in blocks] + [ref]
            ms = time_calls([lambda c=c: c(x) for c in chains], rounds, iters, device=device, progress=bar.update)
            return [t / len(c) for t, c in zip(ms, chains)]

        # one attention size at a time keeps memory small; the rounds alternate within each size group
        groups = [timed([_branch_block(model, h=h, a=a, v=v) for (hh, a, v) in attn_pts if hh == h])
                  for h in grid["heads"]]
        groups.append(timed([_branch_block(model, m=m) for m in grid["mlp_widths"]]))
        # the last group, timed together: fixed part, dense model, the dense block and its two branches alone
        a_only, m_only = (_branch_block(model, s.num_heads, s.head_dim, s.head_dim).to(device),
                          _branch_block(model, m=s.mlp_hidden).to(device))
        a_only, m_only = _chain(a_only, x, s.depth), _chain(m_only, x, s.depth)
        fixed_ms, dense_ms, ref_ms, a_ms, m_ms = time_calls(
            [lambda: wholes[0](img), lambda: wholes[1](img), lambda: ref(x), lambda: a_only(x), lambda: m_only(x)],
            rounds, iters, device=device, progress=bar.update)
        if calib:  # whole models on their own (timed between the chains above they measured 10-40 % apart)
            calib_ms = time_calls([lambda w=w: w(img) for w in wholes[1:]], 9, 2, device=device, progress=bar.update)
        ref_ms, a_ms, m_ms = ref_ms / len(ref), a_ms / len(a_only), m_ms / len(m_only)
        bar.close()
        # each group at the load of the last one: times x (reference now / reference then) removes slow drifts
        groups = [[t * ref_ms / g[-1] for t in g[:-1]] for g in groups]
        attn_ms, mlp_ms = [t for g in groups[:-1] for t in g], groups[-1]
    finally:
        torch.set_num_threads(saved_threads)
    nq, nv = len(grid["qk_widths"]), len(grid["v_widths"])
    cube = [[attn_ms[(i * nq + j) * nv:(i * nq + j + 1) * nv] for j in range(nq)] for i in range(len(grid["heads"]))]
    table = LatencyTable(key=key, heads=grid["heads"], qk_widths=grid["qk_widths"], v_widths=grid["v_widths"],
                         attn_ms=cube, mlp_widths=grid["mlp_widths"], mlp_ms=mlp_ms,
                         block_overhead_ms=max(0.0, ref_ms - a_ms - m_ms), fixed_ms=fixed_ms, dense_ms=dense_ms)
    if calib:
        table.calibration = fit_calibration(table, [dense_struct] + calib, calib_ms)
    table.build_seconds = time.time() - t0
    return table


def latency_table(model: nn.Module, batch_size: int = 64, threads: Optional[int] = None, device: str = "cpu",
                  rebuild: bool = False, folder: Optional[Path] = None, progress: bool = True,
                  **build_kw) -> LatencyTable:
    """The cached table for this model shape, batch, threads and device; measured (and cached) when missing,
    when its key differs (another torch, device, grid...) or when `rebuild`."""
    threads = threads or torch.get_num_threads()
    grid = table_grid(model, build_kw.get("width_points", 8), build_kw.get("mlp_points", 16),
                      build_kw.get("qk_points", 4))
    key = table_key(model, batch_size, threads, device, grid, build_kw.get("calibrate", 0))
    path = cache_path(key, folder)
    if path.exists() and not rebuild:
        try:
            t = LatencyTable.load(path)
            if t.key == key:
                return t
        except UvclabError:
            pass  # corrupt or from another format: measure again
    t = build_table(model, batch_size, threads, device, progress=progress, **build_kw)
    t.save(path)
    return t
