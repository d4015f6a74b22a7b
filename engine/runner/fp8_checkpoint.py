"""FP8 checkpoints, as transformers and llm-compressor save them, loaded into our FP8 layers.

Two formats, told apart by the `quantization_config` in the model's config.json:

- transformers' fine-grained FP8 (`quant_method: "fp8"`, `FineGrainedFP8Config`, e.g. Qwen3-*-FP8):
  `<layer>.weight` in float8_e4m3fn and `<layer>.weight_scale_inv`, float32 of shape
  [ceil(N / bn), ceil(K / bk)] for `weight_block_size` [bn, bk] (a scalar when it is null: one scale per
  tensor); the weight is `fp8 * weight_scale_inv` over each block. `activation_scheme: "static"` adds an
  `activation_scale` per layer. `modules_to_not_convert` layers (always the LM head) are stored unquantized.
- compressed-tensors FP8 (`quant_method: "compressed-tensors"`, format `float-quantized`, weights of type
  float with 8 bits; llm-compressor's FP8 / FP8_DYNAMIC, e.g. RedHatAI/*-FP8-dynamic): `<layer>.weight` in
  e4m3 and `<layer>.weight_scale` (multiplied, not inverted): [N, 1] per channel, [1] per tensor,
  [N, K / group] per group, [ceil(N / bn), ceil(K / bk)] per block; `input_scale` for static activations.
  transformers needs the compressed-tensors package for these; we read the tensors ourselves and need none.

How a checkpoint loads (`load_fp8_checkpoint`): transformers builds and fills the model from the checkpoint
with the quantization config taken out, so each FP8 layer arrives as a plain linear whose weight holds the
e4m3 values themselves (every e4m3 value is exactly a float16, bfloat16 and float32 value), on the host like
every load; the scales are read from the same safetensors files. Then `convert_fp8_layers`, one layer at a
time on the target device, casts the weight back to e4m3 (exact) and either
- keeps it FP8 (`Fp8Linear`, engine/kernels/fp8_linear.py): our layers hold one scale per output row, so
  `rows_from_blocks` gives each row its largest block scale and rescales the row's other blocks into it; or
- dequantizes it into the model's dtype (`fp8 * scale` in float32, then cast: what transformers' own
  dequantizing load computes, bit for bit).
Kept FP8, a layer reaches the device as FP8 only; the host holds the model in its dtype once, as for any
checkpoint. Why not transformers' own FP8 loading: it dequantizes on CPU (and below compute capability 8.9)
and needs the compressed-tensors package for the second format, while this one path runs the same on CPU and
GPU, so the CPU tests cover what a Hopper load does.

MoE experts: transformers keeps a block's experts merged (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]) but
saves them per expert, as the hub's FP8 MoE checkpoints are (Qwen3-30B-A3B-FP8: `mlp.experts.<e>.gate_proj`,
`up_proj`, `down_proj`, each an e4m3 weight with its own block scales; Mixtral's `block_sparse_moe.experts.<e>.w1`,
`w3`, `w2`). Its loading merges the e4m3 values into the experts module like any weight; `convert_fp8_experts`
then takes each expert's projection with its own scales, as `convert_fp8_layers` takes a linear: kept FP8 as
e4m3 values with a scale per expert and output row (engine/kernels/moe/fp8.py, the fused MoE path's FP8
experts; `rows_from_blocks`, exact where a row's blocks share a scale), or dequantized into the model's dtype
(transformers' dequantization, bit for bit) where the experts run in that dtype (quantization 'none', or
`moe_backend="transformers"`, whose expert code takes the model's dtype).

Static activation scales are not used: our layers scale activations per token at run time (as transformers'
compressed-tensors FP8 layer does too). The LM head stays in the model's dtype even if a checkpoint stored it
in FP8 (it is dequantized then). What these formats can also hold and we refuse with a `ConfigError`: FP8
embeddings (`modules_to_convert`), power-of-two `ue8m0` scales, FP4 experts, FP8 tensors on anything but a
linear layer or a MoE block's per-expert projections (e.g. experts saved merged, or experts of a family the
fused path does not take: gpt-oss), experts only partly FP8, and models with custom code.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from pagedserve.config.engine import ConfigError
from pagedserve.engine.kernels.fp8_linear import FP8_DTYPE, Fp8Linear
from pagedserve.engine.kernels.moe.experts import moe_blocks, unsupported_reason
from pagedserve.engine.kernels.moe.fp8 import set_expert_weights

logger = logging.getLogger(__name__)

# A block size per dimension (rows, columns); None: the whole dimension (one scale per tensor is (None, None)).
BlockSize = tuple[int | None, int | None]
_COMPRESSED_TENSORS_BLOCKS: dict[str, BlockSize] = {"tensor": (None, None), "channel": (1, None)}


@dataclass(frozen=True)
class Fp8CheckpointFormat:
    """What a checkpoint's quantization config says about its FP8 tensors."""

    method: Literal["fp8", "compressed-tensors"]
    block_size: BlockSize
    scale_name: str  # the suffix of a weight's scale: weight_scale_inv (fine-grained) or weight_scale
    activation_scale_name: str  # static activation scales, not used (activations are scaled per token)

    @property
    def description(self) -> str:
        rows, columns = self.block_size
        if rows is None and columns is None:
            layout = "one scale per tensor"
        elif rows == 1 and columns is None:
            layout = "one scale per output channel"
        else:
            layout = f"{rows or 'all'}x{columns or 'all'} blocks"
        name = "fine-grained FP8" if self.method == "fp8" else "compressed-tensors FP8"
        return f"{name} ({layout})"


