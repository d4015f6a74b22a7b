"""The low-rank update of LoRA adapters over a batch whose rows use different adapters (or none).

A step's rows may belong to several adapters and to the base model. The base GEMM runs once over all rows
(the model's own linear layer); this module adds, to each row whose token uses adapter slot `s`,
`scale_s * (x @ A_s.T) @ B_s.T`, in two grouped passes in the spirit of Punica's SGMV and S-LoRA:

- shrink: `inter[t] = x[t] @ A[slot(t)].T` for every adapter row t (float32, [T, S * R]; with few rows, K is
  split over programs and their partial sums added: `shrink_splits`);
- expand: `out[t, slice j] += inter[t, j*R:(j+1)*R] @ B[slot(t), slice j].T`.

A layer may be a fused projection (q/k/v, gate/up: engine/kernels/fused_projections.py): its `S` slices
share one input, so their A matrices are stacked ([S * R, K], one shrink) and each output slice reads its
own R columns of `inter` (one expand over every slice). Ranks below R are zero-padded, so one R serves
every adapter; the scale is folded into B when an adapter is loaded into a slot.

Rows are grouped by adapter without the host: `LoraStepIndex.build` sorts the token indices by slot on the
device (base rows first), counts each slot's rows and where its segment starts, and cuts each segment into
row tiles of `lora_block_m(T)` rows: a table of (slot, first row) per tile, whose length, cdiv(T, BLOCK_M) +
slots, bounds the tiles any grouping needs. The Triton kernels take a program per (tile, column tile); a
tile past the table's used part returns at once. (A grid per (row tile, column tile, slot) instead left all
but one program in `slots` idle: at a 512-row step over 8 slots, 7 of 8 of the expand's 28,672 programs
for a gate/up projection did nothing but start and return.) Grids depend only on the number of rows and slots,
and every per-step value is in a device tensor, so a decode step with adapters can be captured in a CUDA
graph: the slot ids per row are the graph's input.

The PyTorch reference (`lora_add_reference`) computes the same per slot with index_select and an indexed add:
CPU, and the oracle the kernels must match (tests run them under TRITON_INTERPRET=1). `lora_add` is a
custom op (`pagedserve::lora_add`, mutating `out`) so that torch.compile sees one opaque call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference runs
    triton = None


@dataclass
class LoraStepIndex:
    """One step's rows grouped by adapter slot, all on the device.

    `token_slots` [T] int32: the slot of each packed token, -1 for the base model. `sorted_ids` [T] int32:
    token indices sorted by slot (stable; the base rows first), `slot_counts` [L] int32: rows per slot,
    `slot_starts` [L] int32: where each slot's rows begin in `sorted_ids`. `tile_slots` [cdiv(T, BLOCK_M) + L]
    int32: the slot of each row tile of BLOCK_M = `lora_block_m(T)` rows (slot by slot, -1 past the last),
    `tile_rows` [same] int32: the tile's first row within its slot's segment."""

    token_slots: torch.Tensor
    sorted_ids: torch.Tensor
    slot_counts: torch.Tensor
    slot_starts: torch.Tensor
    tile_slots: torch.Tensor
    tile_rows: torch.Tensor

    @classmethod
    def build(cls, token_slots: torch.Tensor, num_slots: int) -> "LoraStepIndex":
        """Device ops only (no host sync), so a CUDA graph may hold them."""
        token_slots = token_slots.to(torch.int32)
        sorted_ids = torch.argsort(token_slots, stable=True).to(torch.int32)
        is_adapter = token_slots >= 0
        counts = torch.zeros(num_slots, dtype=torch.int32, device=token_slots.device)
        counts.scatter_add_(0, token_slots.clamp(min=0).long(), is_adapter.to(torch.int32))
        num_base = (~is_adapter).sum().to(torch.int32)
        starts = (torch.cumsum(counts, 0, dtype=torch.int32) - counts + num_base).to(torch.int32)
        block_m = lora_block_m(token_slots.numel())
        tiles = (counts.long() + block_m - 1) // block_m
        tile_ends = torch.cumsum(tiles, 0)
        tile = torch.arange(-(-token_slots.numel() // block_m) + num_slots, device=token_slots.device)
        tile_slot = torch.searchsorted(tile_ends, tile, right=True)
        used = tile_slot < num_slots
        slot = tile_slot.clamp(max=num_slots - 1)
        tile_rows = ((tile - (tile_ends[slot] - tiles[slot])) * block_m).to(torch.int32)
        tile_slots = torch.where(used, slot, -1).to(torch.int32)
        # The row count changes every step: compiled layers that read these take it as a dynamic size from the
        # first graph on, rather than compiling a static graph and then recompiling.
        for tensor in (token_slots, sorted_ids, tile_slots, tile_rows):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return cls(token_slots, sorted_ids, counts, starts, tile_slots, tile_rows)


def slot_segments(token_slots: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(slot, row indices) of every slot with rows (host work: the reference's grouping, once per step)."""
    return [(slot, (token_slots == slot).nonzero().squeeze(1)) for slot in torch.unique(token_slots).tolist()
            if slot >= 0]


