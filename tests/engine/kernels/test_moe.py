"""The fused MoE path (engine/kernels/moe/) against transformers' own MoE blocks and the reference loop.

On CPU: the reference (and torch's CPU grouped_mm) inside real transformers blocks of tiny Qwen3-MoE, Qwen2-MoE
(shared expert), Mixtral and OLMoE models in float32; the swap and its fallbacks; the kernel rule; the block
alignment. The Triton kernels run under TRITON_INTERPRET=1 in a subprocess (tiny shapes; the interpreter's
bf16 tl.dot is broken, so the grouped kernel is checked in float32/float16, the per-pair kernel also in
bf16). GPU cases (bf16 kernels, compile and CUDA graphs) run in-process, marked `gpu`.

FP8 experts (engine/kernels/moe/fp8.py): the reference against the same experts dequantized, the op and the
fused block on CPU, `_scaled_grouped_mm`'s arguments on the meta device, the tensor-parallel cut; the FP8
kernels (per-pair W8A16, grouped W8A8) under the interpreter; on a GPU at the Qwen3-30B-A3B layer shape.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.engine.kernels.moe.experts import (
    FusedExperts,
    MoeKernelPolicy,
    pick_kernel,
    unsupported_reason,
    use_fused_moe,
)
from pagedserve.engine.kernels.moe.reference import experts_reference
from pagedserve.engine.kernels.moe.triton import align_pairs_to_blocks
from tiny_models import MOE_ARCHS, tiny_config
from triton_interpreter import WORKER_FLAG, interpreter_results

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()


def tiny_moe_model(arch: str, num_hidden_layers: int = 2) -> nn.Module:
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, num_hidden_layers=num_hidden_layers)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def routed_inputs(num_tokens: int, hidden: int, num_experts: int, top_k: int, seed: int = 0,
                  dtype: torch.dtype = torch.float32, device: str = "cpu"):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=generator)
    logits = torch.randn(num_tokens, num_experts, generator=generator)
    weights, ids = torch.topk(logits.softmax(-1), top_k)
    return x.to(device, dtype), ids.to(device), weights.to(device)


def random_experts(num_experts: int, hidden: int, intermediate: int, seed: int = 1, dtype: torch.dtype = torch.float32,
                   device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * intermediate, hidden, generator=generator) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, intermediate, generator=generator) / intermediate**0.5
    return w13.to(device, dtype), w2.to(device, dtype)


# ---- the reference inside transformers' blocks (float32, CPU) ------------------------------------------------
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_fused_block_matches_transformers_block(arch: str) -> None:
    """The whole MoE block (the model's router, shared expert, our experts) equals transformers' block with its
    eager and grouped_mm experts, in float32."""
    model = tiny_moe_model(arch)
    block = model.model.layers[0].mlp
    x = torch.randn(1, 23, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    wanted = {}
    with torch.no_grad():
        for implementation in ("eager", "grouped_mm"):
            model.set_experts_implementation(implementation)
            wanted[implementation] = block(x)
        swap = use_fused_moe(model)
        assert type(block.experts) is FusedExperts
        got = block(x)
        swap.undo()
    for implementation, want in wanted.items():
        want = want[0] if isinstance(want, tuple) else want
        got_tensor = got[0] if isinstance(got, tuple) else got
        torch.testing.assert_close(got_tensor, want, rtol=1e-5, atol=1e-6, msg=f"{arch} vs {implementation}")


def test_swap_keeps_parameters_and_undo_restores(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_moe_model("qwen3_moe")
    experts = model.model.layers[1].mlp.experts
    original_class = type(experts)
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    hook_calls = []
    experts.register_forward_hook(lambda *_: hook_calls.append(1))  # as tensor parallelism's all-reduce hook
    with caplog.at_level(logging.INFO, logger="pagedserve.engine.kernels.moe.experts"):
        swap = use_fused_moe(model)
    assert swap.fused == {"qwen3_moe": 2} and not swap.fallback
    assert "qwen3_moe: 2 expert modules take the fused path" in caplog.text
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == pointers  # no copy, same names
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]))
    assert hook_calls == [1]
    assert use_fused_moe(model).modules == []  # already switched: left as they are
    swap.undo()
    assert type(experts) is original_class and not hasattr(experts, "moe_policy")


def test_gpt_oss_and_per_expert_modules_keep_transformers_code() -> None:
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2)
    swap = use_fused_moe(GptOssForCausalLM(config))
    assert not swap.fused and swap.fallback["gpt_oss"][0] == 1
    assert "interleaved" in swap.fallback["gpt_oss"][1]
    assert unsupported_reason(nn.ModuleList([nn.Linear(2, 2)])) == "experts kept as separate per-expert modules"


def test_kernel_rule() -> None:
    auto = MoeKernelPolicy(rows_max_tokens=4, grouped_mm_min_tokens=256)
    assert pick_kernel(1, on_cuda_with_triton=False, grouped_mm_runs=False, policy=auto) == "reference"
    assert pick_kernel(4, True, True, auto) == "rows"
    assert pick_kernel(5, True, True, auto) == "triton"
    assert pick_kernel(256, True, True, auto) == "grouped_mm"
    assert pick_kernel(4096, True, False, auto) == "triton"  # fp16, or not Hopper
    assert pick_kernel(1, True, True, MoeKernelPolicy(kernel="grouped_mm")) == "grouped_mm"
    default = MoeKernelPolicy()  # the H200's measurements: rows through 8 tokens, Triton for decode batches
    assert [pick_kernel(t, True, True, default) for t in (8, 9, 512, 1024)] == ["rows", "triton", "triton", "grouped_mm"]
    assert pick_kernel(1024, True, True, MoeKernelPolicy(grouped_mm_min_tokens=None)) == "triton"  # None: never


def test_moe_backend_resolution() -> None:
    """auto: fused on a GPU with Triton, transformers' code elsewhere; fused on CPU runs the reference (tests);
    fused on a GPU without Triton is refused, naming the field."""
    from pagedserve.config.engine import ConfigError, EngineConfig
    from pagedserve.config.resolve import ModelFacts, Platform, resolve

    facts = ModelFacts(max_position_embeddings=512)
    gpu = Platform(cuda_available=True, bf16_supported=True, triton_unavailable_reason="")
    no_triton = Platform(cuda_available=True, bf16_supported=True, triton_unavailable_reason="triton is not installed")
    assert resolve(EngineConfig(), gpu, facts).runner.moe_backend == "fused"
    assert resolve(EngineConfig(), Platform.cpu_only(), facts).runner.moe_backend == "transformers"
    assert resolve(EngineConfig(), no_triton, facts).runner.moe_backend == "transformers"
    assert resolve(EngineConfig(moe_backend="fused"), Platform.cpu_only(), facts).runner.moe_backend == "fused"
    assert resolve(EngineConfig(moe_backend="transformers"), gpu, facts).runner.moe_backend == "transformers"
    with pytest.raises(ConfigError, match="moe_backend='fused'"):
        resolve(EngineConfig(moe_backend="fused"), no_triton, facts)


def test_rows_tiles_cover_every_rows_token_count() -> None:
    """The per-pair tile table is ordered by its token bounds and covers the token counts `rows` takes."""
    from pagedserve.engine.kernels.moe.experts import ROWS_MAX_TOKENS
    from pagedserve.engine.kernels.moe.triton import ROWS_TILES, rows_tiles

    bounds = [max_tokens for max_tokens, _ in ROWS_TILES]
    assert bounds == sorted(bounds) and bounds[-1] >= ROWS_MAX_TOKENS
    assert rows_tiles(1) is ROWS_TILES[0][1] and rows_tiles(10_000) is ROWS_TILES[-1][1]


def test_align_pairs_to_blocks() -> None:
    """Every pair once; each block holds one expert's pairs (padding marked num_pairs); blocks past the last
    expert's run carry expert E; the static bound holds."""
    _, ids, _ = routed_inputs(num_tokens=37, hidden=4, num_experts=6, top_k=2)
    block_m, num_pairs = 8, ids.numel()
    sorted_pairs, block_experts = align_pairs_to_blocks(ids, 6, block_m)
    assert sorted_pairs.shape[0] == block_experts.shape[0] * block_m
    assert block_experts.shape[0] == -(-(num_pairs + 6 * (block_m - 1)) // block_m)
    real = sorted_pairs[sorted_pairs < num_pairs]
    assert sorted(real.tolist()) == list(range(num_pairs))
    flat = ids.reshape(-1)
    for block, expert in enumerate(block_experts.tolist()):
        pairs = sorted_pairs[block * block_m : (block + 1) * block_m]
        pairs = pairs[pairs < num_pairs]
        if expert == 6:
            assert pairs.numel() == 0
        else:
            assert pairs.numel() > 0 and bool((flat[pairs.long()] == expert).all())
            assert pairs.tolist() == sorted(pairs.tolist())  # stable
    # One token: at most k blocks, whatever E.
    _, one, _ = routed_inputs(num_tokens=1, hidden=4, num_experts=128, top_k=8)
    assert align_pairs_to_blocks(one, 128, 16)[1].shape[0] == 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_path_matches_reference_on_cpu(dtype: torch.dtype) -> None:
    from pagedserve.engine.kernels.moe.grouped_mm import experts_grouped_mm

    x, ids, weights = routed_inputs(19, 32, 8, 3, dtype=dtype)
    w13, w2 = random_experts(8, 32, 16, dtype=dtype)
    try:
        got = experts_grouped_mm(x, ids, weights, w13, w2)
    except (RuntimeError, NotImplementedError) as error:
        pytest.skip(f"this torch has no CPU _grouped_mm for {dtype}: {error}")
    want = experts_reference(x, ids, weights, w13, w2)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance)


# ---- Triton kernels under the interpreter --------------------------------------------------------------------
# (kernel, tokens, hidden, intermediate, experts, top_k, dtype, config); a rows config is (gate_up, down) tiles,
# None: the ROWS_TILES defaults (fitted to the tiny shape).
INTERPRETER_CASES = {
    "grouped_fp32_many_blocks": ("triton", 21, 32, 24, 4, 2, "float32", (8, 16, 16, 2, 4, 1)),
    "grouped_fp32_ragged_k": ("triton", 9, 40, 20, 6, 3, "float32", (16, 16, 16, 1, 4, 1)),
    "grouped_fp16_empty_experts": ("triton", 3, 32, 16, 16, 2, "float16", (16, 16, 32, 1, 4, 1)),
    "rows_one_token_bf16": ("rows", 1, 48, 24, 8, 4, "bfloat16", ((8, 16, 4, 1), (16, 16, 4, 1))),
    "rows_fp32_ragged_k2": ("rows", 3, 40, 20, 5, 2, "float32", ((8, 16, 4, 1), (4, 32, 4, 1))),
    "rows_two_tokens_k8_bf16": ("rows", 2, 32, 16, 16, 8, "bfloat16", ((8, 16, 4, 1), (8, 8, 4, 1))),
    "rows_eight_tokens_shared": ("rows", 8, 32, 16, 3, 2, "float32", ((16, 32, 4, 1), (16, 16, 4, 1))),
    "rows_one_token_k3_fp16_default_tiles": ("rows", 1, 40, 24, 6, 3, "float16", None),
}
# FP8 experts (e4m3 weights, a scale per expert and row), same fields; checked against the reference of the same
# semantics: W8A16 for rows, W8A8 (activations rounded to e4m3 per row) for the grouped kernel.
FP8_INTERPRETER_CASES = {
    "fp8_rows_one_token_ragged_k": ("rows", 1, 40, 20, 5, 3, "float32", ((8, 16, 4, 1), (4, 32, 4, 1))),
    "fp8_grouped_fp32_w8a8": ("triton", 9, 32, 16, 4, 2, "float32", (16, 16, 16, 1, 4, 1)),
}


def run_case(kernel, num_tokens, hidden, intermediate, num_experts, top_k, dtype_name, config, device,
             fp8: bool = False) -> dict:
    from pagedserve.engine.kernels.moe import triton as moe_triton
    from pagedserve.engine.kernels.moe.fp8 import quantize_expert_weight

    dtype = getattr(torch, dtype_name)
    x, ids, weights = routed_inputs(num_tokens, hidden, num_experts, top_k, dtype=dtype, device=device)
    w13, w2 = random_experts(num_experts, hidden, intermediate, dtype=dtype, device=device)
    scales = {}
    if fp8:
        (w13, w13_scale), (w2, w2_scale) = quantize_expert_weight(w13), quantize_expert_weight(w2)
        scales = dict(w13_scale=w13_scale, w2_scale=w2_scale)
    if kernel == "triton":
        out = moe_triton.experts_triton(x, ids, weights, w13, w2, moe_triton.GroupedConfig(*config), **scales)
    else:
        tiles = None if config is None else moe_triton.RowsTiles(*(moe_triton.RowsConfig(*c) for c in config))
        out = moe_triton.experts_rows(x, ids, weights, w13, w2, tiles, **scales)
    if fp8:
        want = experts_reference(x.float(), ids, weights, w13, w2, **scales, quantize_activations=kernel == "triton")
    else:
        want = experts_reference(x.float(), ids, weights, w13.float(), w2.float())
    return {"max_error": ((out.float() - want).abs().max() / want.abs().max()).item(),
            "shape_ok": float(out.shape == (num_tokens, hidden) and out.dtype == dtype)}


# (architecture, tokens, dtype): the one-kernel router against the family's own router module.
ROUTER_CASES = {
    "router_qwen3_moe_1_bf16": ("qwen3_moe", 1, "bfloat16"),
    "router_qwen3_moe_3": ("qwen3_moe", 3, "float32"),
    "router_qwen2_moe_2": ("qwen2_moe", 2, "float32"),
    "router_mixtral_3": ("mixtral", 3, "float32"),
    "router_olmoe_8": ("olmoe", 8, "float32"),
}


def run_router_case(arch: str, num_tokens: int, dtype_name: str) -> dict:
    from pagedserve.engine.kernels.moe.router import ROUTER_SEMANTICS, router_triton

    router = tiny_moe_model(arch, num_hidden_layers=1).model.layers[0].mlp.gate.to(getattr(torch, dtype_name))
    semantics = ROUTER_SEMANTICS[type(router).__name__]
    normalize = bool(getattr(router, semantics.normalize_attribute)) if semantics.normalize_attribute else True
    x = torch.randn(num_tokens, router.weight.shape[1], generator=torch.Generator().manual_seed(num_tokens))
    x = x.to(router.weight.dtype)
    counter = torch.zeros(1, dtype=torch.int32)
    with torch.no_grad():
        got = router_triton(x, router.weight, counter, router.top_k, normalize, semantics.scores_in_logits_dtype)
        want = router(x)
    return {"logits_error": (got[0].float() - want[0].float()).abs().max().item(),
            "scores_error": (got[1].float() - want[1].float()).abs().max().item(),
            "ids_equal": float(torch.equal(got[2], want[2])), "counter_reset": float(counter.item() == 0),
            "dtypes_ok": float(all(a.dtype == b.dtype and a.shape == b.shape for a, b in zip(got, want)))}


def _interpreter_worker() -> None:
    results = {name: run_case(*case, device="cpu") for name, case in INTERPRETER_CASES.items()}
    results.update({name: run_case(*case, device="cpu", fp8=True) for name, case in FP8_INTERPRETER_CASES.items()})
    results.update({name: run_router_case(*case) for name, case in ROUTER_CASES.items()})
    print(json.dumps(results))


@pytest.fixture(scope="module", name="interpreter_results")
def interpreter_results_fixture() -> dict[str, dict[str, float]]:
    return interpreter_results(__file__)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("name", list(INTERPRETER_CASES))
def test_triton_kernels_in_interpreter(name: str, interpreter_results: dict[str, dict[str, float]]) -> None:
    result = interpreter_results[name]
    assert result["shape_ok"] == 1.0
    tolerance = 1e-5 if INTERPRETER_CASES[name][6] == "float32" else 2e-2
    assert result["max_error"] < tolerance, result


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("name", list(FP8_INTERPRETER_CASES))
def test_fp8_triton_kernels_in_interpreter(name: str, interpreter_results: dict[str, dict[str, float]]) -> None:
    """FP8 experts: the per-pair kernels (W8A16) and the grouped kernel (W8A8, its FP8 tl.dot) against the float32
    reference of the same e4m3 weights and semantics (bf16: the activations' and GEMM 1 output's rounding)."""
    result = interpreter_results[name]
    assert result["shape_ok"] == 1.0
    tolerance = 1e-5 if FP8_INTERPRETER_CASES[name][6] == "float32" else 2e-2
    assert result["max_error"] < tolerance, result


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("name", list(ROUTER_CASES))
def test_router_kernel_in_interpreter(name: str, interpreter_results: dict[str, dict[str, float]]) -> None:
    """The one-kernel router gives each family's own router output: the same experts in the same order, the
    weights renormalized (or not) and cast (or not) as the family does, and the counter back at 0."""
    result = interpreter_results[name]
    tolerance = 1e-5 if ROUTER_CASES[name][2] == "float32" else 1e-2
    assert result["ids_equal"] == 1.0 and result["counter_reset"] == 1.0 and result["dtypes_ok"] == 1.0, result
    assert result["logits_error"] < tolerance and result["scores_error"] < tolerance, result


def test_router_swap_and_its_refusals() -> None:
    """use_fused_moe switches each fused block's router (its weight kept; on CPU it runs its own code, so the
    block's output is unchanged) and undo restores it; a router whose forward does not do what its class is
    listed for, or whose class is not listed, keeps its code."""
    from pagedserve.engine.kernels.moe.router import FusedTopKRouter, router_unsupported_reason

    model = tiny_moe_model("qwen3_moe")
    block = model.model.layers[0].mlp
    router, original_class = block.gate, type(block.gate)
    x = torch.randn(1, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = block(x)
        swap = use_fused_moe(model)
        assert type(router) is FusedTopKRouter and len(swap.routers) == 2 and router.moe_router_normalize
        assert "2 routers take the one-kernel router" in swap.describe()
        torch.testing.assert_close(block(x), want)
        swap.undo()
    assert type(router) is original_class and not hasattr(router, "moe_router_counter")
    assert use_fused_moe(model, fuse_router=False).routers == []

    class Qwen3MoeTopKRouter(original_class):  # listed name, other semantics: no renormalization
        def forward(self, hidden_states):
            logits = F.linear(hidden_states, self.weight)
            scores, ids = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), self.top_k, dim=-1)
            return logits, scores.to(logits.dtype), ids

    renamed = tiny_moe_model("qwen3_moe", num_hidden_layers=1).model.layers[0].mlp.gate
    renamed.__class__ = Qwen3MoeTopKRouter
    assert "differs" in router_unsupported_reason(renamed)
    renamed.__class__ = type("SomeRouter", (original_class,), {})
    assert "not one whose semantics are known" in router_unsupported_reason(renamed)