def quantization_config_dict(hf_config: Any) -> dict[str, Any] | None:
    """The config's `quantization_config` as a plain dict (transformers keeps a dict, or an object)."""
    quantization = getattr(hf_config, "quantization_config", None)
    if quantization is None or isinstance(quantization, dict):
        return quantization
    return quantization.to_dict() if hasattr(quantization, "to_dict") else vars(quantization)


def fp8_checkpoint_format(hf_config: Any) -> Fp8CheckpointFormat | None:
    """The checkpoint's FP8 format, None when it stores no FP8 weights; `ConfigError` for FP8 variants that
    pagedserve cannot load (see the module docstring), naming what the config says."""
    quantization = quantization_config_dict(hf_config)
    if not quantization:
        return None
    method = quantization.get("quant_method")
    if method == "fp8":
        return _fine_grained_format(quantization)
    if method == "compressed-tensors":
        return _compressed_tensors_format(quantization)
    return None


def _fine_grained_format(quantization: dict[str, Any]) -> Fp8CheckpointFormat:
    what = "this fine-grained FP8 checkpoint (quantization_config"
    if quantization.get("scale_fmt", "float") != "float":
        raise ConfigError(f"{what}.scale_fmt={quantization['scale_fmt']!r}): only float scales are supported")
    if quantization.get("expert_dtype", "fp8") != "fp8":
        raise ConfigError(f"{what}.expert_dtype={quantization['expert_dtype']!r}): FP4 experts are not supported")
    if quantization.get("modules_to_convert"):
        raise ConfigError(f"{what}.modules_to_convert={quantization['modules_to_convert']!r}): FP8 embeddings "
                          "are not supported")
    block = quantization.get("weight_block_size")
    block_size: BlockSize = (None, None) if block is None else (int(block[0]), int(block[1]))
    return Fp8CheckpointFormat("fp8", block_size, "weight_scale_inv", "activation_scale")


def _compressed_tensors_format(quantization: dict[str, Any]) -> Fp8CheckpointFormat | None:
    groups = quantization.get("config_groups") or {}
    weights = [group.get("weights") for group in groups.values() if isinstance(group, dict)]
    is_fp8 = bool(weights) and all(w and w.get("type") == "float" and w.get("num_bits") == 8 for w in weights)
    if not is_fp8:
        if importlib.util.find_spec("compressed_tensors") is None:
            schemes = sorted({f"{w.get('type')}{w.get('num_bits')}" for w in weights if w}) or ["none"]
            raise ConfigError(
                f"this compressed-tensors checkpoint quantizes weights as {', '.join(schemes)}: pagedserve reads "
                "compressed-tensors FP8 itself, other schemes load through transformers, which needs the "
                "compressed-tensors package (not installed): pip install compressed-tensors"
            )
        return None  # not FP8: transformers loads it, with the package
    fmt = quantization.get("format")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise ConfigError(f"this compressed-tensors FP8 checkpoint has format {fmt!r}: only 'float-quantized' "
                          "(FP8 values and scales stored) is supported")
    layouts = set()
    for w in weights:
        strategy = w.get("strategy")
        if strategy in _COMPRESSED_TENSORS_BLOCKS:
            layouts.add(_COMPRESSED_TENSORS_BLOCKS[strategy])
        elif strategy == "group" and w.get("group_size"):
            layouts.add((1, int(w["group_size"])))
        elif strategy == "block" and w.get("block_structure"):
            layouts.add((int(w["block_structure"][0]), int(w["block_structure"][1])))
        else:
            raise ConfigError(f"this compressed-tensors FP8 checkpoint uses weight strategy {strategy!r}, "
                              "which pagedserve does not read")
    if len(layouts) > 1:
        raise ConfigError(f"this compressed-tensors FP8 checkpoint mixes weight scale layouts {sorted(map(str, layouts))}")
    return Fp8CheckpointFormat("compressed-tensors", layouts.pop(), "weight_scale", "input_scale")