def lora_add_reference(x: torch.Tensor, out: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                       segments: list[tuple[int, torch.Tensor]], slice_sizes: list[int], rank: int) -> None:
    """`out[t] += delta of slot(t)` in place, plain PyTorch over `segments` (`slot_segments`).

    x [T, K]; out [T, N]; lora_a [L, S*R, K]; lora_b [L, N, R] (scale folded in); N = sum(slice_sizes)."""
    for slot, rows in segments:
        inter = x.index_select(0, rows).float() @ lora_a[slot].float().T  # [n, S*R]
        parts = []
        start = 0
        for index, size in enumerate(slice_sizes):
            b = lora_b[slot, start : start + size].float()  # [size, R]
            parts.append(inter[:, index * rank : (index + 1) * rank] @ b.T)
            start += size
        # A row is in one segment only, so a gather-add-scatter is exact; CPU's index_add_ splits even a few rows
        # over its threads, which stall on every call beside another busy process (a tensor-parallel rank).
        out[rows] += torch.cat(parts, dim=1).to(out.dtype)


if triton is not None:

    # Triton compiles a variant per pattern of a kernel's integer arguments (equal to 1, a multiple of 16); the
    # split of K and the partial sums' stride change with the step's row count, so a step of a new pattern would
    # compile (about a second) inside it. Left unspecialized, the variants are the row tiles (BLOCK_M) alone.
    @triton.jit(do_not_specialize=["k_per_split", "stride_is"])
    def _lora_shrink_kernel(
        x_ptr, a_ptr, inter_ptr, sorted_ids_ptr, counts_ptr, starts_ptr, tile_slots_ptr, tile_rows_ptr,
        K, N, num_col_tiles, k_per_split,
        stride_xm, stride_al, stride_an, stride_is, stride_im,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
    ):
        tile = tl.program_id(0)
        pid_sn = tl.program_id(1)  # split * num_col_tiles + column tile
        slot = tl.load(tile_slots_ptr + tile)
        if slot < 0:
            return
        pid_n = pid_sn % num_col_tiles
        split = pid_sn // num_col_tiles
        count = tl.load(counts_ptr + slot)
        start = tl.load(starts_ptr + slot)
        offsets = tl.load(tile_rows_ptr + tile) + tl.arange(0, BLOCK_M)
        row_valid = offsets < count
        rows = tl.load(sorted_ids_ptr + start + offsets, mask=row_valid, other=0).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_valid = cols < N
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        a_base = a_ptr + slot.to(tl.int64) * stride_al
        k_first = split * k_per_split
        for k_start in range(k_first, tl.minimum(k_first + k_per_split, K), BLOCK_K):
            k_valid = (k_start + ks) < K
            x = tl.load(x_ptr + rows[:, None] * stride_xm + (k_start + ks)[None, :],
                        mask=row_valid[:, None] & k_valid[None, :], other=0.0)
            a = tl.load(a_base + cols[:, None] * stride_an + (k_start + ks)[None, :],
                        mask=col_valid[:, None] & k_valid[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(x, tl.trans(a), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(a))
        tl.store(inter_ptr + split.to(tl.int64) * stride_is + rows[:, None] * stride_im + cols[None, :], acc,
                 mask=row_valid[:, None] & col_valid[None, :])

    @triton.jit(do_not_specialize=["num_splits", "stride_is"])
    def _lora_expand_kernel(
        inter_ptr, b_ptr, out_ptr, sorted_ids_ptr, counts_ptr, starts_ptr, tile_slots_ptr, tile_rows_ptr,
        slice_starts_ptr, R, num_col_tiles, num_splits,
        stride_is, stride_im, stride_bl, stride_bn, stride_om,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
    ):
        tile = tl.program_id(0)
        pid_sn = tl.program_id(1)  # slice * num_col_tiles + column tile within the slice
        slot = tl.load(tile_slots_ptr + tile)
        if slot < 0:
            return
        count = tl.load(counts_ptr + slot)
        slice_index = pid_sn // num_col_tiles
        col_tile = pid_sn % num_col_tiles
        slice_start = tl.load(slice_starts_ptr + slice_index)
        slice_end = tl.load(slice_starts_ptr + slice_index + 1)
        if col_tile * BLOCK_N >= slice_end - slice_start:
            return
        start = tl.load(starts_ptr + slot)
        offsets = tl.load(tile_rows_ptr + tile) + tl.arange(0, BLOCK_M)
        row_valid = offsets < count
        rows = tl.load(sorted_ids_ptr + start + offsets, mask=row_valid, other=0).to(tl.int64)
        cols = slice_start + col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_valid = cols < slice_end
        rs = tl.arange(0, BLOCK_R)
        r_valid = rs < R
        # The shrink's partial sums over K (one, or the few rows' splits, added here in a fixed order).
        inter_ptrs = inter_ptr + rows[:, None] * stride_im + (slice_index * R + rs)[None, :]
        inter_mask = row_valid[:, None] & r_valid[None, :]
        inter = tl.load(inter_ptrs, mask=inter_mask, other=0.0)
        for split in range(1, num_splits):
            inter += tl.load(inter_ptrs + split * stride_is, mask=inter_mask, other=0.0)
        b = tl.load(b_ptr + slot.to(tl.int64) * stride_bl + cols[:, None] * stride_bn + rs[None, :],
                    mask=col_valid[:, None] & r_valid[None, :], other=0.0)
        if IEEE:
            delta = tl.dot(inter, tl.trans(b.to(tl.float32)), input_precision="ieee")
        else:
            delta = tl.dot(inter.to(b.dtype), tl.trans(b))
        out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
        mask = row_valid[:, None] & col_valid[None, :]
        previous = tl.load(out_ptrs, mask=mask, other=0.0)
        tl.store(out_ptrs, (previous.to(tl.float32) + delta).to(out_ptr.dtype.element_ty), mask=mask)


def lora_block_m(num_rows: int) -> int:
    """Rows a tile, by the step's row count (the index's tile table and the kernels agree on it)."""
    return 16 if num_rows <= 16 else 32 if num_rows <= 256 else 64


SHRINK_PROGRAMS = 256  # the shrink's working programs to aim for (about two an SM on an H100/H200)
EXPAND_SUMS_MAX_BLOCK_M = 16  # tiles of at most this many rows add the shrink's splits in the expand
MAX_SHRINK_SPLITS = 32


def shrink_splits(tiles: int, in_features: int, block_k: int) -> tuple[int, int]:
    """(splits, inputs a split) of the shrink's reduction over K for `tiles` (row tile, column tile) pairs.

    The shrink's output is only S * R columns wide, so a few rows make one or two tiles: one program would walk
    all of K alone (224 sequential tiles for the 8B shape's down projection, 128 such shrinks a 32-layer step:
    a batch-1 step under an adapter took twice the base's, docs/lora.md). Few tiles split K into up to 32 ranges whose
    float32 partial sums are added afterwards, in a fixed order (a deterministic result, unlike atomics). A
    long prompt has tiles enough: one split."""
    k_tiles = -(-in_features // block_k)
    splits = max(1, min(MAX_SHRINK_SPLITS, SHRINK_PROGRAMS // max(1, tiles), k_tiles))
    k_per_split = -(-k_tiles // splits) * block_k
    return -(-in_features // k_per_split), k_per_split


def lora_add_triton(x: torch.Tensor, out: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    index: LoraStepIndex, slice_starts: torch.Tensor, max_slice_size: int, rank: int) -> None:
    """The two grouped passes (shapes as `lora_add_reference`; `slice_starts` int32 [S+1] on the device)."""
    num_rows, in_features = x.shape
    if num_rows == 0:
        return
    stacked_rank = lora_a.shape[1]
    ieee = x.dtype == torch.float32
    block_m = lora_block_m(index.token_slots.numel())  # the tile table's
    num_tiles = index.tile_slots.numel()
    block_n = min(64, max(16, triton.next_power_of_2(stacked_rank)))
    block_k = 64 if in_features >= 64 else 32
    col_tiles = triton.cdiv(stacked_rank, block_n)
    splits, k_per_split = shrink_splits(triton.cdiv(num_rows, block_m) * col_tiles, in_features, block_k)
    partial = torch.empty((splits, num_rows, stacked_rank), dtype=torch.float32, device=x.device)
    _lora_shrink_kernel[(num_tiles, col_tiles * splits)](
        x, lora_a, partial, index.sorted_ids, index.slot_counts, index.slot_starts, index.tile_slots, index.tile_rows,
        in_features, stacked_rank, col_tiles, k_per_split,
        x.stride(0), lora_a.stride(0), lora_a.stride(1), partial.stride(0), partial.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=ieee,
    )
    # A tile of few rows reads its rows' splits in the expand (a launch fewer at batch 1, where launches are the
    # cost); more rows sum them first, once, rather than in every column tile of the expand. Base rows' entries
    # are never written (garbage, summed too), and never read by the expand.
    if splits > 1 and block_m > EXPAND_SUMS_MAX_BLOCK_M:
        partial, splits = partial.sum(dim=0, keepdim=True), 1
    num_slices = slice_starts.numel() - 1
    block_n = 64
    num_col_tiles = triton.cdiv(max_slice_size, block_n)
    _lora_expand_kernel[(num_tiles, num_slices * num_col_tiles)](
        partial, lora_b, out, index.sorted_ids, index.slot_counts, index.slot_starts, index.tile_slots, index.tile_rows,
        slice_starts,
        rank, num_col_tiles, splits,
        partial.stride(0), partial.stride(1), lora_b.stride(0), lora_b.stride(1), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=max(16, triton.next_power_of_2(rank)), IEEE=ieee,
    )


def uses_triton(x: torch.Tensor) -> bool:
    """The kernels run on CUDA tensors with Triton installed (tests run them on CPU under the interpreter)."""
    return triton is not None and x.is_cuda


@torch.library.custom_op("pagedserve::lora_add", mutates_args=("out",))
def lora_add(x: torch.Tensor, out: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
             token_slots: torch.Tensor, sorted_ids: torch.Tensor, slot_counts: torch.Tensor,
             slot_starts: torch.Tensor, tile_slots: torch.Tensor, tile_rows: torch.Tensor, slice_starts: torch.Tensor,
             slice_sizes: list[int], rank: int) -> None:
    """`out += ` each adapter row's low-rank update (x [T, K], out [T, N]): the Triton kernels (CUDA), else
    the reference. Inference only. (Layers on CPU call the reference directly, with the step's grouping.)"""
    if uses_triton(x):
        index = LoraStepIndex(token_slots, sorted_ids, slot_counts, slot_starts, tile_slots, tile_rows)
        lora_add_triton(x, out, lora_a, lora_b, index, slice_starts, max(slice_sizes), rank)
    else:
        lora_add_reference(x, out, lora_a, lora_b, slot_segments(token_slots), slice_sizes, rank)


@lora_add.register_fake
def _(x: torch.Tensor, out: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor,
      sorted_ids: torch.Tensor, slot_counts: torch.Tensor, slot_starts: torch.Tensor, tile_slots: torch.Tensor,
      tile_rows: torch.Tensor, slice_starts: torch.Tensor, slice_sizes: list[int], rank: int) -> None:
    return None
