"""Inv-Adapter (Xing et al., arXiv 2406.02881): reference features from DDIM inversion through the generating UNet,
injected by a light Embedded Attention Adapter in self- and cross-attention (docs/DESIGN.md §3; the paper's method
section is unavailable, so the form is our inference and every choice is a parameter).

    eaa.py        EAABlock per UNet transformer block: appended reference K/V in self-attention (gated), decoupled
                  attention over the reference in cross-attention
    inversion.py  DDIM inversion over a denoiser, and which trajectory point feeds a generation step
    model.py      InvAdapter (all blocks) and its config
    files.py      the weights file (format: inv-adapter)
"""
from .eaa import EAABlock, EAABlocks, EAAReferenceKV
from .files import INV_ADAPTER_FORMAT, load_inv_adapter, save_inv_adapter
from .inversion import Denoiser, ReferenceTrajectory, ddim_invert, inversion_sigmas
from .model import InvAdapter, InvAdapterConfig, count_inv_adapter_parameters

__all__ = [
    "EAABlock", "EAABlocks", "EAAReferenceKV",
    "INV_ADAPTER_FORMAT", "load_inv_adapter", "save_inv_adapter",
    "Denoiser", "ReferenceTrajectory", "ddim_invert", "inversion_sigmas",
    "InvAdapter", "InvAdapterConfig", "count_inv_adapter_parameters",
]