# ---- scales: blocks to rows ------------------------------------------------------------------------------
def _block_dims(weight_shape: torch.Size, block_size: BlockSize) -> tuple[int, int]:
    rows, columns = weight_shape
    return block_size[0] or rows, block_size[1] or columns


def scale_grid(scale: torch.Tensor, weight_shape: torch.Size, block_size: BlockSize, name: str) -> torch.Tensor:
    """`scale` as a float32 [ceil(N / bn), ceil(K / bk)] grid, one value per block of a weight of
    `weight_shape`; `ConfigError` naming the layer if its shape does not fit the format's blocks."""
    block_rows, block_columns = _block_dims(weight_shape, block_size)
    grid = (math.ceil(weight_shape[0] / block_rows), math.ceil(weight_shape[1] / block_columns))
    if scale.numel() != grid[0] * grid[1]:
        raise ConfigError(f"FP8 checkpoint: {name} has {tuple(scale.shape)} scales for a {tuple(weight_shape)} "
                          f"weight in {block_rows}x{block_columns} blocks (expected {grid})")
    return scale.float().reshape(grid)


def _scaled_by_block(values: torch.Tensor, factors: torch.Tensor, block_columns: int) -> torch.Tensor:
    """float32 `values` [N, K] times `factors` [N, C], each factor over its `block_columns` columns, with one
    temporary of the weight's size (the factors are never expanded to [N, K])."""
    out = values.float()
    full, remainder = divmod(out.shape[1], block_columns)
    if full:
        out[:, : full * block_columns].unflatten(1, (full, block_columns)).mul_(factors[:, :full, None])
    if remainder:
        out[:, full * block_columns :].mul_(factors[:, full:])
    return out


def _row_factors(grid: torch.Tensor, num_rows: int, block_rows: int) -> torch.Tensor:
    """Each row's block scales, [N, C]: a block's scale repeated over the rows it covers."""
    return grid.repeat_interleave(block_rows, dim=0)[:num_rows]


def dequantize_blocks(values: torch.Tensor, grid: torch.Tensor, block_size: BlockSize) -> torch.Tensor:
    """e4m3 `values` [N, K] times their block scales, in float32 (transformers' dequantization, bit for bit)."""
    block_rows, block_columns = _block_dims(values.shape, block_size)
    return _scaled_by_block(values, _row_factors(grid, values.shape[0], block_rows), block_columns)


