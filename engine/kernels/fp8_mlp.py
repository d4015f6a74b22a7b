"""Gated MLPs over FP8 projections: the down projection's input quantized by the activation's own kernel.

transformers' gated MLPs (Llama, Mistral, Qwen2, Qwen3 and others of the same shape) compute
`down_proj(act_fn(gate_proj(x)) * up_proj(x))`. With FP8 layers (engine/kernels/fp8_linear.py) the product is
written to memory in the activation dtype and read back to be quantized per row for the down projection's GEMM.
`use_fp8_mlps` changes the class of each such MLP to a subclass of its own whose forward runs gate and up as
before and hands their outputs to `silu_mul_quantize_fp8` (engine/kernels/silu_mul_fp8.py), whose e4m3 rows
and scales go straight into the down projection's FP8 GEMM (`fp8_gemm`): one kernel and one [M, I] round trip
through memory less a layer. The results are the unfused path's, bit for bit.

Which MLPs are taken, and why the others are not:
- children `gate_proj`, `up_proj`, `down_proj` and `act_fn`, the activation SiLU (transformers' `SiLUActivation`
  or `nn.SiLU`). GELU-tanh (Gemma) is not taken: matching its eager kernel bit for bit would mean reproducing
  CUDA's `tanhf` and the multiply-adds nvcc contracts in it.
- `down_proj` an `Fp8Linear` (or its one-row variant, engine/kernels/decode_linear.py) without hooks: the fused
  path calls its GEMM, not the module, so a hook would be skipped. Tensor parallelism's all-reduce sits on the
  row-parallel down projection as a hook (engine/runner/tensor_parallel.py), and LoRA wraps or hooks it
  (engine/runner/lora.py): those MLPs keep their forward (the runner does not call this with LoRA enabled).
- the forward really is that expression: each candidate's own forward and the fused one run on the same
  random rows once here, and a candidate whose outputs differ in any bit keeps its forward.

The fused path is chosen per call on static facts only (a compiled graph and a CUDA graph each hold one path):
- one row: the MLP's own forward. Its down projection takes the one-row GEMM, which reads the activations in
  their dtype: there is no quantization to fuse.
- under torch.compile, where the unfused product would be Inductor's Triton kernel (a CUDA tensor,
  `inductor_compiled` set by the owner): fused, with Inductor's numerics (`inductor=True`), if the kernel
  computed exactly what Inductor computes in `use_fp8_mlps`' check (`inductor_matches_kernel`: with Inductor's
  config as it is then, e.g. `emulate_precision_casts` off), else the MLP's own forward; under any other
  compiler (or Inductor on CPU, whose C++ kernels compute the product their own way), the MLP's own forward.
- otherwise (eager): fused, with eager PyTorch's numerics.

`FUSE_ACTIVATION_QUANTIZATION` turns it off for the MLPs `use_fp8_mlps` is called on next (benchmarks flip it
for an A/B in one process); `undo` gives the MLPs their classes back.
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from torch._dynamo.exc import TorchDynamoException
from transformers.activations import SiLUActivation

from pagedserve.engine.kernels.fp8_linear import FP8_DTYPE, Fp8Linear, fp8_gemm
from pagedserve.engine.kernels.silu_mul_fp8 import silu_mul_quantize_fp8, silu_mul_reference, silu_mul_triton

logger = logging.getLogger(__name__)

# Read by `use_fp8_mlps`: False leaves every MLP its own forward (the unfused path, for an A/B benchmark).
FUSE_ACTIVATION_QUANTIZATION = True
SILU_TYPES = (SiLUActivation, nn.SiLU)
PROBE_ROWS = 4  # the check's random rows: more than one, so that the fused path runs
NOT_GATED, NOT_FP8 = "not a gated MLP", "down projection not FP8"  # `why_not_fused`'s reasons not logged


class FusedFp8MlpForward:
    """The forward mixed into a gated MLP's class by `use_fp8_mlps` (first in the new class's bases)."""

    # Whether the owner compiles the MLP with Inductor, and whether the kernel's Inductor numerics matched
    # Inductor's own kernel on this device (set on each MLP by `use_fp8_mlps`).
    inductor_compiled: bool = False
    inductor_matched: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        up = self.up_proj(x)
        if not self._fuses(x):
            return self.down_proj(self.act_fn(gate) * up)
        down = self.down_proj
        features = gate.shape[-1]
        quantized, scales = silu_mul_quantize_fp8(gate.reshape(-1, features), up.reshape(-1, features),
                                                  torch.compiler.is_compiling())
        out = fp8_gemm(quantized, scales, down.weight, down.weight_scale, down.bias, gate.dtype, down.use_scaled_mm)
        return out.view(*gate.shape[:-1], out.shape[-1])

    def _fuses(self, x: torch.Tensor) -> bool:
        """Whether this call takes the fused path: static facts of x and of the trace (module docstring)."""
        if x.numel() == x.shape[-1]:
            return False
        if not torch.compiler.is_compiling():
            return True
        return self.inductor_compiled and self.inductor_matched and x.is_cuda


@dataclass
class Fp8MlpSwap:
    """The MLPs `use_fp8_mlps` changed; `undo` gives them their classes back."""

    modules: list[tuple[nn.Module, type]] = field(default_factory=list)  # (MLP, its own class)

    def undo(self) -> None:
        for module, original in self.modules:
            module.__class__ = original
            module.__dict__.pop("inductor_compiled", None)
            module.__dict__.pop("inductor_matched", None)
        self.modules.clear()


def why_not_fused(module: nn.Module) -> str | None:
    """None if `module` looks like a gated MLP over an FP8 down projection the fused path can take; else why not
    (a short reason for the log). Its forward is checked by running it (`use_fp8_mlps`)."""
    children = ("gate_proj", "up_proj", "down_proj")
    if not all(isinstance(getattr(module, name, None), nn.Module) for name in children + ("act_fn",)):
        return NOT_GATED
    down = module.down_proj
    if not isinstance(down, Fp8Linear) or down.weight.dtype != FP8_DTYPE:
        return NOT_FP8
    if isinstance(module, FusedFp8MlpForward):
        return "fused already"
    if len(inspect.signature(type(module).forward).parameters) != 2:  # (self, x)
        return "forward takes more than x"
    if not isinstance(module.act_fn, SILU_TYPES):
        return f"activation {type(module.act_fn).__name__} (SiLU only)"
    if down._forward_hooks or down._forward_pre_hooks:
        return "down projection with hooks (tensor parallel's all-reduce or LoRA)"
    return None


def inductor_matches_kernel(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `silu_mul_triton(inductor=True)` gives the bits of torch.compile's own kernel for SiLU(gate) * up,
    for every gate value of `dtype` (16-bit dtypes: all 65,536) times random up values, on `device`. Inductor's
    code generation is torch's, not ours: this checks the version at hand rather than trusting it."""
    if dtype == torch.float32:  # 2^32 gate values: checked on a random sample
        gate = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0)) * 8
    else:
        gate = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
        gate = torch.where(gate.isfinite(), gate, torch.zeros_like(gate))
    up = torch.randn(gate.shape, generator=torch.Generator().manual_seed(1)) * 4
    gate, up = gate.to(device, dtype).view(256, -1), up.to(device, dtype).view(256, -1)
    compiled = torch.compile(silu_mul_reference, backend="inductor", dynamic=False, fullgraph=True)
    try:
        want = compiled(gate, up)
    except TorchDynamoException as error:  # Inductor cannot compile here: the owner's compile falls back too
        logger.warning("FP8 MLPs: Inductor failed on SiLU(gate) * up (%s); compiled layers keep the unfused MLP",
                       type(error).__name__)
        return False
    try:
        got = silu_mul_triton(gate, up, inductor=True)
    except Exception as error:  # noqa: BLE001 - a kernel that does not build here leaves the MLPs as they were
        logger.warning("FP8 MLPs: the fused kernel failed (%s: %s); compiled layers keep the unfused MLP",
                       type(error).__name__, error)
        return False
    return torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       want.view(torch.int16 if dtype != torch.float32 else torch.int32))


