"""uvclab: compress Vision Transformers with UVC (Unified Visual Transformer Compression, ICLR 2022).

Layers, low to high (each imports only from those below it): `vit` (models, gating, Structure, MACs, export),
`prune` (one-shot structures, the budget fit), `uvc` (the primal-dual search), `engine` (config, data,
the training loop, compress, teachers), `compare` (throughput, benchmark, run folders), `ui` (CLI, figures,
widgets). This module is the curated public API.
"""
from uvclab.version import __version__  # noqa: F401
from uvclab.errors import UvclabError
from uvclab.vit.models import create_vit
from uvclab.vit.gated import gate_vit, explicit_attention
from uvclab.vit.structure import Structure, BlockStructure, apply_structure
from uvclab.vit.macs import count, macs_table, vit_shape, expected_macs
from uvclab.vit.export import export_model, save_pruned, load_pruned
from uvclab.uvc import UVCPrimalDual, UVCSettings
from uvclab.engine.config import CompressConfig, TeacherConfig, load_config
from uvclab.engine.compress import compress
from uvclab.engine.teacher import load_teacher, train_teacher
from uvclab.compare.deploy import export_onnx
from uvclab.compare.behaviour import compare_runs
from uvclab.compare.provenance import provenance

__all__ = ["UvclabError", "create_vit", "gate_vit", "explicit_attention", "Structure", "BlockStructure",
           "apply_structure", "count", "macs_table", "vit_shape", "expected_macs", "export_model",
           "save_pruned", "load_pruned", "UVCPrimalDual", "UVCSettings", "CompressConfig", "TeacherConfig",
           "load_config", "compress", "load_teacher", "train_teacher", "export_onnx", "compare_runs",
           "provenance"]