def rows_from_blocks(values: torch.Tensor, grid: torch.Tensor, block_size: BlockSize
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 `values` [N, K] with block scales `grid` as e4m3 values with one float32 scale per row [N].

    Each row takes the largest scale among its blocks; a block with a smaller scale s is rescaled into it,
    `values * (s / row_scale)` rounded to e4m3 (round to nearest even). Exact (the same e4m3 values, so the
    same dequantized weight, bit for bit) for every block whose scale is its row's largest: a per-tensor or
    per-channel checkpoint, and any block layout where a row's blocks share a scale, converts without loss.
    A rescaled value is off by at most half an e4m3 step (2^-4 relative), or by e4m3's subnormal spacing
    times `row_scale` (2^-9 * row_scale) when its block's scale is far below the row's.
    """
    num_rows = values.shape[0]
    block_rows, block_columns = _block_dims(values.shape, block_size)
    block_scales = _row_factors(grid, num_rows, block_rows)
    row_scale = block_scales.amax(dim=1)
    ratios = block_scales / row_scale.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    if bool((ratios == 1).all()):
        return values, row_scale.contiguous()
    return _scaled_by_block(values, ratios, block_columns).to(FP8_DTYPE), row_scale.contiguous()


# ---- loading ---------------------------------------------------------------------------------------------
def checkpoint_files(model_path: str, revision: str | None) -> list[str]:
    """The checkpoint's safetensors files, local or from the hub cache (downloaded if not there yet)."""
    from transformers.utils import cached_file

    index = cached_file(model_path, "model.safetensors.index.json", revision=revision,
                        _raise_exceptions_for_missing_entries=False)
    if index is not None:
        with open(index) as handle:
            names = sorted(set(json.load(handle)["weight_map"].values()))
        return [cached_file(model_path, name, revision=revision) for name in names]
    single = cached_file(model_path, "model.safetensors", revision=revision, _raise_exceptions_for_missing_entries=False)
    if single is None:
        raise ConfigError(f"{model_path}: FP8 checkpoints are read from safetensors files, and it has none")
    return [single]


def read_scales(files: list[str], fmt: Fp8CheckpointFormat) -> dict[str, torch.Tensor]:
    """Layer name -> its weight scales, from the safetensors files; `ConfigError` unless every FP8 tensor
    is a layer's weight with a scale (anything else would load as unscaled values)."""
    from safetensors import safe_open

    scales: dict[str, torch.Tensor] = {}
    fp8_weights: set[str] = set()
    static_activations = 0
    for path in files:
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                owner, _, suffix = key.rpartition(".")
                if suffix == fmt.scale_name:
                    scales[owner] = handle.get_tensor(key)
                elif suffix == fmt.activation_scale_name:
                    static_activations += 1
                elif handle.get_slice(key).get_dtype().startswith("F8"):
                    if handle.get_slice(key).get_dtype() != "F8_E4M3" or suffix != "weight":
                        raise ConfigError(f"FP8 checkpoint: {key} ({handle.get_slice(key).get_dtype()}) is not an "
                                          "e4m3 layer weight; pagedserve reads e4m3 weights with their scales only")
                    fp8_weights.add(owner)
    unscaled = sorted(fp8_weights - scales.keys())
    if unscaled:
        raise ConfigError(f"FP8 checkpoint: {unscaled[0]}.weight is FP8 without a {fmt.scale_name}")
    if static_activations:
        logger.info("the checkpoint's %d static activation scales are not used: activations are scaled per token "
                    "at run time", static_activations)
    return {name: scale for name, scale in scales.items() if name in fp8_weights}


# Per-layer KV-cache scales as llm-compressor saves them with a `kv_cache_scheme` (and as vLLM reads them):
# `<...>.layers.<i>.self_attn.k_scale` / `v_scale`, or, in older files, the output scales of k_proj / v_proj.
_KV_SCALE_KEY = re.compile(r"\.layers\.(\d+)\.self_attn\.(k_scale|v_scale|k_proj\.output_scale|v_proj\.output_scale)$")
KV_SCALE_KEYS_IGNORED = (r"\.self_attn\.[kv]_scale$", r"\.self_attn\.[kv]_proj\.output_scale$")


def read_kv_cache_scales(files: list[str]) -> dict[int, tuple[float, float]]:
    """Layer index -> (k_scale, v_scale) the checkpoint stores for an FP8 KV cache (empty if none). A
    layer with one of the two gets 1.0 for the other; a scale that is not one positive number is refused."""
    from safetensors import safe_open

    found: dict[int, dict[str, float]] = {}
    for path in files:
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                match = _KV_SCALE_KEY.search(key)
                if match is None:
                    continue
                value = handle.get_tensor(key).float()
                if value.numel() != 1 or not math.isfinite(value.item()) or value.item() <= 0:
                    raise ConfigError(f"KV-cache scale {key} must be one positive number (a scale per layer), got "
                                      f"shape {tuple(value.shape)}")
                found.setdefault(int(match.group(1)), {})[match.group(2)[0]] = value.item()
    return {layer: (scales.get("k", 1.0), scales.get("v", 1.0)) for layer, scales in sorted(found.items())}


def _causal_lm_class(hf_config: Any) -> type:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(hf_config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ConfigError(f"FP8 checkpoints of {type(hf_config).__name__} models (custom code or no causal LM "
                          "class in transformers) are not supported")
    classes = MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)]
    if not isinstance(classes, (list, tuple)):
        return classes
    by_name = {cls.__name__: cls for cls in classes}
    return next((by_name[a] for a in getattr(hf_config, "architectures", None) or [] if a in by_name), classes[0])


