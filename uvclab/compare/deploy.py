"""Deployment: a run folder's exported model as a verified ONNX file, and models timed inside ONNX Runtime.

`export_onnx` takes a run folder (or a model folder from `save_pruned`, or a model) and writes ONNX through
`uvclab.vit.onnx.to_onnx`, verifying it on real test images of the run's dataset. `OrtModel` wraps a model
exported in memory as a callable, so `compare_throughput(..., runtime="onnxruntime")` times dense vs slim
inside ONNX Runtime with the same alternating rounds as the PyTorch bench; `ort_op_profile` sums ORT's
profiler per operator type (which op dominates the time).
"""
from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

from uvclab.errors import UvclabError
from uvclab.paths import CONFIG, MODEL_DIR, REPORT
from uvclab.vit.models import input_shape
from uvclab.vit.onnx import DEFAULT_OPSET, OnnxExport, ort_session, run_session, to_onnx

REPORT_KEYS = ("method", "dataset", "budget", "top1", "teacher_top1", "val_top1", "seed")


def model_folder(run_or_model: str | Path) -> Path:
    """The folder holding uvclab.json + model.safetensors: the path itself or its `model/` subfolder."""
    p = Path(run_or_model)
    for d in (p, p / MODEL_DIR):
        if (d / "uvclab.json").is_file() and (d / "model.safetensors").is_file():
            return d
    raise UvclabError(f"'{p}' holds no exported model (model/uvclab.json + model/model.safetensors). Point at a "
                      "run folder written by `uvclab compress` (after its export step) or at a folder written by "
                      "uvclab.save_pruned.")


def real_images(run_dir: Path, n: int, img_size: int) -> tuple[Optional[torch.Tensor], str]:
    """The first `n` test images of the run's dataset (config.yaml), or (None, why not)."""
    from uvclab.engine.config import load_config
    from uvclab.engine.data import load_dataset
    if not (run_dir / CONFIG).is_file():
        return None, "no config.yaml next to the model"
    try:
        cfg = load_config(run_dir / CONFIG)
        splits = load_dataset(cfg.dataset, cfg.data_root, cfg.split_seed, img_size=img_size, augment=False,
                              download=False)
    except (UvclabError, OSError, RuntimeError) as e:
        return None, f"its dataset cannot be read ({str(e).splitlines()[0][:200]})"
    xs = torch.stack([splits.test[i][0] for i in range(min(n, len(splits.test)))])
    return xs, f"{cfg.dataset} test images"


def export_onnx(model_or_run, path: str | Path, batch_size: Optional[int] = None, opset: int = DEFAULT_OPSET,
                images: Optional[torch.Tensor] = None, num_images: int = 16, exporter: str = "auto",
                atol: float = 1e-4) -> OnnxExport:
    """Write a verified ONNX file of an exported model (run folder, `save_pruned` folder, or nn.Module).

    batch_size None: dynamic batch dimension. Verification: ONNX Runtime's output on `images` (default: the
    first `num_images` test images of the run's dataset; random ones where there are none) must equal
    PyTorch's within `atol`, else nothing is written. The card (model, structure, MACs, accuracy) goes into
    the ONNX metadata. Returns what was written and the max abs difference measured.
    """
    from uvclab.vit.export import load_pruned
    extra, source = {}, "images passed in"
    if isinstance(model_or_run, torch.nn.Module):
        model = model_or_run
    else:
        folder = model_folder(model_or_run)
        model = load_pruned(folder)
        card = json.loads((folder / "uvclab.json").read_text())
        run_dir = folder.parent if folder.name == MODEL_DIR else folder
        report = json.loads((run_dir / REPORT).read_text()) if (run_dir / REPORT).is_file() else {}
        extra = {k: v for k, v in {**card, **report}.items() if k in REPORT_KEYS}
        if images is None:
            images, source = real_images(run_dir, num_images, input_shape(model)[1])
            if images is None:
                source = f"random images ({source})"
    if images is None:
        source = source if source.startswith("random") else "random images"
        images = torch.randn(num_images, *input_shape(model), generator=torch.Generator().manual_seed(0))
    res, _ = to_onnx(model, path, batch_size, opset, images, source, extra, atol, exporter)
    return res


class OrtModel:
    """A model exported to ONNX in memory (batch fixed to `batch_size`) and run by ONNX Runtime on the CPU."""

    def __init__(self, model: torch.nn.Module, batch_size: int, threads: Optional[int] = None,
                 opset: int = DEFAULT_OPSET):
        self.model, self.batch_size, self.threads = model, batch_size, threads or torch.get_num_threads()
        self.export, self.data = to_onnx(model, None, batch_size, opset)
        self.session = ort_session(self.data, self.threads)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) != self.batch_size:
            raise UvclabError(f"This ONNX model was exported for batch {self.batch_size}, got {len(x)} images.")
        return run_session(self.session, x)


def ort_op_profile(model: torch.nn.Module | OrtModel, batch_size: int = 8, threads: Optional[int] = None,
                   runs: int = 3) -> pd.DataFrame:
    """Time per run by ONNX operator type from ORT's profiler: op, ms (per run), share, nodes (count).
    An OrtModel is profiled as it is (its batch size and threads), without exporting again."""
    if not isinstance(model, OrtModel):
        model = OrtModel(model, batch_size, threads)
    with tempfile.TemporaryDirectory() as tmp:
        session = ort_session(model.data, model.threads, profile_prefix=str(Path(tmp) / "ort"))
        x = torch.randn(model.batch_size, *input_shape(model.model))
        run_session(session, x)  # warm-up (first-run allocations are not the steady state)
        for _ in range(runs):
            run_session(session, x)
        trace = json.loads(Path(session.end_profiling()).read_text())
    us, nodes = defaultdict(float), defaultdict(set)
    per_node = defaultdict(list)
    for ev in trace:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            op = ev.get("args", {}).get("op_name", "?")
            per_node[ev["name"]].append(ev["dur"])
            nodes[op].add(ev["name"])
            us[op] += ev["dur"]
    skip = {name: durs[0] for name, durs in per_node.items()}  # drop the warm-up run of every node
    for op, names in nodes.items():
        us[op] -= sum(skip[n] for n in names)
    df = pd.DataFrame({"op": list(us), "ms": [us[o] / runs / 1e3 for o in us], "nodes": [len(nodes[o]) for o in us]})
    df["share"] = df.ms / df.ms.sum()
    return df.sort_values("ms", ascending=False, ignore_index=True)
