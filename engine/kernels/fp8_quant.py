"""Per-token FP8 quantization of activations in one kernel: each row's largest magnitude, its scale, the
row in e4m3.

The FP8 GEMM (engine/kernels/fp8_linear.py) takes its input quantized per row. In plain PyTorch that is
five passes over the activations (abs, amax, divide, clamp, cast), and torch.compile fuses them only into
two or three kernels that on an H200 took 10-21 us a layer input at 512 rows (a quarter of a decode step's
GEMM time) and, in uncompiled prefill steps, more time than the FP8 GEMMs saved. `quantize_rows_fp8` reads
each row once into registers (rows up to `MAX_ONE_PASS_K` features; longer rows are read twice, the
second time from L2), and writes the e4m3 row and its float32 scale: a read of 2 bytes and a write of 1 per
element, the least the job needs.

It computes what `quantize_rows` (the PyTorch reference, here too) computes, bit for bit: the same float32 scale
(`max(amax / 448, 1e-12)`), an IEEE division and the same round-to-nearest-even saturating cast
(`quantize_e4m3`, which the FP8 KV cache's stores use too: engine/kernels/attention/triton.py). Exposed as the custom op `pagedserve::quantize_rows_fp8`, so
torch.compile treats it as one opaque kernel (as it treats the GEMM after it) and CUDA graphs capture it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch reference quantizes
    triton = None

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
# A row of zeros would get scale 0; any positive floor keeps the division finite and the row zero.
MIN_SCALE = 1e-12
MAX_ONE_PASS_K = 16384  # features a row may have to be read once (Llama-3-8B's down projection: 14336)
ONE_PASS_DEFAULT_K = 8192  # rows up to this many features are read once by default (`default_quant_tiles`)


def quantize_rows(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of `values` ([..., K]) to e4m3 with its own scale: (quantized, float32 scales [..., 1]).
    The reference: plain PyTorch, any device."""
    amax = values.abs().amax(dim=-1, keepdim=True).float()
    # Divided by a tensor on amax's device: on CUDA, torch divides by a Python number as a product with its
    # reciprocal (one bit off at times), which made the GPU's reference scales differ from the CPU's and from
    # the Triton kernel's IEEE division.
    scale = (amax / amax.new_tensor(FP8_MAX)).clamp(min=MIN_SCALE)
    quantized = (values.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return quantized, scale


if triton is not None:

    @triton.jit
    def quantize_e4m3(x, scale, ELEMENT_TY: tl.constexpr):
        """x / scale as e4m3: clamped to +-448 and rounded to nearest even, as torch's cast does.

        The division is IEEE's (`div_rn`; Triton's `/` on float32 is approximate on NVIDIA GPUs, and one
        ulp off changes the rounding of values next to a midpoint), as torch's is. The rounding is done in
        float32 arithmetic (adding and taking away 2^23 times the e4m3 step at x's magnitude: 2^-9 below
        2^-6, where e4m3 is subnormal, else a 3-bit mantissa's step), so the cast that follows is exact
        everywhere: Triton's interpreter converts float32 to fp8 without rounding to even."""
        x = tl.math.div_rn(x.to(tl.float32), scale)
        bits = x.to(tl.int32, bitcast=True)
        magnitude = tl.minimum(tl.abs(x), 448.0)
        exponent = magnitude.to(tl.int32, bitcast=True) >> 23  # biased float32 exponent (the sign bit is clear)
        magic = ((tl.maximum(exponent, 127 - 6) - 3 + 23) << 23).to(tl.float32, bitcast=True)
        rounded = (magnitude + magic) - magic
        signed = rounded.to(tl.int32, bitcast=True) | ((bits >> 31) << 31)  # x's sign, -0.0 included
        return signed.to(tl.float32, bitcast=True).to(ELEMENT_TY)

    @triton.jit
    def row_scale(amax, FP8_MAX_VALUE: tl.constexpr, MIN_SCALE_VALUE: tl.constexpr):
        """A row's float32 scale from its largest magnitude: `max(amax / 448, 1e-12)` by IEEE's division, the rule
        of `quantize_rows` (every row quantization kernel takes it from here)."""
        return tl.maximum(tl.math.div_rn(amax, FP8_MAX_VALUE), MIN_SCALE_VALUE)

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, K, stride_xm, stride_qm,
                              FP8_MAX_VALUE: tl.constexpr, MIN_SCALE_VALUE: tl.constexpr,
                              BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_xm
        q_row = q_ptr + row * stride_qm
        cols = tl.arange(0, BLOCK_K)
        if ONE_PASS:
            valid = cols < K
            x = tl.load(x_row + cols, mask=valid, other=0.0).to(tl.float32)
            scale = row_scale(tl.max(tl.abs(x), axis=0), FP8_MAX_VALUE, MIN_SCALE_VALUE)
            tl.store(q_row + cols, quantize_e4m3(x, scale, q_ptr.dtype.element_ty), mask=valid)
        else:
            amax = tl.zeros([BLOCK_K], dtype=tl.float32)
            for start in range(0, K, BLOCK_K):
                valid = start + cols < K
                amax = tl.maximum(amax, tl.abs(tl.load(x_row + start + cols, mask=valid, other=0.0).to(tl.float32)))
            scale = row_scale(tl.max(amax, axis=0), FP8_MAX_VALUE, MIN_SCALE_VALUE)
            for start in range(0, K, BLOCK_K):
                valid = start + cols < K
                x = tl.load(x_row + start + cols, mask=valid, other=0.0).to(tl.float32)
                tl.store(q_row + start + cols, quantize_e4m3(x, scale, q_ptr.dtype.element_ty), mask=valid)
        tl.store(scale_ptr + row, scale)


@dataclass(frozen=True)
class QuantTiles:
    """How `_quantize_rows_kernel` reads a row: whole in one block (`block_k` None: the next power of two of the
    row, read once) or in blocks of `block_k` (read twice: once for the largest magnitude, once to quantize,
    the second time from L2), by `num_warps` warps (None: a warp per 1,024 elements of the block, 1 to 16)."""

    block_k: int | None = None
    num_warps: int | None = None


def default_quant_tiles(num_features: int) -> QuantTiles:
    """One pass up to `ONE_PASS_DEFAULT_K` features; wider rows in two passes over blocks of 2,048 by 16 warps. On
    an H100 (`bench/fp8_gemm_bench.py --quant-sweep`) one pass was the fastest at 4,096 features, and at 14,336 (an
    8B MLP's down projection) the blocks of 2,048 took 50.4 us instead of 57.0 at 2,048 rows and 155.9 instead of
    192.0 at 8,192: a whole row in registers leaves a program too few rows in flight to cover the reads."""
    return QuantTiles() if num_features <= ONE_PASS_DEFAULT_K else QuantTiles(block_k=2048, num_warps=16)


@dataclass(frozen=True)
class RowLaunch:
    """How a one-program-per-row quantization kernel reads its rows: whole (`one_pass`, a block of the row's next
    power of two) or in blocks of `block_k`, by `num_warps` warps."""

    one_pass: bool
    block_k: int
    num_warps: int


def row_launch(num_features: int, tiles: QuantTiles | None = None) -> RowLaunch:
    """`tiles` (None: the default for the width) resolved for rows of `num_features` (needs Triton)."""
    tiles = tiles or default_quant_tiles(num_features)
    one_pass = tiles.block_k is None
    if one_pass and num_features > MAX_ONE_PASS_K:
        raise ValueError(f"a row of {num_features} features is over MAX_ONE_PASS_K ({MAX_ONE_PASS_K}) for one pass")
    block_k = triton.next_power_of_2(num_features) if one_pass else tiles.block_k
    return RowLaunch(one_pass, block_k, tiles.num_warps or max(1, min(16, block_k // 1024)))


def empty_quantized(num_rows: int, num_features: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs a row quantization kernel fills: e4m3 rows and their float32 scales ([M, 1])."""
    return (torch.empty((num_rows, num_features), dtype=FP8_DTYPE, device=device),
            torch.empty((num_rows, 1), dtype=torch.float32, device=device))


def quantize_rows_triton(x: torch.Tensor, tiles: QuantTiles | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows` of a 2-D x (contiguous rows) by one Triton program per row (`tiles`: how; None, the
    default for its width)."""
    num_rows, num_features = x.shape
    quantized, scales = empty_quantized(num_rows, num_features, x.device)
    if num_rows == 0:
        return quantized, scales
    launch = row_launch(num_features, tiles)
    _quantize_rows_kernel[(num_rows,)](
        x, quantized, scales, num_features, x.stride(0), quantized.stride(0),
        FP8_MAX_VALUE=FP8_MAX, MIN_SCALE_VALUE=MIN_SCALE, BLOCK_K=launch.block_k, ONE_PASS=launch.one_pass,
        num_warps=launch.num_warps,
    )
    return quantized, scales


@torch.library.custom_op("pagedserve::quantize_rows_fp8", mutates_args=())
def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of a 2-D x to e4m3 with its own float32 scale ([M, 1]): the Triton kernel on a GPU, the
    PyTorch reference elsewhere (same values)."""
    if triton is None or not x.is_cuda:
        return quantize_rows(x)
    return quantize_rows_triton(x if x.stride(1) == 1 else x.contiguous())


@quantize_rows_fp8.register_fake
def _(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape, dtype=FP8_DTYPE), x.new_empty((x.shape[0], 1), dtype=torch.float32)
