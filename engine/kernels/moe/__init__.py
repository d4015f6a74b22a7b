"""Mixture-of-experts layers on fused expert kernels, under transformers' own MoE blocks.

transformers 5 keeps a MoE block's experts in one module (`*Experts`, decorated with
`use_experts_implementation`): `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I] parameters, called as
`experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])` after the block's own router. That call is
our seam: shared experts and everything else stay the model's code; the experts' computation is replaced
(engine/kernels/moe/experts.py) by one of the kernels below, and the router, for steps of a few tokens on CUDA,
by one kernel with the family's own semantics (`router.py`: Qwen2/3-MoE and OLMoE softmax, top-k, optional
renormalization, cast; Mixtral's renormalized float32 weights); the experts' kernels:

- `reference.py`: a loop over the experts in PyTorch (CPU, any float dtype): the oracle;
- `triton.py`: Triton kernels: a grouped GEMM over expert-sorted, block-padded pairs (vLLM's fused_moe
  scheme) for many tokens, and a per-pair kernel for a few tokens that reads only the chosen experts;
- `grouped_mm.py`: `torch._grouped_mm` (CUTLASS) over expert-sorted pairs, bf16 on Hopper (FP8 experts:
  `torch._scaled_grouped_mm`);
- `fp8.py`: FP8 experts (`quantization="fp8"`): e4m3 weights with a float32 scale per expert and output row, which
  every kernel above takes (per-pair W8A16, grouped W8A8, the reference dequantizing).

`experts.py` holds the custom op they run behind (`pagedserve::fused_experts`: one opaque op for
torch.compile, static shapes and no host syncs for CUDA graphs), the rule that picks a kernel per step, and
`use_fused_moe(model)`, which switches supported expert modules to it in place (no weight copies).
"""
