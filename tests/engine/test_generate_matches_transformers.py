"""Greedy outputs are token for token those of transformers' own `generate` (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve.engine.llm import LLM
from pagedserve.engine.core.request import SamplingParams

from tiny_models import ARCHS, MOE_ARCHS, VOCAB_SIZE

MAX_TOKENS = 24


def random_prompts(seed: int, count: int = 6, low: int = 5, high: int = 70) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=generator).tolist()
    return [torch.randint(3, VOCAB_SIZE, (n,), generator=generator).tolist() for n in lengths]


_reference_cache: dict[tuple[str, int], list[list[int]]] = {}


def reference_outputs(model_dir, arch: str, prompts: list[list[int]], seed: int) -> list[list[int]]:
    key = (arch, seed)
    if key not in _reference_cache:
        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
        model.eval()
        outs = []
        for prompt in prompts:
            generated = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False)
            outs.append(generated[0, len(prompt):].tolist())
        _reference_cache[key] = outs
    return _reference_cache[key]


ENGINE_SETUPS = {
    "default": {},
    # A budget smaller than every prompt: each prompt is prefilled in several chunks.
    "chunked": {"max_batch_tokens": 8},
    # So few blocks that running requests must be preempted and recomputed.
    "preempting": {"num_blocks": 14, "max_batch_tokens": 32},
    "no-prefix-cache": {"enable_prefix_caching": False},
    "prefill-first": {"scheduling_policy": "prefill_first", "max_batch_tokens": 40},
    # Prompts beside decodes in chunks of at most 5 tokens; the first step (no decodes) takes 40.
    "prefill-bound": {"max_batch_tokens": 40, "max_prefill_tokens_while_decoding": 5},
    # Each step delivered before the next is scheduled (the default prepares the next step first).
    "synchronous": {"async_scheduling": False},
}


@pytest.mark.parametrize("setup", list(ENGINE_SETUPS))
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(tiny_model_dir, arch, setup):
    model_dir = tiny_model_dir(arch)
    prompts = random_prompts(seed=1)
    expected = reference_outputs(model_dir, arch, prompts, seed=1)
    llm = LLM(str(model_dir), dtype="float32", block_size=8, **ENGINE_SETUPS[setup])
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    for prompt, output, want in zip(prompts, outputs, expected):
        assert output.outputs[0].token_ids == want, f"{arch}/{setup}: prompt of {len(prompt)} tokens diverged"
    stats = llm.engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks, "blocks leaked after every request finished"
    llm.engine.kv_cache.check_invariants()
    if setup == "preempting":
        assert stats.num_preemptions_total > 0, "the tiny cache was meant to force preemption"


# MoE models with their experts on the fused path (engine/kernels/moe/: the reference on CPU) under the
# model's own router; one family also with preemption (and prompts chunked by its 32-token budget).
MOE_SETUPS = [(arch, "default") for arch in MOE_ARCHS] + [("qwen3_moe", "preempting")]


@pytest.mark.parametrize(("arch", "setup"), MOE_SETUPS)
def test_moe_greedy_matches_transformers(tiny_model_dir, arch, setup):
    model_dir = tiny_model_dir(arch)
    prompts = random_prompts(seed=1)
    expected = reference_outputs(model_dir, arch, prompts, seed=1)
    llm = LLM(str(model_dir), dtype="float32", block_size=8, moe_backend="fused", **ENGINE_SETUPS[setup])
    assert type(llm.engine.runner.model.model.layers[0].mlp.experts).__name__ == "FusedExperts"
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    for prompt, output, want in zip(prompts, outputs, expected):
        assert output.outputs[0].token_ids == want, f"{arch}/{setup}: prompt of {len(prompt)} tokens diverged"
    plan = llm.engine.memory_plan
    experts_bytes = sum(p.numel() * p.element_size() for n, p in llm.engine.runner.model.named_parameters()
                        if ".experts." in n)
    assert experts_bytes and plan.weights_bytes >= experts_bytes  # the plan counts the experts' weights
    llm.engine.shutdown()


def test_sliding_window_holds_window_many_blocks(tiny_model_dir):
    """A long Mistral sequence keeps about window/block_size blocks, not length/block_size."""
    llm = LLM(str(tiny_model_dir("mistral")), dtype="float32", block_size=8, max_batch_tokens=16)
    engine = llm.engine
    engine.add_request("long", list(range(3, 203)), SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
    most_held = 0
    while engine.has_unfinished_requests():
        engine.step()
        if engine.kv_cache.has_blocks("long"):
            (table,) = engine.kv_cache.block_tables("long")
            most_held = max(most_held, sum(block is not None for block in table))
    # window 24 + chunk 16 spans at most ceil(39 / 8) + 1 = 6 blocks; 300 tokens would need 38.
    assert most_held <= 6


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2"])
def test_prefix_cache_hits_and_same_outputs(tiny_model_dir, arch):
    """Mistral (every layer a 24-token window) and Gemma-2 (alternating) hit too: their window's blocks."""
    model_dir = tiny_model_dir(arch)
    shared = list(range(10, 58))  # 48 tokens: 6 full blocks of 8, twice the sliding window
    prompts = [shared + [100 + i, 101 + i, 102 + i] for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    cold = LLM(str(model_dir), dtype="float32", block_size=8, enable_prefix_caching=False)
    want = [o.outputs[0].token_ids for o in cold.generate(prompts, params, use_tqdm=False)]
    warm = LLM(str(model_dir), dtype="float32", block_size=8, enable_prefix_caching=True)
    first = warm.generate(prompts[:1], params, use_tqdm=False)
    rest = warm.generate(prompts[1:], params, use_tqdm=False)
    got = [o.outputs[0].token_ids for o in first + rest]
    assert got == want
    stats = warm.engine.get_stats()
    assert stats.num_prefix_cache_hits_total >= 3 * 48
    assert all(o.num_cached_tokens == 48 for o in rest)
    assert stats.num_free_blocks == stats.num_total_blocks
    warm.engine.kv_cache.check_invariants()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_backends_match_reference_backend(tiny_model_dir, arch):
    """On the GPU, every attention backend gives the reference backend's greedy tokens (fp32)."""
    from pagedserve.engine.kernels.attention import get_attention_backend

    prompts = random_prompts(seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    want = None
    # The Triton backend with CUDA graphs, then again with the decoder layers compiled (and captured).
    for backend, extra in (("reference", {"compile": False}), ("triton", {"compile": False}),
                           ("triton", {"compile": True})):
        try:
            get_attention_backend(backend, torch.device("cuda"))
        except ValueError as error:
            pytest.skip(str(error))
        torch._dynamo.reset()
        llm = LLM(str(tiny_model_dir(arch)), dtype="float32", block_size=16, attention_backend=backend,
                  max_batch_tokens=64, device="cuda", **extra)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        if want is None:
            want = got
        else:
            assert got == want, f"{arch}: {backend} {extra} diverged from the reference backend"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_gpu_fused_moe_matches_transformers_experts_bf16(tiny_model_dir, arch):
    """bf16 on the GPU: the fused experts (compiled layers, decode CUDA graphs; a 700-token first step on
    grouped_mm where it runs, decode batches of 12 on the Triton grouped GEMM, a lone request on the per-pair
    kernel, the one-kernel router) are as close to exact arithmetic as transformers' own bf16 experts code.

    Scored teacher-forced along the fused engine's greedy paths: each generated token's log-probability from the
    engine, from transformers in bf16 and from transformers in float32 (the truth), all under the same context.
    Comparing greedy paths instead fails without a bug: a bf16 near tie in a router's top k (Qwen3-MoE: 3 of 8
    experts, renormalized) moves the logits past any fixed tie margin, and the paths then compare different
    contexts (transformers' own bf16 code parts from float32 on 5 of these 12 prompts, on CPU)."""
    from tiny_models import forced_logprobs

    prompts = random_prompts(seed=2, count=12, low=20, high=100)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)
    torch._dynamo.reset()
    llm = LLM(str(tiny_model_dir(arch)), dtype="bfloat16", block_size=16, moe_backend="fused",
              max_batch_tokens=1024, device="cuda", cuda_graph_max_batch_size=16)
    assert llm.engine.runner.is_compiled and llm.engine.runner._decode_graphs is not None
    outputs = llm.generate(prompts, params, use_tqdm=False) + llm.generate(prompts[:1], params, use_tqdm=False)
    llm.engine.shutdown()
    paths = [(prompt, o.outputs[0].token_ids, torch.tensor([lp[t].logprob for t, lp in
                                                          zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]))
             for prompt, o in zip(prompts + prompts[:1], outputs)]
    forced = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch), dtype=dtype).cuda().eval()
        forced[dtype] = [forced_logprobs(model, prompt, tokens) for prompt, tokens, _ in paths]
        del model
    truth = torch.cat(forced[torch.float32])
    fused_error = (torch.cat([engine for _, _, engine in paths]) - truth).abs()
    transformers_error = (torch.cat(forced[torch.bfloat16]) - truth).abs()
    assert len(truth) == len(paths) * MAX_TOKENS
    summary = (f"{arch}: |fused - fp32| mean {fused_error.mean():.4f} max {fused_error.max():.4f}; "
               f"|transformers bf16 - fp32| mean {transformers_error.mean():.4f} max {transformers_error.max():.4f}")
    print(summary)
    assert fused_error.mean() <= 1.5 * transformers_error.mean() + 2e-3, summary
    # One position may flip a router's near tie the other way (a jump of tenths of a nat); a wrong kernel path
    # moves many positions, which the mean catches, and by nats.
    assert fused_error.max() <= max(2 * transformers_error.max(), 1.0), summary
