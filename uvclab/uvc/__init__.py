"""UVC: the primal-dual optimiser, its settings and state, and structure selection from its state."""
from uvclab.uvc.optimizer import UVCPrimalDual, UVCState
from uvclab.uvc.select import current_structure, ranks_agree, select_structure, structure_from_counts
from uvclab.uvc.settings import REFERENCE_UVC, SHORT_RUN_UVC, UVCSettings

__all__ = ["UVCPrimalDual", "UVCState", "UVCSettings", "SHORT_RUN_UVC", "REFERENCE_UVC",
           "current_structure", "select_structure",
           "structure_from_counts", "ranks_agree"]
