"""FlashAttention 4's paged kernels as an attention backend (`attention_backend="flash_paged"`).

FlashAttention 4 (`pip install 'pagedserve[flash]'`: the `flash-attn-4` package, a pure-Python build on the
CUTLASS CuTe DSL that compiles its kernels at first use, a few seconds each) reads a paged KV cache through
`flash_attn.cute.flash_attn_varlen_func`: packed queries `[T, H, D]` with `cu_seqlens_q`, the cache as
`[num_pages, page_size, KVH, D]` (our `[num_blocks, block_size, KVH, D]` exactly, so it takes the engine's
cache tensors as they are), a `page_table` `[B, pages]` int32 (our block table) and `seqused_k` (our
`seq_lens`). Causal masking is bottom-right aligned (the new tokens are the last of their context, our
semantics); a sliding window W is FlashAttention's `window_size=(W - 1, 0)`; soft-capping is its `softcap`.

What this backend does with that:

- the new K/V are stored by the fallback backend's `write_kv` (Triton's one-launch scatter: FlashAttention's
  varlen function only reads the cache), then one varlen call attends for decode rows, chunked prefill and
  prefill over a cached prefix alike;
- a layer FlashAttention cannot run goes to the fallback (Triton), whole, decided per layer geometry and
  logged once: an FP8 KV cache (FlashAttention 4 reads FP8 K/V only with FP8 queries, and only on
  Blackwell), float32 queries (it takes float16 and bfloat16), a head dim that is not a multiple of 16 or
  above what the GPU generation's kernels take;
- the cache page size is the engine's `block_size`, any value: FlashAttention loads K/V tiles by TMA when a
  page is exactly one key tile (128 keys at head dim 128 on Hopper) and gathers them with cp.async
  otherwise, so `block_size` is not changed for it (bench/attention_bench.py `--block-size` measures both);
- every per-step value reaches the kernels as a device tensor and nothing syncs the host, so decode steps
  are captured in CUDA graphs; the host bounds it is given (`max_seqlen_q/k`) are the metadata's, which a
  captured graph sizes for `max_model_len`.

Split-KV (flash-decoding) exists in FlashAttention 4 on Blackwell only: on Hopper a decode step runs one
program per (sequence, KV head), which leaves most of the GPU idle at small batches over long contexts,
where the Triton backend splits the KV range. `attention_backend="auto"` keeps Triton until the benchmark
says otherwise (config/resolve.py).

Nothing here imports `flash_attn` or Triton at module level: `flash_varlen_args` and the support rules are
plain functions (tested on CPU), and `FlashPagedAttentionBackend.create` imports both when the backend is
chosen. The backend itself takes the fallback and the varlen function as arguments, so tests can run it on
CPU with the reference backend and a plain-PyTorch stand-in for the kernel.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from pagedserve.engine.kernels.attention.base import (
    FP8_KV_DTYPE,
    AttentionBackend,
    AttentionMetadata,
    GroupAttentionMetadata,
)

logger = logging.getLogger(__name__)

FLASH_EXTRA_HINT = "pip install 'pagedserve[flash]'"
FLASH_DTYPES = (torch.float16, torch.bfloat16)
# Compute capability majors whose FlashAttention 4 forward reads a paged cache: Hopper (9), Blackwell
# datacenter (10) and Thor (11). SM80 and consumer Blackwell (12) have no paged-KV path in it.
FLASH_PAGED_CAPABILITY_MAJORS = (9, 10, 11)


@dataclass(frozen=True)
class FlashVarlenArgs:
    """Our step metadata, in the names of `flash_attn_varlen_func`'s paged call."""

    cu_seqlens_q: torch.Tensor  # [B + 1] int32: query_start_loc
    seqused_k: torch.Tensor  # [B] int32: context length after this step (new tokens included)
    page_table: torch.Tensor  # [B, pages] int32, last dimension contiguous: the group's block tables
    max_seqlen_q: int
    max_seqlen_k: int
    window_size: tuple[int | None, int | None]  # (left, right) keys around a query; (None, None): no window


def flash_varlen_args(metadata: AttentionMetadata, group: GroupAttentionMetadata,
                      sliding_window: int | None) -> FlashVarlenArgs:
    """The arguments one layer group's attention passes to FlashAttention (`causal=True` besides).

    Causal with a window: a query at position q sees keys q - W + 1 .. q, which is FlashAttention's local
    window (W - 1 keys to the left, 0 to the right). The host bounds are the metadata's: exact in an eager
    step, sized for max_model_len in a captured decode graph, so they cover every replay."""
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    page_table = group.block_tables
    if page_table.dtype != torch.int32 or page_table.stride(-1) != 1:
        page_table = page_table.to(torch.int32).contiguous()
    return FlashVarlenArgs(
        cu_seqlens_q=metadata.query_start_loc,
        seqused_k=metadata.seq_lens,
        page_table=page_table,
        max_seqlen_q=metadata.max_query_len,
        max_seqlen_k=metadata.max_seq_len,
        window_size=(None, None) if sliding_window is None else (sliding_window - 1, 0),
    )


