"""uvclab: compress Vision Transformers with UVC (Unified Visual Transformer Compression, ICLR 2022)."""
__version__ = "0.1.0"

from uvclab.errors import UvclabError  # noqa: E402
from uvclab.vit.models import create_vit  # noqa: E402
from uvclab.vit.gated import gate_vit, explicit_attention  # noqa: E402
from uvclab.vit.structure import Structure, BlockStructure, apply_structure  # noqa: E402
from uvclab.vit.macs import count, macs_table, vit_shape, expected_macs  # noqa: E402
from uvclab.vit.export import export_model, save_pruned, load_pruned  # noqa: E402

__all__ = ["UvclabError", "create_vit", "gate_vit", "explicit_attention", "Structure", "BlockStructure",
           "apply_structure", "count", "macs_table", "vit_shape", "expected_macs", "export_model",
           "save_pruned", "load_pruned"]