# ---- FP8 experts on CPU ---------------------------------------------------------------------------------------
def fp8_experts(num_experts: int, hidden: int, intermediate: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    from pagedserve.engine.kernels.moe.fp8 import quantize_expert_weight

    w13, w2 = random_experts(num_experts, hidden, intermediate, device=device)
    (q13, s13), (q2, s2) = quantize_expert_weight(w13), quantize_expert_weight(w2)
    return dict(w13=q13, w2=q2, w13_scale=s13, w2_scale=s2)


def test_fp8_experts_reference_is_the_dequantized_experts() -> None:
    """The op on FP8 experts (CPU: the reference) is the float32 reference on the dequantized weights, exactly; the
    weights are `quantize_rows` per expert (the linear layers' rounding); W8A8 stays within e4m3 precision of it;
    scales that do not fit are refused."""
    from pagedserve.engine.kernels.fp8_quant import quantize_rows
    from pagedserve.engine.kernels.moe.fp8 import dequantize_expert_weight, quantize_expert_weight

    x, ids, weights = routed_inputs(11, 32, 8, 3)
    fp8 = fp8_experts(8, 32, 16)
    w13, _ = random_experts(8, 32, 16)
    values, scale = quantize_rows(w13[5])
    assert torch.equal(fp8["w13"][5].view(torch.uint8), values.view(torch.uint8))
    assert torch.equal(fp8["w13_scale"][5], scale.squeeze(-1)) and fp8["w13_scale"].shape == (8, 32)
    policy = MoeKernelPolicy()
    got = torch.ops.pagedserve.fused_experts(x, ids, weights, fp8["w13"], fp8["w2"], policy.kernel,
                                             policy.rows_max_tokens, policy.grouped_mm_min_tokens, False,
                                             fp8["w13_scale"], fp8["w2_scale"])
    dequantized = experts_reference(x, ids, weights, dequantize_expert_weight(fp8["w13"], fp8["w13_scale"]),
                                    dequantize_expert_weight(fp8["w2"], fp8["w2_scale"]))
    torch.testing.assert_close(got, dequantized, rtol=1e-6, atol=1e-7)
    w8a8 = experts_reference(x, ids, weights, **fp8, quantize_activations=True)
    assert ((w8a8 - got).abs().max() / got.abs().max()).item() < 0.1
    with pytest.raises(ValueError, match="without their row scales"):
        torch.ops.pagedserve.fused_experts(x, ids, weights, fp8["w13"], fp8["w2"], "reference", 8, None)
    with pytest.raises(ValueError, match="one per expert and output row"):
        torch.ops.pagedserve.fused_experts(x, ids, weights, fp8["w13"], fp8["w2"], "reference", 8, None, False,
                                           fp8["w13_scale"][:, :16], fp8["w2_scale"])


def test_fp8_fused_block_matches_transformers_on_dequantized_experts(caplog: pytest.LogCaptureFixture) -> None:
    """quantize_experts puts e4m3 experts and their scales on the module (nothing else changes, the memory plan's
    measure counts their bytes exactly); the fused block then equals transformers' block whose experts hold the
    dequantized weights, in float32."""
    from pagedserve.engine.kernels.fp8_quant import FP8_DTYPE
    from pagedserve.engine.kernels.moe.experts import quantize_experts
    from pagedserve.engine.kernels.moe.fp8 import dequantize_expert_weight
    from pagedserve.engine.runner.loader import weights_footprint_bytes

    model = tiny_moe_model("qwen3_moe")
    experts = [layer.mlp.experts for layer in model.model.layers]
    before = weights_footprint_bytes(model)
    expert_elements = sum(e.gate_up_proj.numel() + e.down_proj.numel() for e in experts)
    expert_rows = sum(e.gate_up_proj.shape[0] * (e.gate_up_proj.shape[1] + e.down_proj.shape[1]) for e in experts)
    with caplog.at_level(logging.INFO, logger="pagedserve.engine.kernels.moe.experts"):
        assert quantize_experts(model) == 2 and quantize_experts(model) == 0  # FP8 already: left
    assert "quantized the experts of 2 MoE blocks to FP8" in caplog.text
    assert weights_footprint_bytes(model) == before - expert_elements * 4 + expert_elements + expert_rows * 4
    assert experts[0].gate_up_proj.dtype == FP8_DTYPE and experts[0].down_proj_scale.shape == (8, 64)
    assert unsupported_reason(experts[0]) is None
    block = model.model.layers[0].mlp
    x = torch.randn(1, 9, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        swap = use_fused_moe(model)
        got = block(x)
        swap.undo()
        fp8 = {name: getattr(block.experts, name) for name in ("gate_up_proj", "down_proj")}
        for name, values in fp8.items():  # transformers' own experts code on the dequantized weights
            scale = getattr(block.experts, name + "_scale")
            setattr(block.experts, name, nn.Parameter(dequantize_expert_weight(values, scale)))
        want = block(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fp8_scaled_grouped_mm_arguments_on_meta() -> None:
    """torch's own checks of `_scaled_grouped_mm` (its meta function: layouts, scale shapes, dtypes) accept what
    the grouped_mm path passes; it has no CPU kernel, and says so."""
    from pagedserve.engine.kernels.moe.grouped_mm import experts_grouped_mm, grouped_mm_unavailable

    if not hasattr(torch, "_scaled_grouped_mm"):
        pytest.skip("this torch has no _scaled_grouped_mm")
    x, ids, weights = routed_inputs(5, 32, 8, 3, dtype=torch.bfloat16)
    fp8 = fp8_experts(8, 32, 16)
    assert "no CPU kernel" in grouped_mm_unavailable(x, fp8["w13"], fp8["w2"])
    meta = {name: tensor.to("meta") for name, tensor in fp8.items()}
    out = experts_grouped_mm(x.to("meta"), ids.to("meta"), weights.to("meta"), **meta)
    assert out.shape == x.shape and out.dtype == torch.bfloat16


def test_fp8_experts_tensor_parallel_cut() -> None:
    """Under transformers 5.17's expert plan each rank keeps its gate/up rows with their scales and its down_proj
    columns with every row's scale: the two ranks' partial outputs add up to the whole."""
    from pagedserve.engine.runner.tensor_parallel import _shard_experts

    class Experts(nn.Module):
        pass

    x, ids, weights = routed_inputs(6, 32, 4, 2)
    whole = fp8_experts(4, 32, 16)
    want = experts_reference(x, ids, weights, **whole)
    plan = {"layers.*.mlp.experts.gate_up_proj": "packed_colwise", "layers.*.mlp.experts.down_proj": "rowwise"}
    total = torch.zeros_like(want)
    for rank in range(2):
        experts = Experts()
        for name in ("gate_up_proj", "down_proj"):
            setattr(experts, name, nn.Parameter(whole["w13" if name == "gate_up_proj" else "w2"].clone(),
                                                requires_grad=False))
            setattr(experts, name + "_scale", nn.Parameter(whole[("w13" if name == "gate_up_proj" else "w2") + "_scale"]))
        _shard_experts(experts, "layers.0.mlp.experts", plan, rank, 2)
        assert experts.gate_up_proj_scale.shape == (4, 16) and experts.down_proj_scale.shape == (4, 32)
        total += experts_reference(x, ids, weights, experts.gate_up_proj, experts.down_proj,
                                   experts.gate_up_proj_scale, experts.down_proj_scale)
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-6)


# ---- GPU ----------------------------------------------------------------------------------------------------
QWEN3_30B_LAYER = (2048, 768, 128, 8)  # hidden, moe_intermediate, experts, top-k


@functools.cache
def qwen3_layer_experts() -> tuple[torch.Tensor, torch.Tensor]:
    """One Qwen3-30B-A3B layer's experts in bf16 on the GPU, drawn once for every GPU test (600 M values on
    the CPU generator take seconds)."""
    hidden, intermediate, num_experts, _ = QWEN3_30B_LAYER
    return random_experts(num_experts, hidden, intermediate, dtype=torch.bfloat16, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_tokens", [1, 2, 3, 8, 64, 600])
@pytest.mark.parametrize("kernel", ["rows", "triton", "grouped_mm"])
def test_gpu_kernels_match_reference_bf16(kernel: str, num_tokens: int) -> None:
    """Each kernel on the Qwen3-30B-A3B layer shape in bf16, against the float32 reference of the same weights."""
    from pagedserve.engine.kernels.moe.experts import run_kernel
    from pagedserve.engine.kernels.moe.grouped_mm import grouped_mm_unavailable

    hidden, intermediate, num_experts, top_k = QWEN3_30B_LAYER
    x, ids, weights = routed_inputs(num_tokens, hidden, num_experts, top_k, dtype=torch.bfloat16, device="cuda")
    w13, w2 = qwen3_layer_experts()
    if kernel == "grouped_mm" and grouped_mm_unavailable(x, w13, w2):
        pytest.skip(grouped_mm_unavailable(x, w13, w2))
    out = run_kernel(kernel, x, ids, weights, w13, w2)
    want = experts_reference(x.float(), ids, weights, w13.float(), w2.float())
    assert out.dtype == torch.bfloat16
    assert ((out.float() - want).abs().max() / want.abs().max()).item() < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("use_pdl", [False, True])
def test_gpu_rows_kernels_in_a_cuda_graph(use_pdl: bool) -> None:
    """The per-pair kernels at 1, 2, 4 and 8 tokens on the Qwen3-30B-A3B layer, replayed from one CUDA graph
    (with programmatic dependent launch where the device has it) after new routing is written into the captured
    inputs, against the float32 reference."""
    from pagedserve.engine.kernels.launch import supports_programmatic_launch
    from pagedserve.engine.kernels.moe.triton import experts_rows

    if use_pdl and not supports_programmatic_launch(torch.device("cuda")):
        pytest.skip("no programmatic dependent launch on this device")
    hidden, intermediate, num_experts, top_k = QWEN3_30B_LAYER
    w13, w2 = qwen3_layer_experts()
    for num_tokens in (1, 2, 4, 8):
        static = routed_inputs(num_tokens, hidden, num_experts, top_k, dtype=torch.bfloat16, device="cuda")
        experts_rows(*static, w13, w2, use_pdl=use_pdl)  # compiled outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = experts_rows(*static, w13, w2, use_pdl=use_pdl)
        fresh = routed_inputs(num_tokens, hidden, num_experts, top_k, seed=7, dtype=torch.bfloat16, device="cuda")
        for buffer, value in zip(static, fresh):
            buffer.copy_(value)
        graph.replay()
        x, ids, weights = fresh
        want = experts_reference(x.float(), ids, weights, w13.float(), w2.float())
        assert ((out.float() - want).abs().max() / want.abs().max()).item() < 2e-2, num_tokens


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_tokens", [1, 8, 300])
def test_gpu_op_compiled_and_in_a_cuda_graph(num_tokens: int) -> None:
    """The op under torch.compile (fullgraph) and replayed from a CUDA graph gives the eager op's output, with
    new routing written into the captured inputs (no host sync, no data-dependent shape inside)."""
    hidden, intermediate, num_experts, top_k = QWEN3_30B_LAYER
    x, ids, weights = routed_inputs(num_tokens, hidden, num_experts, top_k, dtype=torch.bfloat16, device="cuda")
    w13, w2 = qwen3_layer_experts()
    policy = MoeKernelPolicy()

    def experts(x, ids, weights):
        return torch.ops.pagedserve.fused_experts(x, ids, weights, w13, w2, policy.kernel, policy.rows_max_tokens,
                                                  policy.grouped_mm_min_tokens) * 2.0

    eager = experts(x, ids, weights)
    compiled = torch.compile(experts, fullgraph=True)
    torch.testing.assert_close(compiled(x, ids, weights), eager)
    static = [x.clone(), ids.clone(), weights.clone()]
    compiled(*static)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(*static)
    x2, ids2, weights2 = routed_inputs(num_tokens, hidden, num_experts, top_k, seed=5, dtype=torch.bfloat16,
                                       device="cuda")
    for buffer, value in zip(static, (x2, ids2, weights2)):
        buffer.copy_(value)
    graph.replay()
    torch.testing.assert_close(out, experts(x2, ids2, weights2))


@functools.cache
def qwen3_layer_fp8_experts() -> dict[str, torch.Tensor]:
    """The same layer's experts in FP8 (e4m3, a scale per expert and row), quantized on the GPU."""
    from pagedserve.engine.kernels.moe.fp8 import quantize_expert_weight

    w13, w2 = qwen3_layer_experts()
    (q13, s13), (q2, s2) = quantize_expert_weight(w13), quantize_expert_weight(w2)
    return dict(w13=q13, w2=q2, w13_scale=s13, w2_scale=s2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_tokens", [1, 2, 8, 64, 600])
@pytest.mark.parametrize("kernel", ["rows", "triton", "grouped_mm"])
def test_gpu_fp8_kernels_match_reference(kernel: str, num_tokens: int) -> None:
    """FP8 experts on the Qwen3-30B-A3B layer: the per-pair kernels (W8A16) and the grouped ones (W8A8: Triton's
    FP8 dot, torch's _scaled_grouped_mm) against the float32 reference of the same semantics. The GPU quantizes
    the experts as the CPU does (the Triton rounding is bit-exact with quantize_rows)."""
    from pagedserve.engine.kernels.fp8_quant import quantize_rows
    from pagedserve.engine.kernels.moe.experts import run_kernel
    from pagedserve.engine.kernels.moe.grouped_mm import grouped_mm_unavailable

    hidden, intermediate, num_experts, top_k = QWEN3_30B_LAYER
    x, ids, weights = routed_inputs(num_tokens, hidden, num_experts, top_k, dtype=torch.bfloat16, device="cuda")
    fp8 = qwen3_layer_fp8_experts()
    if kernel == "grouped_mm" and grouped_mm_unavailable(x, fp8["w13"], fp8["w2"]):
        pytest.skip(grouped_mm_unavailable(x, fp8["w13"], fp8["w2"]))
    values, scale = quantize_rows(qwen3_layer_experts()[0][3])
    assert torch.equal(fp8["w13"][3].view(torch.uint8), values.view(torch.uint8))
    assert torch.equal(fp8["w13_scale"][3], scale.squeeze(-1))
    out = run_kernel(kernel, x, ids, weights, fp8["w13"], fp8["w2"], False, fp8["w13_scale"], fp8["w2_scale"])
    want = experts_reference(x.float(), ids, weights, **fp8, quantize_activations=kernel != "rows")
    assert out.dtype == torch.bfloat16
    assert ((out.float() - want).abs().max() / want.abs().max()).item() < 3e-2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_tokens", [1, 8, 300, 1024])
def test_gpu_fp8_op_compiled_and_in_a_cuda_graph(num_tokens: int) -> None:
    """The op on FP8 experts under torch.compile (fullgraph) and replayed from a CUDA graph with new routing gives
    the eager op's output (rows, Triton W8A8 and, at 1,024 tokens, _scaled_grouped_mm where it runs)."""
    hidden, intermediate, num_experts, top_k = QWEN3_30B_LAYER
    fp8 = qwen3_layer_fp8_experts()
    policy = MoeKernelPolicy()

    def experts(x, ids, weights):
        return torch.ops.pagedserve.fused_experts(x, ids, weights, fp8["w13"], fp8["w2"], policy.kernel,
                                                  policy.rows_max_tokens, policy.grouped_mm_min_tokens, False,
                                                  fp8["w13_scale"], fp8["w2_scale"]) * 2.0

    static = list(routed_inputs(num_tokens, hidden, num_experts, top_k, dtype=torch.bfloat16, device="cuda"))
    compiled = torch.compile(experts, fullgraph=True)
    torch.testing.assert_close(compiled(*static), experts(*static))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(*static)
    fresh = routed_inputs(num_tokens, hidden, num_experts, top_k, seed=5, dtype=torch.bfloat16, device="cuda")
    for buffer, value in zip(static, fresh):
        buffer.copy_(value)
    graph.replay()
    torch.testing.assert_close(out, experts(*fresh))


def _router_close_to_reference(got, want) -> None:
    """bf16 logits within rounding; the chosen experts' reference probabilities are the reference's top k (the
    same experts, up to near ties that a logit an ulp apart can order the other way); weights within rounding."""
    probs = torch.softmax(want[0], dim=-1, dtype=torch.float32)
    assert [t.dtype for t in got] == [t.dtype for t in want] and [t.shape for t in got] == [t.shape for t in want]
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(probs.gather(1, got[2]), probs.topk(got[2].shape[1], dim=-1).values,
                               rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(got[1].float(), want[1].float(), rtol=2e-2, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("normalize,cast,use_pdl", [(True, True, False), (False, True, False), (True, False, True)])
def test_gpu_router_kernel_in_a_cuda_graph(normalize: bool, cast: bool, use_pdl: bool) -> None:
    """The one-kernel router at 1, 2 and 8 tokens on the Qwen3-30B-A3B router (128 experts, top 8, bf16):
    48 calls (48 layers' weights) captured in one CUDA graph and replayed with new inputs five times, every
    call against transformers' router code in PyTorch: the counter protocol holds under real concurrency and
    is back at 0 after every call (with programmatic dependent launch: calls overlapping their predecessor)."""
    from pagedserve.engine.kernels.launch import supports_programmatic_launch
    from pagedserve.engine.kernels.moe.router import router_reference, router_triton

    if use_pdl and not supports_programmatic_launch(torch.device("cuda")):
        pytest.skip("no programmatic dependent launch on this device")

    hidden, _, num_experts, top_k = QWEN3_30B_LAYER
    generator = torch.Generator(device="cuda").manual_seed(0)
    weights = torch.randn(48, num_experts, hidden, generator=generator, device="cuda").to(torch.bfloat16) * 0.05
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    for num_tokens in (1, 2, 8):
        x = torch.randn(num_tokens, hidden, generator=generator, device="cuda").to(torch.bfloat16)
        router_triton(x, weights[0], counter, top_k, normalize, cast, use_pdl)  # compiled outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [router_triton(x, weight, counter, top_k, normalize, cast, use_pdl) for weight in weights]
        for _ in range(5):
            x.copy_(torch.randn(num_tokens, hidden, generator=generator, device="cuda"))
            graph.replay()
            torch.cuda.synchronize()
            assert counter.item() == 0
            for weight, got in zip(weights, outs):
                _router_close_to_reference(got, router_reference(x, weight, top_k, normalize, cast))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])  # cast to the logits' dtype / float32 weights
def test_gpu_fused_router_module_compiled(arch: str) -> None:
    """A router switched to the one-kernel router, compiled with fullgraph at one token (the op), and eager at 64
    tokens (its own code), against the module before the switch, in bf16."""
    from pagedserve.engine.kernels.moe.router import FusedTopKRouter, undo_fused_router, use_fused_router

    router = tiny_moe_model(arch, num_hidden_layers=1).model.layers[0].mlp.gate.to("cuda", torch.bfloat16)
    one, many = (torch.randn(tokens, router.weight.shape[1], device="cuda").to(torch.bfloat16) for tokens in (1, 64))
    with torch.no_grad():
        want_one, want_many = router(one), router(many)
        assert use_fused_router(router) is None and type(router) is FusedTopKRouter
        _router_close_to_reference(torch.compile(router, fullgraph=True)(one), want_one)
        for got, want in zip(router(many), want_many):
            assert torch.equal(got, want)
    undo_fused_router(router)


if __name__ == "__main__" and WORKER_FLAG in sys.argv:
    _interpreter_worker()


def test_a_model_with_attention_sinks_is_refused_at_load_not_served_wrong(tmp_path) -> None:
    """gpt-oss adds a learned sink logit to every softmax; the paged kernels have no such term, so the engine
    must refuse the model at start-up rather than generate other tokens than transformers."""
    from transformers import GptOssConfig, GptOssForCausalLM

    from pagedserve.config.engine import ConfigError
    from pagedserve.engine.llm import LLM

    config = GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                          num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match="attention sinks"):
        LLM.from_model(GptOssForCausalLM(config).eval(), None, device="cpu", num_blocks=16, block_size=8)
