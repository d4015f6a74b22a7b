"""The experts of a MoE block in plain PyTorch: a loop over the experts the step routed tokens to.

The oracle the kernels are tested against, and the path on CPU. Same arithmetic as transformers' eager
experts: per expert, `act(x @ gate.T) * (x @ up.T)` in the weights' dtype, then `@ down.T`; the routing weights
and the sum over a token's k experts are in float32 and the result is cast once (transformers multiplies and
sums in the model's dtype, expert by expert: the same up to that rounding). It syncs with the host (which
experts have tokens), so it is never captured in a CUDA graph.

FP8 experts (engine/kernels/moe/fp8.py: e4m3 weights, a float32 scale per expert and output row) run in
float32: each used expert's weights dequantized, the activations as given (W8A16, what the `rows` kernels
compute) or, with `quantize_activations`, rounded to e4m3 per row first, GEMM 1's input per token and GEMM 2's
per pair (W8A8, what the grouped kernels compute); the result is cast to the input's dtype once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from pagedserve.engine.kernels.fp8_quant import quantize_rows


def gated_silu(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up over the two halves of the last dimension ([..., 2I] -> [..., I]), as
    transformers' default `_apply_gate` with a SiLU `act_fn`."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _fake_quantized(rows: torch.Tensor) -> torch.Tensor:
    """Rows rounded to e4m3 with their per-row scales, back in float32 (what an FP8 GEMM's input holds)."""
    values, scales = quantize_rows(rows)
    return values.float() * scales


def experts_reference(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                      w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor | None = None,
                      w2_scale: torch.Tensor | None = None, quantize_activations: bool = False) -> torch.Tensor:
    """hidden [T, H], topk_ids [T, k] (expert of each slot), topk_weights [T, k], w13 [E, 2I, H] (gate rows, then
    up rows), w2 [E, H, I] -> [T, H] in hidden's dtype. With `w13_scale` [E, 2I] and `w2_scale` [E, H], w13 and
    w2 are e4m3 (module docstring)."""
    if w13_scale is not None:  # e4m3 experts: float32 throughout, each used expert dequantized once
        rows = _fake_quantized(hidden.float()) if quantize_activations else hidden.float()
        return _expert_loop(
            rows, topk_ids, topk_weights, hidden.dtype,
            lambda expert: (w13[expert].float() * w13_scale[expert].float()[:, None],
                            w2[expert].float() * w2_scale[expert].float()[:, None]),
            _fake_quantized if quantize_activations else None)
    return _expert_loop(hidden, topk_ids, topk_weights, hidden.dtype, lambda expert: (w13[expert], w2[expert]))


def _expert_loop(rows: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, out_dtype: torch.dtype,
                 weights_of: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                 quantize_act: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The loop over the experts with tokens: `weights_of(expert)` gives its (w13, w2) in the GEMMs' dtype;
    `quantize_act` rounds GEMM 2's input (W8A8). Each pair's weighted output goes into its own row, summed over
    a token's k pairs at the end (index_add_ on CPU took milliseconds a call with two threads in torch 2.13; a
    put into distinct rows takes microseconds)."""
    num_tokens, top_k = topk_ids.shape
    pair_out = torch.zeros((num_tokens * top_k, rows.shape[1]), dtype=torch.float32, device=rows.device)
    flat_ids = topk_ids.reshape(-1)
    flat_weights = topk_weights.reshape(-1).float()
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start : start + count]
        start += count
        gate_up, down = weights_of(expert)
        act = gated_silu(F.linear(rows[pairs // top_k], gate_up))
        if quantize_act is not None:
            act = quantize_act(act)
        pair_out[pairs] = F.linear(act, down).float() * flat_weights[pairs, None]
    return pair_out.view(num_tokens, top_k, -1).sum(dim=1).to(out_dtype)
