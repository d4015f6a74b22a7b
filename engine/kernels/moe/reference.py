"""The experts of a MoE block in plain PyTorch: a loop over the experts the step routed tokens to.

The oracle the kernels are tested against, and the path on CPU. Same arithmetic as transformers' eager
experts: per expert, `act(x @ gate.T) * (x @ up.T)` in the weights' dtype, then `@ down.T`; the routing weights
and the sum over a token's k experts are in float32 and the result is cast once (transformers multiplies and
sums in the model's dtype, expert by expert: the same up to that rounding). It syncs with the host (which
experts have tokens), so it is never captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gated_silu(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up over the two halves of the last dimension ([..., 2I] -> [..., I]), as
    transformers' default `_apply_gate` with a SiLU `act_fn`."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def experts_reference(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                      w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """hidden [T, H], topk_ids [T, k] (expert of each slot), topk_weights [T, k], w13 [E, 2I, H] (gate rows, then
    up rows), w2 [E, H, I] -> [T, H] in hidden's dtype."""
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
