"""Throughput of a dense model against its exported (physically slimmed) version on this machine.

Both models run in one process on the same batch, in alternating rounds after a warm-up (the latency table's
timer, `uvclab.vit.latency_build.time_calls`), so that drifts of the machine hit both alike, in PyTorch or
(runtime="onnxruntime", `uvclab.compare.deploy.OrtModel`) in ONNX Runtime. Reports images/s, the measured
speedup and the MACs ratio next to it; the goal is speedup >= 0.9 x (dense MACs / exported MACs).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from uvclab.errors import UvclabError
from uvclab.vit.latency_build import time_calls
from uvclab.vit.macs import count, vit_shape
from uvclab.vit.models import input_shape


RUNTIMES = ("torch", "onnxruntime")


@dataclass
class BenchResult:
    batch_size: int
    dense_img_per_s: float
    exported_img_per_s: float
    speedup: float
    dense_macs: int
    exported_macs: int
    macs_speedup: float        # dense MACs / exported MACs: the ideal speedup
    efficiency: float          # speedup / macs_speedup
    runtime: str = "torch"     # torch | onnxruntime

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"{self.runtime}, batch {self.batch_size}: dense {self.dense_img_per_s:.1f} img/s, exported "
                f"{self.exported_img_per_s:.1f} img/s -> speedup {self.speedup:.2f}x "
                f"(MACs ratio {self.exported_macs / self.dense_macs:.3f}, ideal {self.macs_speedup:.2f}x, "
                f"efficiency {self.efficiency:.2f})")


@torch.inference_mode()
def compare_throughput(dense: torch.nn.Module, exported: torch.nn.Module, batch_size: int = 32,
                       rounds: int = 5, iters: int = 2, warmup: int = 1, dense_macs: Optional[int] = None,
                       exported_macs: Optional[int] = None, runtime: str = "torch",
                       threads: Optional[int] = None) -> BenchResult:
    """Median over alternating rounds of the per-batch time of each model. MACs default to our calculator's
    count (the exported model's uvclab_export structure); pass both for models pruned by other tools.
    runtime "onnxruntime": both models are exported to ONNX (batch fixed) and timed in ONNX Runtime with
    `threads` intra-op threads (default: torch's thread count); either model may be an OrtModel already."""
    run_dense, run_exported = dense, exported
    if runtime == "onnxruntime":  # an OrtModel passed in is reused (e.g. one dense model against many exports)
        from uvclab.compare.deploy import OrtModel
        run_dense, run_exported = (m if isinstance(m, OrtModel) else OrtModel(m, batch_size, threads)
                                   for m in (dense, exported))
        dense, exported = run_dense.model, run_exported.model
    elif runtime != "torch":
        raise UvclabError(f"Unknown runtime '{runtime}'. Choose from: {', '.join(RUNTIMES)}.")
    dense, exported = dense.eval(), exported.eval()
    x = torch.randn(batch_size, *input_shape(dense))
    if runtime == "torch":
        run_dense, run_exported = dense, exported
    td_med, te_med = (ms / 1000 for ms in time_calls([lambda: run_dense(x), lambda: run_exported(x)], rounds, iters,
                                                     max(1, warmup), min_ms=0.0))
    dm = dense_macs if dense_macs is not None else count(vit_shape(dense))["macs"]
    em = exported_macs if exported_macs is not None else count(exported)["macs"]
    speedup = td_med / te_med
    return BenchResult(batch_size, batch_size / td_med, batch_size / te_med, speedup, dm, em, dm / em,
                       speedup / (dm / em), runtime)