def _same_as_own_forward(module: nn.Module, own_class: type, fused_class: type, dtype: torch.dtype) -> bool:
    """Run `module`'s own forward and the fused one on the same random rows; equal bits, or it keeps its own."""
    device = module.down_proj.weight.device
    rows = torch.randn(PROBE_ROWS, module.gate_proj.in_features, generator=torch.Generator().manual_seed(0))
    rows = rows.to(device, dtype)
    with torch.no_grad():
        want = module(rows)
        module.__class__ = fused_class
        try:
            got = module(rows)
        except Exception as error:  # noqa: BLE001 - a kernel that does not build here: the MLP keeps its forward
            logger.warning("FP8 MLPs: the fused forward failed (%s: %s)", type(error).__name__, error)
            return False
        finally:
            module.__class__ = own_class
    return torch.equal(got, want)


def use_fp8_mlps(model: nn.Module, dtype: torch.dtype, inductor_compiled: bool = False) -> Fp8MlpSwap:
    """Give every gated MLP of `model` over an FP8 down projection the fused forward (module docstring), in place.
    `dtype`: the activations' (the model's) dtype; `inductor_compiled`: whether the owner will torch.compile the
    MLPs with Inductor (then the kernel's Inductor numerics are checked here once). Logs what it took and what it
    left, once."""
    swap = Fp8MlpSwap()
    if not FUSE_ACTIVATION_QUANTIZATION:
        return swap
    candidates, left = [], Counter()
    for module in model.modules():
        reason = why_not_fused(module)
        if reason is None:
            candidates.append(module)
        elif reason not in (NOT_GATED, NOT_FP8):  # nothing to say about a bf16 model, or a module not an MLP
            left[reason] += 1
    if not candidates:
        if left:
            logger.info("FP8 MLPs: none fused (%s)", ", ".join(f"{n} with {why}" for why, n in left.items()))
        return swap
    device = candidates[0].down_proj.weight.device
    matched = inductor_compiled and device.type == "cuda" and inductor_matches_kernel(device, dtype)
    if inductor_compiled and device.type == "cuda" and not matched:
        logger.warning("FP8 MLPs: this torch's Inductor computes SiLU(gate) * up otherwise than the fused kernel's "
                       "emulation of it; compiled layers keep the unfused MLP")
    fused_classes: dict[type, type] = {}
    for module in candidates:
        own_class = type(module)
        if own_class not in fused_classes:
            fused_classes[own_class] = type(f"FusedFp8{own_class.__name__}", (FusedFp8MlpForward, own_class), {})
        if not _same_as_own_forward(module, own_class, fused_classes[own_class], dtype):
            left["forward differs from the fused one"] += 1
            continue
        module.__class__ = fused_classes[own_class]
        module.inductor_compiled, module.inductor_matched = inductor_compiled, matched
        swap.modules.append((module, own_class))
    kept = f"; kept their own forward: {', '.join(f'{n} with {why}' for why, n in left.items())}" if left else ""
    logger.info("FP8 MLPs: SiLU(gate) * up quantized in one kernel for the down projection in %d MLPs%s",
                len(swap.modules), kept)
    return swap
