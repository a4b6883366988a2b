"""ONNX export of a (dense or exported) ViT, checked with `onnx.checker` and verified in ONNX Runtime.

`to_onnx` traces the model with `torch.onnx.export`: the dynamo exporter first (torch.export + onnxscript),
the TorchScript exporter where dynamo cannot translate an op (the Transformer T2T stem's 3-D single-head
attention). The uvclab.json card (model, structure, layout, MACs, accuracy) goes into the ONNX
`metadata_props`. Before the file is written, ONNX Runtime (CPU provider) runs it on the given images and
its output must equal PyTorch's within `atol`; a mismatch writes nothing. onnx / onnxruntime / onnxscript
are the optional `deploy` extra.
"""
from __future__ import annotations

import io
import json
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from uvclab.version import __version__
from uvclab.errors import UvclabError
from uvclab.io_utils import atomic_write

DEFAULT_OPSET = 18       # the dynamo exporter's native opset; ORT 1.17+ runs it
EXPORTERS = ("auto", "dynamo", "torchscript")
DEPLOY_MODULES = ("onnx", "onnxruntime", "onnxscript")


def require_deploy():
    """(onnx, onnxruntime), or a clear error naming the `deploy` extra."""
    import importlib
    mods = []
    for name in DEPLOY_MODULES:
        try:
            mods.append(importlib.import_module(name))
        except ImportError as e:
            raise UvclabError(f"ONNX export and ONNX Runtime timing need the optional 'deploy' dependencies "
                              f"('{name}' cannot be imported: {e}). Install them with: "
                              "pip install 'uvclab[deploy]'  (onnx, onnxruntime, onnxscript).") from None
    return mods[0], mods[1]


@dataclass
class OnnxExport:
    """What `to_onnx` wrote and how it was checked."""
    path: Optional[str]
    exporter: str            # dynamo | torchscript
    opset: int
    batch_size: Optional[int]  # None: dynamic batch dimension
    max_abs_diff: float      # ONNX Runtime vs PyTorch on the verification images
    verified_on: str         # which images
    num_images: int
    size_bytes: int
    metadata: dict

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        where = f"wrote {self.path}" if self.path else "exported in memory"
        batch = "dynamic" if self.batch_size is None else self.batch_size
        return (f"{where} ({self.size_bytes / 1e6:.1f} MB, opset {self.opset}, {self.exporter} exporter, "
                f"batch {batch}); ONNX Runtime = PyTorch on {self.num_images} {self.verified_on}: "
                f"max abs diff {self.max_abs_diff:.2e}")


def onnx_metadata(model: torch.nn.Module, extra: Optional[dict] = None) -> dict[str, str]:
    """The card of an exported model (or the config of a dense uvclab model) as ONNX metadata strings."""
    from uvclab.vit.macs import _skeleton_base, count, count_exported, vit_shape
    meta = getattr(model, "uvclab_export", None)
    cfg = (meta or {}).get("model") or getattr(model, "uvclab_config", None)
    out = {"uvclab_version": __version__, "exported": "true" if meta else "false"}
    if cfg:
        out.update(model=cfg["name"], model_kwargs=json.dumps(cfg.get("kwargs", {})))
    if meta:
        out.update(layout=meta["layout"], structure=json.dumps(meta["structure"], separators=(",", ":")))
        if cfg:
            c, dense = count_exported(model), count(_skeleton_base(cfg))
            out.update(macs=c["macs"], params=c["params"], dense_macs=dense["macs"],
                       macs_ratio=f"{c['macs'] / dense['macs']:.6f}")
    else:
        out.update(macs=count(vit_shape(model))["macs"])
    out.update(extra or {})
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in out.items() if v is not None}


def _trace(model: torch.nn.Module, x: torch.Tensor, dynamic: bool, opset: int, exporter: str):
    """(ModelProto, exporter used)."""
    import onnx
    kw = dict(input_names=["images"], output_names=["logits"], opset_version=opset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter in ("auto", "dynamo"):
            try:
                shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
                prog = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=shapes, verbose=False,
                                         report=False, **kw)
                return prog.model_proto, "dynamo"
            except Exception as e:
                if exporter == "dynamo":
                    raise UvclabError(f"The dynamo ONNX exporter failed ({str(e).splitlines()[0][:300]}); "
                                      "try exporter='torchscript'.") from e
        buf = io.BytesIO()
        torch.onnx.export(model, (x,), buf, dynamo=False, dynamic_axes={"images": {0: "batch"}} if dynamic else None,
                          **kw)
        return onnx.load_from_string(buf.getvalue()), "torchscript"


