"""A MoE block's router in one kernel for steps of a few tokens: logits, softmax, top-k and its normalization.

transformers' routers (`*TopKRouter`, the block's `gate`) run `F.linear(x, W)` [T, E], a float32 softmax,
`torch.topk` and, per family, a renormalization and a cast: five or six kernels a layer (a GEMV, the softmax,
topk's select and sort, the division), each a few microseconds of launch and ramp-up for almost no work at batch
1. `_router_kernel` does it all in one launch:

- every program computes BLOCK_E experts' logits for the step's T tokens (the [E, H] weight is read once,
  spread over E / BLOCK_E programs) and stores them, rounded to the model's dtype as `F.linear` rounds them;
- each program then takes a ticket from a counter (after a barrier, with release/acquire semantics, so its
  logits are visible first); the program holding the last ticket reads every token's logits back (from L2),
  takes the float32 softmax of the rounded logits, picks the top k by probability, renormalizes them where
  the family does and casts them where it does, and resets the counter to 0 for the next call. The counter
  is 0 before and after every call, so the op declares no mutation and a CUDA graph replays it as captured.

Which families, and their semantics (transformers 5.17-5.25; `ROUTER_SEMANTICS`): Qwen2-MoE, Qwen3-MoE and
OLMoE renormalize the top-k probabilities when `norm_topk_prob` and cast them to the logits' dtype; Mixtral
always renormalizes and keeps them in float32. A router is switched only if its class is in that table and its
own forward gives exactly what `router_reference` (the same semantics in PyTorch) gives on a probe input on
its device (so a transformers release that changes a router's code keeps that router's code), and it takes the
kernel only on CUDA at up to `ROUTER_MAX_TOKENS` tokens; other calls run the module's own forward.

Differences from transformers', by construction none beyond rounding: the logits' float32 sums run in another
order than cuBLAS's (an ulp of bf16 apart at times), the exponential is Triton's, and among exactly equal
probabilities the lowest expert index wins (torch.topk's order among ties is unspecified).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.engine.kernels.launch import launch_options

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: routers keep their own code
    triton = None

ROUTER_MAX_TOKENS = 8  # the rows path's token counts: decode steps of a few sequences
ROUTER_BLOCK_E = 2  # experts a program: E=128 gives 64 programs, each reading 2 weight rows (8 KB at H=2048)


@dataclass(frozen=True)
class RouterSemantics:
    normalize_attribute: str | None  # the module's flag for renormalizing the top k (None: always renormalized)
    scores_in_logits_dtype: bool  # the top-k weights cast to the logits' dtype (else kept in float32)


# Router classes whose forward is F.linear -> float32 softmax -> topk -> [renormalize] -> [cast], by class name.
ROUTER_SEMANTICS: dict[str, RouterSemantics] = {
    "Qwen2MoeTopKRouter": RouterSemantics("norm_topk_prob", True),
    "Qwen3MoeTopKRouter": RouterSemantics("norm_topk_prob", True),
    "OlmoeTopKRouter": RouterSemantics("norm_topk_prob", True),
    "MixtralTopKRouter": RouterSemantics(None, False),
}


def router_reference(hidden: torch.Tensor, weight: torch.Tensor, top_k: int, normalize: bool,
                     scores_in_logits_dtype: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [T, E], top-k weights [T, k], expert ids [T, k]): transformers' router code, in PyTorch."""
    logits = F.linear(hidden.reshape(-1, weight.shape[1]), weight)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    scores, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        scores = scores / scores.sum(dim=-1, keepdim=True)
    return logits, scores.to(logits.dtype) if scores_in_logits_dtype else scores, ids


