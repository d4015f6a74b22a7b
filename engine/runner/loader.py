"""Loading a causal LM and its tokenizer with transformers: a hub id, a local path, or the demo model.

The loader receives resolved `LoadSettings` (config/resolve.py): the device and dtypes are already decided.
FP8 weights come two ways: an FP8 checkpoint (engine/runner/fp8_checkpoint.py) is read into FP8 layers, or
dequantized where resolve decided quantization='none' for it; a checkpoint in the model's dtype is quantized
at load with `quantization='fp8'` (engine/kernels/fp8_linear.py). MoE experts are FP8 where resolve decided
`fp8_experts` (quantization 'fp8' and the fused MoE path, engine/kernels/moe/fp8.py): quantized like the
linears, or kept FP8 from the checkpoint; otherwise they hold the model's dtype (an FP8 checkpoint's experts
dequantized).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from pagedserve.config.engine import ConfigError
from pagedserve.config.resolve import LoadSettings
from pagedserve.engine.kernels.attention.hf_integration import register_paged_attention
from pagedserve.engine.kernels.fp8_linear import quantize_linears, supports_fp8_gemm
from pagedserve.engine.kernels.moe.experts import quantize_experts
from pagedserve.engine.runner.fp8_checkpoint import (
    checkpoint_files,
    convert_fp8_experts,
    convert_fp8_layers,
    fp8_checkpoint_format,
    load_fp8_checkpoint,
    read_kv_cache_scales,
    split_expert_scales,
)

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ShardCut:
    """What one tensor-parallel rank holds of a linear layer (engine/runner/tensor_parallel.py): "colwise", the
    output features `kept` of `full`; "rowwise", the input features `kept` of `full` (its output is a partial
    sum, all-reduced by a forward hook on the layer). LoRA adapters are cut to match (engine/runner/lora.py)."""

    style: str
    kept: slice
    full: int


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: Any
    model_path: str  # what was loaded (hub id or folder)
    served_name: str  # the id clients use
    device: torch.device
    dtype: torch.dtype
    # Layer index -> (k_scale, v_scale) stored in the checkpoint for an FP8 KV cache (llm-compressor's
    # kv_cache_scheme); empty when it has none. Read by the runner only when its cache is FP8.
    kv_cache_scales: dict[int, tuple[float, float]] = field(default_factory=dict)
    # Tensor parallel: module name (as `model.named_modules()` gives it) -> this rank's cut; empty otherwise.
    shard_cuts: dict[str, ShardCut] = field(default_factory=dict)


def torch_device(device_type: str) -> torch.device:
    """The resolved device type as a torch device: the current CUDA device, or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def model_path_and_name(model: str | None) -> tuple[str, str]:
    """(path or hub id to load, name to serve it under); no model: the demo model, built once per machine."""
    if model is not None:
        return model, model
    from pagedserve.demo.model import DEMO_MODEL_NAME, demo_model_path

    return str(demo_model_path()), DEMO_MODEL_NAME


def read_model_config(model: str | None, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The model's transformers config (a small file, no weights): what resolution reads before loading."""
    model_path, _ = model_path_and_name(model)
    return AutoConfig.from_pretrained(model_path, revision=revision, trust_remote_code=trust_remote_code)


def quantization_kwargs(config: LoadSettings, dtype: torch.dtype, device: torch.device | None = None) -> dict[str, Any]:
    """`from_pretrained` arguments for `config.quantization`; with `device`, first checks that it runs there.
    FP8 needs none: the model loads in its dtype and `load_model` quantizes it after."""
    if config.quantization in ("none", "fp8"):
        return {}
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"EngineConfig.quantization={config.quantization!r} needs bitsandbytes, which is not installed: "
            "pip install 'pagedserve[quant]' (or bitsandbytes), or set quantization='none'"
        ) from exc
    from transformers import BitsAndBytesConfig

    if config.quantization == "bnb-8bit":
        quantization_config = BitsAndBytesConfig(load_in_8bit=True)
        compute_dtype = dtype
    else:
        compute_dtype = _DTYPES[config.bnb_4bit_compute_dtype]
        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if device is not None:
        check_quantization_runs(config, device, dtype, compute_dtype)
    return {"quantization_config": quantization_config}