def load_fp8_checkpoint(model_path: str, hf_config: Any, fmt: Fp8CheckpointFormat, files: list[str],
                        revision: str | None, **from_pretrained: Any) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The model with its FP8 layers as plain linears holding the e4m3 values, on the host, and each such
    layer's scales (read from `files`, the checkpoint's safetensors files: `checkpoint_files`).
    `from_pretrained`: the usual `from_pretrained` keywords (dtype, attention, ...)."""
    plain_config = copy.deepcopy(hf_config)
    del plain_config.quantization_config
    model_class = _causal_lm_class(plain_config)
    # The scales are read below, not by transformers: a subclass (same name, so transformers' per-class
    # weight conversions still apply) tells its loader they are expected to be left over.
    ignored = [rf"\.{fmt.scale_name}$", rf"\.{fmt.activation_scale_name}$", *KV_SCALE_KEYS_IGNORED]
    ignored += list(model_class._keys_to_ignore_on_load_unexpected or [])
    reader = type(model_class.__name__, (model_class,), {"_keys_to_ignore_on_load_unexpected": ignored,
                                                         "__module__": model_class.__module__})
    model = reader.from_pretrained(model_path, config=plain_config, revision=revision, **from_pretrained)
    scales = read_scales(files, fmt)
    return model, scales


def convert_fp8_layers(model: nn.Module, scales: dict[str, torch.Tensor], fmt: Fp8CheckpointFormat,
                       device: torch.device, keep_fp8: bool, use_scaled_mm: bool) -> int:
    """Turn every layer named in `scales` (a plain linear holding e4m3 values) into an `Fp8Linear` with one
    scale per row (`keep_fp8`) or a linear of the model's dtype holding the dequantized weight, one layer at a
    time on `device` (each host weight is freed once its layer is converted). The LM head is always
    dequantized. Returns how many layers were kept FP8."""
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    kept = 0
    for name, scale in scales.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if type(linear) is not nn.Linear:
            found = "nothing" if linear is None else f"a {type(linear).__name__}"
            raise ConfigError(f"FP8 checkpoint: {name}.weight is FP8, but {name} is {found} in the model, not a "
                              "linear layer; pagedserve reads FP8 linear layers only")
        dtype = linear.weight.dtype
        values = linear.weight.detach().to(FP8_DTYPE).to(device)  # exact: the weight holds e4m3 values
        grid = scale_grid(scale.to(device), values.shape, fmt.block_size, f"{name}.{fmt.scale_name}")
        bias = None if linear.bias is None else linear.bias.detach().to(device)
        if keep_fp8 and linear is not lm_head:
            weight, row_scale = rows_from_blocks(values, grid, fmt.block_size)
            fast = use_scaled_mm and not (values.shape[0] % 16 or values.shape[1] % 16)  # _scaled_mm's rule
            replacement: nn.Module = Fp8Linear(weight, row_scale, bias, fast)
            kept += 1
        else:
            linear.weight = nn.Parameter(dequantize_blocks(values, grid, fmt.block_size).to(dtype), requires_grad=False)
            linear.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
            replacement = linear
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, replacement)
        del linear, values, grid
    if keep_fp8:
        logger.info("loaded %d FP8 layers (e4m3, one scale per output feature); the rest in the model's dtype", kept)
    else:
        logger.info("dequantized %d FP8 layers of the checkpoint to the model's dtype", len(scales))
    return kept


# ---- MoE experts -----------------------------------------------------------------------------------------
# A per-expert projection as transformers saves a merged experts module: (block prefix, expert, projection).
_EXPERT_KEY = re.compile(r"^(?P<block>.+)\.experts\.(?P<expert>\d+)\.(?P<projection>gate_proj|up_proj|down_proj|w1|w3|w2)$")
_GATE, _UP, _DOWN = ("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")
_LAYER_PATH = re.compile(r"^(.*\.layers\.\d+)\.")


def split_expert_scales(scales: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(linear layers' scales, per-expert projections' scales) of `read_scales`' result."""
    experts = {name: scale for name, scale in scales.items() if _EXPERT_KEY.match(name)}
    return {name: scale for name, scale in scales.items() if name not in experts}, experts


def _experts_module_name(block: str, candidates: dict[str, nn.Module]) -> str | None:
    """The model's experts module for a checkpoint's `<block>.experts.<e>...` keys: the same name, or else the one
    experts module of the same decoder layer (transformers renames some blocks at load: Mixtral's
    `block_sparse_moe` is its `mlp`)."""
    if f"{block}.experts" in candidates:
        return f"{block}.experts"
    layer = _LAYER_PATH.match(block + ".")
    if layer is None:
        return None
    same_layer = [name for name in candidates if name.startswith(layer.group(1) + ".")]
    return same_layer[0] if len(same_layer) == 1 else None