if triton is not None:

    @triton.jit
    def _load_router_tile(ptrs, row_valid, hs, h_left, EVEN_H: tl.constexpr):
        if EVEN_H:
            return tl.load(ptrs, mask=row_valid[:, None], other=0.0)
        return tl.load(ptrs, mask=row_valid[:, None] & (hs < h_left)[None, :], other=0.0)

    @triton.jit
    def _router_kernel(
        x_ptr, w_ptr, logits_ptr, scores_ptr, ids_ptr, counter_ptr,
        T, E, H, stride_xm, stride_we, stride_lm, stride_sm, stride_im,
        TOP_K: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_ALL_E: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_H: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        pid = tl.program_id(0)
        tokens = tl.arange(0, BLOCK_T)
        token_valid = tokens < T
        experts = pid * BLOCK_E + tl.arange(0, BLOCK_E)
        expert_valid = experts < E
        hs = tl.arange(0, BLOCK_H)
        x_ptrs = x_ptr + tokens[:, None] * stride_xm + hs[None, :]
        w_ptrs = w_ptr + experts[:, None].to(tl.int64) * stride_we + hs[None, :]
        acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
        first_step = 0
        if USE_PDL:
            # Launched while the kernel before still runs (engine/kernels/launch.py): no kernel writes the
            # weight, so its first tile is fetched now; the hidden states and the counter only after the wait.
            w = _load_router_tile(w_ptrs, expert_valid, hs, H, EVEN_H)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
            x = _load_router_tile(x_ptrs, token_valid, hs, H, EVEN_H)
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
            x_ptrs += BLOCK_H
            w_ptrs += BLOCK_H
            first_step = 1
        for h_step in range(first_step, tl.cdiv(H, BLOCK_H)):
            w = _load_router_tile(w_ptrs, expert_valid, hs, H - h_step * BLOCK_H, EVEN_H)
            x = _load_router_tile(x_ptrs, token_valid, hs, H - h_step * BLOCK_H, EVEN_H)
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
            x_ptrs += BLOCK_H
            w_ptrs += BLOCK_H
        tl.store(logits_ptr + tokens[:, None] * stride_lm + experts[None, :], acc.to(logits_ptr.dtype.element_ty),
                 mask=token_valid[:, None] & expert_valid[None, :])
        # Every thread's logits stored before the ticket (the barrier), and the ticket released at GPU scope, so
        # the program that draws the last one sees all of them (it acquires).
        tl.debug_barrier()
        ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
        if ticket == tl.num_programs(0) - 1:
            all_experts = tl.arange(0, BLOCK_ALL_E)
            valid = token_valid[:, None] & (all_experts < E)[None, :]
            # .cg: from L2, where the other programs' stores are (L1 is not coherent across SMs).
            logits = tl.load(logits_ptr + tokens[:, None] * stride_lm + all_experts[None, :], mask=valid,
                             other=0.0, cache_modifier=".cg").to(tl.float32)
            logits = tl.where((all_experts < E)[None, :], logits, float("-inf"))  # padding experts weigh 0
            shifted = tl.exp(logits - tl.max(logits, axis=1)[:, None])
            probs = tl.where(valid, shifted / tl.sum(shifted, axis=1)[:, None], -1.0)
            slots = tl.arange(0, BLOCK_K)
            top_probs = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
            top_ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
            for slot in tl.static_range(TOP_K):
                best = tl.max(probs, axis=1)
                # The lowest index among equal probabilities; padding (-1) is never picked while k <= E.
                best_id = tl.min(tl.where(probs == best[:, None], all_experts[None, :], BLOCK_ALL_E), axis=1)
                top_probs = tl.where(slots[None, :] == slot, best[:, None], top_probs)
                top_ids = tl.where(slots[None, :] == slot, best_id[:, None], top_ids)
                probs = tl.where(all_experts[None, :] == best_id[:, None], -2.0, probs)
            if NORMALIZE:
                top_probs = top_probs / tl.sum(top_probs, axis=1)[:, None]
            out_mask = token_valid[:, None] & (slots < TOP_K)[None, :]
            tl.store(scores_ptr + tokens[:, None] * stride_sm + slots[None, :],
                     top_probs.to(scores_ptr.dtype.element_ty), mask=out_mask)
            tl.store(ids_ptr + tokens[:, None] * stride_im + slots[None, :], top_ids.to(tl.int64), mask=out_mask)
            tl.store(counter_ptr, 0)


def router_triton(hidden: torch.Tensor, weight: torch.Tensor, counter: torch.Tensor, top_k: int, normalize: bool,
                  scores_in_logits_dtype: bool, use_pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`router_reference` in one kernel launch; `counter`: an int32 [1] tensor on hidden's device, 0 between
    calls, used by one call at a time (a router's own; calls on one stream follow each other). `use_pdl`: launch
    with programmatic dependent launch (engine/kernels/launch.py; the caller checked the device)."""
    hidden = hidden.reshape(-1, weight.shape[1])
    if hidden.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("the router needs hidden [T, H] and weight [E, H] with a contiguous last dimension")
    num_tokens, hidden_size = hidden.shape
    num_experts = weight.shape[0]
    if not 0 < top_k <= num_experts or num_tokens > ROUTER_MAX_TOKENS:
        raise ValueError(f"router kernel: top_k {top_k} of {num_experts} experts, {num_tokens} tokens "
                         f"(at most {ROUTER_MAX_TOKENS})")
    logits = torch.empty((num_tokens, num_experts), dtype=hidden.dtype, device=hidden.device)
    scores = torch.empty((num_tokens, top_k), dtype=hidden.dtype if scores_in_logits_dtype else torch.float32,
                         device=hidden.device)
    ids = torch.empty((num_tokens, top_k), dtype=torch.int64, device=hidden.device)
    if num_tokens == 0:
        return logits, scores, ids
    block_t = triton.next_power_of_2(num_tokens)
    block_h = min(triton.next_power_of_2(hidden_size), 4096 // block_t)  # [T, BLOCK_E, BLOCK_H] <= 8192 products
    _router_kernel[(triton.cdiv(num_experts, ROUTER_BLOCK_E),)](
        hidden, weight, logits, scores, ids, counter,
        num_tokens, num_experts, hidden_size, hidden.stride(0), weight.stride(0), logits.stride(0),
        scores.stride(0), ids.stride(0),
        TOP_K=top_k, NORMALIZE=normalize, BLOCK_T=block_t, BLOCK_E=ROUTER_BLOCK_E,
        BLOCK_H=block_h, BLOCK_ALL_E=triton.next_power_of_2(num_experts), BLOCK_K=triton.next_power_of_2(top_k),
        EVEN_H=hidden_size % block_h == 0, USE_PDL=use_pdl, num_warps=4, **launch_options(use_pdl),
    )
    return logits, scores, ids


@torch.library.custom_op("pagedserve::moe_router", mutates_args=())
def moe_router(hidden: torch.Tensor, weight: torch.Tensor, counter: torch.Tensor, top_k: int, normalize: bool,
               scores_in_logits_dtype: bool, use_pdl: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The router of a few tokens in one kernel (see the module docstring); the caller checked the device."""
    return router_triton(hidden, weight, counter, top_k, normalize, scores_in_logits_dtype, use_pdl)


@moe_router.register_fake
def _(hidden: torch.Tensor, weight: torch.Tensor, counter: torch.Tensor, top_k: int, normalize: bool,
      scores_in_logits_dtype: bool, use_pdl: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_tokens = hidden.numel() // weight.shape[1]
    return (hidden.new_empty((num_tokens, weight.shape[0])),
            hidden.new_empty((num_tokens, top_k), dtype=hidden.dtype if scores_in_logits_dtype else torch.float32),
            hidden.new_empty((num_tokens, top_k), dtype=torch.int64))


class FusedTopKRouter(nn.Module):
    """The class a supported router takes (`use_fused_router`): the same parameter, through the one-kernel op on
    CUDA at up to ROUTER_MAX_TOKENS tokens, through its own forward otherwise. Set on the instance by the swap:
    `moe_original_class`, `moe_router_normalize`, `moe_router_cast`, `moe_router_counter`, `moe_router_use_pdl`."""

    moe_original_class: type
    moe_router_normalize: bool
    moe_router_cast: bool
    moe_router_counter: torch.Tensor
    moe_router_use_pdl: bool

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if hidden_states.is_cuda and hidden_states.numel() <= ROUTER_MAX_TOKENS * self.weight.shape[1]:
            return torch.ops.pagedserve.moe_router(hidden_states, self.weight, self.moe_router_counter, self.top_k,
                                                   self.moe_router_normalize, self.moe_router_cast,
                                                   self.moe_router_use_pdl)
        return self.moe_original_class.forward(self, hidden_states)


def router_unsupported_reason(router: nn.Module) -> str | None:
    """Why `router` (a MoE block's `gate`) cannot take the one-kernel router, or None when it can: its class is
    in ROUTER_SEMANTICS and its forward equals `router_reference` on a probe input on its own device."""
    semantics = ROUTER_SEMANTICS.get(type(router).__name__)
    if semantics is None:
        return f"router {type(router).__name__} is not one whose semantics are known"
    weight = getattr(router, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or getattr(router, "bias", None) is not None:
        return "no [E, H] router weight, or a bias"
    if not weight.is_floating_point() or weight.stride(1) != 1 or not 0 < getattr(router, "top_k", 0) <= weight.shape[0]:
        return f"router weight {weight.dtype} / top_k {getattr(router, 'top_k', None)} not supported"
    normalize = bool(getattr(router, semantics.normalize_attribute)) if semantics.normalize_attribute else True
    probe = torch.randn((3, weight.shape[1]), generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    with torch.no_grad():
        got = router(probe)
        want = router_reference(probe, weight, router.top_k, normalize, semantics.scores_in_logits_dtype)
    if not isinstance(got, tuple) or len(got) != 3 or any(
            a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b) for a, b in zip(got, want)):
        return f"{type(router).__name__}.forward differs from the router semantics it is listed with"
    return None


def use_fused_router(router: nn.Module, use_pdl: bool = False) -> str | None:
    """Switch `router` to FusedTopKRouter in place (no copy; `undo_fused_router` restores it); the reason it
    stays as it is, or None. `use_pdl`: the owner's programmatic-launch setting (it checked the device)."""
    reason = router_unsupported_reason(router)
    if reason is not None:
        return reason
    semantics = ROUTER_SEMANTICS[type(router).__name__]
    router.moe_router_normalize = (bool(getattr(router, semantics.normalize_attribute))
                                   if semantics.normalize_attribute else True)
    router.moe_router_cast = semantics.scores_in_logits_dtype
    router.moe_router_counter = torch.zeros(1, dtype=torch.int32, device=router.weight.device)
    router.moe_router_use_pdl = use_pdl
    router.moe_original_class = type(router)
    router.__class__ = FusedTopKRouter
    return None


def undo_fused_router(router: nn.Module) -> None:
    router.__class__ = router.moe_original_class
    del router.moe_original_class, router.moe_router_normalize, router.moe_router_cast, router.moe_router_counter
    del router.moe_router_use_pdl
