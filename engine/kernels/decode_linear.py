"""Linear layers of a one-token step: a Triton GEMM that streams the weight once over every SM.

At batch 1, `x @ W.T` is a read of W: the work is the bytes. cuBLAS picks tiles made for large
batches and, for Llama-3-8B's o and down projections on an H200, splits K over a second, reducing
kernel each (two extra kernels a layer). `_skinny_gemm_kernel` gives each program `BLOCK_N` output
features and all of K, so a grid of N / BLOCK_N programs reads W once, in order, with no reduction
pass; the rows of x stay in L1/L2. Accumulation is in float32, the output in the input's dtype, as
cuBLAS. Rows are padded to 16 for `tl.dot` (tensor cores); one row can also use a multiply-and-sum on
the CUDA cores (`use_dot=False`).

Why only one row (`bench/linear_bench.py`, docs/kernels.md): there the kernel matches or beats cuBLAS on
o, down and the LM head and removes the split-K reductions; at 2-16 rows it is slower than cuBLAS on q/k/v
and down (masked 16-row tiles). A weight with too few output features for the wide tiles to give every SM a
program (q/k/v, N=6144) takes narrow multiply-and-sum tiles at one row; with fewer features still, it
stays on cuBLAS.

`use_decode_linear(model)` routes a model's plain `nn.Linear` layers (and fused projection leads)
through `linear`: one-row inputs go to the `pagedserve::decode_linear` custom op, which takes the
kernel when `uses_kernel` says so and `F.linear` otherwise; more rows go straight to `F.linear`.
torch.compile sees one opaque op (as it sees cuBLAS) and each CUDA graph captures whichever path its
batch size takes. The layers keep their parameters, hooks and identity:
only their class changes (to a subclass whose forward calls the op), and `undo` changes it back.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.engine.kernels.launch import launch_options
from pagedserve.engine.kernels.fp8_linear import FP8_DTYPE, Fp8Linear, fp8_linear
from pagedserve.engine.kernels.fused_projections import Fp8FusedLead, FusedLead

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: every call takes F.linear
    triton = None

MAX_ROWS = 16  # rows skinny_linear takes (tl.dot's smallest M)


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int  # output features per program
    block_k: int  # reduction step
    num_warps: int
    num_stages: int
    use_dot: bool = True  # False: BLOCK_M rows by multiply-and-sum on CUDA cores (a single row)
    # Multiply-and-sum over an FP8 weight with float16 products (`_accumulate_f16`): a candidate of `--sweep --fp8`
    # until a GPU run says whether it reads faster; no default takes it.
    f16_products: bool = False


def default_config(out_features: int, num_rows: int = MAX_ROWS, num_sms: int | None = None,
                   fp8_weight: bool = False) -> SkinnyConfig:
    """From `bench/linear_bench.py --sweep` on an H200 (Llama-3-8B's projections at 1-16 rows): narrower
    tiles keep a grid of N <= 4096 features on every SM; wider ones read the long weights best. One row
    over a weight too short to give those tiles about one program per SM (`num_sms`: q/k/v's 6144
    features) takes narrow multiply-and-sum tiles instead: 8 features a program (a little faster than
    cuBLAS on q/k/v in that sweep). One row over an FP8 weight (`--sweep --fp8`): multiply-and-sum tiles
    with 2,048-deep steps for every projection (half the bytes a step of bf16's tiles, so twice as deep to
    keep as many bytes in flight), 8 features a program up to 8,192 features and 16 beyond; 10-28% faster
    than bf16's tiles on FP8 weights."""
    if fp8_weight and num_rows == 1:
        return SkinnyConfig(block_n=8 if out_features <= 8192 else 16, block_k=2048, num_warps=4, num_stages=3,
                            use_dot=False)
    wide = (SkinnyConfig(block_n=32, block_k=256, num_warps=4, num_stages=5) if out_features <= 4096
            else SkinnyConfig(block_n=64, block_k=128, num_warps=4, num_stages=5))
    if num_rows == 1 and num_sms is not None and not _fills_sms(out_features, wide, num_sms):
        return SkinnyConfig(block_n=8, block_k=1024, num_warps=4, num_stages=3, use_dot=False)
    return wide


def _fills_sms(out_features: int, config: SkinnyConfig, num_sms: int) -> bool:
    """At least about one program per SM (below that the kernel leaves bandwidth unused)."""
    return -(-out_features // config.block_n) * 4 >= num_sms * 3


if triton is not None:

    @triton.jit
    def _load_weight_tile(w_ptrs, col_valid, ks, k_left, EVEN_K: tl.constexpr):
        # The weight is read once per forward: keep it from evicting the activations in L2.
        if EVEN_K:
            return tl.load(w_ptrs, mask=col_valid[:, None], other=0.0, eviction_policy="evict_first")
        return tl.load(w_ptrs, mask=col_valid[:, None] & (ks < k_left)[None, :], other=0.0,
                       eviction_policy="evict_first")

    @triton.jit
    def _load_x_tile(x_ptrs, row_valid, ks, k_left, EVEN_K: tl.constexpr):
        if EVEN_K:
            return tl.load(x_ptrs, mask=row_valid[:, None], other=0.0)
        return tl.load(x_ptrs, mask=row_valid[:, None] & (ks < k_left)[None, :], other=0.0)

    @triton.jit
    def _accumulate(acc, x, w, USE_DOT: tl.constexpr):
        if USE_DOT:  # an FP8 weight tile is widened to x's dtype in registers (its bytes were read as FP8)
            return acc + tl.dot(x, tl.trans(w.to(x.dtype)), out_dtype=tl.float32)
        return acc + tl.sum(x[:, None, :].to(tl.float32) * w[None, :, :].to(tl.float32), axis=2)

    @triton.jit
    def _accumulate_f16(acc, x, w, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Multiply-and-sum over an e4m3 weight tile with float16 arithmetic: widening each weight to float32
        costs two conversions (e4m3 -> f16 -> f32) at the conversion units' rate (an eighth of the FMA rate on
        Hopper), which may bound a one-row step below the memory's rate; here each weight takes half a packed
        e4m3 -> f16x2 conversion and a half-rate packed product, 8 products are summed in float16 and only
        those sums are widened. Overflow-safe: the x step is divided by its largest magnitude first (|x| <= 1,
        |w| <= 448: 8 products stay below 3,600), and the step's float32 sum multiplied back."""
        xf = x.to(tl.float32)
        x_max = tl.max(tl.abs(xf), axis=1)
        x_scale = tl.where(x_max > 0.0, x_max, 1.0)
        xs = (xf * (1.0 / x_scale)[:, None]).to(tl.float16)
        products = xs[:, None, :] * w.to(tl.float16)[None, :, :]
        eights = tl.sum(tl.reshape(products, [BLOCK_M, BLOCK_N, BLOCK_K // 8, 8]), axis=3)
        return acc + tl.sum(eights.to(tl.float32), axis=2) * x_scale[:, None]

    @triton.jit
    def _step(acc, x, w, USE_DOT: tl.constexpr, F16_PRODUCTS: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        if F16_PRODUCTS:
            return _accumulate_f16(acc, x, w, BLOCK_M, BLOCK_N, BLOCK_K)
        return _accumulate(acc, x, w, USE_DOT)

    @triton.jit
    def _skinny_gemm_kernel(
        x_ptr,
        w_ptr,
        w_scale_ptr,
        bias_ptr,
        out_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_om,
        HAS_BIAS: tl.constexpr,
        HAS_W_SCALE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        USE_DOT: tl.constexpr,
        F16_PRODUCTS: tl.constexpr,
        EVEN_K: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = tl.arange(0, BLOCK_M)
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        row_valid = rows < M
        col_valid = cols < N
        x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :]
        w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_wn + ks[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        first_step = 0
        if USE_PDL:
            # Launched while the kernel before still runs (engine/kernels/launch.py): no kernel writes
            # the weight, so its first tile is fetched now; x is read only after that kernel is done.
            w = _load_weight_tile(w_ptrs, col_valid, ks, K, EVEN_K)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
            acc = _step(acc, _load_x_tile(x_ptrs, row_valid, ks, K, EVEN_K), w, USE_DOT, F16_PRODUCTS, BLOCK_M,
                        BLOCK_N, BLOCK_K)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
            first_step = 1
        for k_step in range(first_step, tl.cdiv(K, BLOCK_K)):
            k_left = K - k_step * BLOCK_K
            x = _load_x_tile(x_ptrs, row_valid, ks, k_left, EVEN_K)
            w = _load_weight_tile(w_ptrs, col_valid, ks, k_left, EVEN_K)
            acc = _step(acc, x, w, USE_DOT, F16_PRODUCTS, BLOCK_M, BLOCK_N, BLOCK_K)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if HAS_W_SCALE:  # FP8 weight: one scale per output feature
            acc *= tl.load(w_scale_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & col_valid[None, :])


def skinny_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: SkinnyConfig | None = None,
    use_pdl: bool = False, weight_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x of at most MAX_ROWS rows (2-D, contiguous last dimension);
    `use_pdl`: launch with programmatic dependent launch (engine/kernels/launch.py; the caller checked the device).
    With `weight_scale` ([N] float32), `weight` is FP8 and the product is `x @ (weight * weight_scale).T`: the
    weight is read as FP8 (half of bf16's bytes) and x is used as it is (no activation quantization)."""
    num_rows, in_features = x.shape
    out_features = weight.shape[0]
    if num_rows > MAX_ROWS:
        raise ValueError(f"skinny_linear takes at most {MAX_ROWS} rows, got {num_rows}")
    if weight.shape[1] != in_features or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"need x [M, K] and weight [N, K] with contiguous K, got {tuple(x.shape)}, {tuple(weight.shape)}")
    if config is None:
        config = default_config(out_features, num_rows, _num_sms(_device_index(x)) if x.is_cuda else None,
                                fp8_weight=weight_scale is not None)
    if config.f16_products and (config.use_dot or weight_scale is None):
        raise ValueError("f16_products is a multiply-and-sum tile (use_dot=False) over an FP8 weight")
    out = torch.empty((num_rows, out_features), dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out
    block_m = 16 if config.use_dot else triton.next_power_of_2(num_rows)
    _skinny_gemm_kernel[(triton.cdiv(out_features, config.block_n),)](
        x,
        weight,
        weight_scale if weight_scale is not None else weight,
        bias if bias is not None else weight,
        out,
        num_rows,
        out_features,
        in_features,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        HAS_W_SCALE=weight_scale is not None,
        BLOCK_M=block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        USE_DOT=config.use_dot,
        F16_PRODUCTS=config.f16_products,
        EVEN_K=in_features % config.block_k == 0,
        USE_PDL=use_pdl,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **launch_options(use_pdl),
    )
    return out


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_index(x: torch.Tensor) -> int:
    return x.device.index if x.device.index is not None else torch.cuda.current_device()


def _kernel_config(x: torch.Tensor, weight: torch.Tensor) -> SkinnyConfig | None:
    """The tiles `decode_linear` (or `decode_linear_fp8`, for an FP8 weight) runs these operands with, or None
    where it takes the library GEMM."""
    if triton is None or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        return None
    if weight.dtype != x.dtype and weight.dtype != FP8_DTYPE:
        return None
    if x.numel() == 0 or x.shape[-1] != weight.shape[1] or weight.stride(1) != 1:
        return None
    num_rows = x.numel() // x.shape[-1]
    if num_rows != 1:  # 2-16 rows: slower than cuBLAS on the H200 (see the module docstring)
        return None
    num_sms = _num_sms(_device_index(x))
    config = default_config(weight.shape[0], num_rows, num_sms, fp8_weight=weight.dtype == FP8_DTYPE)
    return config if _fills_sms(weight.shape[0], config, num_sms) else None


def uses_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `decode_linear` takes the Triton kernel for these operands (else F.linear)."""
    return _kernel_config(x, weight) is not None


@torch.library.custom_op("pagedserve::decode_linear", mutates_args=())
def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, use_pdl: bool) -> torch.Tensor:
    """F.linear, through the skinny kernel where `uses_kernel` says it pays. Inference only: no backward."""
    config = _kernel_config(x, weight)
    if config is None:
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(1) != 1:
        flat = flat.contiguous()
    return skinny_linear(flat, weight, bias, config, use_pdl).view(*x.shape[:-1], weight.shape[0])


@decode_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, use_pdl: bool) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("pagedserve::decode_linear_fp8", mutates_args=())
def decode_linear_fp8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                      use_scaled_mm: bool, use_pdl: bool) -> torch.Tensor:
    """An FP8 layer's product (engine/kernels/fp8_linear.py), through the skinny kernel where it pays (one
    row on a GPU: the weight read as FP8, x unquantized), else the layer's own FP8 GEMM."""
    config = _kernel_config(x, weight)
    if config is None:
        return fp8_linear(x, weight, weight_scale, bias, use_scaled_mm)
    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(1) != 1:
        flat = flat.contiguous()
    return skinny_linear(flat, weight, bias, config, use_pdl, weight_scale).view(*x.shape[:-1], weight.shape[0])


@decode_linear_fp8.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
      use_scaled_mm: bool, use_pdl: bool) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear_fp8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
               use_scaled_mm: bool, use_pdl: bool = False) -> torch.Tensor:
    """`decode_linear_fp8` for one row, the FP8 GEMM otherwise (as `linear` for bf16 weights)."""
    if x.numel() == x.shape[-1]:
        return decode_linear_fp8(x, weight, weight_scale, bias, use_scaled_mm, use_pdl)
    return fp8_linear(x, weight, weight_scale, bias, use_scaled_mm)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, use_pdl: bool = False) -> torch.Tensor:
    """`decode_linear` for one row, `F.linear` otherwise: the custom op's Python dispatch costs a few
    microseconds a call, which steps of several rows, eager or
    compiled, need not pay. torch.compile specializes a dimension of size 1, so a compiled region has
    one graph with the op (one-token steps) and others without it, as it had before the op."""
    if x.numel() == x.shape[-1]:
        return decode_linear(x, weight, bias, use_pdl)
    return F.linear(x, weight, bias)


class DecodeLinear(nn.Linear):
    """An `nn.Linear` whose forward goes through `linear` (set as a layer's class, see `use_decode_linear`;
    `use_pdl` is the owning runner's launch setting, set on the layer)."""

    use_pdl: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.use_pdl)


class DecodeFusedLead(FusedLead):
    use_pdl: bool = False

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return linear(x, weight, bias, self.use_pdl)


class DecodeFp8Linear(Fp8Linear):
    use_pdl: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_fp8(x, self.weight, self.weight_scale, self.bias, self.use_scaled_mm, self.use_pdl)


class DecodeFp8FusedLead(Fp8FusedLead):
    use_pdl: bool = False

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return linear_fp8(x, weight, self.fused_weight_scale, bias, self.use_scaled_mm, self.use_pdl)


_DECODE_CLASSES = {nn.Linear: DecodeLinear, FusedLead: DecodeFusedLead, Fp8Linear: DecodeFp8Linear,
                   Fp8FusedLead: DecodeFp8FusedLead}


@dataclass
class DecodeLinearSwap:
    """The layers `use_decode_linear` changed; `undo` gives them their classes back."""

    modules: list[nn.Module] = field(default_factory=list)

    def undo(self) -> None:
        originals = {new: old for old, new in _DECODE_CLASSES.items()}
        for module in self.modules:
            module.__class__ = originals[type(module)]
            module.__dict__.pop("use_pdl", None)
        self.modules.clear()


def use_decode_linear(model: nn.Module, use_pdl: bool = False) -> DecodeLinearSwap:
    """Route every plain `nn.Linear` and fused projection lead of `model` through `decode_linear` (FP8 layers
    and leads through `decode_linear_fp8`), launched
    with programmatic dependent launch when `use_pdl` (the caller checked that the device supports it).

    Subclasses of `nn.Linear` (bitsandbytes' quantized layers, for one) keep their own forward.
    """
    swap = DecodeLinearSwap()
    for module in model.modules():
        replacement = _DECODE_CLASSES.get(type(module))
        if replacement is not None:
            module.__class__ = replacement
            module.use_pdl = use_pdl
            swap.modules.append(module)
    return swap
