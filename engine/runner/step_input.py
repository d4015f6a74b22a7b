"""`StepInput`: one step's batch as plain lists, and turning it into device tensors.

Plain lists so that a tensor-parallel group receives the same object on every rank in one broadcast; the
runner and the CUDA-graph path both build their tensors from it with the helpers here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from pagedserve.cache.allocators import BlockCopy
from pagedserve.cache.blocks import blocks_for


@dataclass
class StepInput:
    """One step's batch as plain data: broadcastable to every rank of a TP group."""

    token_ids: list[int]
    positions: list[int]
    query_lens: list[int]
    seq_lens: list[int]  # context length after this step, per sequence
    block_tables: list[list[list[int]]]  # [group][sequence] -> block ids (released entries as 0)
    logits_indices: list[int]  # packed-token index of each sampled position
    block_copies: list[BlockCopy] = field(default_factory=list)
    # Tokens still on the device under async scheduling: packed index i takes row pending_source_rows[k]
    # of the previous step's sampled ids (passed to `execute`) for i = pending_input_indices[k].
    pending_input_indices: list[int] = field(default_factory=list)
    pending_source_rows: list[int] = field(default_factory=list)
    # LoRA: the adapter of each sequence (None: the base model); empty when no sequence of the step has one.
    lora_names: list[str | None] = field(default_factory=list)

    @classmethod
    def empty(cls, num_groups: int, block_copies: list[BlockCopy] | None = None) -> StepInput:
        """A step of no sequences yet, for `add_sequence` to fill: one table list per KV group."""
        return cls([], [], [], [], [[] for _ in range(num_groups)], [], [] if block_copies is None else block_copies)

    def add_sequence(self, tokens: list[int], start: int, block_tables: list[list[int | None]],
                     logits: Literal["none", "last", "all"] = "last", has_released: bool = False) -> None:
        """Append one sequence: `tokens` at positions start.., so its context after the step is start +
        len(tokens), and its table per KV group. `logits`: which of its positions are sampled: none (a prompt
        chunk short of the end), the last, or all (a verification: each position scores the proposal after
        it). `has_released`: the tables may hold None (a block released behind a sliding window), sent as 0;
        without it they go as they are, shared with the cache, so the caller must not change them meanwhile."""
        # Called for every sequence of every step, so kept lean: a decode (one token) appends its position
        # rather than build a range, and a single KV group (the usual model) skips the loop over groups.
        token_ids = self.token_ids
        token_ids.extend(tokens)
        count = len(tokens)
        if count == 1:
            self.positions.append(start)
        else:
            self.positions.extend(range(start, start + count))
        self.query_lens.append(count)
        self.seq_lens.append(start + count)
        if logits == "last":
            self.logits_indices.append(len(token_ids) - 1)
        elif logits == "all":
            end = len(token_ids)
            self.logits_indices.extend(range(end - count, end))
        groups = self.block_tables
        if has_released:
            for group, table in enumerate(block_tables):
                groups[group].append([0 if block is None else block for block in table])
        elif len(block_tables) == 1:
            groups[0].append(block_tables[0])
        else:
            for group, table in enumerate(block_tables):
                groups[group].append(table)


def to_device(values: list[int] | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list or tensor on `device` without stalling the host: through pinned memory on a GPU
    (a copy from pageable memory would wait for every kernel already queued)."""
    if device.type != "cuda":
        return values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if isinstance(values, torch.Tensor):
        return values.to(dtype).pin_memory().to(device, non_blocking=True)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def fill_pending_tokens(input_ids: torch.Tensor, step: StepInput, previous_tokens: torch.Tensor | None) -> None:
    """Write the tokens the previous step sampled on the device into this step's input ids, in place."""
    if not step.pending_input_indices:
        return
    if previous_tokens is None:
        raise ValueError("the step has tokens pending on the device but no previous sampled tokens were given")
    device = input_ids.device
    index = to_device(step.pending_input_indices, torch.long, device)
    rows = to_device(step.pending_source_rows, torch.long, device)
    input_ids.index_copy_(0, index, previous_tokens.index_select(0, rows))


def host_block_table_and_slots(
    tables: list[list[int]], seq_index: torch.Tensor, positions: torch.Tensor, block_size: int,
    out: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block tables as one padded host tensor [B, width] (int32), and the cache slot (int64) of each new
    token, the one at `positions[t]` of sequence `seq_index[t]`. `out` (int32, at least [B, width]): write
    the rows there instead of into a new zeroed array (entries past a row's blocks keep what they held)."""
    width = max(len(t) for t in tables)
    # Row by row into one numpy array: several times faster than torch.tensor of (padded) lists.
    array = np.zeros((len(tables), width), dtype=np.int32) if out is None else out[: len(tables)]
    for row, t in enumerate(tables):
        array[row, : len(t)] = t
    table = torch.from_numpy(array)
    blocks = table[seq_index, positions // block_size].long()
    return table, blocks * block_size + positions % block_size


def warm_up_steps(block_size: int, num_groups: int, num_blocks: int, max_model_len: int,
                  max_batch_tokens: int, lora_name: str | None = None) -> list[StepInput]:
    """A few small steps of the shapes serving meets first: an odd-length prefill, a mixed batch (one
    decode row, one prompt chunk after a cached prefix), eager decodes of 3 and of 1 sequence.

    Run once at start-up, they move lazy work out of the first requests: torch.compile traces a new
    shape and then recompiles with dynamic sizes, Triton compiles each specialisation of its kernels
    (an odd length, a length of 1), CUDA loads kernel modules on first use. They write to blocks no
    request holds yet. Empty when the cache or the limits are too small for them. With `lora_name` (LoRA on),
    the same steps again with the first sequence under that adapter: the layers' graphs with adapter rows
    differ from those without.
    """
    prompt_len, chunk_start = 33, 16
    blocks_per_seq = blocks_for(prompt_len + 2, block_size)
    if num_blocks < 3 * blocks_per_seq or max_model_len < prompt_len + 2 or max_batch_tokens < prompt_len + 1:
        return []
    tables = [[list(range(s * blocks_per_seq, (s + 1) * blocks_per_seq)) for s in range(3)] for _ in range(num_groups)]

    def step(rows: list[tuple[int, int, int]], lora: str | None) -> StepInput:
        """rows: (sequence, first position, new tokens); sequence 0 under adapter `lora`."""
        step_input = StepInput.empty(num_groups)
        for sequence, start, count in rows:
            step_input.add_sequence([(7 * p + 1) % 50 for p in range(start, start + count)], start,
                                    [group[sequence] for group in tables])
        if lora is not None:
            step_input.lora_names = [lora if sequence == 0 else None for sequence, _, _ in rows]
        return step_input

    shapes = [
        [(0, 0, prompt_len)],
        [(0, prompt_len, 1), (1, chunk_start, prompt_len - chunk_start)],
        [(0, prompt_len + 1, 1), (1, prompt_len, 1), (2, 0, 1)],
        [(1, prompt_len + 1, 1)],
    ]
    steps = [step(rows, None) for rows in shapes]
    if lora_name is not None:  # the last shape has no sequence 0: no adapter row to warm
        steps += [step(rows, lora_name) for rows in shapes[:-1]]
    return steps
