"""UVC: the primal-dual optimiser, its settings and presets, and the final structure from its state."""
from uvclab.uvc.optimizer import UVCPrimalDual, UVCState
from uvclab.uvc.select import current_structure, final_structure, fit_structure, structure_from_counts
from uvclab.uvc.settings import REFERENCE_UVC, SHORT_RUN_UVC, UVCSettings, resolve_prune_dims

__all__ = ["UVCPrimalDual", "UVCState", "UVCSettings", "SHORT_RUN_UVC", "REFERENCE_UVC", "final_structure",
           "current_structure", "fit_structure", "structure_from_counts", "resolve_prune_dims"]