def flash_capability_unsupported_reason(capability: tuple[int, int] | None) -> str:
    """'' when FlashAttention 4 has a paged-KV forward for this compute capability, else why not."""
    if capability is None:
        return "the GPU's compute capability is unknown"
    if capability[0] in FLASH_PAGED_CAPABILITY_MAJORS:
        return ""
    return (f"FlashAttention 4 reads a paged KV cache on compute capability 9.x (Hopper) and 10.x/11.x "
            f"(Blackwell) only; this GPU is {capability[0]}.{capability[1]}")


def flash_head_dim_unsupported_reason(head_dim: int, capability_major: int) -> str:
    """'' when FlashAttention 4's paged forward takes this head dim (K and V alike) on that GPU generation.
    Its paged loads need a multiple of 16 (`Paged KV does not support irregular head dim`); Hopper's kernels
    take 16..256, Blackwell's up to 128 and 256."""
    if head_dim % 16 != 0:
        return f"head_dim {head_dim} (FlashAttention 4's paged loads need a multiple of 16)"
    if capability_major == 9 and not 16 <= head_dim <= 256:
        return f"head_dim {head_dim} (FlashAttention 4 on Hopper takes 16..256)"
    if capability_major in (10, 11) and not (head_dim <= 128 or head_dim == 256):
        return f"head_dim {head_dim} (FlashAttention 4 on Blackwell takes up to 128, or 256)"
    return ""


def flash_layer_unsupported_reason(query_dtype: torch.dtype, cache_dtype: torch.dtype, head_dim: int,
                                   capability_major: int) -> str:
    """'' when FlashAttention 4 runs a layer of this geometry, else why the fallback (Triton) runs it."""
    if cache_dtype == FP8_KV_DTYPE:
        return ("an FP8 KV cache (FlashAttention 4 reads FP8 K/V only together with FP8 queries, and only on "
                "Blackwell)")
    if query_dtype not in FLASH_DTYPES:
        return f"{str(query_dtype).removeprefix('torch.')} activations (FlashAttention 4 takes float16 and bfloat16)"
    if cache_dtype != query_dtype:
        return f"a {cache_dtype} cache under {query_dtype} queries"
    return flash_head_dim_unsupported_reason(head_dim, capability_major)


def flash_package_missing_reason() -> str:
    """'' when the flash-attn-4 package and its CuTe DSL look importable (found, not imported: importing them
    loads the DSL's compiler, seconds), else what to install."""
    try:
        found = importlib.util.find_spec("flash_attn") is not None and (
            importlib.util.find_spec("flash_attn.cute") is not None)
    except (ImportError, ValueError):  # a broken flash_attn package (e.g. flash-attn 2 half installed)
        found = False
    if not found:
        return f"the flash-attn-4 package (flash_attn.cute) is not installed: {FLASH_EXTRA_HINT}"
    if importlib.util.find_spec("cutlass") is None:
        return (f"flash_attn.cute is installed but the CUTLASS CuTe DSL (nvidia-cutlass-dsl, module cutlass) is "
                f"not importable: {FLASH_EXTRA_HINT}")
    return ""