def _projection_names(found: dict[tuple[int, str], torch.Tensor], num_experts: int, module: str) -> tuple[str, str, str]:
    names = {projection for _, projection in found}
    for triple in (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")):
        if names == set(triple) and len(found) == 3 * num_experts:
            return triple
    raise ConfigError(f"FP8 checkpoint: the experts of {module} are only partly FP8 ({len(found)} of "
                      f"{3 * num_experts} expert projections, {sorted(names)}); pagedserve reads a MoE block's "
                      "experts all FP8 or none")


def convert_fp8_experts(model: nn.Module, scales: dict[str, torch.Tensor], fmt: Fp8CheckpointFormat,
                        device: torch.device, keep_fp8: bool) -> int:
    """Turn every experts module whose per-expert projections are named in `scales` (its merged weights holding
    the e4m3 values) into FP8 experts with a scale per expert and output row (`keep_fp8`), or into experts of the
    model's dtype holding the dequantized weights, one module at a time on `device`. Returns how many modules
    were kept FP8."""
    if not scales:
        return 0
    candidates = {name: experts for name, experts in model.named_modules() if name.endswith(".experts")}
    grouped: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    for name, scale in scales.items():
        match = _EXPERT_KEY.match(name)
        module_name = _experts_module_name(match["block"], candidates)
        if module_name is None:
            raise ConfigError(f"FP8 checkpoint: {name}.weight is FP8, but the model has no experts module for it")
        grouped.setdefault(module_name, {})[(int(match["expert"]), match["projection"])] = scale
    families = {id(experts): family for family, experts in moe_blocks(model)}
    kept = 0
    for module_name, found in grouped.items():
        experts = candidates[module_name]
        reason = unsupported_reason(experts)
        if reason is not None:
            raise ConfigError(f"FP8 checkpoint: the experts of {module_name} ({families.get(id(experts), 'MoE')}) are "
                              f"FP8, and pagedserve reads FP8 experts only where its fused MoE path runs them: {reason}")
        gate_up, down = experts.gate_up_proj.data, experts.down_proj.data
        num_experts, intermediate = gate_up.shape[0], gate_up.shape[1] // 2
        gate_name, up_name, down_name = _projection_names(found, num_experts, module_name)
        parts = {gate_name: slice(0, intermediate), up_name: slice(intermediate, 2 * intermediate)}
        dtype = gate_up.dtype
        new_dtype = FP8_DTYPE if keep_fp8 else dtype
        new_gate_up = torch.empty(gate_up.shape, dtype=new_dtype, device=device)
        new_down = torch.empty(down.shape, dtype=new_dtype, device=device)
        gate_up_scale = torch.empty(gate_up.shape[:2], dtype=torch.float32, device=device) if keep_fp8 else None
        down_scale = torch.empty(down.shape[:2], dtype=torch.float32, device=device) if keep_fp8 else None
        for expert in range(num_experts):
            for projection, source, target, target_scale, rows in (
                (gate_name, gate_up, new_gate_up, gate_up_scale, parts[gate_name]),
                (up_name, gate_up, new_gate_up, gate_up_scale, parts[up_name]),
                (down_name, down, new_down, down_scale, slice(0, down.shape[1])),
            ):
                key = f"{module_name.removesuffix('.experts')}.experts.{expert}.{projection}"
                values = source[expert, rows].to(FP8_DTYPE).to(device)  # exact: the weight holds e4m3 values
                grid = scale_grid(found[(expert, projection)].to(device), values.shape, fmt.block_size,
                                  f"{key}.{fmt.scale_name}")
                if keep_fp8:
                    target[expert, rows], target_scale[expert, rows] = rows_from_blocks(values, grid, fmt.block_size)
                else:
                    target[expert, rows] = dequantize_blocks(values, grid, fmt.block_size).to(dtype)
        set_expert_weights(experts, new_gate_up, new_down, gate_up_scale, down_scale)
        kept += keep_fp8
        del gate_up, down
    if keep_fp8:
        logger.info("loaded the FP8 experts of %d MoE blocks (e4m3, a scale per expert and output row)", kept)
    else:
        logger.info("dequantized the FP8 experts of %d MoE blocks to the model's dtype", len(grouped))
    return kept
