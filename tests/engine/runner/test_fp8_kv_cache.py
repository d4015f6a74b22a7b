"""`kv_cache_dtype="fp8"` end to end: the runner allocates e4m3 caches with per-layer scales, the memory plan
counts one byte a value, and generation stays close to the model-dtype cache.

Random weights make greedy paths part at near-ties (top-two logprobs of a tiny random model differ by 1e-4
nats at times), so closeness is checked as what it implies: wherever both engines had seen the same tokens,
their logprobs agree within a bound, and the paths part only where the exact engine's top two tokens were
closer than twice that bound. On CPU the reference backend runs the FP8 cache; the GPU tests (marked gpu)
run the Triton kernels with CUDA graphs.
"""

from __future__ import annotations

import pytest
import torch

from pagedserve.engine.core.request import CompletionOutput, SamplingParams
from pagedserve.engine.llm import LLM
from tiny_models import VOCAB_SIZE

MAX_TOKENS = 16


def _prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(5, 70, (6,), generator=generator).tolist()
    prompts = [torch.randint(3, VOCAB_SIZE, (n,), generator=generator).tolist() for n in lengths]
    return prompts + [prompts[0][:40] + [7, 8, 9]]  # shares five full blocks of 8 with the first


def _generate(llm: LLM) -> list[CompletionOutput]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=20)
    return [output.outputs[0] for output in llm.generate(_prompts(), params, use_tqdm=False)]


def assert_close(got: list[CompletionOutput], exact: list[CompletionOutput], max_logprob_error: float) -> float:
    """Logprobs within `max_logprob_error` wherever both saw the same tokens; paths part only at a near-tie of
    `exact`. Returns the largest logprob difference seen."""
    largest = 0.0
    for index, (ours, theirs) in enumerate(zip(got, exact)):
        for step, (our_token, their_token) in enumerate(zip(ours.token_ids, theirs.token_ids)):
            our_logprobs, their_logprobs = ours.logprobs[step], theirs.logprobs[step]
            common = set(our_logprobs) & set(their_logprobs)
            largest = max(largest, *(abs(our_logprobs[t].logprob - their_logprobs[t].logprob) for t in common))
            if our_token != their_token:
                gap = their_logprobs[their_token].logprob - their_logprobs[our_token].logprob
                assert gap <= 2 * max_logprob_error, f"prompt {index} parted at token {step} past a near-tie: {gap}"
                break
    assert largest <= max_logprob_error, largest
    return largest


@pytest.mark.parametrize(("arch", "setup"), [
    # Prompts chunked across steps (16 tokens a step) and the last prompt's prefix served from the cache.
    ("llama", {"max_batch_tokens": 16}),
    ("gemma2", {"max_batch_tokens": 16}),  # a sliding-window group beside a full one, and softcapping
    # So few blocks that requests are preempted and recomputed.
    ("llama", {"num_blocks": 16, "max_batch_tokens": 32}),
], ids=["llama-chunked-prefix", "gemma2-chunked-prefix", "llama-preempting"])
def test_fp8_cache_generates_close_to_the_float32_cache(tiny_model_dir, arch: str, setup: dict) -> None:
    model = str(tiny_model_dir(arch))
    exact = _generate(LLM(model, dtype="float32", block_size=8, **setup))
    llm = LLM(model, dtype="float32", block_size=8, kv_cache_dtype="fp8", **setup)
    runner = llm.engine.runner
    assert {cache.dtype for pair in runner.kv_caches for cache in pair} == {torch.float8_e4m3fn}
    assert len(runner.kv_scales) == len(runner.kv_caches) and all(s.tolist() == [1.0, 1.0] for s in runner.kv_scales)
    assert all(s.is_contiguous() and s.data_ptr() % 16 == 0 for s in runner.kv_scales)  # one kernel variant
    got = _generate(llm)
    assert assert_close(got, exact, max_logprob_error=0.1) > 0  # close, and not the float32 cache in disguise
    stats = llm.engine.get_stats()
    assert stats.kv_cache_dtype == llm.engine.memory_plan.kv_cache_dtype == "fp8_e4m3"
    if "num_blocks" in setup:
        assert stats.num_preemptions_total > 0, "the small cache was meant to force preemption"
    else:
        assert stats.num_prefix_cache_hits_total >= 40
    assert stats.num_free_blocks == stats.num_total_blocks, "blocks leaked after every request finished"
    llm.engine.kv_cache.check_invariants()