class FlashPagedAttentionBackend(AttentionBackend):
    """Paged attention through FlashAttention 4's varlen kernel; the fallback backend writes the cache and
    runs the layers FlashAttention cannot (`flash_layer_unsupported_reason`, each reason logged once).

    `varlen_attention` is `flash_attn.cute.flash_attn_varlen_func` (or a stand-in with its signature and
    semantics); `capability` is the device's compute capability, which picks the support rules. Owns no
    state beyond its choices per layer geometry."""

    name = "flash_paged"
    supports_cuda_graphs = True

    def __init__(self, fallback: AttentionBackend, varlen_attention: Callable[..., Any],
                 capability: tuple[int, int]) -> None:
        self.fallback = fallback
        self._varlen_attention = varlen_attention
        self.capability = capability
        self._reasons: dict[tuple[torch.dtype, torch.dtype, int], str] = {}  # geometry -> '' (flash) or why not

    @classmethod
    def create(cls, device: torch.device, programmatic_launch: bool = False) -> "FlashPagedAttentionBackend":
        """The engine's backend on `device`: Triton as the writer and fallback, FlashAttention 4's kernel.
        Raises ValueError with the reason where it cannot run."""
        is_ok, reason = cls.is_available(device)
        if not is_ok:
            raise ValueError(f"attention backend 'flash_paged' is unavailable: {reason}")
        from pagedserve.engine.kernels.attention.triton import TritonAttentionBackend

        try:
            from flash_attn.cute import flash_attn_varlen_func
        except Exception as error:  # a broken install (DSL libraries, CUDA flavour): say so at start-up
            raise ValueError(f"attention backend 'flash_paged' is unavailable: flash_attn.cute failed to import "
                             f"({type(error).__name__}: {error}); reinstall with {FLASH_EXTRA_HINT}") from error
        capability = torch.cuda.get_device_capability(device)
        return cls(TritonAttentionBackend(programmatic_launch=programmatic_launch), flash_attn_varlen_func, capability)

    @classmethod
    def is_available(cls, device: torch.device) -> tuple[bool, str]:
        if device.type != "cuda":
            return False, f"FlashAttention 4 needs a CUDA device, got {device} ({FLASH_EXTRA_HINT} on a GPU host)"
        reason = flash_package_missing_reason() or flash_capability_unsupported_reason(
            torch.cuda.get_device_capability(device))
        return reason == "", reason

    def unsupported_reason(self, query: torch.Tensor, key_cache: torch.Tensor) -> str:
        """'' when this layer runs FlashAttention, else why the fallback runs it (logged the first time)."""
        key = (query.dtype, key_cache.dtype, key_cache.shape[-1])
        reason = self._reasons.get(key)
        if reason is None:
            reason = flash_layer_unsupported_reason(query.dtype, key_cache.dtype, key_cache.shape[-1],
                                                    self.capability[0])
            self._reasons[key] = reason
            if reason:
                logger.info("flash_paged: layers with %s run the %s backend", reason, self.fallback.name)
        return reason

    def write_kv(
        self,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_scales: torch.Tensor | None = None,
    ) -> None:
        self.fallback.write_kv(key_cache, value_cache, key, value, slot_mapping, kv_scales)

    def forward(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
        group: GroupAttentionMetadata,
        *,
        scale: float,
        sliding_window: int | None,
        softcap: float | None,
        kv_scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.unsupported_reason(query, key_cache):
            return self.fallback.forward(query, key_cache, value_cache, metadata, group, scale=scale,
                                         sliding_window=sliding_window, softcap=softcap, kv_scales=kv_scales)
        return self._flash_forward(query, key_cache, value_cache, metadata, group, scale, sliding_window, softcap)

    def write_kv_and_forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
        group: GroupAttentionMetadata,
        *,
        scale: float,
        sliding_window: int | None,
        softcap: float | None,
        kv_scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A fallback layer keeps the fallback's own fused path (Triton stores decode K/V in its attention
        kernel); a FlashAttention layer writes with the fallback, then attends."""
        if self.unsupported_reason(query, key_cache):
            return self.fallback.write_kv_and_forward(query, key, value, key_cache, value_cache, metadata, group,
                                                      scale=scale, sliding_window=sliding_window, softcap=softcap,
                                                      kv_scales=kv_scales)
        self.fallback.write_kv(key_cache, value_cache, key, value, group.slot_mapping, kv_scales)
        return self._flash_forward(query, key_cache, value_cache, metadata, group, scale, sliding_window, softcap)

    def _flash_forward(
        self,
        query: torch.Tensor,  # [T, H, D]
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
        group: GroupAttentionMetadata,
        scale: float,
        sliding_window: int | None,
        softcap: float | None,
    ) -> torch.Tensor:  # [T, H, D]
        num_tokens, num_heads, _ = query.shape
        if num_heads % key_cache.shape[2] != 0:
            raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({key_cache.shape[2]})")
        if num_tokens == 0 or metadata.num_seqs == 0:
            return query.new_empty(query.shape)
        args = flash_varlen_args(metadata, group, sliding_window)
        out, _ = self._varlen_attention(
            query,
            key_cache,
            value_cache,
            cu_seqlens_q=args.cu_seqlens_q,
            seqused_k=args.seqused_k,
            page_table=args.page_table,
            max_seqlen_q=args.max_seqlen_q,
            max_seqlen_k=args.max_seqlen_k,
            softmax_scale=float(scale),
            causal=True,
            window_size=args.window_size,
            softcap=0.0 if softcap is None else float(softcap),
            # 0: FlashAttention picks the split count (Blackwell splits small decode batches; Hopper never does).
            num_splits=0,
        )
        return out
