"""Loading a causal LM and its tokenizer with transformers: a hub id, a local path, or the demo model."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from pagedserve.config.engine import ConfigError, EngineConfig

from .attention.hf_integration import register_paged_attention

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: Any
    model_path: str  # what was loaded (hub id or folder)
    served_name: str  # the id clients use
    device: torch.device
    dtype: torch.dtype


def resolve_device(config: EngineConfig) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("EngineConfig.device='cuda' but no CUDA device is visible")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return _DTYPES[config.dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_model_path(config: EngineConfig) -> tuple[str, str]:
    """(path or hub id to load, name to serve it under)."""
    if config.model is not None:
        return config.model, config.model
    from .demo_model import DEMO_MODEL_NAME, demo_model_path

    return str(demo_model_path()), DEMO_MODEL_NAME


def quantization_kwargs(config: EngineConfig, dtype: torch.dtype) -> dict[str, Any]:
    if config.quantization == "none":
        return {}
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"EngineConfig.quantization={config.quantization!r} needs bitsandbytes: pip install 'pagedserve[quant]'"
        ) from exc
    from transformers import BitsAndBytesConfig

    if config.quantization == "bnb-8bit":
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    compute_dtype = dtype if config.bnb_4bit_compute_dtype == "auto" else _DTYPES[config.bnb_4bit_compute_dtype]
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    }


def wrap_model(model: PreTrainedModel, tokenizer: Any, served_name: str) -> LoadedModel:
    """Use a model already in memory (benchmarks, notebooks): it keeps its device and dtype."""
    model.set_attn_implementation(register_paged_attention())
    model.eval()
    parameter = next(model.parameters())
    return LoadedModel(model, tokenizer, served_name, served_name, parameter.device, parameter.dtype)


def load_model(
    config: EngineConfig, shard: Callable[[PreTrainedModel], None] | None = None
) -> LoadedModel:
    """`shard` (tensor parallelism) cuts the model to this rank's part on the host, before it moves to the device."""
    device = resolve_device(config)
    dtype = resolve_dtype(config, device)
    model_path, served_name = resolve_model_path(config)
    attn_implementation = register_paged_attention()
    tokenizer = AutoTokenizer.from_pretrained(
        config.tokenizer or model_path, revision=config.revision, trust_remote_code=config.trust_remote_code
    )
    extra = quantization_kwargs(config, dtype)
    if extra:
        extra["device_map"] = {"": device}
    logger.info("loading %s (%s, %s, quantization=%s)", model_path, device, dtype, config.quantization)
    model = AutoModelForCausalLM.from_pretrained(
        model_path,
        revision=config.revision,
        trust_remote_code=config.trust_remote_code,
        dtype=dtype,
        attn_implementation=attn_implementation,
        **extra,
    )
    if shard is not None:
        shard(model)
    if not extra:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, model_path, served_name, device, dtype)