def check_quantization_runs(
    config: LoadSettings, device: torch.device, dtype: torch.dtype, compute_dtype: torch.dtype
) -> None:
    """Fail before loading gigabytes: quantize one small layer on `device` and run it once.

    What bitsandbytes supports depends on its build (which native libraries it ships) and the device, so
    this asks the installed build instead of keeping a table that goes stale.
    """
    import bitsandbytes

    field = "bnb_4bit_compute_dtype" if config.quantization == "bnb-4bit" else "dtype"
    if device.type == "cuda" and torch.bfloat16 in (dtype, compute_dtype) and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"EngineConfig.{field}: bfloat16 is not supported by {torch.cuda.get_device_name(device)} "
            f"(compute capability below 8.0); use float16 for quantization={config.quantization!r}"
        )
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(
            f"EngineConfig.quantization={config.quantization!r} is not supported on device {device.type!r}: "
            "use device='cpu' or 'cuda'"
        )
    try:
        layer = _probe_layer(config.quantization, dtype, compute_dtype).to(device)
        with torch.inference_mode():
            out = layer(torch.ones((2, 64), dtype=dtype, device=device))
        if not bool(torch.isfinite(out).all()):
            raise RuntimeError("the probe layer produced non-finite values")
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError(
            f"EngineConfig.quantization={config.quantization!r} cannot run on EngineConfig.device={str(device)!r} "
            f"with dtype={dtype_name(dtype)} and compute dtype {dtype_name(compute_dtype)} using the installed "
            f"bitsandbytes {bitsandbytes.__version__}: {type(error).__name__}: {_first_line(error)}. "
            f"Use another device or EngineConfig.{field}, or quantization='none'."
        ) from error


