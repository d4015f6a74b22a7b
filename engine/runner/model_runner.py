"""The model runner: owns the device, the model, the KV-cache tensors, and runs one packed step.

A step arrives as a `StepInput` of plain Python lists (token ids, positions, block tables), so that a
tensor-parallel group can receive the same object on every rank in one broadcast. The runner turns it
into device tensors, writes new K/V into the paged cache through the attention backend, and returns
logits only at the positions that are sampled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pagedserve.cache.allocators import BlockCopy
from pagedserve.cache.blocks import blocks_for
from pagedserve.cache.sizing import (
    GIB,
    GroupShape,
    MemoryPlan,
    cpu_available_bytes,
    kv_budget_bytes,
    plan_num_blocks,
)
from pagedserve.config.engine import ConfigError
from pagedserve.config.resolve import CacheSettings, RunnerSettings

from pagedserve.engine.kernels.attention import get_attention_backend
from pagedserve.engine.kernels.attention.base import FP8_KV_DTYPE, AttentionMetadata, GroupAttentionMetadata
from pagedserve.engine.kernels.attention.hf_integration import LayerProbe, PagedForwardContext
from pagedserve.engine.runner.compile import CompiledForward
from pagedserve.engine.runner.cuda_graphs import DecodeGraphs, GreedyChainGraphs, MixedGraphs, mixed_graph_seqs
from pagedserve.engine.kernels.decode_linear import use_decode_linear
from pagedserve.engine.kernels.fp8_mlp import use_fp8_mlps
from pagedserve.engine.kernels.fused_projections import ProjectionFusion
from pagedserve.engine.kernels.moe.experts import moe_blocks, use_fused_moe
from pagedserve.engine.runner.lora import LoraManager
from pagedserve.engine.runner.loader import LoadedModel, weights_footprint_bytes
from pagedserve.engine.runner.step_input import StepInput, fill_pending_tokens, host_block_table_and_slots, to_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerGroupSpec:
    """Layers that share one attention kind and therefore one block pool and one allocator."""

    layer_indices: tuple[int, ...]
    sliding_window: int | None  # None: full attention

    @property
    def kind(self) -> str:
        return "full" if self.sliding_window is None else f"sliding({self.sliding_window})"


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int | None
    groups: tuple[LayerGroupSpec, ...]
    layer_groups: tuple[int, ...]  # layer index -> group index


class ModelRunner:
    """`settings` and `cache` come resolved (config/resolve.py): this class decides no auto value.

    Owns the KV-cache tensors (in the model's dtype, or e4m3 with `kv_cache_dtype` fp8) and, for an FP8 cache,
    `kv_scales`: one [2] float32 tensor per layer, (k_scale, v_scale), views of one table on the device
    (`kv_scale_table[:, :2]`; rows padded to 16 bytes, so every layer's pointer is aligned alike and Triton
    compiles one kernel variant, not one for even and one for odd layers). They are 1.0 (no calibration yet);
    the attention kernels read them at run time, so a later calibration or checkpoint scales can be written in
    place, CUDA graphs included."""

    def __init__(self, loaded: LoadedModel, settings: RunnerSettings, cache: CacheSettings) -> None:
        self.model = loaded.model
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.settings = settings
        self.cache_settings = cache
        # PDL for every Triton kernel this runner launches, and for inductor's (engine/kernels/launch.py).
        self.programmatic_launch = settings.programmatic_launch
        self.backend = get_attention_backend(settings.attention_backend, self.device, self.programmatic_launch)
        # MoE experts on the fused kernels (engine/kernels/moe/), before the probe's forward runs them once.
        self._moe = use_fused_moe(self.model) if settings.moe_backend == "fused" else None
        if self._moe is None and moe_blocks(self.model):
            logger.info("MoE experts: transformers' code in all %d MoE blocks (moe_backend=transformers)",
                        len(moe_blocks(self.model)))
        # The shape probe's forward also shows which projections share an input (engine/kernels/fused_projections.py).
        self._fusion = ProjectionFusion.watch(self.model) if settings.fuse_projections else None
        self.shape = self._probe_shape()
        if self._fusion is not None:
            self._fusion.apply()
        self._decode_linear = use_decode_linear(self.model, self.programmatic_launch) if settings.decode_linear else None
        # LoRA adapters over the (fused, one-row-GEMM) projections, before compilation sees the layers.
        self.lora = (LoraManager(self.model, settings.lora, self.dtype, self.device, loaded.shard_cuts)
                     if settings.lora.enabled else None)
        # FP8 MLPs quantize the down projection's input in their activation's kernel (engine/kernels/fp8_mlp.py),
        # after the layers above took their final classes; not with LoRA, whose adapters join the down projection.
        inductor_compiled = settings.compile.enabled and settings.compile.backend == "inductor"
        self._fp8_mlps = (use_fp8_mlps(self.model, self.dtype, inductor_compiled)
                          if not settings.lora.enabled else None)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.block_size = cache.block_size
        is_fp8_cache = cache.kv_cache_dtype == "fp8_e4m3"
        self.kv_cache_dtype = FP8_KV_DTYPE if is_fp8_cache else self.dtype
        self.kv_cache_dtype_name = "fp8_e4m3" if is_fp8_cache else str(self.dtype).removeprefix("torch.")
        self.kv_scale_table = (torch.ones((self.shape.num_layers, 4), dtype=torch.float32, device=self.device)
                               if is_fp8_cache else None)
        self.kv_scales = None if self.kv_scale_table is None else [row[:2] for row in self.kv_scale_table]
        self._set_checkpoint_kv_scales(loaded.kv_cache_scales)
        self._decode_graphs = None  # DecodeGraphs once captured
        self._verify_graphs = None  # DecodeGraphs of k + 1 tokens a sequence, with speculative decoding
        self._chain_graphs = None  # GreedyChainGraphs: a draft model's proposal rounds
        self._mixed_graphs = None  # MixedGraphs: steps with prompt tokens
        self._supports_logits_to_keep = hasattr(self.model, "_supports_logits_to_keep") and bool(
            self.model._supports_logits_to_keep()
        )
        # With compile on, the decoder layers are compiled in place: eager steps run them and decode graphs
        # capture them; every forward goes through the fallback ladder.
        self._step_model: Callable[..., Any] = (
            CompiledForward(self.model, settings.compile, self.programmatic_launch) if settings.compile.enabled else self.model
        )
        logger.info("attention backend: %s; layer groups: %s; KV cache dtype: %s", self.backend.name,
                    [g.kind for g in self.shape.groups], self.kv_cache_dtype_name)

    # ---- model geometry ------------------------------------------------------------------------
    @torch.no_grad()  # not inference mode: projection fusion reads its tensors' version counters
    def _set_checkpoint_kv_scales(self, scales: dict[int, tuple[float, float]]) -> None:
        """An FP8 cache takes the per-layer K/V scales its checkpoint was calibrated with (1.0 elsewhere)."""
        if not scales:
            return
        if self.kv_scale_table is None:
            logger.info("the checkpoint stores KV-cache scales for %d layers; they apply to an FP8 cache only "
                        "(kv_cache_dtype='fp8')", len(scales))
            return
        outside = sorted(layer for layer in scales if layer >= self.shape.num_layers)
        if outside:
            raise ConfigError(f"the checkpoint has KV-cache scales for layer {outside[0]}, but the model has "
                              f"{self.shape.num_layers} layers")
        for layer, (k_scale, v_scale) in scales.items():
            self.kv_scale_table[layer, 0], self.kv_scale_table[layer, 1] = k_scale, v_scale
        logger.info("FP8 KV cache: the checkpoint's K/V scales for %d of %d layers (the others 1.0)", len(scales),
                    self.shape.num_layers)

    def _probe_shape(self) -> ModelShape:
        """Run one token through the model to learn each attention layer's KV geometry and window."""
        probe = LayerProbe()
        ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        # The logits' width, not the head's weight: a tensor-parallel head holds a slice of the vocabulary.
        vocab_size = self.model(
            input_ids=ids, position_ids=torch.zeros_like(ids), paged_context=probe, use_cache=False
        ).logits.shape[-1]
        if not probe.layers:
            raise ConfigError("the model ran no attention layer through the paged attention registry")
        layer_ids = sorted(probe.layers)
        first = probe.layers[layer_ids[0]]
        windows: list[int | None] = []
        layer_groups = []
        for layer_idx in layer_ids:
            info = probe.layers[layer_idx]
            if (info["num_kv_heads"], info["head_dim"]) != (first["num_kv_heads"], first["head_dim"]):
                raise ConfigError("layers with different KV head counts or head sizes are not supported yet")
            window = info["sliding_window"]
            if window not in windows:
                windows.append(window)
            layer_groups.append(windows.index(window))
        groups = tuple(
            LayerGroupSpec(tuple(i for i, g in zip(layer_ids, layer_groups) if g == group), window)
            for group, window in enumerate(windows)
        )
        text_config = self.model.config.get_text_config()
        return ModelShape(
            num_layers=len(layer_ids),
            num_heads=first["num_heads"],
            num_kv_heads=first["num_kv_heads"],
            head_dim=first["head_dim"],
            vocab_size=vocab_size,
            max_position_embeddings=getattr(text_config, "max_position_embeddings", None),
            groups=groups,
            layer_groups=tuple(layer_groups),
        )

    # ---- memory --------------------------------------------------------------------------------
    def weights_bytes(self) -> int:
        """Measured footprint of parameters and buffers (quantized weights counted as stored)."""
        return weights_footprint_bytes(self.model)

    def plan_memory(self, max_num_seqs: int, max_model_len: int, max_batch_tokens: int) -> MemoryPlan:
        config = self.cache_settings
        dtype_bytes = torch.empty((), dtype=self.kv_cache_dtype).element_size()  # 1 for FP8: twice the blocks
        group_shapes = [
            GroupShape(len(g.layer_indices), self.shape.num_kv_heads, self.shape.head_dim, g.sliding_window)
            for g in self.shape.groups
        ]
        weights = self.weights_bytes()
        graphs = 0
        if self.device.type == "cuda":
            activation_peak = self._profile_activation_bytes(max_batch_tokens, max_num_seqs)
            free, total = torch.cuda.mem_get_info(self.device)
            if self.settings.cuda_graphs:
                graphs = self.cuda_graph_reserve_bytes(min(self.settings.cuda_graph_max_batch_size, max_num_seqs),
                                                       max_batch_tokens, activation_peak,
                                                       self.settings.cuda_graph_max_mixed_tokens, max_num_seqs)
        else:
            # CPU: no allocator statistics; estimate the step's working set from the model's widths.
            hidden = self.model.config.get_text_config().hidden_size
            intermediate = getattr(self.model.config.get_text_config(), "intermediate_size", 4 * hidden)
            activation_peak = max_batch_tokens * (4 * hidden + 3 * intermediate) * 4
            activation_peak += max_num_seqs * self.shape.vocab_size * 4 * 3
            total = free = cpu_available_bytes()
        budget, kv_bytes = kv_budget_bytes(
            is_gpu=self.device.type == "cuda",
            device_total_bytes=total,
            device_free_bytes=free,
            max_memory_percent=config.max_memory_percent,
            weights_bytes=weights,
            activation_peak_bytes=activation_peak,
            max_cpu_kv_bytes=int(config.max_cpu_kv_cache_gib * GIB),
            cuda_graph_bytes=graphs,
        )
        if config.num_blocks is not None:
            num_blocks = tuple(config.num_blocks for _ in group_shapes)
            needed = sum(n * g.bytes_per_block(self.block_size, dtype_bytes) for n, g in zip(num_blocks, group_shapes))
            if needed > max(kv_bytes, 0) and self.device.type == "cuda":
                raise ConfigError(
                    f"EngineConfig.num_blocks={config.num_blocks} needs {needed / GIB:.2f} GiB of KV cache, "
                    f"but only {kv_bytes / GIB:.2f} GiB fit within max_memory_percent={config.max_memory_percent}"
                )
        else:
            num_blocks = plan_num_blocks(
                kv_bytes,
                group_shapes,
                self.block_size,
                dtype_bytes,
                max_num_seqs=max_num_seqs,
                max_model_len=max_model_len,
                max_batch_tokens=max_batch_tokens,
            )
        kv_total = sum(n * g.bytes_per_block(self.block_size, dtype_bytes) for n, g in zip(num_blocks, group_shapes))
        return MemoryPlan(total, budget, weights, activation_peak, kv_total, tuple(num_blocks), self.block_size,
                          cuda_graph_bytes=graphs, kv_cache_dtype=self.kv_cache_dtype_name)

    def cuda_graph_reserve_bytes(self, max_graph_batch: int, max_batch_tokens: int, activation_peak: int,
                                 mixed_max_tokens: int = 0, max_num_seqs: int = 0) -> int:
        """What the decode graphs (and the mixed-step graphs of up to `mixed_max_tokens` tokens, in the same pool)
        will hold, set aside before the KV cache is sized: their one shared float32 logits output (a row per
        sequence a graph holds), plus their private pool, which holds the temporaries of one forward of at
        most that many tokens, bounded by the profiled forward of `max_batch_tokens` tokens (scaled up when a
        graph is larger). An upper bound: on the 8B shape, 1.09 GiB set aside for 0.59 GiB used (decode graphs)."""
        rows = max(max_graph_batch, mixed_graph_seqs(mixed_max_tokens, max_num_seqs) if mixed_max_tokens else 0)
        output = rows * self.shape.vocab_size * 4
        return output + int(activation_peak * max(1.0, max(max_graph_batch, mixed_max_tokens) / max_batch_tokens))

    @torch.inference_mode()
    def _profile_activation_bytes(self, max_batch_tokens: int, max_num_seqs: int) -> int:
        """Peak extra memory of one forward at `max_batch_tokens`, measured with a throwaway cache."""
        num_seqs = max(1, min(max_num_seqs, max_batch_tokens // 512 or 1))
        per_seq = max_batch_tokens // num_seqs
        query_lens = [per_seq] * num_seqs
        blocks_per_seq = blocks_for(per_seq, self.block_size)
        self.allocate_kv_cache(tuple(blocks_per_seq * num_seqs for _ in self.shape.groups))
        tables = [[list(range(s * blocks_per_seq, (s + 1) * blocks_per_seq)) for s in range(num_seqs)]
                  for _ in self.shape.groups]
        step = StepInput(
            token_ids=[0] * (per_seq * num_seqs),
            positions=[p for _ in range(num_seqs) for p in range(per_seq)],
            query_lens=query_lens,
            seq_lens=query_lens,
            block_tables=tables,
            logits_indices=list(range(min(max_num_seqs, per_seq * num_seqs))),
        )
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self.execute(step)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        self.kv_caches = []
        torch.cuda.empty_cache()
        return int(peak)

    def allocate_kv_cache(self, num_blocks: tuple[int, ...]) -> None:
        shape = self.shape
        self.kv_caches = []
        group_tensors = [
            torch.zeros(
                (len(g.layer_indices), 2, n, self.block_size, shape.num_kv_heads, shape.head_dim),
                dtype=self.kv_cache_dtype,
                device=self.device,
            )
            for g, n in zip(shape.groups, num_blocks)
        ]
        position_in_group = [0] * len(shape.groups)
        for group in shape.layer_groups:
            tensor = group_tensors[group][position_in_group[group]]
            position_in_group[group] += 1
            self.kv_caches.append((tensor[0], tensor[1]))
        self._group_tensors = group_tensors

    # ---- one step ------------------------------------------------------------------------------
    def _build_metadata(self, step: StepInput) -> AttentionMetadata:
        device = self.device
        query_lens = torch.tensor(step.query_lens, dtype=torch.int32)
        query_start_loc = torch.zeros(len(step.query_lens) + 1, dtype=torch.int32)
        torch.cumsum(query_lens, 0, out=query_start_loc[1:])
        positions = torch.tensor(step.positions, dtype=torch.long)
        seq_index = torch.repeat_interleave(torch.arange(len(step.query_lens)), query_lens.long())
        groups = []
        for tables in step.block_tables:
            table, slots = host_block_table_and_slots(tables, seq_index, positions, self.block_size)
            groups.append(
                GroupAttentionMetadata(
                    block_tables=to_device(table, torch.int32, device),
                    slot_mapping=to_device(slots, torch.long, device),
                )
            )
        return AttentionMetadata(
            query_start_loc=to_device(query_start_loc, torch.int32, device),
            seq_lens=to_device(step.seq_lens, torch.int32, device),
            max_query_len=max(step.query_lens),
            max_seq_len=max(step.seq_lens),
            block_size=self.block_size,
            groups=groups,
            query_lens_cpu=list(step.query_lens),
            seq_lens_cpu=list(step.seq_lens),
        )

    def _copy_blocks(self, copies: list[BlockCopy]) -> None:
        for copy in copies:
            tensor = self._group_tensors[copy.group]  # [layers, 2, blocks, ...]
            tensor[:, :, copy.dst].copy_(tensor[:, :, copy.src])

    def forward_context(self, metadata: AttentionMetadata) -> PagedForwardContext:
        return PagedForwardContext(
            metadata=metadata,
            backend=self.backend,
            kv_caches=self.kv_caches,
            layer_groups=list(self.shape.layer_groups),
            sliding_windows=[g.sliding_window for g in self.shape.groups],
            kv_scales=self.kv_scales,
        )

    def forward_logits(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        context: PagedForwardContext,
        logits_indices: torch.Tensor,  # [S]
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The step model's forward (compiled when configured) over one packed batch; float32 logits at
        `logits_indices` only, written into `out` [S, vocab] when given (the decode graphs' shared output)."""
        kwargs = {"logits_to_keep": logits_indices} if self._supports_logits_to_keep else {}
        logits = self._step_model(
            input_ids=input_ids[None], position_ids=positions[None], paged_context=context, use_cache=False, **kwargs
        ).logits[0]
        if not self._supports_logits_to_keep:
            logits = logits[logits_indices]
        return logits.float() if out is None else out.copy_(logits)

    @property
    def mixed_graph_max_tokens(self) -> int:
        """The most tokens of a step with prompt tokens that replays a CUDA graph (0: none captured)."""
        return self._mixed_graphs.max_tokens if self._mixed_graphs is not None else 0

    @property
    def is_compiled(self) -> bool:
        return isinstance(self._step_model, CompiledForward) and self._step_model.is_compiled

    def capture_cuda_graphs(self, max_batch_size: int, max_model_len: int, reserved_bytes: int = 0,
                            verify_query_len: int = 0, verify_max_batch_size: int = 0, mixed_max_tokens: int = 0,
                            max_num_seqs: int = 0) -> bool:
        """Capture decode graphs where the settings allow it (resolution said why not); False (eager) otherwise.
        `reserved_bytes`: what the memory plan set aside for them (a warning if they took more).
        `verify_query_len` (k + 1) and `verify_max_batch_size`: also capture speculative verification graphs,
        q = k + 1 tokens a sequence for up to that many sequences, in the decode graphs' pool and logits.
        `mixed_max_tokens` (and `max_num_seqs`): also graphs of steps with prompt tokens of up to that many
        tokens (`MixedGraphs`), in the same pool and logits."""
        if not self.settings.cuda_graphs:
            return False
        verify = verify_query_len > 1 and verify_max_batch_size > 0
        mixed = mixed_max_tokens > 0 and max_num_seqs > 0
        logit_rows = max(verify_query_len * verify_max_batch_size if verify else 0,
                         mixed_graph_seqs(mixed_max_tokens, max_num_seqs) if mixed else 0)
        graphs = DecodeGraphs(self, max_batch_size, max_model_len, num_logit_rows=logit_rows)
        used = graphs.capture()
        if verify:
            self._verify_graphs = DecodeGraphs(self, verify_max_batch_size, max_model_len, verify_query_len,
                                               logits=graphs.logits)
            used += self._verify_graphs.capture(graphs.pool)
        if mixed:
            mixed_graphs = MixedGraphs(self, mixed_max_tokens, max_num_seqs, max_model_len, logits=graphs.logits)
            try:
                used += mixed_graphs.capture(graphs.pool)
            except Exception as exc:  # noqa: BLE001 - a model whose larger steps cannot be captured still serves
                # Capturing such a step failed (an op of this model or kernel that reads the device on the host):
                # they run eagerly, as with cuda_graph_max_mixed_tokens=0; the decode graphs stand.
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                logger.warning("steps with prompt tokens could not be captured in CUDA graphs (%s: %s): they run "
                               "eagerly; set cuda_graph_max_mixed_tokens=0 to skip the attempt",
                               type(exc).__name__, exc)
            else:
                self._mixed_graphs = mixed_graphs
        if reserved_bytes and used > reserved_bytes:
            logger.warning("the CUDA graphs took %.0f MiB, more than the %.0f MiB the memory plan set aside",
                           used / 2**20, reserved_bytes / 2**20)
        self._decode_graphs = graphs
        return True

    def capture_greedy_chain_graphs(self, max_batch_size: int, max_model_len: int, query_len: int, rounds: int,
                                    pick: Callable[[torch.Tensor], torch.Tensor]) -> bool:
        """Decode graphs (`capture_cuda_graphs`), and graphs of a greedy chain in their pool and logits: a catch-up of
        up to `query_len` tokens a sequence, then `rounds` decodes fed back on the device (`greedy_chain`). False
        (eager) where the settings allow no graphs."""
        if not self.capture_cuda_graphs(max_batch_size, max_model_len):
            return False
        decode = self._decode_graphs
        chain = GreedyChainGraphs(self, max_batch_size, max_model_len, query_len, rounds, pick, logits=decode.logits)
        chain.capture(decode.pool)
        self._chain_graphs = chain
        return True

    @torch.inference_mode()
    def greedy_chain(self, step: StepInput, wanted: list[int]) -> torch.Tensor | None:
        """`step` (a catch-up) and the greedy chain after it in one graph replay: tokens [rounds + 1, B] on the
        device, row r of sequence b its r-th greedy token after the step (meaningful for r < wanted[b]); read them
        before the next call. None when no captured chain takes the step (the caller runs it eagerly)."""
        chain = self._chain_graphs
        if chain is None or not chain.can_run(step):
            return None
        if step.block_copies:
            self._copy_blocks(step.block_copies)
        return chain.run_chain(step, wanted)

    def shutdown(self) -> None:
        """Give the model back as it came: decoder layers compiled in place are made eager again, FP8 MLPs take
        their own forward again, fused projections are split again and MoE experts take transformers' code again
        (a model passed in by the caller, `LLM.from_model`, is the caller's object)."""
        if isinstance(self._step_model, CompiledForward):
            self._step_model.uncompile()
        if self._fp8_mlps is not None:
            self._fp8_mlps.undo()
        if self.lora is not None:
            self.lora.layers.undo()
        if self._decode_linear is not None:
            self._decode_linear.undo()
        if self._fusion is not None:
            self._fusion.undo()
        if self._moe is not None:
            self._moe.undo()
        self._decode_graphs = self._verify_graphs = self._chain_graphs = self._mixed_graphs = None

    @torch.inference_mode()
    def execute(self, step: StepInput, previous_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Run one packed step; returns float32 logits [len(logits_indices), vocab].

        `previous_tokens`: the previous step's sampled ids, still on the device, that fill the inputs
        named by `step.pending_input_indices` (async scheduling)."""
        if step.block_copies:
            self._copy_blocks(step.block_copies)
        for graphs in (self._decode_graphs, self._verify_graphs, self._mixed_graphs):
            if graphs is not None and graphs.can_run(step):
                return graphs.run(step, previous_tokens)
        context = self.forward_context(self._build_metadata(step))
        if self.lora is not None:
            token_slots = self.lora.token_slots(step.lora_names, step.query_lens)
            self.lora.set_step(None if token_slots is None else to_device(token_slots, torch.int32, self.device))
        input_ids = to_device(step.token_ids, torch.long, self.device)
        fill_pending_tokens(input_ids, step, previous_tokens)
        positions = to_device(step.positions, torch.long, self.device)
        logits_indices = to_device(step.logits_indices, torch.long, self.device)
        return self.forward_logits(input_ids, positions, context, logits_indices)
