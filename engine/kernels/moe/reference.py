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
    if w13_scale is not None:
        return _experts_reference_fp8(hidden, topk_ids, topk_weights, w13, w2, w13_scale, w2_scale,
                                      quantize_activations)
    num_tokens, top_k = topk_ids.shape
    # Each pair's weighted output in its own row, summed over a token's k pairs at the end (index_add_ on CPU
    # took milliseconds a call with two threads in torch 2.13; a put into distinct rows takes microseconds).
    pair_out = torch.zeros((num_tokens * top_k, hidden.shape[1]), dtype=torch.float32, device=hidden.device)
    flat_ids = topk_ids.reshape(-1)
    flat_weights = topk_weights.reshape(-1).float()
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start : start + count]
        start += count
        tokens = pairs // top_k
        act = gated_silu(F.linear(hidden[tokens], w13[expert]))
        down = F.linear(act, w2[expert])
        pair_out[pairs] = down.float() * flat_weights[pairs, None]
    return pair_out.view(num_tokens, top_k, -1).sum(dim=1).to(hidden.dtype)


def _experts_reference_fp8(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                           w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor, w2_scale: torch.Tensor,
                           quantize_activations: bool) -> torch.Tensor:
    num_tokens, top_k = topk_ids.shape
    rows = hidden.float()
    if quantize_activations:
        rows = _fake_quantized(rows)
    pair_out = torch.zeros((num_tokens * top_k, hidden.shape[1]), dtype=torch.float32, device=hidden.device)
    flat_ids = topk_ids.reshape(-1)
    flat_weights = topk_weights.reshape(-1).float()
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start : start + count]
        start += count
        gate_up = w13[expert].float() * w13_scale[expert].float()[:, None]
        down = w2[expert].float() * w2_scale[expert].float()[:, None]
        act = gated_silu(F.linear(rows[pairs // top_k], gate_up))
        if quantize_activations:
            act = _fake_quantized(act)
        pair_out[pairs] = F.linear(act, down) * flat_weights[pairs, None]
    return pair_out.view(num_tokens, top_k, -1).sum(dim=1).to(hidden.dtype)
