"""CUDA graphs of the decode forward: one graph per batch size, replayed with padded inputs.

A decode step launches hundreds of small kernels; on a busy host the CPU that issues them, not the GPU,
sets the pace. A captured graph replays them all with one launch. Inputs live in static buffers that
each replay overwrites; a batch of B sequences runs the graph of the smallest captured size >= B, with
the extra rows padded (context of one token, KV write skipped, logits ignored).

Only backends whose kernels take every per-step value from device tensors can be captured (Triton);
the attention grid is sized for `max_model_len` so one graph serves every context length.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from pagedserve.cache.allocators import cdiv

from .attention.base import AttentionMetadata, GroupAttentionMetadata
from .attention.hf_integration import PagedForwardContext
# model_runner imports this module only when capturing
from .model_runner import fill_pending_tokens, host_block_table_and_slots, to_device

if TYPE_CHECKING:
    from .model_runner import ModelRunner, StepInput


logger = logging.getLogger(__name__)


def capture_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every 16 (the padding waste stays under 16 rows), up to `max_batch_size`."""
    sizes = [size for size in (1, 2, 4, 8) if size < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    return sorted(set(sizes + [max_batch_size]))


class DecodeGraphs:
    def __init__(self, runner: "ModelRunner", max_batch_size: int, max_model_len: int) -> None:
        self.runner = runner
        self.max_model_len = max_model_len
        self.sizes = capture_sizes(max_batch_size)
        self.max_batch_size = self.sizes[-1]
        device = runner.device
        num_groups = len(runner.shape.groups)
        max_blocks = cdiv(max_model_len, runner.block_size)
        size = self.max_batch_size
        self.input_ids = torch.zeros(size, dtype=torch.long, device=device)
        self.positions = torch.zeros(size, dtype=torch.long, device=device)
        self.query_start_loc = torch.arange(size + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(size, dtype=torch.int32, device=device)
        self.logits_indices = torch.arange(size, dtype=torch.long, device=device)
        self.block_tables = [torch.zeros((size, max_blocks), dtype=torch.int32, device=device) for _ in range(num_groups)]
        self.slot_mappings = [torch.full((size,), -1, dtype=torch.long, device=device) for _ in range(num_groups)]
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _context(self, batch_size: int) -> PagedForwardContext:
        metadata = AttentionMetadata(
            query_start_loc=self.query_start_loc[: batch_size + 1],
            seq_lens=self.seq_lens[:batch_size],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            block_size=self.runner.block_size,
            groups=[
                GroupAttentionMetadata(table[:batch_size], slots[:batch_size])
                for table, slots in zip(self.block_tables, self.slot_mappings)
            ],
            query_lens_cpu=[1] * batch_size,
            seq_lens_cpu=[self.max_model_len] * batch_size,
        )
        return self.runner.forward_context(metadata)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        free_before = torch.cuda.mem_get_info(self.runner.device)[0]
        stream = torch.cuda.Stream(self.runner.device)
        stream.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(stream):
            for batch_size in reversed(self.sizes):  # largest first: the smaller ones reuse its pool
                context = self._context(batch_size)
                args = (self.input_ids[:batch_size], self.positions[:batch_size], context,
                        self.logits_indices[:batch_size])
                self.runner.forward_logits(*args)  # warm-up outside the graph (kernel compilation)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    logits = self.runner.forward_logits(*args)
                pool = graph.pool()
                self._graphs[batch_size] = (graph, logits)
        torch.cuda.current_stream(self.runner.device).wait_stream(stream)
        torch.cuda.synchronize(self.runner.device)
        used = free_before - torch.cuda.mem_get_info(self.runner.device)[0]
        logger.info("captured %d decode graphs (batch sizes %s..%s), %.0f MiB",
                    len(self._graphs), self.sizes[0], self.sizes[-1], used / 2**20)

    def can_run(self, step: "StepInput") -> bool:
        return bool(self._graphs) and len(step.query_lens) <= self.max_batch_size and max(step.query_lens) == 1

    def run(self, step: "StepInput", previous_tokens: torch.Tensor | None = None) -> torch.Tensor:
        batch_size = len(step.query_lens)
        padded = next(size for size in self.sizes if size >= batch_size)
        graph, logits = self._graphs[padded]
        device = self.runner.device
        # One pinned host tensor per buffer, copied without a sync; padding rows keep a one-token context.
        positions = torch.tensor(step.positions)  # on the host, also for the slot mapping below
        self.input_ids[:batch_size].copy_(to_device(step.token_ids, torch.long, device))
        fill_pending_tokens(self.input_ids[:batch_size], step, previous_tokens)
        self.positions[:batch_size].copy_(to_device(positions, torch.long, device))
        self.seq_lens[:batch_size].copy_(to_device(step.seq_lens, torch.int32, device))
        if padded > batch_size:
            self.seq_lens[batch_size:padded].fill_(1)
        block_size = self.runner.block_size
        rows = torch.arange(batch_size)  # decode: token t is sequence t's only one
        for group, tables in enumerate(step.block_tables):
            host, slots = host_block_table_and_slots(tables, rows, positions, block_size)
            self.block_tables[group][:batch_size, : host.shape[1]].copy_(to_device(host, torch.int32, device))
            self.slot_mappings[group][:batch_size].copy_(to_device(slots, torch.long, device))
            if padded > batch_size:
                self.slot_mappings[group][batch_size:padded].fill_(-1)
        graph.replay()
        return logits[:batch_size]
