"""Sibling projections of one input (q/k/v, gate/up) run as one GEMM.

Transformers' decoder layers call `q_proj`, `k_proj` and `v_proj` one after another on the same hidden
states, and `gate_proj` and `up_proj` likewise: five GEMMs per layer where two would do. At batch 1 a
decode step is a pass over the weights, and the narrow k/v projections (an eighth of q's width with
GQA) read their weights far below the device's bandwidth, each in its own kernel; one GEMM over the
concatenated weight reads the same bytes in one pass. vLLM and SGLang merge these weights in their own
model code; we keep transformers' model code and merge under it.

Found by watching one forward (the runner's shape probe), not by module names: the plain `nn.Linear`
children (or FP8 ones, `Fp8Linear`, fused into one FP8 GEMM with their scales) of one parent that receive the same input tensor, once each, in a fixed order, with the same
input width, dtype, device and bias presence, and no hooks (tensor parallelism's all-reduce hooks sit
on the row-parallel layers, which are never siblings of one input). Each such group becomes:

- a lead (the first member called) that holds the concatenated weight, computes every member's output
  and returns its own part, leaving the others' parts on itself;
- followers that take their part from the lead (the last one clears it, so nothing outlives a forward)
  and compute their own slice should the lead not have run first.

The old linears' weights become views of the concatenated one, so fusing costs no memory and `undo`
puts the original modules back as they were (a model passed in by the caller is the caller's object).
The lead's hand-over is a plain attribute, which torch.compile traces as a side effect of the layer:
the compiled decoder layer keeps one graph.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.engine.kernels.fp8_linear import Fp8Linear, fp8_linear

logger = logging.getLogger(__name__)


class _FusedMember(nn.Module):
    """`weight` and `bias` read as the member's own rows of the concatenated tensors, as the linear it
    replaced (code that inspects `q_proj.weight` sees q's weight)."""

    lead: "FusedLead"
    row_start: int
    out_features: int

    @property
    def weight(self) -> torch.Tensor:
        return self.lead.fused_weight[self.row_start : self.row_start + self.out_features]

    @property
    def bias(self) -> torch.Tensor | None:
        bias = self.lead.fused_bias
        return None if bias is None else bias[self.row_start : self.row_start + self.out_features]


class FusedLead(_FusedMember):
    """The first member of a group: one GEMM over the concatenated weight, its own part returned."""

    linear = staticmethod(F.linear)  # FP8 leads and decode_linear.py's subclasses swap in their own GEMM

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, out_sizes: list[int]) -> None:
        super().__init__()
        self.fused_weight = nn.Parameter(weight, requires_grad=False)
        self.fused_bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_sizes = out_sizes
        self.row_start = 0
        self.in_features = weight.shape[1]
        self.out_features = out_sizes[0]
        self.pending: list[torch.Tensor] | None = None  # the followers' parts of the latest input
        # LoRA adapters' update of every member's output (engine/runner/lora.py sets it; None: no adapters).
        self.lora: nn.Module | None = None

    @property
    def lead(self) -> "FusedLead":
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.linear(x, self.fused_weight, self.fused_bias)
        if self.lora is not None:
            fused = self.lora(x, fused)
        parts = fused.split(self.out_sizes, dim=-1)
        self.pending = list(parts[1:])
        return parts[0]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_sizes={self.out_sizes}, bias={self.fused_bias is not None}"


class Fp8FusedLead(FusedLead):
    """A lead over FP8 members: the concatenated e4m3 weight with its concatenated per-feature scales (a row's
    scale is its own, so concatenating scales is exact). Its own class: the one-row GEMM swaps leads by exact
    type, and this one takes its FP8 variant."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 out_sizes: list[int], use_scaled_mm: bool) -> None:
        super().__init__(weight, bias, out_sizes)
        self.fused_weight_scale = nn.Parameter(weight_scale, requires_grad=False)
        self.use_scaled_mm = use_scaled_mm

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return fp8_linear(x, weight, self.fused_weight_scale, bias, self.use_scaled_mm)


class FusedFollower(_FusedMember):
    """A later member: its part of the lead's output. The lead is not registered as a submodule, so the
    model's parameters list the concatenated weight once."""

    def __init__(self, lead: FusedLead, index: int) -> None:
        super().__init__()
        self.__dict__["lead"] = lead  # not a submodule (see the class docstring)
        self.index = index
        self.is_last = index == len(lead.out_sizes) - 1
        self.row_start = sum(lead.out_sizes[:index])
        self.in_features = lead.in_features
        self.out_features = lead.out_sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = self.lead
        pending = lead.pending
        if pending is None:  # the lead did not run first on this input: compute this slice alone
            if isinstance(lead, Fp8FusedLead):
                scale = lead.fused_weight_scale[self.row_start : self.row_start + self.out_features]
                return fp8_linear(x, self.weight, scale, self.bias, lead.use_scaled_mm)
            return F.linear(x, self.weight, self.bias)
        part = pending[self.index - 1]
        if self.is_last:
            lead.pending = None
        return part

    def extra_repr(self) -> str:
        return f"part {self.index} of {self.lead.out_sizes}"


