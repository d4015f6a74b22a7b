"""Plugs paged attention into transformers' attention-function registry, so model code is not rewritten.

The model is loaded with `attn_implementation="pagedserve"`. Transformers then calls
`paged_attention_forward` in every attention layer with the layer's new (rotated) queries, keys and
values; the step's context (metadata, backend, cache tensors) arrives as the `paged_context` keyword
that the model forwards down to its layers. No module globals: two engines can run in one process.
Because the name is not in transformers' mask registry, the model builds no attention mask at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface

from pagedserve.config.engine import ConfigError
from pagedserve.engine.kernels.attention.base import AttentionBackend, AttentionMetadata

ATTN_IMPLEMENTATION = "pagedserve"


@dataclass
class PagedForwardContext:
    """Everything the attention layers need for one forward pass."""

    metadata: AttentionMetadata
    backend: AttentionBackend
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # by layer index: (key_cache, value_cache)
    layer_groups: list[int]  # layer index -> layer group
    sliding_windows: list[int | None]  # by group
    kv_scales: list[torch.Tensor] | None = None  # by layer index: [2] float32 (k_scale, v_scale); FP8 caches


@dataclass
class LayerProbe:
    """Records each attention layer's geometry during a one-token probe forward."""

    layers: dict[int, dict] = field(default_factory=dict)


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, H, T, D]
    key: torch.Tensor,  # [1, KVH, T, D]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    paged_context: PagedForwardContext | LayerProbe | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if kwargs.get("s_aux") is not None:
        # gpt-oss's attention sinks (a learned logit per head in every softmax): the paged kernels have no such
        # term, and leaving it out would generate other tokens without a word. The probe forward meets this at
        # start-up, so such a model fails to load instead.
        raise ConfigError(f"{type(module).__name__} uses attention sinks (gpt-oss's s_aux), which pagedserve's "
                          "paged attention does not support yet")
    # module.layer_idx is read behind the compiler boundary: a compiled layer that read it would be
    # specialized to its index, one recompile per layer.
    return _paged_attention(module, query, key, value, scaling, sliding_window, softcap, paged_context)


# torch.compile of the decoder layers stops here: the attention runs its own kernels with per-step host
# values (lists of lengths) that a compiled graph would guard on and recompile for.
@torch.compiler.disable
def _paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
    sliding_window: int | None,
    softcap: float | None,
    paged_context: PagedForwardContext | LayerProbe | None,
) -> tuple[torch.Tensor, None]:
    if paged_context is None:
        raise RuntimeError(
            "a model loaded with attn_implementation='pagedserve' runs only inside the pagedserve engine"
        )
    layer_idx = module.layer_idx
    if isinstance(paged_context, LayerProbe):
        paged_context.layers[layer_idx] = {
            "sliding_window": sliding_window,
            "num_kv_heads": key.shape[1],
            "num_heads": query.shape[1],
            "head_dim": key.shape[-1],
        }
        # One token attends only to itself: the output is its value, repeated over the query heads.
        group = query.shape[1] // key.shape[1]
        return value.repeat_interleave(group, dim=1).transpose(1, 2), None

    context = paged_context
    group_idx = context.layer_groups[layer_idx]
    key_cache, value_cache = context.kv_caches[layer_idx]
    group_meta = context.metadata.groups[group_idx]
    q = query[0].transpose(0, 1)  # [T, H, D]
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = context.backend.write_kv_and_forward(
        q,
        k,
        v,
        key_cache,
        value_cache,
        context.metadata,
        group_meta,
        scale=scale,
        sliding_window=context.sliding_windows[group_idx],
        softcap=softcap,
        kv_scales=None if context.kv_scales is None else context.kv_scales[layer_idx],
    )
    return out.unsqueeze(0), None  # [1, T, H, D]


def register_paged_attention() -> str:
    """Idempotent: registers the function under its name in transformers' registry."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    return ATTN_IMPLEMENTATION
