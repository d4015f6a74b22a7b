"""transformers' expert modules switched to the fused kernels: the op, the kernel choice, and the swap.

**Which modules.** A module with 3-D `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I] parameters and
`num_experts`, whose gate and up rows are concatenated (not interleaved), not transposed, without biases or a
post-expert norm, and whose gate activation is transformers' default `SiLU(gate) * up`: the experts of
Qwen2-MoE, Qwen3-MoE, Mixtral and OLMoE in transformers 5.17-5.25 (and of any other family built the same
way). Anything else keeps transformers' code: gpt-oss (transposed [E, H, 2I] weights, interleaved gate/up,
biases, a clamped SwiGLU), experts kept as a ModuleList of per-expert MLPs, other activations. `use_fused_moe`
logs once, per model family, which path its expert blocks take and why.

**The swap.** A supported module's class becomes `FusedExperts` (its parameters, hooks and identity stay: a
tensor-parallel all-reduce hook on the module still sums its output) and `undo` gives the class back; no
weight is copied or repacked, so the memory plan's measured weights are the model's own. The router beside
it (the block's `gate`) becomes the one-kernel router of engine/kernels/moe/router.py where its family's
semantics are known and its own forward checks out against them (Qwen2-MoE, Qwen3-MoE, OLMoE, Mixtral): on
CUDA at up to 8 tokens it is one kernel instead of five or six; otherwise it runs its own code.

**The op.** `FusedExperts.forward` calls `pagedserve::fused_experts`, one custom op: torch.compile sees it as
opaque (shared experts and the rest of the layer compile around it), and every kernel behind it takes
its shapes from the token count alone, with no host sync, so a decode CUDA graph captures it. Inside, the
kernel is chosen per call by `choose_kernel`, from the token count and the device:

| where | tokens | kernel |
|---|---|---|
| CPU (or a CUDA device without Triton) | any | `reference` (PyTorch loop over experts; not capturable) |
| CUDA | <= `rows_max_tokens` | `rows` (Triton, one program per pair: reads only the chosen experts) |
| CUDA, bf16, compute capability 9.0+, torch with `_grouped_mm` | >= `grouped_mm_min_tokens` (None: never) | `grouped_mm` |
| CUDA otherwise | | `triton` (Triton grouped GEMM over block-padded expert runs) |

The thresholds are the H200's (Qwen3-30B-A3B shape; docs/kernels.md has the figures): `rows` was fastest up
to 8 tokens in the per-layer microbenchmark (its first version: 159 us vs Triton's 183 at 8; the current
per-pair kernels are faster, so the bound may move up when they are measured); the Triton grouped GEMM from there
through decode batches of 512 (437 vs 567 us a layer at 512 tokens; W1-MoE's decode steps of 257-512
sequences 27.9 ms against 34.0 on grouped_mm); `grouped_mm` for prompt steps from 1,024 tokens, where the
engine measured it faster (W1-MoE's prompt steps 15.3 s against 16.9 on Triton) although the microbenchmark at
4,096 tokens favours Triton (1,101 vs 1,506 us): the large-T Triton tiles are unmeasured first guesses.
`MoeKernelPolicy(kernel=...)` forces one kernel (benchmarks, tests).

**FP8 experts** (`quantization="fp8"`: engine/kernels/moe/fp8.py): the module holds e4m3 `gate_up_proj` /
`down_proj` and float32 `gate_up_proj_scale` [E, 2I] / `down_proj_scale` [E, H]; the op takes the scales as two
trailing optional arguments and the same rule picks the kernel: `rows` reads the e4m3 rows with bf16
activations (W8A16), `triton` and `grouped_mm` (`torch._scaled_grouped_mm`, where torch has it and the device
runs it; otherwise `triton`) quantize their inputs per row and multiply on FP8 tensor cores (W8A8), the CPU
reference dequantizes in float32.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from pagedserve.engine.kernels.fp8_quant import FP8_DTYPE
from pagedserve.engine.kernels.moe.fp8 import (
    expert_scales,
    fp8_scales_problem,
    is_fp8_experts,
    quantize_expert_weight,
    set_expert_weights,
)
from pagedserve.engine.kernels.moe.grouped_mm import experts_grouped_mm, grouped_mm_unavailable
from pagedserve.engine.kernels.moe.reference import experts_reference
from pagedserve.engine.kernels.moe.router import ROUTER_MAX_TOKENS, undo_fused_router, use_fused_router
from pagedserve.engine.kernels.moe.triton import experts_rows, experts_triton, triton

try:  # transformers' gate of concatenated gate/up halves: act_fn(gate) * up (5.17 through 5.25 at least)
    from transformers.integrations.moe import _default_apply_gate
except ImportError:
    _default_apply_gate = None

logger = logging.getLogger(__name__)

KernelName = Literal["auto", "reference", "rows", "triton", "grouped_mm"]
KERNELS: tuple[str, ...] = ("reference", "rows", "triton", "grouped_mm")

# Measured on an H200 (docs/kernels.md, docs/results/moe_h200_dab14b2.md): the per-pair kernel reads every
# pair's expert weights once per pair, so it pays while few pairs share an expert (through 8 tokens); the Triton
# grouped GEMM wins decode batches; torch's grouped_mm (CUTLASS) won the engine's prompt steps.
ROWS_MAX_TOKENS = 8
GROUPED_MM_MIN_TOKENS: int | None = 1024


@dataclass(frozen=True)
class MoeKernelPolicy:
    """How `pagedserve::fused_experts` picks its kernel (see the module docstring's table)."""

    kernel: KernelName = "auto"  # a name forces that kernel
    rows_max_tokens: int = ROWS_MAX_TOKENS
    grouped_mm_min_tokens: int | None = GROUPED_MM_MIN_TOKENS
    # Programmatic dependent launch of the per-pair kernels (engine/kernels/launch.py): the owner's setting
    # (`RunnerSettings.programmatic_launch`), which checked the device.
    use_pdl: bool = False

    def describe(self) -> str:
        if self.kernel != "auto":
            return f"kernel {self.kernel} (forced)"
        grouped = ("" if self.grouped_mm_min_tokens is None else
                   f"grouped_mm from {self.grouped_mm_min_tokens} tokens where it runs (bf16, compute capability 9.0+), ")
        pdl = " (programmatic dependent launch)" if self.use_pdl else ""
        return (f"on CUDA: rows up to {self.rows_max_tokens} tokens{pdl}, {grouped}the Triton grouped GEMM otherwise; "
                "on CPU: the PyTorch reference")


def pick_kernel(num_tokens: int, on_cuda_with_triton: bool, grouped_mm_runs: bool, policy: MoeKernelPolicy) -> str:
    """The rule of the module docstring's table, on plain facts."""
    if policy.kernel != "auto":
        return policy.kernel
    if not on_cuda_with_triton:
        return "reference"
    if num_tokens <= policy.rows_max_tokens:
        return "rows"
    if policy.grouped_mm_min_tokens is not None and num_tokens >= policy.grouped_mm_min_tokens and grouped_mm_runs:
        return "grouped_mm"
    return "triton"


def choose_kernel(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, policy: MoeKernelPolicy) -> str:
    """The kernel `fused_experts` runs for these operands (a function of shapes, dtypes and device only, so a
    CUDA graph captured at a batch size always replays the kernel it was captured with)."""
    on_cuda_with_triton = hidden.is_cuda and triton is not None
    grouped_mm_runs = on_cuda_with_triton and grouped_mm_unavailable(hidden, w13, w2) is None
    return pick_kernel(hidden.shape[0], on_cuda_with_triton, grouped_mm_runs, policy)


def run_kernel(kernel: str, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
               w13: torch.Tensor, w2: torch.Tensor, use_pdl: bool = False, w13_scale: torch.Tensor | None = None,
               w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`kernel`'s experts; `use_pdl` launches the per-pair kernels with programmatic dependent launch; the scales
    make w13 / w2 FP8 experts (module docstring)."""
    problem = fp8_scales_problem(w13, w2, w13_scale, w2_scale)
    if problem is not None:
        raise ValueError(problem)
    scales = dict(w13_scale=w13_scale, w2_scale=w2_scale)
    if kernel == "reference":
        return experts_reference(hidden, topk_ids, topk_weights, w13, w2, **scales)
    if kernel == "rows":
        return experts_rows(hidden, topk_ids, topk_weights, w13, w2, use_pdl=use_pdl, **scales)
    if kernel == "triton":
        return experts_triton(hidden, topk_ids, topk_weights, w13, w2, **scales)
    if kernel == "grouped_mm":
        unavailable = grouped_mm_unavailable(hidden, w13, w2)
        if unavailable is not None:
            raise ValueError(f"the grouped_mm MoE kernel cannot run here: {unavailable}")
        return experts_grouped_mm(hidden, topk_ids, topk_weights, w13, w2, **scales)
    raise ValueError(f"unknown MoE kernel {kernel!r}; known: {', '.join(KERNELS)}")


@torch.library.custom_op("pagedserve::fused_experts", mutates_args=())
def fused_experts(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
                  w2: torch.Tensor, kernel: str, rows_max_tokens: int, grouped_mm_min_tokens: int | None,
                  use_pdl: bool = False, w13_scale: torch.Tensor | None = None,
                  w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """A MoE block's experts: hidden [T, H], the router's topk_ids / topk_weights [T, k], w13 [E, 2I, H],
    w2 [E, H, I] -> [T, H]; FP8 experts: w13 / w2 in e4m3 with float32 row scales w13_scale [E, 2I] and
    w2_scale [E, H]. Inference only (no backward)."""
    policy = MoeKernelPolicy(kernel, rows_max_tokens, grouped_mm_min_tokens, use_pdl)  # type: ignore[arg-type]
    hidden = hidden.contiguous()
    return run_kernel(choose_kernel(hidden, w13, w2, policy), hidden, topk_ids, topk_weights, w13, w2, use_pdl,
                      w13_scale, w2_scale)


@fused_experts.register_fake
def _(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
      w2: torch.Tensor, kernel: str, rows_max_tokens: int, grouped_mm_min_tokens: int | None,
      use_pdl: bool = False, w13_scale: torch.Tensor | None = None,
      w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    return hidden.new_empty(hidden.shape)


class FusedExperts(nn.Module):
    """The class a supported experts module takes (`use_fused_moe`): the same parameters, through the op.
    `moe_policy` and `moe_original_class` are set on the instance by the swap."""

    moe_policy: MoeKernelPolicy
    moe_original_class: type

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        policy = self.moe_policy
        w13_scale, w2_scale = expert_scales(self)  # FP8 experts; None in the model's dtype
        return torch.ops.pagedserve.fused_experts(
            hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj, policy.kernel,
            policy.rows_max_tokens, policy.grouped_mm_min_tokens, policy.use_pdl, w13_scale, w2_scale)


def unsupported_reason(experts: nn.Module) -> str | None:
    """Why `experts` (a MoE block's `experts` child) cannot take the fused path, or None when it can."""
    if isinstance(experts, (nn.ModuleList, nn.ModuleDict)):
        return "experts kept as separate per-expert modules"
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor) or gate_up.dim() != 3 \
            or down.dim() != 3:
        return "no 3-D gate_up_proj/down_proj expert weights"
    if getattr(experts, "is_transposed", False) or not getattr(experts, "is_concatenated", True):
        return "transposed or interleaved gate/up expert weights"
    if getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True) \
            or getattr(experts, "has_post_expert_norm", False):
        return "expert biases, ungated experts or a post-expert norm"
    gate_function = getattr(type(experts), "_apply_gate", None)
    if gate_function is not None and gate_function is not _default_apply_gate:
        return f"its own gate function ({type(experts).__name__}._apply_gate)"
    activation = getattr(experts, "act_fn", None)
    if type(activation).__name__ not in ("SiLU", "SiLUActivation"):
        return f"activation {type(activation).__name__} (the fused kernels take SiLU)"
    num_experts, intermediate2, hidden = gate_up.shape
    if down.shape != (num_experts, hidden, intermediate2 // 2) or intermediate2 % 2:
        return f"expert weights of shapes {tuple(gate_up.shape)} and {tuple(down.shape)} do not chain"
    if gate_up.dtype == FP8_DTYPE or down.dtype == FP8_DTYPE:  # FP8 experts (engine/kernels/moe/fp8.py)
        problem = fp8_scales_problem(gate_up, down, *expert_scales(experts))
        if problem is not None:
            return problem
    elif not gate_up.is_floating_point() or gate_up.dtype != down.dtype or gate_up.dtype.itemsize < 2:
        return f"expert weights of dtype {gate_up.dtype}"
    if gate_up.stride(2) != 1 or down.stride(2) != 1:
        return "expert weights without a contiguous last dimension"
    return None


@dataclass
class MoeSwap:
    """The expert modules `use_fused_moe` switched, with what it found per model family; `undo` restores them."""

    modules: list[nn.Module] = field(default_factory=list)
    fused: dict[str, int] = field(default_factory=dict)  # family -> expert modules on the fused path
    fallback: dict[str, tuple[int, str]] = field(default_factory=dict)  # family -> (modules, why) on transformers'
    routers: list[nn.Module] = field(default_factory=list)  # routers switched to the one-kernel router
    router_fallback: dict[str, str] = field(default_factory=dict)  # family -> why its routers keep their code

    def describe(self) -> str:
        parts = [f"{family}: {count} expert modules take the fused path" for family, count in self.fused.items()]
        parts += [f"{family}: {count} expert modules keep transformers' code ({why})"
                  for family, (count, why) in self.fallback.items()]
        if self.routers:
            parts.append(f"{len(self.routers)} routers take the one-kernel router on CUDA up to "
                         f"{ROUTER_MAX_TOKENS} tokens")
        parts += [f"{family}: routers keep transformers' code ({why})" for family, why in self.router_fallback.items()]
        return "; ".join(parts)

    def undo(self) -> None:
        for module in self.modules:
            module.__class__ = module.moe_original_class
            del module.moe_policy, module.moe_original_class
        self.modules.clear()
        for router in self.routers:
            undo_fused_router(router)
        self.routers.clear()


def _moe_block_modules(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(model family, block, experts module) of every MoE block: a module with an `experts` child."""
    found = []
    for module in model.modules():
        experts = getattr(module, "_modules", {}).get("experts")
        if experts is not None:
            config = getattr(module, "config", None) or getattr(experts, "config", None) or getattr(model, "config", None)
            found.append((getattr(config, "model_type", None) or type(module).__name__, module, experts))
    return found


def moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(model family, experts module) of every MoE block: a module with an `experts` child."""
    return [(family, experts) for family, _, experts in _moe_block_modules(model)]


def use_fused_moe(model: nn.Module, policy: MoeKernelPolicy | None = None, fuse_router: bool = True) -> MoeSwap:
    """Switch every supported experts module of `model` to `FusedExperts` and (`fuse_router`) the router beside
    it (the block's `gate`) to the one-kernel router where its family's semantics are known
    (engine/kernels/moe/router.py). Blocks whose experts are already switched, e.g. by a benchmark with its own
    policy, are left as they are; the rest keep transformers' code. Logs once what it found, when the model has
    MoE blocks."""
    policy = policy or MoeKernelPolicy()
    swap = MoeSwap()
    fused: dict[str, int] = defaultdict(int)
    fallback: dict[str, list] = {}
    for family, block, experts in _moe_block_modules(model):
        if isinstance(experts, FusedExperts):
            fused[family] += 1
            continue
        reason = unsupported_reason(experts)
        if reason is not None:
            entry = fallback.setdefault(family, [0, reason])
            entry[0] += 1
            continue
        experts.moe_original_class = type(experts)
        experts.moe_policy = policy
        experts.__class__ = FusedExperts
        swap.modules.append(experts)
        fused[family] += 1
        router = block._modules.get("gate")
        if fuse_router and router is not None and triton is not None:
            router_reason = use_fused_router(router, policy.use_pdl)
            if router_reason is None:
                swap.routers.append(router)
            else:
                swap.router_fallback.setdefault(family, router_reason)
    swap.fused = dict(fused)
    swap.fallback = {family: (count, why) for family, (count, why) in fallback.items()}
    if swap.fused or swap.fallback:
        logger.info("MoE experts: %s; kernels: %s", swap.describe(), policy.describe())
    return swap


def quantize_experts(model: nn.Module) -> int:
    """Quantize, in place, the experts of every MoE block that the fused path takes (its expert weights to e4m3
    with a scale per expert and output row); experts it does not take keep the model's dtype (their transformers
    code cannot run FP8 weights), and so do experts already in FP8. Returns how many modules were quantized."""
    quantized, kept = 0, {}  # kept: family -> why its experts keep the model's dtype
    for family, _, experts in _moe_block_modules(model):
        if is_fp8_experts(experts):
            continue
        reason = unsupported_reason(experts)
        if reason is not None:
            kept.setdefault(family, reason)
            continue
        gate_up, gate_up_scale = quantize_expert_weight(experts.gate_up_proj.data)
        down, down_scale = quantize_expert_weight(experts.down_proj.data)
        set_expert_weights(experts, gate_up, down, gate_up_scale, down_scale)  # the bf16 stacks are freed here
        quantized += 1
    if quantized:
        logger.info("quantized the experts of %d MoE blocks to FP8 (e4m3, a scale per expert and output row)",
                    quantized)
    for family, why in kept.items():
        logger.info("%s: MoE experts stay in the model's dtype under quantization='fp8' (%s)", family, why)
    return quantized