def test_fp8_cache_holds_twice_the_tokens_of_bfloat16_in_the_same_budget(tiny_model_dir) -> None:
    model = str(tiny_model_dir("llama"))
    plans = {kv: LLM(model, dtype="bfloat16", block_size=8, kv_cache_dtype=kv, max_cpu_kv_cache_gib=0.001).engine.memory_plan
             for kv in ("auto", "fp8")}
    bf16, fp8 = plans["auto"], plans["fp8"]
    assert (bf16.kv_cache_dtype, fp8.kv_cache_dtype) == ("bfloat16", "fp8_e4m3")
    assert 2 * bf16.kv_tokens <= fp8.kv_tokens < 2 * (bf16.kv_tokens + bf16.block_size)  # floors of one budget
    assert "KV cache (fp8_e4m3)" in fp8.describe()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_fp8_cache_triton_with_cuda_graphs_matches_the_reference_backend(tiny_model_dir, arch: str) -> None:
    """fp32 model, FP8 cache: the Triton kernels (decode steps captured in CUDA graphs, then also compiled
    layers) against the reference backend on the same GPU; both store the same bytes, so the bound is tight."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("the Triton kernels' e4m3 casts need compute capability 8.9+")
    model = str(tiny_model_dir(arch))
    common = dict(dtype="float32", device="cuda", block_size=16, max_batch_tokens=64, kv_cache_dtype="fp8")
    exact = _generate(LLM(model, attention_backend="reference", compile=False, **common))
    for compile_layers in (False, True):
        torch._dynamo.reset()
        llm = LLM(model, attention_backend="triton", compile=compile_layers, **common)
        assert llm.engine.runner._decode_graphs is not None, "decode graphs were not captured"
        assert_close(_generate(llm), exact, max_logprob_error=0.01)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_cache_with_gpu_defaults_stays_close_to_bfloat16(tiny_model_dir) -> None:
    """The GPU defaults (bf16, Triton, compiled layers, CUDA graphs) with and without an FP8 cache."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("the Triton kernels' e4m3 casts need compute capability 8.9+")
    model = str(tiny_model_dir("llama"))
    torch._dynamo.reset()
    exact = _generate(LLM(model, device="cuda", block_size=16, max_batch_tokens=64))
    torch._dynamo.reset()
    llm = LLM(model, device="cuda", block_size=16, max_batch_tokens=64, kv_cache_dtype="fp8")
    assert llm.engine.runner._decode_graphs is not None and llm.engine.runner.kv_caches[0][0].dtype == torch.float8_e4m3fn
    assert_close(_generate(llm), exact, max_logprob_error=0.2)


def test_an_fp8_cache_takes_the_kv_scales_its_checkpoint_stores(tiny_model_dir, tmp_path, caplog) -> None:
    """llm-compressor's kv_cache_scheme saves `self_attn.k_scale` / `v_scale` per layer (older files: the
    output scales of k_proj / v_proj): an FP8 cache stores value / scale with them, layers without one keep
    1.0, and generation stays close to the float32 cache; a model-dtype cache leaves them unused."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "with-kv-scales"
    shutil.copytree(tiny_model_dir("llama"), model)
    weights = load_file(model / "model.safetensors")
    weights["model.layers.0.self_attn.k_scale"] = torch.tensor(0.5)
    weights["model.layers.0.self_attn.v_scale"] = torch.tensor(0.25)
    weights["model.layers.1.self_attn.k_proj.output_scale"] = torch.tensor([2.0])  # the older name
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    exact = _generate(LLM(str(model), dtype="float32", block_size=8))
    llm = LLM(str(model), dtype="float32", block_size=8, kv_cache_dtype="fp8")
    scales = [s.tolist() for s in llm.engine.runner.kv_scales]
    assert scales[:2] == [[0.5, 0.25], [2.0, 1.0]] and all(s == [1.0, 1.0] for s in scales[2:])
    assert_close(_generate(llm), exact, max_logprob_error=0.1)
    with caplog.at_level("INFO", logger="pagedserve.engine.runner.model_runner"):
        plain = LLM(str(model), dtype="float32", block_size=8)
    assert plain.engine.runner.kv_scales is None and "apply to an FP8 cache only" in caplog.text

    weights["model.layers.1.self_attn.v_scale"] = torch.tensor([1.0, 2.0])  # one scale a head: not read
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Exception, match="must be one positive number"):
        LLM(str(model), dtype="float32", block_size=8, kv_cache_dtype="fp8")