@dataclass
class _Group:
    parent: nn.Module
    names: list[str]  # child names, in call order
    originals: list[nn.Linear | Fp8Linear]


@dataclass
class ProjectionFusion:
    """Watches one forward, then fuses the groups it saw; `undo` restores the original modules."""

    # (parent id, child name, input): the input as (object id, version counter), so a tensor changed in
    # place between two calls does not count as the same input.
    _calls: list[tuple[int, str, tuple[int, int]]] = field(default_factory=list)
    _parents: dict[int, nn.Module] = field(default_factory=dict)
    _hooks: list = field(default_factory=list)
    groups: list[_Group] = field(default_factory=list)

    @classmethod
    def watch(cls, model: nn.Module) -> "ProjectionFusion":
        """Hook every fusable linear; run one forward of the model, then call `apply`."""
        fusion = cls()
        for parent in model.modules():
            for name, child in parent.named_children():
                if type(child) not in (nn.Linear, Fp8Linear) or _has_hooks(child):
                    continue
                fusion._parents[id(parent)] = parent
                hook = child.register_forward_pre_hook(fusion._recorder(id(parent), name))
                fusion._hooks.append(hook)
        return fusion

    def _recorder(self, parent_id: int, name: str):
        def record(_module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                x = args[0]
                # Inference tensors keep no version counter; the runner's probe runs outside inference mode.
                version = -1 if x.is_inference() else x._version
                self._calls.append((parent_id, name, (id(x), version)))

        return record

    def apply(self) -> list[_Group]:
        """Fuse every group the watched forward showed; returns them (empty: nothing to fuse)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        by_parent: dict[int, list[tuple[str, tuple[int, int]]]] = defaultdict(list)
        for parent_id, name, input_id in self._calls:
            by_parent[parent_id].append((name, input_id))
        self._calls = []
        for parent_id, calls in by_parent.items():
            parent = self._parents[parent_id]
            times_called = Counter(name for name, _ in calls)
            by_input: dict[tuple[int, int], list[str]] = defaultdict(list)
            for name, input_id in calls:
                if times_called[name] == 1:  # a child called twice in one forward has no one input
                    by_input[input_id].append(name)
            for members in by_input.values():
                if len(members) > 1 and _compatible([getattr(parent, n) for n in members]):
                    self.groups.append(_fuse(parent, members))
        self._parents = {}
        if self.groups:
            shapes = sorted({"/".join(g.names) for g in self.groups})
            logger.info("fused %d projection groups into one GEMM each (%s)", len(self.groups), ", ".join(shapes))
        return self.groups

    def undo(self) -> None:
        """Put the original linears back (their weights stay views of the concatenated one)."""
        for group in self.groups:
            for name, original in zip(group.names, group.originals):
                setattr(group.parent, name, original)
        self.groups = []


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def _compatible(linears: list[nn.Linear | Fp8Linear]) -> bool:
    first = linears[0].weight
    return all(
        type(lin) is type(linears[0])
        and getattr(lin, "use_scaled_mm", None) == getattr(linears[0], "use_scaled_mm", None)
        and lin.in_features == linears[0].in_features
        and lin.weight.dtype == first.dtype
        and lin.weight.device == first.device
        and (lin.bias is None) == (linears[0].bias is None)
        for lin in linears
    )


def _fuse(parent: nn.Module, names: list[str]) -> _Group:
    originals = [getattr(parent, name) for name in names]
    sizes = [lin.out_features for lin in originals]
    weight = torch.cat([lin.weight.detach() for lin in originals])
    bias = None if originals[0].bias is None else torch.cat([lin.bias.detach() for lin in originals])
    # The originals keep views of the new tensors, so their old storage is freed and `undo` is exact.
    is_fp8 = isinstance(originals[0], Fp8Linear)
    scale = torch.cat([lin.weight_scale.detach() for lin in originals]) if is_fp8 else None
    start = 0
    for lin, size in zip(originals, sizes):
        lin.weight = nn.Parameter(weight[start : start + size], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[start : start + size], requires_grad=False)
        if scale is not None:
            lin.weight_scale = nn.Parameter(scale[start : start + size], requires_grad=False)
        start += size
    if is_fp8:
        lead: FusedLead = Fp8FusedLead(weight, scale, bias, sizes, originals[0].use_scaled_mm)
    else:
        lead = FusedLead(weight, bias, sizes)
    setattr(parent, names[0], lead)
    for index, name in enumerate(names[1:], start=1):
        setattr(parent, name, FusedFollower(lead, index))
    return _Group(parent, names, originals)