def ort_session(model: bytes | str | Path, threads: int = 1, profile_prefix: Optional[str] = None):
    """An ONNX Runtime CPU session with `threads` intra-op threads (full graph optimisation)."""
    _, ort = require_deploy()
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling, so.profile_file_prefix = True, profile_prefix
    src = str(model) if isinstance(model, (str, Path)) else model
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run_session(session, x: torch.Tensor) -> torch.Tensor:
    """Logits of an ONNX Runtime session on a float batch."""
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.detach().cpu().float().numpy()})[0])


def _batch_of(images: torch.Tensor, n: int) -> torch.Tensor:
    reps = -(-n // len(images))
    return images.repeat(reps, 1, 1, 1)[:n]


def _unwritable(path: Path, e: OSError) -> UvclabError:
    return UvclabError(f"Cannot write '{path}' ({type(e).__name__}: {e.strerror or e}); choose a writable output "
                       "file (--out FILE).")


def check_writable(path: Path) -> None:
    """A clear error now, rather than after the export, when `path` cannot be written."""
    if path.is_dir():
        raise UvclabError(f"'{path}' is a folder; pass the ONNX file to write, e.g. '{path / 'model.onnx'}'.")
    folder = next(p for p in path.parents if p.exists())
    if not folder.is_dir():
        raise UvclabError(f"Cannot write '{path}': '{folder}' is a file, not a folder; choose a writable output "
                          "file (--out FILE).")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise _unwritable(path, e) from None


def to_onnx(model: torch.nn.Module, path: Optional[str | Path] = None, batch_size: Optional[int] = None,
            opset: int = DEFAULT_OPSET, images: Optional[torch.Tensor] = None, verified_on: str = "random images",
            metadata: Optional[dict] = None, atol: float = 1e-4, exporter: str = "auto", threads: int = 1):
    """Export `model` to ONNX (batch fixed to `batch_size`, or dynamic when None), verify it in ONNX Runtime
    on `images` (default: 8 random normal ones) and write it atomically to `path` (None: keep in memory).
    Returns (OnnxExport, serialized model bytes)."""
    onnx, _ = require_deploy()
    from uvclab.vit.models import input_shape
    if exporter not in EXPORTERS:
        raise UvclabError(f"Unknown exporter '{exporter}'. Choose from: {', '.join(EXPORTERS)}.")
    if batch_size is not None and batch_size < 1:
        raise UvclabError(f"batch_size must be >= 1 (or None for a dynamic batch), got {batch_size}.")
    if path is not None:
        path = Path(path)
        check_writable(path)  # before the (slow) export
    model = model.eval().cpu()
    if images is None:
        images = torch.randn(8, *input_shape(model), generator=torch.Generator().manual_seed(0))
    images = images.float()
    if batch_size is not None:  # whole batches of the fixed size, covering every image
        images = _batch_of(images, -(-len(images) // batch_size) * batch_size)
    chunks = [images] if batch_size is None else list(images.split(batch_size))
    example = _batch_of(images, 2) if batch_size is None else chunks[0]  # batch 2: torch.export keeps it symbolic
    proto, used = _trace(model, example, batch_size is None, opset, exporter)
    meta = onnx_metadata(model, dict(metadata or {}, exporter=used))
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    proto.doc_string = f"uvclab {__version__} export of {meta.get('model', type(model).__name__)}"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise UvclabError(f"The ONNX graph failed onnx.checker ({e}); try another opset or exporter.") from e
    data = proto.SerializeToString()
    with torch.no_grad():
        ref = model(images)
    session = ort_session(data, threads)
    got = torch.cat([run_session(session, c) for c in chunks])
    diff = float((got - ref).abs().max()) if got.shape == ref.shape else float("inf")
    if not diff <= atol:
        raise UvclabError(f"ONNX Runtime output differs from PyTorch by {diff:.3g} (> {atol:g}) on {len(images)} "
                          f"{verified_on}; nothing written. Try exporter='torchscript' or another opset.")
    if path is not None:
        try:
            atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
        except OSError as e:
            raise _unwritable(path, e) from None
    res = OnnxExport(None if path is None else str(path), used, opset, batch_size, diff, verified_on,
                     len(images), len(data), meta)
    return res, data


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The metadata_props of an ONNX file as a dict."""
    onnx, _ = require_deploy()
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
