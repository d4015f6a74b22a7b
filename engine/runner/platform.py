"""The facts `config/resolve.py` decides from, gathered here with torch: what the device offers, what the
model's config says (read before any weight loads)."""

from __future__ import annotations

from typing import Any

import torch

from pagedserve.config.resolve import ModelFacts, Platform
from pagedserve.engine.kernels.attention import flash_unavailable_reason, triton_unavailable_reason
from pagedserve.engine.kernels.launch import supports_programmatic_launch
from pagedserve.engine.runner.fp8_checkpoint import fp8_checkpoint_format, quantization_config_dict


def detect_platform() -> Platform:
    """The visible CUDA device (the current one), or a CPU-only platform."""
    if not torch.cuda.is_available():
        return Platform.cpu_only()
    device = torch.device("cuda", torch.cuda.current_device())
    return Platform(
        cuda_available=True,
        bf16_supported=torch.cuda.is_bf16_supported(),
        supports_programmatic_launch=supports_programmatic_launch(device),
        triton_unavailable_reason=triton_unavailable_reason(device),
        flash_unavailable_reason=flash_unavailable_reason(device),
        compute_capability=torch.cuda.get_device_capability(device),
    )


def model_facts(hf_config: Any) -> ModelFacts:
    """From a transformers config: the context length, the bitsandbytes layers a checkpoint saved
    quantized will load as, and whether the checkpoint stores FP8 weights (`ConfigError` for an FP8 variant
    pagedserve cannot read, before any weight loads)."""
    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    quantization = quantization_config_dict(hf_config)
    bnb = "none"
    if quantization and quantization.get("quant_method") == "bitsandbytes":
        bnb = "8bit" if quantization.get("load_in_8bit") else "4bit"
    num_experts = getattr(text_config, "num_experts", None) or getattr(text_config, "num_local_experts", None)
    return ModelFacts(max_position_embeddings=getattr(text_config, "max_position_embeddings", None),
                      bnb_quantization=bnb, fp8_checkpoint=fp8_checkpoint_format(hf_config) is not None,
                      has_moe_experts=bool(num_experts))
