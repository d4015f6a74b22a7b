"""Programmatic dependent launch (PDL) for the engine's Triton kernels on Hopper and newer GPUs.

A decode step at batch 1 is a chain of some 400 short kernels, and each one normally starts only after
the one before it has finished and its memory is flushed: launching, rasterizing and ramping up the
next grid is dead time for the GPU. Launched with PDL (`launch_pdl=True`), a kernel may start while the
previous one still runs: it does what does not depend on that kernel (address arithmetic, or reading a
weight, which no kernel writes), then `gdc_wait()` holds it until the previous kernel has completed and
its writes are visible, and `gdc_launch_dependents()` lets the next kernel start early in turn.

Every kernel that the engine launches with PDL calls `gdc_wait()` on every path before it touches memory
that an earlier kernel writes, and before it writes anything an earlier kernel might still read, so the
order of the chain is kept: a kernel's wait returns only after its predecessor completed, and that one's
only after its own predecessor.

`supports_programmatic_launch(device)` says whether the device can: a CUDA device of compute capability
9.0 or newer, a Triton that has the grid-dependency intrinsics, and not the Triton interpreter. Whether the
engine does is a per-runner setting (`RunnerSettings.programmatic_launch`, from the engine's
`programmatic_launch` and this check), handed to each kernel's owner: no module state, so two engines in
one process keep their own choice.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton.language.extra.cuda as _triton_cuda

    _HAS_GDC = hasattr(_triton_cuda, "gdc_wait") and hasattr(_triton_cuda, "gdc_launch_dependents")
except ImportError:  # no Triton (CPU-only installs), or one without the CUDA extras
    _HAS_GDC = False

# The interpreter is chosen when kernels are defined, i.e. at import: its kernels take no launch options.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _capability_major(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


def supports_programmatic_launch(device: torch.device) -> bool:
    """Whether kernels launched on `device` can use PDL."""
    if not (_HAS_GDC and device.type == "cuda") or _INTERPRETED:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability_major(index) >= 9


def launch_options(use_pdl: bool) -> dict[str, bool]:
    """Keyword arguments of a Triton launch: PDL's option only when it is used (older Tritons lack it)."""
    return {"launch_pdl": True} if use_pdl else {}
