"""A gated MLP's activation and the down projection's input quantization in one kernel: SiLU(gate) * up, each
row's largest magnitude, the row in e4m3 and its float32 scale.

Unfused, an FP8 MLP (engine/kernels/fp8_mlp.py) writes SiLU(gate) * up as a [M, I] tensor in the activation
dtype (reading gate and up: 4 bytes a feature, writing 2) and `quantize_rows_fp8` reads it back (2 bytes) to
write the e4m3 row (1) and a scale. `silu_mul_quantize_fp8` reads gate and up (4 bytes a feature) and writes
only the e4m3 row and its scale: the [M, I] round trip through memory is gone. It reads a row as the quantization
kernel does (`QuantTiles`, by default `default_quant_tiles`: short rows once into registers, wide ones twice over
blocks, the second time from L2, computing the product again); `bench/fp8_gemm_bench.py --mlp-fusion` also times
one pass, which keeps the product's arithmetic to once a value.

It computes what the unfused path computes, bit for bit, in one of two ways (`inductor`), because the unfused
product itself differs between eager PyTorch and torch.compile:

- eager (`inductor=False`): `F.silu(gate) * up` as PyTorch's kernels compute it: SiLU as `g / (1 + exp(-g))`
  in float32 (an IEEE division and the accurate `expf`, libdevice's on a GPU: what PyTorch's CUDA kernel
  calls), rounded to the activation dtype, then the product in float32 (exact: two 8- or 11-bit mantissas),
  rounded again;
- Inductor (`inductor=True`): what torch.compile's kernel of the same expression computes inside a compiled
  decoder layer: `g / (exp(-g) + 1)` with libdevice's `expf` and Triton's float32 division (not IEEE's),
  multiplied by up in float32 and rounded once, at the store: Inductor keeps fused intermediates in float32
  (unless `emulate_precision_casts` is set), so SiLU is not rounded on its own. On an H100 this is 1 value
  in 57 of the bf16 products (every bf16 gate value times random up values) apart from eager's. It is
  Inductor's code generation, which can change with torch: engine/kernels/fp8_mlp.py checks it against
  Inductor's own kernel before using it.

Then `quantize_rows`' rule on the rounded values: the same float32 scale (`max(amax / 448, 1e-12)`), IEEE
division and round-to-nearest-even saturating cast (`quantize_e4m3`, engine/kernels/fp8_quant.py). The rounding
to the activation dtype is done in float32 bit arithmetic (`_round_to`): Triton's interpreter casts float32 to
bfloat16 without rounding to even.

Exposed as the custom op `pagedserve::silu_mul_quantize_fp8`, opaque to torch.compile (as `quantize_rows_fp8`
is) and captured by CUDA graphs. Off a GPU it runs the PyTorch reference, `silu_mul_quantize_reference`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedserve.engine.kernels.fp8_quant import (
    FP8_DTYPE,
    FP8_MAX,
    MIN_SCALE,
    QuantTiles,
    empty_quantized,
    quantize_rows,
    row_launch,
)

try:
    import triton
    import triton.language as tl

    from pagedserve.engine.kernels.fp8_quant import quantize_e4m3, row_scale
except ImportError:  # CPU-only installs: the PyTorch reference runs
    triton = None

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor, inductor: bool = False) -> torch.Tensor:
    """SiLU(gate) * up in gate's dtype as the unfused MLP computes it: eagerly (`F.silu(gate) * up`), or as
    Inductor's fused kernel does (`inductor`: float32 throughout, one rounding at the end)."""
    if not inductor:
        return F.silu(gate) * up
    gate32 = gate.float()
    return (gate32 / (torch.exp(-gate32) + 1) * up.float()).to(gate.dtype)


