"""CUDA graphs of the decode forward: one graph per batch size, replayed with padded inputs.

A decode step launches hundreds of small kernels; on a busy host the CPU that issues them, not the GPU,
sets the pace. A captured graph replays them all with one launch. Inputs live in static buffers that
each replay overwrites; a batch of B sequences runs the graph of the smallest captured size >= B, with
the extra rows padded (context of one token, KV write skipped, logits ignored).

Speculative verification (engine/spec/) runs the same way with `query_len` q = k + 1 rows a sequence: a
sequence with fewer new tokens (fewer proposals, or none) has them in its last rows and padding rows in
front of them, at the positions just before its new tokens (their K/V write is skipped, their logits are
not read); the attention kernels see every sequence as a q-token chunk at the end of its context, so each
real row attends to exactly what it attends to in an eager step. Any step whose sequences have at most q
new tokens and a context of at least q tokens fits.

Only backends whose kernels take every per-step value from device tensors can be captured (Triton);
the attention grid is sized for `max_model_len` so one graph serves every context length.

A step's inputs reach the device in one copy (`DecodeInputs`): ids, positions, context lengths, block
tables and cache slots are packed on the host into one pinned buffer laid out like the device buffer the
graphs read. Tokens the previous step sampled on the device (async scheduling) are gathered inside the
graph. So a decode step is a host->device copy and a replay, with no small copies and index kernels in
front of it.

Steps with prompt tokens (`MixedGraphs`): a prompt chunk beside decodes runs the same kernels as a decode step,
only more rows, but eagerly it pays the host's launches of every layer's kernels (regional compilation leaves
two compiled regions and the attention call a layer), which on a fast GPU take longer than the kernels of a
small mixed step (docs/kernels.md has the figures). The
Triton attention kernel reads every per-sequence value from device tensors and sizes its grid from the token
and sequence counts alone, so such a step is captured too, one graph per padded token count: its tokens first,
then padding tokens that form one extra sequence of their own (positions from 0, their K/V not written, their
context read from block 0), then empty sequences (no tokens) up to the graph's sequence count. Only the logits
of the step's sampled positions are read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from pagedserve.cache.blocks import blocks_for

from pagedserve.engine.kernels.attention.base import AttentionMetadata, GroupAttentionMetadata
from pagedserve.engine.kernels.attention.hf_integration import PagedForwardContext
from pagedserve.engine.runner.step_input import StepInput, fill_pending_tokens, host_block_table_and_slots

if TYPE_CHECKING:
    from pagedserve.engine.runner.model_runner import ModelRunner


logger = logging.getLogger(__name__)


def mixed_capture_sizes(max_tokens: int) -> list[int]:
    """Token counts of the mixed-step graphs: 16 to 128 by doubling, then every 64 up to `max_tokens` (a step's
    compute grows with its tokens, so padding costs in proportion: docs/kernels.md)."""
    sizes = [size for size in (16, 32, 64, 128) if size < max_tokens]
    sizes += list(range(192, max_tokens, 64))
    return sorted(set(sizes + [max_tokens]))


def mixed_graph_seqs(num_tokens: int, max_num_seqs: int) -> int:
    """Sequences (and logits rows) of the mixed-step graph of `num_tokens` tokens: as many as tokens (each has
    one), at most the engine's sequences and the padding one."""
    return min(num_tokens, max_num_seqs + 1)


def capture_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every 16 (the padding waste stays under 16 rows), up to `max_batch_size`."""
    sizes = [size for size in (1, 2, 4, 8) if size < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    return sorted(set(sizes + [max_batch_size]))


@dataclass
class _Views:
    """Typed views of one packed buffer (host or device); rows beyond a step's batch are padding."""

    ids: torch.Tensor  # int64 [S * q]
    positions: torch.Tensor  # int64 [S * q]
    pending: torch.Tensor  # int64 [S * q]: row of the previous step's sampled ids to take, or -1
    logits_rows: torch.Tensor  # int64 [S * q]: padded row of each of the step's logits indices
    slots: list[torch.Tensor]  # per group, int64 [S * q]; -1 skips the KV write (padding)
    seq_lens: torch.Tensor  # int32 [S]
    tables: list[torch.Tensor]  # per group, int32 [S, max_blocks]