def _probe_layer(quantization: str, dtype: torch.dtype, compute_dtype: torch.dtype) -> torch.nn.Module:
    from bitsandbytes.nn import Linear4bit, Linear8bitLt

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn((64, 64), generator=generator).to(dtype) / 8
    if quantization == "bnb-8bit":
        layer = Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
        layer.load_state_dict({"weight": weight})
        return layer
    layer = Linear4bit(64, 64, bias=False, compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
    layer.load_state_dict({"weight": weight})
    return layer


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def weights_footprint_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct tensor that holds the weights, as stored.

    Parameters and buffers, plus what bitsandbytes keeps beside its packed weights and that
    `parameters()` does not list: 4-bit quantization state (absmax per block, the nested absmax of double
    quantization, code maps) and 8-bit row scales (SCB). Tensors are counted once by address, so tied
    embeddings and shared code maps are not counted twice.
    """
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(tensor: Any) -> None:
        nonlocal total
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta" or tensor.numel() == 0:
            return
        nbytes = tensor.numel() * tensor.element_size()
        key = (tensor.data_ptr(), nbytes)
        if key not in seen:
            seen.add(key)
            total += nbytes

    def add_quant_state(state: Any) -> None:
        if state is None:
            return
        for name in ("absmax", "code", "offset"):
            add(getattr(state, name, None))
        add_quant_state(getattr(state, "state2", None))

    for parameter in model.parameters():
        add(parameter)
        add_quant_state(getattr(parameter, "quant_state", None))
        add(getattr(parameter, "SCB", None))
        add(getattr(parameter, "CB", None))
    for buffer in model.buffers():
        add(buffer)
    for module in model.modules():
        state = getattr(module, "state", None)  # bitsandbytes Linear8bitLt keeps CB/SCB here too
        add(getattr(state, "SCB", None))
        add(getattr(state, "CB", None))
    return total


def wrap_model(model: PreTrainedModel, tokenizer: Any, served_name: str) -> LoadedModel:
    """Use a model already in memory (benchmarks, notebooks): it keeps its device and dtype."""
    model.set_attn_implementation(register_paged_attention())
    model.eval()
    parameter = next(model.parameters())
    return LoadedModel(model, tokenizer, served_name, served_name, parameter.device, parameter.dtype)


def _random_model(
    config: LoadSettings, model_path: str, dtype: torch.dtype, device: torch.device, attn_implementation: str
) -> PreTrainedModel:
    """The model's architecture with random weights, built on `device`: only its config is read (vLLM's
    `--load-format dummy`), so an 8B benchmark needs no 16 GB of weight files."""
    logger.info("building %s with random weights (load_format='dummy') on %s, %s", model_path, device, dtype)
    hf_config = AutoConfig.from_pretrained(
        model_path, revision=config.revision, trust_remote_code=config.trust_remote_code
    )
    if getattr(hf_config, "quantization_config", None) is not None:
        del hf_config.quantization_config  # random weights in the model's dtype (quantization='fp8' quantizes them)
    torch.manual_seed(config.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            hf_config, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=config.trust_remote_code
        )
    return model


def load_model(
    config: LoadSettings, shard: Callable[[PreTrainedModel], dict[str, ShardCut]] | None = None,
    device: torch.device | None = None
) -> LoadedModel:
    """`shard` (tensor parallelism) cuts the model to this rank's part on the host, before it moves to the
    device, and says what it kept of each layer; `device`: the rank's device (default: the current device of
    the resolved type).

    FP8 weights: an FP8 checkpoint's layers are converted one at a time on the device (on the host under
    tensor parallelism, before the cut), so the device never holds them in a wider dtype. A checkpoint in the
    model's dtype is quantized on the device after the move, or, under tensor parallelism, before the cut:
    a row-parallel layer then keeps the scale of each whole row, as on one GPU."""
    device = device or torch_device(config.device)
    dtype = _DTYPES[config.dtype]
    model_path, served_name = model_path_and_name(config.model)
    attn_implementation = register_paged_attention()
    tokenizer = AutoTokenizer.from_pretrained(
        config.tokenizer or model_path, revision=config.revision, trust_remote_code=config.trust_remote_code
    )
    is_fp8 = config.quantization == "fp8"
    use_scaled_mm = is_fp8 and supports_fp8_gemm(device)
    quantized = False  # the model's FP8 layers exist
    if config.load_format == "dummy":
        if config.quantization not in ("none", "fp8"):
            raise ConfigError(
                f"EngineConfig.load_format='dummy' builds unquantized random weights; it cannot be combined with "
                f"quantization={config.quantization!r}"
            )
        # Built whole on the device from the seed: every tensor-parallel rank (and a TP=1 engine on the
        # same kind of GPU) draws the same weights before cutting its shard, and no host copy is made.
        model = _random_model(config, model_path, dtype, device, attn_implementation)
        extra = {}
        kv_cache_scales = {}
    else:
        hf_config = read_model_config(config.model, config.revision, config.trust_remote_code)
        checkpoint = fp8_checkpoint_format(hf_config)
        extra = {} if checkpoint is not None else quantization_kwargs(config, dtype, device)
        if extra:
            extra["device_map"] = {"": device}
        logger.info("loading %s (%s, %s, quantization=%s%s)", model_path, device, dtype, config.quantization,
                    "" if checkpoint is None else f", checkpoint: {checkpoint.description}")
        common = dict(revision=config.revision, trust_remote_code=config.trust_remote_code, dtype=dtype,
                      attn_implementation=attn_implementation)
        # Resolved once (the weight scales and the KV-cache scales are read from them); an FP8 checkpoint
        # must have safetensors files (checkpoint_files raises), another may have .bin weights only.
        files = (checkpoint_files(model_path, config.revision) if checkpoint is not None
                 else _safetensors_files(model_path, config.revision))
        if checkpoint is not None:  # quantization is 'fp8' or 'none' for it (config/resolve.py)
            model, scales = load_fp8_checkpoint(model_path, hf_config, checkpoint, files, **common)
            linear_scales, expert_scales = split_expert_scales(scales)
            convert_to = device if shard is None else torch.device("cpu")
            convert_fp8_layers(model, linear_scales, checkpoint, convert_to, keep_fp8=is_fp8,
                               use_scaled_mm=use_scaled_mm)
            convert_fp8_experts(model, expert_scales, checkpoint, convert_to, keep_fp8=config.fp8_experts)
            quantized = True  # its FP8 layers are the checkpoint's; the others stay in the model's dtype
        else:
            model = AutoModelForCausalLM.from_pretrained(model_path, **common, **extra)
        kv_cache_scales = read_kv_cache_scales(files)
    shard_cuts: dict[str, ShardCut] = {}
    if shard is not None:
        if is_fp8 and not quantized:
            # Before the cut, where the model is (the host, or the device for dummy weights): a row-parallel
            # layer keeps each whole row's scale, so every rank holds TP=1's FP8 weights.
            quantize_linears(model, use_scaled_mm)
            if config.fp8_experts:
                quantize_experts(model)
            quantized = True
        shard_cuts = shard(model)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the cut-away parts of a model built on the device, before memory is planned
    if not extra:
        model.to(device)
    if is_fp8 and not quantized:
        # On the device, layer by layer: each bf16 weight is freed once its FP8 copy exists.
        quantize_linears(model, use_scaled_mm)
        if config.fp8_experts:
            quantize_experts(model)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, model_path, served_name, device, dtype, kv_cache_scales, shard_cuts)


def _safetensors_files(model_path: str, revision: str | None) -> list[str]:
    """The checkpoint's safetensors files; none for a checkpoint of .bin weights only."""
    try:
        return checkpoint_files(model_path, revision)
    except ConfigError:
        return []