def silu_mul_quantize_reference(gate: torch.Tensor, up: torch.Tensor,
                                inductor: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows(silu_mul_reference(gate, up, inductor))`: the unfused path, in plain PyTorch."""
    return quantize_rows(silu_mul_reference(gate, up, inductor))


if triton is not None:
    try:
        from triton.language.extra import libdevice
    except ImportError:  # older Tritons keep it under the CUDA extras
        from triton.language.extra.cuda import libdevice

    @triton.jit
    def _round_to(x, ACT_TY: tl.constexpr):
        """float32 x rounded to nearest even in ACT_TY, returned as float32 (exact in ACT_TY)."""
        if ACT_TY == tl.bfloat16:
            # bfloat16 is float32's top half: add half an ulp of it (less one, plus the kept lowest bit: ties to
            # even) and clear the bottom half. A carry into the exponent is the rounding up to the next binade or
            # to infinity, as the cast does.
            bits = x.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            return bits.to(tl.float32, bitcast=True)
        elif ACT_TY == tl.float16:
            return x.to(tl.float16).to(tl.float32)  # the interpreter's float16 cast rounds to even, as the GPU's
        else:
            return x

    @triton.jit
    def _widen(x):
        """x as float32. bfloat16 by its bits (float32's top half): exact for subnormals too, which Triton's
        interpreter converts wrongly."""
        if x.dtype == tl.bfloat16:
            return (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
        return x.to(tl.float32)

    @triton.jit
    def _narrow(x, ACT_TY: tl.constexpr):
        """float32 x, already exact in ACT_TY, as ACT_TY (bfloat16 by its bits, as `_widen`)."""
        if ACT_TY == tl.bfloat16:
            return (x.to(tl.int32, bitcast=True) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
        return x.to(ACT_TY)

    @triton.jit
    def _silu_mul(gate, up, ACT_TY: tl.constexpr, INDUCTOR: tl.constexpr, LIBDEVICE_EXP: tl.constexpr):
        """SiLU(gate) * up rounded to ACT_TY as float32 (see the module docstring for the two ways)."""
        g = _widen(gate)
        u = _widen(up)
        if LIBDEVICE_EXP:  # expf, as PyTorch's CUDA kernel and Inductor's kernels call it
            e = libdevice.exp(-g)
        else:  # the interpreter has no libdevice (its exp is numpy's)
            e = tl.exp(-g)
        if INDUCTOR:  # Inductor's code, operation for operation: Triton's division, float32 up to the store
            return _round_to(g / (e + 1.0) * u, ACT_TY)
        act = _round_to(tl.math.div_rn(g, 1.0 + e), ACT_TY)
        return _round_to(act * u, ACT_TY)

    @triton.jit
    def _silu_mul_quantize_kernel(gate_ptr, up_ptr, q_ptr, scale_ptr, K, stride_gm, stride_um, stride_qm,
                                  FP8_MAX_VALUE: tl.constexpr, MIN_SCALE_VALUE: tl.constexpr,
                                  BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr, INDUCTOR: tl.constexpr,
                                  LIBDEVICE_EXP: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        gate_row = gate_ptr + row * stride_gm
        up_row = up_ptr + row * stride_um
        q_row = q_ptr + row * stride_qm
        act_ty = gate_ptr.dtype.element_ty
        cols = tl.arange(0, BLOCK_K)
        # Masked columns load 0 for gate and up: SiLU(0) * 0 = 0 leaves the row's largest magnitude alone.
        if ONE_PASS:
            valid = cols < K
            values = _silu_mul(tl.load(gate_row + cols, mask=valid, other=0.0),
                               tl.load(up_row + cols, mask=valid, other=0.0), act_ty, INDUCTOR, LIBDEVICE_EXP)
            scale = row_scale(tl.max(tl.abs(values), axis=0), FP8_MAX_VALUE, MIN_SCALE_VALUE)
            tl.store(q_row + cols, quantize_e4m3(values, scale, q_ptr.dtype.element_ty), mask=valid)
        else:
            amax = tl.zeros([BLOCK_K], dtype=tl.float32)
            for start in range(0, K, BLOCK_K):
                valid = start + cols < K
                values = _silu_mul(tl.load(gate_row + start + cols, mask=valid, other=0.0),
                                   tl.load(up_row + start + cols, mask=valid, other=0.0), act_ty, INDUCTOR,
                                   LIBDEVICE_EXP)
                amax = tl.maximum(amax, tl.abs(values))
            scale = row_scale(tl.max(amax, axis=0), FP8_MAX_VALUE, MIN_SCALE_VALUE)
            for start in range(0, K, BLOCK_K):  # the same values again: the same loads, the same arithmetic
                valid = start + cols < K
                values = _silu_mul(tl.load(gate_row + start + cols, mask=valid, other=0.0),
                                   tl.load(up_row + start + cols, mask=valid, other=0.0), act_ty, INDUCTOR,
                                   LIBDEVICE_EXP)
                tl.store(q_row + start + cols, quantize_e4m3(values, scale, q_ptr.dtype.element_ty), mask=valid)
        tl.store(scale_ptr + row, scale)

    @triton.jit
    def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, N, BLOCK: tl.constexpr, INDUCTOR: tl.constexpr,
                         LIBDEVICE_EXP: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offsets < N
        values = _silu_mul(tl.load(gate_ptr + offsets, mask=valid, other=0.0),
                           tl.load(up_ptr + offsets, mask=valid, other=0.0), gate_ptr.dtype.element_ty, INDUCTOR,
                           LIBDEVICE_EXP)
        tl.store(out_ptr + offsets, _narrow(values, out_ptr.dtype.element_ty), mask=valid)

    # The interpreter is chosen when a kernel is defined (TRITON_INTERPRET=1 at import): a property of the kernel.
    _IS_INTERPRETED = type(_silu_mul_quantize_kernel).__name__ == "InterpretedFunction"


def silu_mul_quantize_triton(gate: torch.Tensor, up: torch.Tensor, inductor: bool = False,
                             tiles: QuantTiles | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`silu_mul_quantize_reference` of 2-D gate and up ([M, K] each, contiguous columns, rows of any stride) by
    one Triton program per row, reading rows by `tiles` (None: `default_quant_tiles`, as `quantize_rows_fp8`)."""
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.dim() != 2:
        raise ValueError(f"need 2-D gate and up of one shape and dtype, got {tuple(gate.shape)} {gate.dtype} and "
                         f"{tuple(up.shape)} {up.dtype}")
    if gate.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"activations of dtype {gate.dtype} are not supported (one of {ACTIVATION_DTYPES})")
    if gate.stride(1) != 1 or up.stride(1) != 1:
        raise ValueError("gate and up need contiguous columns")
    num_rows, num_features = gate.shape
    quantized, scales = empty_quantized(num_rows, num_features, gate.device)
    if num_rows == 0:
        return quantized, scales
    launch = row_launch(num_features, tiles)
    _silu_mul_quantize_kernel[(num_rows,)](
        gate, up, quantized, scales, num_features, gate.stride(0), up.stride(0), quantized.stride(0),
        FP8_MAX_VALUE=FP8_MAX, MIN_SCALE_VALUE=MIN_SCALE, BLOCK_K=launch.block_k, ONE_PASS=launch.one_pass,
        INDUCTOR=inductor, LIBDEVICE_EXP=not _IS_INTERPRETED, num_warps=launch.num_warps,
    )
    return quantized, scales


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor, inductor: bool = False) -> torch.Tensor:
    """The fused kernel's SiLU(gate) * up alone, in gate's dtype (contiguous gate and up of one shape): what
    checks compare with `silu_mul_reference` value by value, before quantization can hide a difference."""
    if gate.shape != up.shape or gate.dtype != up.dtype or not (gate.is_contiguous() and up.is_contiguous()):
        raise ValueError("need contiguous gate and up of one shape and dtype")
    out = torch.empty_like(gate)
    block = 1024
    _silu_mul_kernel[(triton.cdiv(gate.numel(), block),)](gate, up, out, gate.numel(), BLOCK=block, INDUCTOR=inductor,
                                                         LIBDEVICE_EXP=not _IS_INTERPRETED)
    return out


@torch.library.custom_op("pagedserve::silu_mul_quantize_fp8", mutates_args=())
def silu_mul_quantize_fp8(gate: torch.Tensor, up: torch.Tensor, inductor: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU(gate) * up of 2-D gate and up, each row to e4m3 with its float32 scale ([M, 1]), computed as eager
    PyTorch or as Inductor computes the product (`inductor`): the Triton kernel on a GPU, the PyTorch reference
    elsewhere."""
    if triton is None or not gate.is_cuda:
        return silu_mul_quantize_reference(gate, up, inductor)
    return silu_mul_quantize_triton(gate if gate.stride(1) == 1 else gate.contiguous(),
                                    up if up.stride(1) == 1 else up.contiguous(), inductor)


@silu_mul_quantize_fp8.register_fake
def _(gate: torch.Tensor, up: torch.Tensor, inductor: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return gate.new_empty(gate.shape, dtype=FP8_DTYPE), gate.new_empty((gate.shape[0], 1), dtype=torch.float32)
