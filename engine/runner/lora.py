"""LoRA adapters over the served model: PEFT's format read, the projections wrapped, device slots managed.

An adapter is a folder as `peft` saves it: `adapter_config.json` (rank `r`, `lora_alpha`, `use_rslora`,
`alpha_pattern`, target modules) and `adapter_model.safetensors` with `<module>.lora_A.weight` [r, in] and
`<module>.lora_B.weight` [out, r] per targeted module, under PEFT's `base_model.model.` prefix. Its update
of a layer is `scale * B @ A` with `scale = alpha / r` (`alpha / sqrt(r)` with rsLoRA), as PEFT merges it.

`LoraManager` (owned by the model runner, which owns the device):
- wraps the projections q/k/v/o and gate/up/down of the decoder layers once, at start-up: a plain linear
  becomes a `LoraLinear` (its base layer, then the update), a fused projection lead
  (engine/kernels/fused_projections.py) takes a `LoraLayer` over all its members' outputs. The one-row
  GEMM (engine/kernels/decode_linear.py) still runs the base layers: only the update is added.
- keeps the device's `max_loras` slots (every layer holds [max_loras, ...] A and B tensors, zero-padded to
  `max_lora_rank`), filled least recently used first; a step's adapters are never evicted in that step.
- keeps up to `max_cpu_loras` adapters read in host memory (least recently used dropped, read again from
  their path when needed).
- under tensor parallel, cuts each adapter as its layer was cut (`ShardCut`, engine/runner/tensor_parallel.py):
  a column-parallel layer (q/k/v, gate/up: output features split) keeps the rows of B of its output features
  and all of A; a row-parallel layer (o, down: input features split, output all-reduced) keeps the columns of
  A of its input features and all of B, and its update joins the layer's partial output before the all-reduce.
  Since B is linear, B @ (A_0 x_0) + B @ (A_1 x_1) = B @ (A x): the sum that completes the base output
  completes the update too, with no collective of its own (vLLM's row-parallel LoRA does the same). The other
  way, an all-reduce of the rank-r shrink output, is smaller but one more collective per layer, which at
  decode sizes costs its latency, not its bytes. Each rank computes the expand over all of B's rows.
- per step, maps each row's adapter to its slot: the slot ids per token, one device tensor
  (engine/kernels/lora.py groups the rows by it).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pagedserve.config.engine import ConfigError
from pagedserve.config.resolve import LoraSettings

from pagedserve.engine.kernels.fused_projections import FusedFollower, FusedLead
from pagedserve.engine.kernels.lora import LoraStepIndex, lora_add_reference, slot_segments, uses_triton
from pagedserve.engine.runner.loader import ShardCut

logger = logging.getLogger(__name__)

# Projections that take an adapter (vLLM's and PEFT's usual targets on Llama-like decoder layers).
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# A name no adapter can take: the engine's warm-up steps at start-up run rows under it (slot 0, whatever it holds:
# their output is thrown away), so that the layers' graphs with adapter rows (torch.compile's, static then dynamic)
# and the LoRA kernels are compiled before the first request, not inside its steps.
WARM_UP_ADAPTER = "<warm-up>"
_PEFT_PREFIX = "base_model.model."
_CONFIG_FILE = "adapter_config.json"
_WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass
class LoraAdapter:
    """One adapter in host memory: per module name (the model's, e.g. `model.layers.0.self_attn.q_proj`),
    A [r, in] and B [out, r] already multiplied by the module's scale."""

    name: str
    path: str
    rank: int  # the largest of its modules
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    load_time_s: float = 0.0  # reading the files


def _peft_pattern_value(pattern: dict[str, float], module_name: str, default: float) -> float:
    """PEFT's `alpha_pattern` rule: a key matches a module whose name is it or ends with `.key` (a regex)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def resolve_adapter_path(path: str) -> Path:
    """A local folder as is; otherwise a hub id, fetched with huggingface_hub (adapter files only)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists() or path.startswith((".", "/", "~")):
        raise ConfigError(f"LoRA adapter path {path!r} is not a folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, allow_patterns=[_CONFIG_FILE, _WEIGHTS_FILE]))
    except Exception as exc:  # noqa: BLE001 -- any hub failure names the adapter
        raise ConfigError(f"LoRA adapter {path!r}: not a local folder, and the hub gave no adapter: {exc}") from None


def read_peft_adapter(name: str, path: str, max_rank: int) -> LoraAdapter:
    """Read and check an adapter folder; `ConfigError` naming the adapter and what is not supported."""
    started = time.perf_counter()
    folder = resolve_adapter_path(path)
    config_path, weights_path = folder / _CONFIG_FILE, folder / _WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise ConfigError(f"LoRA adapter {name!r} at {path}: needs {_CONFIG_FILE} and {_WEIGHTS_FILE} (PEFT's "
                          "save_pretrained format)")
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"LoRA adapter {name!r}: peft_type {config.get('peft_type')!r} is not LORA")
    unsupported = [
        (config.get("use_dora"), "use_dora (DoRA)"),
        (config.get("bias", "none") != "none", f"bias={config.get('bias')!r}"),
        (config.get("modules_to_save"), "modules_to_save"),
        (config.get("fan_in_fan_out"), "fan_in_fan_out"),
        (config.get("lora_bias"), "lora_bias"),
    ]
    for present, what in unsupported:
        if present:
            raise ConfigError(f"LoRA adapter {name!r}: {what} is not supported (plain LoRA only)")
    from safetensors.torch import load_file

    tensors = load_file(str(weights_path))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, sep, kind = key.removeprefix(_PEFT_PREFIX).rpartition(".lora_")
        if not sep or kind not in ("A.weight", "B.weight"):
            raise ConfigError(f"LoRA adapter {name!r}: tensor {key!r} is not a lora_A/lora_B weight "
                              "(embeddings, DoRA magnitudes and biases are not supported)")
        pairs.setdefault(module, {})[kind[0]] = tensor
    if not pairs:
        raise ConfigError(f"LoRA adapter {name!r}: {_WEIGHTS_FILE} holds no LoRA weights")
    alpha = float(config.get("lora_alpha", 8))
    alpha_pattern = config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora"))
    weights = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ConfigError(f"LoRA adapter {name!r}: module {module!r} lacks lora_{'B' if 'A' in pair else 'A'}")
        a, b = pair["A"], pair["B"]
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != rank:
            raise ConfigError(f"LoRA adapter {name!r}: module {module!r} has A {tuple(a.shape)} and B "
                              f"{tuple(b.shape)}, not [r, in] and [out, r]")
        if rank > max_rank:
            raise ConfigError(f"LoRA adapter {name!r}: rank {rank} of {module!r} is above max_lora_rank={max_rank}")
        module_alpha = _peft_pattern_value(alpha_pattern, module, alpha)
        scale = module_alpha / math.sqrt(rank) if use_rslora else module_alpha / rank
        weights[module] = (a.float(), b.float() * scale)
    return LoraAdapter(name, str(folder), max(a.shape[0] for a, _ in weights.values()), weights,
                       time.perf_counter() - started)


class LoraStep:
    """The current step's rows grouped by slot, shared by every `LoraLayer` of one runner (None: no row of
    the step has an adapter, and the layers add nothing). `segments`: the same grouping on the host, for the
    reference path (CPU), computed once a step rather than once a layer."""

    def __init__(self) -> None:
        self.index: LoraStepIndex | None = None
        self.segments: list[tuple[int, torch.Tensor]] | None = None


class LoraLayer(nn.Module):
    """The adapters' update of one projection (or of a fused group of `len(slice_sizes)` projections that
    share an input): `lora_a` [slots, S * R, in], `lora_b` [slots, sum(slice_sizes), R], scales folded in."""

    def __init__(self, in_features: int, slice_sizes: list[int], num_slots: int, rank: int, dtype: torch.dtype,
                 device: torch.device, step: LoraStep) -> None:
        super().__init__()
        self.in_features = in_features
        self.slice_sizes = list(slice_sizes)
        self.rank = rank
        self.register_buffer("lora_a", torch.zeros((num_slots, len(slice_sizes) * rank, in_features), dtype=dtype,
                                                   device=device), persistent=False)
        self.register_buffer("lora_b", torch.zeros((num_slots, sum(slice_sizes), rank), dtype=dtype, device=device),
                             persistent=False)
        starts = [0]
        for size in slice_sizes:
            starts.append(starts[-1] + size)
        self.slice_offsets = starts
        self.register_buffer("slice_starts", torch.tensor(starts, dtype=torch.int32, device=device), persistent=False)
        self.__dict__["step"] = step  # shared, not a submodule

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` (the base layer's output for `x`) with each adapter row's update added in place."""
        index = self.step.index
        if index is None:
            return out
        flat_x = x.reshape(-1, x.shape[-1])
        if not flat_x.is_contiguous():
            flat_x = flat_x.contiguous()
        if self.step.segments is not None:
            lora_add_reference(flat_x, out.view(-1, out.shape[-1]), self.lora_a, self.lora_b, self.step.segments,
                               self.slice_sizes, self.rank)
            return out
        torch.ops.pagedserve.lora_add(flat_x, out.view(-1, out.shape[-1]), self.lora_a, self.lora_b,
                                      index.token_slots, index.sorted_ids, index.slot_counts, index.slot_starts,
                                      index.tile_slots, index.tile_rows, self.slice_starts, self.slice_sizes,
                                      self.rank)
        return out

    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()

    def write_slot(self, slot: int, slice_index: int, a: torch.Tensor, b: torch.Tensor) -> None:
        rank = a.shape[0]
        row = slice_index * self.rank
        start = self.slice_offsets[slice_index]
        self.lora_a[slot, row : row + rank].copy_(a)
        self.lora_b[slot, start : start + b.shape[0], :rank].copy_(b)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, slices={self.slice_sizes}, rank={self.rank}"


class LoraLinear(nn.Module):
    """A projection with adapters: its base layer (kept as it was: plain, one-row GEMM or FP8), then the update."""

    def __init__(self, base: nn.Module, lora: LoraLayer) -> None:
        super().__init__()
        self.base = base
        self.lora = lora

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora(x, self.base(x))


@dataclass
class _Target:
    layer: LoraLayer
    slice_index: int
    shape: tuple[int, int]  # (out, in) of this module on this rank
    cut: ShardCut | None = None  # tensor parallel: what this rank holds of the module

    @property
    def full_shape(self) -> tuple[int, int]:
        """(out, in) of the whole module, as an adapter of the model has it."""
        out_features, in_features = self.shape
        if self.cut is not None and self.cut.style == "colwise":
            out_features = self.cut.full
        elif self.cut is not None:
            in_features = self.cut.full
        return out_features, in_features

    def cut_weights(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of an adapter's A [r, in] and B [out, r] (copies: the rest is not kept)."""
        if self.cut is None:
            return a, b
        if self.cut.style == "colwise":
            return a, b[self.cut.kept].clone()
        return a[:, self.cut.kept].clone(), b


@dataclass
class LoraLayers:
    """What `attach` changed: module name -> where its adapter weights go; `undo` restores the model."""

    targets: dict[str, _Target] = field(default_factory=dict)
    layers: list[LoraLayer] = field(default_factory=list)
    _wrapped: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)
    _leads: list[FusedLead] = field(default_factory=list)
    _hooks: list = field(default_factory=list)

    @classmethod
    def attach(cls, model: nn.Module, num_slots: int, rank: int, dtype: torch.dtype, device: torch.device,
               step: LoraStep, cuts: dict[str, ShardCut] | None = None) -> "LoraLayers":
        """`cuts`: tensor parallel's cut of each layer by name (engine/runner/loader.py), None or empty at TP=1."""
        cuts = cuts or {}
        attached = cls()
        for prefix, parent in list(model.named_modules()):
            children = dict(parent.named_children())
            for name, child in children.items():
                if name not in LORA_TARGET_MODULES:
                    continue
                full = f"{prefix}.{name}" if prefix else name
                if isinstance(child, FusedLead):
                    followers = sorted((c.index, n) for n, c in children.items()
                                       if isinstance(c, FusedFollower) and c.lead is child)
                    names = [name] + [n for _, n in followers]
                    layer = LoraLayer(child.in_features, child.out_sizes, num_slots, rank, dtype, device, step)
                    child.lora = layer
                    attached._leads.append(child)
                    for slice_index, member in enumerate(names):
                        member_name = f"{prefix}.{member}" if prefix else member
                        attached.targets[member_name] = _Target(layer, slice_index,
                                                                (child.out_sizes[slice_index], child.in_features),
                                                                cuts.get(member_name))
                elif isinstance(child, FusedFollower):
                    continue  # its lead carries it
                elif hasattr(child, "in_features") and hasattr(child, "out_features"):
                    layer = LoraLayer(child.in_features, [child.out_features], num_slots, rank, dtype, device, step)
                    cut = cuts.get(full)
                    if cut is not None and cut.style == "rowwise":
                        # A partial output (this rank's input features): the update joins it before the layer's
                        # all-reduce hook, which then sums both (a hook run first, the layer itself unchanged).
                        attached._hooks.append(child.register_forward_hook(
                            lambda _module, args, output, layer=layer: layer(args[0], output), prepend=True))
                    else:
                        setattr(parent, name, LoraLinear(child, layer))
                        attached._wrapped.append((parent, name, child))
                    attached.targets[full] = _Target(layer, 0, (child.out_features, child.in_features), cut)
                else:
                    continue
                attached.layers.append(layer)
        return attached

    def undo(self) -> None:
        for parent, name, original in self._wrapped:
            setattr(parent, name, original)
        for lead in self._leads:
            lead.lora = None
        for hook in self._hooks:
            hook.remove()
        self._wrapped, self._leads, self._hooks, self.targets, self.layers = [], [], [], {}, []


@dataclass(frozen=True)
class LoraInfo:
    """An adapter as the API lists it."""

    name: str
    path: str
    rank: int
    on_device: bool


class LoraManager:
    """Registered adapters (name -> path), their host copies and the device's slots. Single-threaded: the
    step loop's thread calls it (adapters added at run time arrive through the engine)."""

    def __init__(self, model: nn.Module, settings: LoraSettings, dtype: torch.dtype, device: torch.device,
                 shard_cuts: dict[str, ShardCut] | None = None) -> None:
        self.settings = settings
        self.device = device
        self.step = LoraStep()
        self.layers = LoraLayers.attach(model, settings.max_loras, settings.max_lora_rank, dtype, device, self.step,
                                        shard_cuts)
        if not self.layers.targets:
            raise ConfigError(f"LoRA: the model has none of the projections adapters apply to "
                              f"({', '.join(LORA_TARGET_MODULES)})")
        self._paths: dict[str, str] = {}
        self._ranks: dict[str, int] = {}
        self._host: OrderedDict[str, LoraAdapter] = OrderedDict()  # least recently used first
        self._slot_names: list[str | None] = [None] * settings.max_loras
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self.num_device_loads_total = 0
        self.device_load_time_s_total = 0.0
        logger.info("LoRA: %d projections take adapters (%d layers after fusion), %d device slots of rank %d",
                    len(self.layers.targets), len(self.layers.layers), settings.max_loras, settings.max_lora_rank)
        for name, path in settings.modules:
            self.add(name, path)

    # ---- the registry --------------------------------------------------------------------------
    def add(self, name: str, path: str) -> LoraAdapter:
        """Read and check an adapter and register it under `name` (ConfigError if it cannot run here)."""
        if name in self._paths:
            raise ConfigError(f"a LoRA adapter named {name!r} is already loaded")
        if name == WARM_UP_ADAPTER:
            raise ConfigError(f"{name!r} is reserved (the engine's warm-up); name the adapter otherwise")
        adapter = self._read(name, path)
        self._paths[name] = path
        self._ranks[name] = adapter.rank
        self._keep_on_host(adapter)
        logger.info("LoRA adapter %r: rank %d over %d modules, read from %s in %.3f s", name, adapter.rank,
                    len(adapter.weights), adapter.path, adapter.load_time_s)
        return adapter

    def remove(self, name: str) -> None:
        """Forget an adapter (the caller made sure no request still runs under it)."""
        if name not in self._paths:
            raise KeyError(name)
        del self._paths[name], self._ranks[name]
        self._host.pop(name, None)
        slot = self._slot_of.pop(name, None)
        if slot is not None:
            self._slot_names[slot] = None
            for layer in self.layers.layers:
                layer.clear_slot(slot)

    def has(self, name: str) -> bool:
        return name in self._paths

    def slot_names(self) -> tuple[str, ...]:
        """Adapters in the device's slots now, least recently used first (the next evicted leads)."""
        return tuple(self._slot_of)

    def host_names(self) -> tuple[str, ...]:
        """Adapters read into host memory now (a slot load copies them without reading files), least recently
        used first."""
        return tuple(self._host)

    def adapters(self) -> list[LoraInfo]:
        return [LoraInfo(name, path, self._ranks[name], name in self._slot_of) for name, path in self._paths.items()]

    def _read(self, name: str, path: str) -> LoraAdapter:
        """Read an adapter, check that it fits the model, and keep this rank's part of it (tensor parallel)."""
        adapter = read_peft_adapter(name, path, self.settings.max_lora_rank)
        for module, (a, b) in adapter.weights.items():
            target = self.layers.targets.get(module)
            if target is None:
                raise ConfigError(f"LoRA adapter {adapter.name!r} targets {module!r}, which takes no adapter here "
                                  f"(supported: the {', '.join(LORA_TARGET_MODULES)} projections of the model's "
                                  "layers, tensor names as PEFT saves them for this model)")
            out_features, in_features = target.full_shape
            if a.shape[1] != in_features or b.shape[0] != out_features:
                raise ConfigError(f"LoRA adapter {adapter.name!r}: {module!r} has A {tuple(a.shape)} and B "
                                  f"{tuple(b.shape)}, but the layer is [{out_features}, {in_features}] (an adapter "
                                  "of another model?)")
            adapter.weights[module] = target.cut_weights(a, b)
        return adapter

    def _keep_on_host(self, adapter: LoraAdapter) -> None:
        self._host[adapter.name] = adapter
        self._host.move_to_end(adapter.name)
        while len(self._host) > self.settings.max_cpu_loras:
            self._host.popitem(last=False)

    def _on_host(self, name: str) -> LoraAdapter:
        adapter = self._host.get(name)
        if adapter is None:  # dropped from host memory: read it again
            adapter = self._read(name, self._paths[name])
            self._keep_on_host(adapter)
        else:
            self._host.move_to_end(name)
        return adapter

    # ---- the device's slots --------------------------------------------------------------------
    def slots_for(self, names: Sequence[str | None]) -> list[int]:
        """The slot of each row's adapter (-1: the base model), loading adapters not on the device into free
        or least recently used slots; the step's own adapters are never evicted for each other. `WARM_UP_ADAPTER`
        rows take slot 0 as it is."""
        wanted = list(dict.fromkeys(name for name in names if name is not None and name != WARM_UP_ADAPTER))
        if len(wanted) > self.settings.max_loras:
            raise ValueError(f"a step with {len(wanted)} LoRA adapters, above max_loras={self.settings.max_loras} "
                             "(the scheduler keeps steps within it)")
        for name in wanted:
            if name not in self._slot_of:
                self._load_into_slot(name, self._free_slot(set(wanted)))
            self._slot_of.move_to_end(name)
        return [-1 if name is None else 0 if name == WARM_UP_ADAPTER else self._slot_of[name] for name in names]

    def _free_slot(self, keep: set[str]) -> int:
        for slot, holder in enumerate(self._slot_names):
            if holder is None:
                return slot
        for name, slot in self._slot_of.items():  # least recently used first
            if name not in keep:
                del self._slot_of[name]
                self._slot_names[slot] = None
                return slot
        raise AssertionError("no LoRA slot to evict")  # slots_for checked the count

    @torch.no_grad()
    def _load_into_slot(self, name: str, slot: int) -> None:
        started = time.perf_counter()
        adapter = self._on_host(name)
        for layer in self.layers.layers:
            layer.clear_slot(slot)
        for module, (a, b) in adapter.weights.items():
            target = self.layers.targets[module]
            target.layer.write_slot(slot, target.slice_index, a.to(self.device), b.to(self.device))
        self._slot_names[slot] = name
        self._slot_of[name] = slot
        self.num_device_loads_total += 1
        self.device_load_time_s_total += time.perf_counter() - started

    # ---- one step ------------------------------------------------------------------------------
    def token_slots(self, lora_names: Sequence[str | None], query_lens: Sequence[int]) -> torch.Tensor | None:
        """Host int32 slot per packed token, or None when no row of the step has an adapter."""
        if not any(name is not None for name in lora_names):
            return None
        slots = self.slots_for(lora_names)
        return torch.repeat_interleave(torch.tensor(slots, dtype=torch.int32),
                                       torch.tensor(list(query_lens), dtype=torch.long))

    def set_step(self, token_slots: torch.Tensor | None) -> None:
        """Group the step's rows for the layers (`token_slots` on the device), or None: no adapter rows."""
        self.step.index = None if token_slots is None else LoraStepIndex.build(token_slots, self.settings.max_loras)
        self.step.segments = (slot_segments(token_slots) if token_slots is not None and not uses_triton(token_slots)
                              else None)
