"""Choosing an attention backend by name.

`get_attention_backend(name, device)` returns a fresh backend instance (no module state). "auto" takes the
fastest backend measured on the device (Triton on CUDA when Triton imports, see docs/kernels.md), else
the reference. An explicit name that cannot run on `device` raises ValueError with the reason, so a bad
config fails at start-up, never mid-step. Kernel modules are imported only when chosen, so importing
this package never imports Triton.
"""

from __future__ import annotations

import importlib.util

import torch

from .base import AttentionBackend, AttentionMetadata, GroupAttentionMetadata
from .reference import ReferenceAttentionBackend

BACKEND_NAMES = ("auto", "reference", "triton", "flex", "flash_paged")

__all__ = [
    "BACKEND_NAMES",
    "AttentionBackend",
    "AttentionMetadata",
    "GroupAttentionMetadata",
    "ReferenceAttentionBackend",
    "get_attention_backend",
]


def _triton_unavailable_reason(device: torch.device) -> str:
    """'' when the Triton backend can run on `device`, else why not."""
    if device.type != "cuda":
        return f"the triton backend needs a CUDA device, got {device}"
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install 'pagedserve[gpu]')"
    try:
        from .triton import TritonAttentionBackend
    except ImportError as error:  # a broken triton install: say so rather than fail mid-step
        return f"triton failed to import: {error}"
    is_ok, reason = TritonAttentionBackend.is_available(device)
    return "" if is_ok else reason


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """A new backend for `name` ("auto", "reference", "triton", "flex", "flash_paged") on `device`."""
    device = torch.device(device)
    if name == "reference":
        return ReferenceAttentionBackend()
    if name == "auto":
        if _triton_unavailable_reason(device) == "":
            from .triton import TritonAttentionBackend

            return TritonAttentionBackend()
        return ReferenceAttentionBackend()
    if name == "triton":
        reason = _triton_unavailable_reason(device)
        if reason:
            raise ValueError(f"attention backend 'triton' is unavailable: {reason}")
        from .triton import TritonAttentionBackend

        return TritonAttentionBackend()
    if name == "flex":
        raise ValueError(
            "attention backend 'flex' is unavailable: no FlexAttention backend is built yet "
            "(use 'auto', 'triton' or 'reference')"
        )
    if name == "flash_paged":
        if importlib.util.find_spec("flash_attn") is None:
            reason = "the flash-attn package is not installed"
        else:
            reason = "no flash-attn paged backend is built yet"
        raise ValueError(f"attention backend 'flash_paged' is unavailable: {reason} (use 'auto', 'triton' or 'reference')")
    raise ValueError(f"attention backend must be one of {', '.join(BACKEND_NAMES)}; got {name!r}")
