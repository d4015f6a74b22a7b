"""Choosing an attention backend by name.

`get_attention_backend(name, device)` returns a fresh backend instance (no module state). "auto" is
decided before this, by config/resolve.py (from `triton_unavailable_reason` and `flash_unavailable_reason`). A
name that cannot run on `device` raises ValueError with the reason, so a bad config fails at start-up, never
mid-step. Kernel modules are imported only when chosen, so importing this package never imports Triton or
FlashAttention.
"""

from __future__ import annotations

import importlib.util

import torch

from pagedserve.engine.kernels.attention.base import AttentionBackend, AttentionMetadata, GroupAttentionMetadata
from pagedserve.engine.kernels.attention.reference import ReferenceAttentionBackend

BACKEND_NAMES = ("reference", "triton", "flash_paged")

__all__ = [
    "BACKEND_NAMES",
    "AttentionBackend",
    "AttentionMetadata",
    "GroupAttentionMetadata",
    "ReferenceAttentionBackend",
    "get_attention_backend",
]


def triton_unavailable_reason(device: torch.device) -> str:
    """'' when the Triton backend can run on `device`, else why not."""
    if device.type != "cuda":
        return f"the triton backend needs a CUDA device, got {device}"
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install 'pagedserve[gpu]')"
    try:
        from pagedserve.engine.kernels.attention.triton import TritonAttentionBackend
    except ImportError as error:  # a broken triton install: say so rather than fail mid-step
        return f"triton failed to import: {error}"
    is_ok, reason = TritonAttentionBackend.is_available(device)
    return "" if is_ok else reason


def flash_unavailable_reason(device: torch.device) -> str:
    """'' when the flash_paged backend can run on `device`, else why not (naming what to install). It checks
    that the packages are there without importing them (FlashAttention 4's import loads a compiler)."""
    from pagedserve.engine.kernels.attention.flash import FlashPagedAttentionBackend

    is_ok, reason = FlashPagedAttentionBackend.is_available(device)
    if not is_ok:
        return reason
    triton_reason = triton_unavailable_reason(device)
    if triton_reason:
        return f"it writes the KV cache with the Triton kernels (and runs its fallback layers there): {triton_reason}"
    return ""


def get_attention_backend(name: str, device: torch.device, programmatic_launch: bool = False) -> AttentionBackend:
    """A new backend for `name` ("reference", "triton" or "flash_paged") on `device`; `programmatic_launch`:
    its Triton kernels launch with PDL (the caller checked that the device supports it)."""
    device = torch.device(device)
    if name == "reference":
        return ReferenceAttentionBackend()
    if name == "triton":
        reason = triton_unavailable_reason(device)
        if reason:
            raise ValueError(f"attention backend 'triton' is unavailable: {reason}")
        from pagedserve.engine.kernels.attention.triton import TritonAttentionBackend

        return TritonAttentionBackend(programmatic_launch=programmatic_launch)
    if name == "flash_paged":
        reason = flash_unavailable_reason(device)
        if reason:
            raise ValueError(f"attention backend 'flash_paged' is unavailable: {reason}")
        from pagedserve.engine.kernels.attention.flash import FlashPagedAttentionBackend

        return FlashPagedAttentionBackend.create(device, programmatic_launch=programmatic_launch)
    raise ValueError(f"attention backend must be one of {', '.join(BACKEND_NAMES)}; got {name!r}")