class _StagedUpload:
    """A device buffer filled from two pinned host halves in turn (`DecodeInputs`, `MixedInputs`): the host packs a
    step into a half while the copy from the other may still be queued; a half is written again only after the copy
    from it has run (an event, long done by then)."""

    def __init__(self, nbytes: int, device: torch.device) -> None:
        on_gpu = device.type == "cuda"
        self.device_buffer = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self.host_buffers = [torch.zeros(nbytes, dtype=torch.uint8, pin_memory=on_gpu) for _ in range(2)]
        self._copied = [None, None] if on_gpu else None  # CUDA events of the last copy from each half
        self._half = 0

    def next_half(self) -> int:
        """The host half to pack the next step into (its earlier copy done)."""
        half = self._half
        self._half ^= 1
        if self._copied is not None and self._copied[half] is not None:
            self._copied[half].synchronize()
        return half

    def send(self, half: int, nbytes: int) -> None:
        """Copy the half's first `nbytes` to the device buffer, asynchronously on the current stream."""
        self.device_buffer[:nbytes].copy_(self.host_buffers[half][:nbytes], non_blocking=True)
        if self._copied is not None:
            event = torch.cuda.Event()
            event.record()
            self._copied[half] = event


class DecodeInputs:
    """A decode step's inputs in one buffer: the host packs, one copy moves them, the graphs read views.

    Layout (bytes): int64 ids | positions | pending | logits rows | slots of each group (S * q entries
    each: q rows a sequence), then int32 seq_lens | block table of each group ([S, max_blocks]). A step of
    B sequences copies the buffer up to row B of the last group's table (earlier groups' tables whole), so
    a small batch moves a few KiB. Block-table entries past a sequence's blocks may hold stale ids from
    earlier steps: the kernels read only the blocks that the context length covers, as with any padded
    table. The host side is pinned and double-buffered (`_StagedUpload`).
    """

    def __init__(self, max_batch_size: int, num_groups: int, max_blocks: int, device: torch.device,
                 query_len: int = 1) -> None:
        self.size, self.num_groups, self.max_blocks = max_batch_size, num_groups, max_blocks
        self.query_len = query_len
        self._int64_len = (4 + num_groups) * max_batch_size * query_len
        self._int32_len = max_batch_size + num_groups * max_batch_size * max_blocks
        self._upload = _StagedUpload(8 * self._int64_len + 4 * self._int32_len, device)
        self.device_buffer = self._upload.device_buffer
        self.device = self._views(self.device_buffer)
        host_views = [self._views(buffer) for buffer in self._upload.host_buffers]
        self._host = [{name: getattr(v, name).numpy()
                       for name in ("ids", "positions", "pending", "logits_rows", "seq_lens")}
                      | {"slots": [t.numpy() for t in v.slots], "tables": [t.numpy() for t in v.tables]}
                      for v in host_views]
        # The padding rows' context: q tokens, nothing written, no pending token.
        for views in (self.device, *host_views):
            views.seq_lens.fill_(query_len)
            views.pending.fill_(-1)
            for slots in views.slots:
                slots.fill_(-1)

    def _views(self, buffer: torch.Tensor) -> _Views:
        size, groups = self.size, self.num_groups
        rows = size * self.query_len
        int64 = buffer[: 8 * self._int64_len].view(torch.int64)
        int32 = buffer[8 * self._int64_len:].view(torch.int32)
        tables = int32[size:].view(groups, size, self.max_blocks)
        return _Views(
            ids=int64[:rows], positions=int64[rows: 2 * rows], pending=int64[2 * rows: 3 * rows],
            logits_rows=int64[3 * rows: 4 * rows], slots=[int64[(4 + g) * rows: (5 + g) * rows] for g in range(groups)],
            seq_lens=int32[:size], tables=[tables[g] for g in range(groups)],
        )

    def _bytes_for(self, batch_size: int) -> int:
        last_table_start = 8 * self._int64_len + 4 * (self.size + (self.num_groups - 1) * self.size * self.max_blocks)
        return last_table_start + 4 * batch_size * self.max_blocks

    def pack(self, step: "StepInput", padded: int, block_size: int, pending_on_device: bool) -> bool:
        """Write `step` (B sequences of at most q new tokens each) and padding sequences up to `padded` into the
        host buffer, and copy it to the device (asynchronously on the current stream). `pending_on_device`: the
        graph gathers the step's pending tokens from the previous sampled ids; else their rows stay -1.
        Returns whether the step's logits indices are the graph's first rows in order (else `logits_rows`
        holds, for each, its padded row)."""
        half = self._upload.next_half()
        host = self._host[half]
        batch, q = len(step.query_lens), self.query_len
        num_rows = padded * q
        seq_lens = np.asarray(step.seq_lens, dtype=np.int64)
        host["seq_lens"][:batch] = seq_lens
        host["seq_lens"][batch:padded] = q
        if q == 1:  # decode: token t is sequence t's only one
            rows = np.arange(batch)
            host["positions"][:batch] = step.positions
            host["positions"][batch:padded] = 0
        else:
            # Sequence b's n new tokens take its last n rows; its other rows are the positions just before.
            query_lens = np.asarray(step.query_lens, dtype=np.int64)
            token_seq = np.repeat(np.arange(batch), query_lens)
            first_token = np.cumsum(query_lens) - query_lens
            rows = token_seq * q + q - query_lens[token_seq] + (np.arange(len(step.token_ids)) - first_token[token_seq])
            all_seq_lens = np.concatenate([seq_lens, np.full(padded - batch, q, dtype=np.int64)])
            host["positions"][:num_rows] = (np.repeat(all_seq_lens - q, q) + np.tile(np.arange(q), padded))
        host["ids"][:num_rows] = 0
        host["ids"][rows] = step.token_ids
        host["pending"][:num_rows] = -1
        if pending_on_device and step.pending_input_indices:
            host["pending"][rows[step.pending_input_indices]] = step.pending_source_rows
        logits_rows = rows[step.logits_indices]
        host["logits_rows"][: len(logits_rows)] = logits_rows
        token_seq_t = torch.from_numpy(np.ascontiguousarray(rows // q))
        positions = torch.as_tensor(step.positions, dtype=torch.long)
        for group, tables in enumerate(step.block_tables):
            _, slots = host_block_table_and_slots(tables, token_seq_t, positions, block_size, out=host["tables"][group])
            host["slots"][group][:num_rows] = -1
            host["slots"][group][rows] = slots.numpy()
        self._upload.send(half, self._bytes_for(batch))
        return bool(np.array_equal(logits_rows, np.arange(len(logits_rows))))


class DecodeGraphs:
    """The graphs of one query length: q = 1 (decode), or q = k + 1 (speculative verification). `logits`:
    the float32 output every graph writes, when shared with the graphs of another query length (they never
    replay at the same time), at least [max_batch_size * q, vocab]; else one of `num_logit_rows` rows (at
    least max_batch_size * q) is allocated here."""

    logit_rows_per_sequence: int | None = None  # rows of logits a sequence needs (None: all q, as verification)

    def __init__(self, runner: "ModelRunner", max_batch_size: int, max_model_len: int, query_len: int = 1,
                 logits: torch.Tensor | None = None, num_logit_rows: int = 0) -> None:
        self.runner = runner
        self.max_model_len = max_model_len
        self.query_len = query_len
        self.sizes = capture_sizes(max_batch_size)
        self.max_batch_size = self.sizes[-1]
        device = runner.device
        self.inputs = DecodeInputs(self.max_batch_size, len(runner.shape.groups),
                                   blocks_for(max_model_len, runner.block_size), device, query_len)
        size, rows = self.max_batch_size, self.max_batch_size * query_len
        self.query_start_loc = torch.arange(0, rows + 1, query_len, dtype=torch.int32, device=device)
        self.logits_indices = torch.arange(rows, dtype=torch.long, device=device)
        # The previous step's sampled ids (async scheduling), gathered by the graph into its input ids.
        self.previous_tokens = torch.zeros(size, dtype=torch.long, device=device)
        # Every graph writes its float32 logits here: a graph's own output would stay allocated for as
        # long as the graph lives (36 graphs up to 512 rows of a 128k vocabulary held 3.3 GiB; this, 0.25).
        self._owns_logits = logits is None
        logit_rows = size * (self.logit_rows_per_sequence or query_len)
        if logits is None:
            logits = torch.empty((max(logit_rows, num_logit_rows), runner.shape.vocab_size), dtype=torch.float32,
                                 device=device)
        if logits.shape[0] < logit_rows:
            raise ValueError(f"a logits buffer of {logits.shape[0]} rows for graphs of up to {logit_rows}")
        self.logits = logits
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None  # the captured graphs' memory pool
        # LoRA: each row's adapter slot (-1: the base model), a graph input like the token ids.
        self.lora_slots = (torch.full((rows,), -1, dtype=torch.int32, device=device)
                           if runner.lora is not None else None)

    def _context(self, batch_size: int) -> PagedForwardContext:
        views = self.inputs.device
        rows = batch_size * self.query_len
        metadata = AttentionMetadata(
            query_start_loc=self.query_start_loc[: batch_size + 1],
            seq_lens=views.seq_lens[:batch_size],
            max_query_len=self.query_len,
            max_seq_len=self.max_model_len,
            block_size=self.runner.block_size,
            groups=[
                GroupAttentionMetadata(table[:batch_size], slots[:rows])
                for table, slots in zip(views.tables, views.slots)
            ],
            query_lens_cpu=[self.query_len] * batch_size,
            seq_lens_cpu=[self.max_model_len] * batch_size,
        )
        return self.runner.forward_context(metadata)

    def _forward(self, batch_size: int) -> torch.Tensor:
        """What each graph holds: the pending-token gather, then the forward over the packed inputs."""
        views = self.inputs.device
        rows = batch_size * self.query_len
        pending = views.pending[:rows]
        gathered = self.previous_tokens.index_select(0, pending.clamp(min=0))
        input_ids = torch.where(pending >= 0, gathered, views.ids[:rows])
        if self.lora_slots is not None:  # rows grouped by adapter inside the graph
            self.runner.lora.set_step(self.lora_slots[:rows])
        return self.runner.forward_logits(input_ids, views.positions[:rows], self._context(batch_size),
                                          self.logits_indices[:rows], out=self.logits[:rows])

    @torch.inference_mode()
    def capture(self, pool=None) -> int:
        """Capture a graph per size (into `pool` if given); returns the device memory they took (pool and
        inputs/outputs). Off CUDA (tests) a "graph" reruns the forward over the same static inputs, so the
        padded layout is checked on a CPU with a backend that reads its metadata from the device tensors."""
        if self.runner.device.type != "cuda":
            for batch_size in self.sizes:
                self._graphs[batch_size] = (_EagerReplay(self, batch_size), self.logits[: batch_size * self.query_len])
            return 0
        self.pool, used = capture_graphs(self.runner.device, self.sizes, self._forward, self._graphs, pool,
                                         self._own_bytes())
        logger.info("captured %d %s graphs (batch sizes %s..%s), %.0f MiB", len(self._graphs),
                    "decode" if self.query_len == 1 else f"verification ({self.query_len} tokens a sequence)",
                    self.sizes[0], self.sizes[-1], used / 2**20)
        return used

    def _own_bytes(self) -> int:
        """The buffers allocated before capture (inputs, the logits when they are ours), counted with the graphs."""
        tensors = (self.inputs.device_buffer, self.query_start_loc, self.logits_indices, self.previous_tokens,
                   *((self.logits,) if self._owns_logits else ()))
        return sum(t.numel() * t.element_size() for t in tensors)

    def can_run(self, step: "StepInput") -> bool:
        if not self._graphs or len(step.query_lens) > self.max_batch_size:
            return False
        longest = max(step.query_lens)
        if self.query_len == 1:
            return longest == 1
        # Padding rows sit at the positions before a sequence's new tokens: its context must hold q of them.
        # Pending tokens (async scheduling) do not occur: a speculative step waits for the step before it.
        return 1 < longest <= self.query_len and min(step.seq_lens) >= self.query_len and \
            not step.pending_input_indices

    def run(self, step: "StepInput", previous_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The step's logits, one row per `step.logits_indices` entry, as an eager step returns them."""
        batch_size = len(step.query_lens)
        padded = next(size for size in self.sizes if size >= batch_size)
        graph, logits = self._graphs[padded]
        # The previous step can have sampled more rows than a graph holds (n > 1 forks): gather outside
        # (fill_pending_tokens, which also refuses pending tokens without previous ones).
        in_graph = previous_tokens is not None and previous_tokens.numel() <= self.max_batch_size
        is_in_order = self.inputs.pack(step, padded, self.runner.block_size, pending_on_device=in_graph)
        if self.lora_slots is not None:  # a sequence's q rows (padding ones too) take its adapter
            upload_lora_slots(self.runner.lora, self.lora_slots, step.lora_names,
                              [self.query_len] * len(step.lora_names), padded * self.query_len)
        feed_pending_tokens(step, previous_tokens, in_graph, self.previous_tokens, self.inputs.device.ids[:batch_size])
        graph.replay()
        num_logits = len(step.logits_indices)
        if is_in_order:
            return logits[:num_logits]
        return logits.index_select(0, self.inputs.device.logits_rows[:num_logits])


def upload_lora_slots(lora, device_slots: torch.Tensor, lora_names, query_lens, num_rows: int) -> None:
    """A graph's adapter slot per packed token (`device_slots[:num_rows]`, a graph input): each sequence's
    `query_lens` rows take its adapter's slot (`lora.token_slots`, loading adapters not on the device), rows past
    them and base-model rows -1. Pinned on a GPU only: off CUDA (the CPU tests' stand-in graphs) there is none."""
    token_slots = lora.token_slots(lora_names, query_lens) if lora_names else None
    slots = torch.full((num_rows,), -1, dtype=torch.int32, pin_memory=device_slots.is_cuda)
    if token_slots is not None:
        slots[:len(token_slots)] = token_slots
    device_slots[:num_rows].copy_(slots, non_blocking=True)


def feed_pending_tokens(step: "StepInput", previous_tokens: torch.Tensor | None, in_graph: bool,
                        graph_previous: torch.Tensor, ids: torch.Tensor) -> None:
    """The step's tokens still on the device (async scheduling): into the graph's copy of the previous step's
    sampled ids (`in_graph`: the graph gathers them), else straight into its input `ids` before the replay."""
    if not step.pending_input_indices:
        return
    if in_graph:
        graph_previous[: previous_tokens.numel()].copy_(previous_tokens)
    else:
        fill_pending_tokens(ids, step, previous_tokens)


def capture_graphs(device: torch.device, sizes: list[int], forward, graphs: dict, pool=None,
                   own_bytes: int = 0) -> tuple[object, int]:
    """Capture `forward(size)` for each size, largest first (the smaller ones reuse its pool), into `graphs`
    as {size: (graph, output)}, in `pool` if given; returns the pool and the device memory the graphs took
    (with `own_bytes`, their buffers allocated before)."""
    free_before = torch.cuda.mem_get_info(device)[0] + own_bytes
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for size in reversed(sizes):
            forward(size)  # warm-up outside the graph (kernel compilation)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                output = forward(size)
            pool = graph.pool()
            graphs[size] = (graph, output)
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    return pool, free_before - torch.cuda.mem_get_info(device)[0]


class _EagerReplay:
    """A graph's stand-in off CUDA: `replay` runs the forward it would have captured."""

    def __init__(self, graphs: "DecodeGraphs | MixedGraphs", size: int) -> None:
        self.graphs, self.size = graphs, size

    @torch.inference_mode()
    def replay(self) -> None:
        self.graphs._forward(self.size)


@dataclass
class _MixedViews:
    """Typed views of a mixed step's packed buffer (host or device): T token rows, S sequence rows."""

    ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    pending: torch.Tensor  # int64 [T]: row of the previous step's sampled ids to take, or -1
    slots: list[torch.Tensor]  # per group, int64 [T]; -1 skips the KV write (padding)
    logits_rows: torch.Tensor  # int64 [S]: the step's logits indices, then row 0
    query_start_loc: torch.Tensor  # int32 [S + 1]
    seq_lens: torch.Tensor  # int32 [S]
    tables: list[torch.Tensor]  # per group, int32 [S, max_blocks]


class MixedInputs:
    """A step with prompt tokens, packed for `MixedGraphs` (one buffer, one copy, as `DecodeInputs`).

    Layout (bytes): int64 ids | positions | pending | slots of each group (`max_tokens` entries each) | logits
    rows (`max_seqs`), then int32 query_start_loc (`max_seqs` + 1) | seq_lens | block table of each group
    ([max_seqs, max_blocks]). A step copies the buffer up to its last used row of the last group's table. A step
    of T tokens and B sequences padded to Tp tokens and Sp sequences: tokens T..Tp-1 are sequence B (positions 0..,
    slots -1, its table row block 0), sequences after it have no tokens (context 0)."""

    def __init__(self, max_tokens: int, max_seqs: int, num_groups: int, max_blocks: int,
                 device: torch.device) -> None:
        self.max_tokens, self.max_seqs, self.num_groups, self.max_blocks = max_tokens, max_seqs, num_groups, max_blocks
        self._int64_len = (3 + num_groups) * max_tokens + max_seqs
        self._int32_len = 2 * max_seqs + 1 + num_groups * max_seqs * max_blocks
        self._upload = _StagedUpload(8 * self._int64_len + 4 * self._int32_len, device)
        self.device_buffer = self._upload.device_buffer
        self.device = self._views(self.device_buffer)
        self._host = [self._numpy(self._views(buffer)) for buffer in self._upload.host_buffers]
        for views in (self.device, *(self._views(buffer) for buffer in self._upload.host_buffers)):
            views.pending.fill_(-1)
            for slots in views.slots:
                slots.fill_(-1)

    def _views(self, buffer: torch.Tensor) -> _MixedViews:
        tokens, seqs, groups = self.max_tokens, self.max_seqs, self.num_groups
        int64 = buffer[: 8 * self._int64_len].view(torch.int64)
        int32 = buffer[8 * self._int64_len:].view(torch.int32)
        slots_end = (3 + groups) * tokens
        return _MixedViews(
            ids=int64[:tokens], positions=int64[tokens: 2 * tokens], pending=int64[2 * tokens: 3 * tokens],
            slots=[int64[(3 + g) * tokens: (4 + g) * tokens] for g in range(groups)],
            logits_rows=int64[slots_end: slots_end + seqs],
            query_start_loc=int32[: seqs + 1], seq_lens=int32[seqs + 1: 2 * seqs + 1],
            tables=list(int32[2 * seqs + 1:].view(groups, seqs, self.max_blocks).unbind(0)),
        )

    @staticmethod
    def _numpy(views: _MixedViews) -> dict:
        return {name: getattr(views, name).numpy()
                for name in ("ids", "positions", "pending", "logits_rows", "query_start_loc", "seq_lens")} | {
            "slots": [t.numpy() for t in views.slots], "tables": [t.numpy() for t in views.tables]}

    def pack(self, step: "StepInput", padded_tokens: int, padded_seqs: int, block_size: int,
             pending_on_device: bool) -> None:
        """Write `step` padded to `padded_tokens` tokens and `padded_seqs` sequences into the host buffer and copy it
        to the device (asynchronously on the current stream). `pending_on_device`: the graph gathers the step's
        pending tokens from the previous sampled ids; else their rows stay -1 (the caller fills them)."""
        half = self._upload.next_half()
        host = self._host[half]
        num_tokens, batch = len(step.token_ids), len(step.query_lens)
        num_padding = padded_tokens - num_tokens
        used_seqs = batch + (1 if num_padding else 0)
        if blocks_for(num_padding, block_size) > self.max_blocks:
            # Its context would run past its table row (on a GPU, into the next row or past the buffer's end).
            raise ValueError(f"{num_padding} padding tokens need {blocks_for(num_padding, block_size)} blocks, more "
                             f"than a table row's {self.max_blocks} (MixedGraphs.can_run refuses such steps)")
        host["ids"][:num_tokens] = step.token_ids
        host["ids"][num_tokens:padded_tokens] = 0
        host["positions"][:num_tokens] = step.positions
        host["positions"][num_tokens:padded_tokens] = np.arange(num_padding)
        host["pending"][:padded_tokens] = -1
        if pending_on_device and step.pending_input_indices:
            host["pending"][step.pending_input_indices] = step.pending_source_rows
        num_logits = len(step.logits_indices)
        host["logits_rows"][:num_logits] = step.logits_indices
        host["logits_rows"][num_logits:padded_seqs] = 0
        starts = host["query_start_loc"]
        starts[0] = 0
        np.cumsum(step.query_lens, out=starts[1: batch + 1])
        starts[batch + 1: padded_seqs + 1] = padded_tokens  # the padding sequence, then empty ones
        host["seq_lens"][:batch] = step.seq_lens
        host["seq_lens"][batch:padded_seqs] = 0
        if num_padding:
            host["seq_lens"][batch] = num_padding
        seq_index = torch.from_numpy(np.repeat(np.arange(batch), step.query_lens))
        positions = torch.as_tensor(step.positions, dtype=torch.long)
        for group, tables in enumerate(step.block_tables):
            _, slots = host_block_table_and_slots(tables, seq_index, positions, block_size, out=host["tables"][group])
            host["slots"][group][:num_tokens] = slots.numpy()
            host["slots"][group][num_tokens:padded_tokens] = -1
            if num_padding:  # the padding sequence reads block 0 (any block: its outputs are not read)
                host["tables"][group][batch, : blocks_for(num_padding, block_size)] = 0
        last_table_start = 8 * self._int64_len + 4 * (2 * self.max_seqs + 1
                                                       + (self.num_groups - 1) * self.max_seqs * self.max_blocks)
        self._upload.send(half, last_table_start + 4 * used_seqs * self.max_blocks)


class MixedGraphs:
    """Graphs of steps with prompt tokens (module docstring): one per token count of `mixed_capture_sizes(max_tokens)`,
    each for up to min(tokens, max_seqs + 1) sequences (the step's, and the padding sequence). `logits`: the float32
    output every graph writes, shared with the decode graphs when it has rows enough."""

    def __init__(self, runner: "ModelRunner", max_tokens: int, max_seqs: int, max_model_len: int,
                 logits: torch.Tensor | None = None) -> None:
        self.runner = runner
        self.max_model_len = max_model_len
        self.sizes = mixed_capture_sizes(max_tokens)
        self.max_tokens = self.sizes[-1]
        self.max_seqs = max_seqs
        device = runner.device
        self.inputs = MixedInputs(self.max_tokens, self.seqs_for(self.max_tokens), len(runner.shape.groups),
                                  blocks_for(max_model_len, runner.block_size), device)
        self.previous_tokens = torch.zeros(max_seqs, dtype=torch.long, device=device)
        rows = self.seqs_for(self.max_tokens)
        self._owns_logits = logits is None or logits.shape[0] < rows
        self.logits = (torch.empty((rows, runner.shape.vocab_size), dtype=torch.float32, device=device)
                       if self._owns_logits else logits)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.lora_slots = (torch.full((self.max_tokens,), -1, dtype=torch.int32, device=device)
                           if runner.lora is not None else None)

    def seqs_for(self, num_tokens: int) -> int:
        """Sequences of the graph of `num_tokens` tokens (`mixed_graph_seqs`)."""
        return mixed_graph_seqs(num_tokens, self.max_seqs)

    def _forward(self, num_tokens: int) -> torch.Tensor:
        views = self.inputs.device
        num_seqs = self.seqs_for(num_tokens)
        pending = views.pending[:num_tokens]
        gathered = self.previous_tokens.index_select(0, pending.clamp(min=0))
        input_ids = torch.where(pending >= 0, gathered, views.ids[:num_tokens])
        if self.lora_slots is not None:
            self.runner.lora.set_step(self.lora_slots[:num_tokens])
        metadata = AttentionMetadata(
            query_start_loc=views.query_start_loc[: num_seqs + 1],
            seq_lens=views.seq_lens[:num_seqs],
            max_query_len=num_tokens,  # a bound (> 1: the kernels' prefill path)
            max_seq_len=self.max_model_len,
            block_size=self.runner.block_size,
            groups=[GroupAttentionMetadata(table[:num_seqs], slots[:num_tokens])
                    for table, slots in zip(views.tables, views.slots)],
            query_lens_cpu=[num_tokens] * num_seqs,
            seq_lens_cpu=[self.max_model_len] * num_seqs,
        )
        context = self.runner.forward_context(metadata)
        return self.runner.forward_logits(input_ids, views.positions[:num_tokens], context,
                                          views.logits_rows[:num_seqs], out=self.logits[:num_seqs])

    @torch.inference_mode()
    def capture(self, pool=None) -> int:
        """As `DecodeGraphs.capture`: a graph per token count, into `pool` if given; the device memory they took."""
        if self.runner.device.type != "cuda":
            for size in self.sizes:
                self._graphs[size] = (_EagerReplay(self, size), self.logits[: self.seqs_for(size)])
            return 0
        own = [self.inputs.device_buffer, self.previous_tokens, *((self.logits,) if self._owns_logits else ())]
        self.pool, used = capture_graphs(self.runner.device, self.sizes, self._forward, self._graphs, pool,
                                         sum(t.numel() * t.element_size() for t in own))
        logger.info("captured %d graphs of steps with prompt tokens (%s..%s tokens), %.0f MiB", len(self._graphs),
                    self.sizes[0], self.sizes[-1], used / 2**20)
        return used

    def can_run(self, step: "StepInput") -> bool:
        """A step with prompt tokens (decode-only steps are the decode graphs') of at most `max_tokens` tokens and
        `max_seqs` sequences, with no more logits rows (a verification's one a position) than its graph has
        sequences, and whose padding is at most `max_model_len` tokens: the padding sequence's context is read
        through one block-table row, as wide as `max_model_len`. Only a model length below the gap between two
        captured sizes (at most 64 tokens) meets that limit; such a step runs eagerly."""
        num_tokens = len(step.token_ids)
        if not self._graphs or num_tokens > self.max_tokens or len(step.query_lens) > self.max_seqs:
            return False
        if max(step.query_lens) <= 1:
            return False
        padded = next(size for size in self.sizes if size >= num_tokens)
        return len(step.logits_indices) <= self.seqs_for(padded) and padded - num_tokens <= self.max_model_len

    def run(self, step: "StepInput", previous_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The step's logits, one row per `step.logits_indices` entry, as an eager step returns them."""
        num_tokens = len(step.token_ids)
        padded = next(size for size in self.sizes if size >= num_tokens)
        graph, logits = self._graphs[padded]
        in_graph = previous_tokens is not None and previous_tokens.numel() <= self.previous_tokens.numel()
        self.inputs.pack(step, padded, self.seqs_for(padded), self.runner.block_size, pending_on_device=in_graph)
        if self.lora_slots is not None:
            upload_lora_slots(self.runner.lora, self.lora_slots, step.lora_names, step.query_lens, padded)
        feed_pending_tokens(step, previous_tokens, in_graph, self.previous_tokens, self.inputs.device.ids[:num_tokens])
        graph.replay()
        return logits[: len(step.logits_indices)]


class GreedyChainGraphs(DecodeGraphs):
    """Greedy continuations in one graph: a catch-up of up to q tokens a sequence (padded as verification pads
    them), its last row's greedy token, then `rounds` decode forwards, each fed the token the one before picked,
    all on the device. A draft model's proposal round (engine/spec/draft.py) is one replay and one wait, where a
    forward each would pay the host's step preparation, the input copy and the launch `rounds + 1` times over.

    Sequence b proposes `wanted[b]` tokens: rounds past its `wanted[b] - 1` neither write its cache (slot -1)
    nor grow its context (they repeat its last valid position), so they touch no block it was not given and
    read no table entry past its blocks; their tokens are not read. Padding sequences want none. `pick` turns
    float32 logits [B, vocab] into ids [B] (the sampler's greedy argmax).
    """

    logit_rows_per_sequence = 1  # each forward keeps its sequences' last rows only

    def __init__(self, runner: "ModelRunner", max_batch_size: int, max_model_len: int, query_len: int, rounds: int,
                 pick, logits: torch.Tensor | None = None) -> None:
        super().__init__(runner, max_batch_size, max_model_len, query_len, logits=logits)
        if runner.lora is not None:
            raise ValueError("greedy chains run without LoRA adapters")
        size, device = self.max_batch_size, runner.device
        self.rounds, self.pick = rounds, pick
        self.last_rows = torch.arange(query_len - 1, size * query_len, query_len, dtype=torch.long, device=device)
        self.decode_query_start_loc = torch.arange(size + 1, dtype=torch.int32, device=device)
        self.decode_logits_indices = torch.arange(size, dtype=torch.long, device=device)
        self.wanted = torch.zeros(size, dtype=torch.long, device=device)
        self._wanted_host = torch.zeros(size, dtype=torch.long, pin_memory=device.type == "cuda")
        self.tokens = torch.zeros((rounds + 1, size), dtype=torch.long, device=device)  # the chain's output
        self._table_width = blocks_for(max_model_len, runner.block_size)

    def _forward(self, batch_size: int) -> torch.Tensor:
        views, q = self.inputs.device, self.query_len
        rows = batch_size * q
        logits = self.runner.forward_logits(views.ids[:rows], views.positions[:rows], self._context(batch_size),
                                            self.last_rows[:batch_size], out=self.logits[:batch_size])
        self.tokens[0, :batch_size].copy_(self.pick(logits))
        context_lens = views.seq_lens[:batch_size].long()  # each sequence's tokens, the catch-up's included
        last_valid = (self.wanted[:batch_size] - 1).clamp(min=0)  # rounds that write a proposal's K/V
        tables = [table[:batch_size] for table in views.tables]
        block_size = self.runner.block_size
        for round_index in range(1, self.rounds + 1):
            steps = last_valid.clamp(max=round_index)
            positions = context_lens + steps - 1  # a valid round feeds its token at context + round - 1
            writes = steps == round_index
            slots = []
            for table in tables:
                blocks = table.gather(1, (positions // block_size).clamp(max=self._table_width - 1)[:, None])[:, 0]
                slots.append(torch.where(writes, blocks.long() * block_size + positions % block_size, -1))
            metadata = AttentionMetadata(
                query_start_loc=self.decode_query_start_loc[: batch_size + 1],
                seq_lens=(positions + 1).to(torch.int32),
                max_query_len=1,
                max_seq_len=self.max_model_len,
                block_size=block_size,
                groups=[GroupAttentionMetadata(table, slot) for table, slot in zip(tables, slots)],
                query_lens_cpu=[1] * batch_size,
                seq_lens_cpu=[self.max_model_len] * batch_size,
            )
            logits = self.runner.forward_logits(self.tokens[round_index - 1, :batch_size], positions,
                                                self.runner.forward_context(metadata),
                                                self.decode_logits_indices[:batch_size], out=self.logits[:batch_size])
            self.tokens[round_index, :batch_size].copy_(self.pick(logits))
        return self.tokens

    def can_run(self, step: "StepInput") -> bool:
        """Any catch-up of 1 to q tokens a sequence whose context holds q tokens (the padding rows sit before
        its new ones), with no token pending on the device."""
        if not self._graphs or len(step.query_lens) > self.max_batch_size or step.pending_input_indices:
            return False
        return max(step.query_lens) <= self.query_len and min(step.seq_lens) >= self.query_len

    def run_chain(self, step: "StepInput", wanted: list[int]) -> torch.Tensor:
        """The chain's tokens [rounds + 1, B] on the device (a view of the graphs' output: read it before the
        next replay); row r of sequence b is its proposal r, meaningful for r < wanted[b]."""
        batch_size = len(step.query_lens)
        padded = next(size for size in self.sizes if size >= batch_size)
        self.inputs.pack(step, padded, self.runner.block_size, pending_on_device=False)
        # One pinned buffer suffices: the caller waits for the tokens before it calls again, so the copy is done.
        self._wanted_host[:batch_size] = torch.tensor(wanted, dtype=torch.long)
        self._wanted_host[batch_size:padded] = 0
        self.wanted[:padded].copy_(self._wanted_host[:padded], non_blocking=True)
        self._graphs[padded][0].replay()
        return self.tokens[:, :batch_size]
