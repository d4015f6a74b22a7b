"""FP8 linear layers (engine/kernels/fp8_linear.py): the quantization, the reference GEMM that runs anywhere,
the model conversion and what the memory plan counts, on CPU; the tensor-core GEMM against the reference
on a Hopper or newer GPU (compute capability 9.0+). Where FP8 may be asked for is config/resolve.py's, checked
in tests/config/test_resolve.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from pagedserve.engine.kernels.fp8_linear import (
    FP8_DTYPE,
    FP8_MAX,
    Fp8Linear,
    fp8_linear_reference,
    quantize_linears,
    quantize_rows,
    quantize_weight,
    supports_fp8_gemm,
)
from pagedserve.engine.runner.loader import weights_footprint_bytes
from tiny_models import build_tiny_model

HAS_FP8_GPU = torch.cuda.is_available() and supports_fp8_gemm(torch.device("cuda"))


def test_each_row_gets_its_own_scale_and_keeps_e4m3_precision() -> None:
    torch.manual_seed(0)
    weight = torch.randn(8, 64) * torch.logspace(-3, 2, 8)[:, None]  # rows five orders of magnitude apart
    weight[3] = 0.0
    quantized, scale = quantize_weight(weight)
    assert quantized.dtype == FP8_DTYPE and scale.dtype == torch.float32 and scale.shape == (8,)
    assert torch.allclose(scale[[0, 1, 2, 4]], weight[[0, 1, 2, 4]].abs().amax(dim=1) / FP8_MAX)
    # The largest weight of each row lands on e4m3's largest value; the rest within e4m3's 3 mantissa bits.
    assert torch.all(quantized.float().abs().amax(dim=1)[[0, 1, 2, 4, 5, 6, 7]] == FP8_MAX)
    dequantized = quantized.float() * scale[:, None]
    assert torch.all(dequantized[3] == 0)
    error = (dequantized - weight).abs()
    assert torch.all(error <= weight.abs() * 2**-4 + scale[:, None] * 2**-9)  # relative 1/16, or subnormal steps


def test_the_reference_gemm_is_the_float_product_of_the_quantized_operands() -> None:
    torch.manual_seed(1)
    linear = nn.Linear(96, 48, bias=True)
    x = torch.randn(2, 5, 96) * 3
    layer = Fp8Linear.from_linear(linear, use_scaled_mm=False)
    out = layer(x)
    assert out.shape == (2, 5, 48) and out.dtype == x.dtype
    x_q, x_scale = quantize_rows(x.reshape(-1, 96))
    expected = (x_q.float() * x_scale) @ layer.dequantized_weight(torch.float32).T + linear.bias
    assert torch.allclose(out.reshape(-1, 48), expected, atol=1e-5, rtol=1e-5)
    # And it stays close to the unquantized layer: a few percent, e4m3's precision on both operands.
    relative = (out - linear(x)).norm() / linear(x).norm()
    assert 0 < relative < 0.06


def test_a_model_keeps_its_lm_head_and_embeddings_and_the_plan_counts_fp8_bytes(tmp_path) -> None:
    model = AutoModelForCausalLM.from_pretrained(build_tiny_model("llama", tmp_path / "m", num_hidden_layers=2))
    linears = {name: module for name, module in model.named_modules() if type(module) is nn.Linear}
    lm_head = model.get_output_embeddings()
    before = weights_footprint_bytes(model)
    replaced = quantize_linears(model, use_scaled_mm=False)
    assert replaced == len(linears) - 1  # all but the LM head
    assert model.get_output_embeddings() is lm_head and lm_head.weight.dtype == torch.float32
    assert model.get_input_embeddings().weight.dtype == torch.float32
    fp8_layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert len(fp8_layers) == replaced and not any(type(m) is nn.Linear and m is not lm_head for m in model.modules())
    # Each weight went from 4 bytes an element to 1, plus a float32 scale per output feature.
    saved = sum(m.weight.numel() * 3 - m.weight.shape[0] * 4 for name, m in linears.items() if m is not lm_head)
    assert weights_footprint_bytes(model) == before - saved


def test_an_fp8_model_gives_logits_close_to_its_own_dtype(tmp_path) -> None:
    path = build_tiny_model("qwen2", tmp_path / "q", num_hidden_layers=2)  # q/k/v with bias
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    quantized = AutoModelForCausalLM.from_pretrained(path).eval()
    quantize_linears(quantized, use_scaled_mm=False)
    input_ids = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = reference(input_ids).logits, quantized(input_ids).logits
    relative = (got - want).norm() / want.norm()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True, reduction="batchmean")
    assert 0 < relative < 0.1 and kl < 0.05, (relative, kl)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_FP8_GPU, reason="needs a Hopper or newer GPU (compute capability 9.0+)")
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_the_tensor_core_gemm_matches_the_reference(rows: int, bias: bool) -> None:
    torch.manual_seed(2)
    linear = nn.Linear(4096, 1024, bias=bias, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    fast = Fp8Linear.from_linear(linear, use_scaled_mm=True)
    out = fast(x)
    want = fp8_linear_reference(x, fast.weight, fast.weight_scale, fast.bias)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 1024)
    assert (out.float() - want.float()).norm() / want.float().norm() < 1e-2
    graph_input = x.clone()
    graph = torch.cuda.CUDAGraph()
    fast(graph_input)  # warm-up outside the capture
    with torch.cuda.graph(graph):
        captured = fast(graph_input)
    graph.replay()
    assert torch.equal(captured, out)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_FP8_GPU, reason="needs a Hopper or newer GPU (compute capability 9.0+)")
def test_the_engine_serves_fp8_weights_through_graphs_and_compile(tiny_model_dir) -> None:
    """`quantization='fp8'` end to end on CUDA: tensor-core FP8 layers, decode graphs and compile, the memory
    plan counting FP8 bytes, and greedy tokens equal to transformers' on the same FP8 model, or parting from
    them only at a near-tie (bfloat16: random-weight near-ties may flip a token, as between bf16 runs)."""
    from pagedserve.engine.core.request import SamplingParams
    from pagedserve.engine.llm import LLM

    path = str(tiny_model_dir("llama"))
    llm = LLM(path, quantization="fp8", block_size=8, max_num_seqs=8)
    model = llm.engine.runner.model
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert layers and all(layer.use_scaled_mm for layer in layers)
    assert llm.engine.memory_plan.weights_bytes < weights_footprint_bytes(
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16))
    prompts = [[5 + i, 17, 23 + 2 * i, 40] for i in range(8)]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    quantize_linears(reference)
    for prompt, output in zip(prompts, outputs):
        got = output.outputs[0].token_ids
        ids = torch.tensor([prompt], device="cuda")
        want = reference.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, len(prompt):].tolist()
        if got == want:
            continue
        # Batched bf16 GEMMs sum in another order than one request alone: a random tiny model's near-tie may
        # flip. Where the tokens part, both must be the reference's top two, less than a bf16 rounding apart.
        split = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + want[:split]], device="cuda")).logits[0, -1].float()
        top2 = logits.topk(2)
        assert {got[split], want[split]} == set(top2.indices.tolist()), (prompt, got, want)
        assert (top2.values[0] - top2.values[1]).item() < 0.25, (prompt, got, want, top2)
    llm.engine.shutdown()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fp8_siblings_fuse_into_one_fp8_gemm_with_the_same_output(tmp_path, arch: str) -> None:
    from pagedserve.engine.kernels.fused_projections import Fp8FusedLead, FusedFollower, ProjectionFusion

    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(arch, tmp_path / arch, num_hidden_layers=2)).eval()
    quantize_linears(model, use_scaled_mm=False)
    input_ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unfused = model(input_ids).logits
        fusion = ProjectionFusion.watch(model)
        model(input_ids)
        groups = fusion.apply()
        fused = model(input_ids).logits
    assert sorted("/".join(group.names) for group in groups) == ["gate_proj/up_proj"] * 2 + ["q_proj/k_proj/v_proj"] * 2
    attention = model.model.layers[0].self_attn
    assert isinstance(attention.q_proj, Fp8FusedLead) and isinstance(attention.k_proj, FusedFollower)
    assert attention.q_proj.fused_weight.dtype == FP8_DTYPE and (attention.q_proj.fused_bias is not None) == (arch == "qwen2")
    assert torch.allclose(fused, unfused, atol=1e-5, rtol=1e-5)
    # A follower called on its own (the lead did not run first) computes its FP8 slice alone.
    x = torch.randn(3, attention.k_proj.in_features)
    (own_group,) = [group for group in groups if group.parent is attention]
    original_k = own_group.originals[own_group.names.index("k_proj")]
    assert torch.allclose(attention.k_proj(x), original_k(x), atol=1e-6)
    fusion.undo()
    assert isinstance(model.model.layers[0].self_attn.q_proj, Fp8Linear)
    with torch.no_grad():
        assert torch.allclose(model(input_ids).logits, unfused, atol=1e-5, rtol=1e-5)


def test_the_one_row_gemm_takes_fp8_layers_and_leads_and_gives_them_back(tmp_path) -> None:
    from pagedserve.engine.kernels.decode_linear import (
        DecodeFp8FusedLead,
        DecodeFp8Linear,
        DecodeLinear,
        use_decode_linear,
    )
    from pagedserve.engine.kernels.fused_projections import Fp8FusedLead, ProjectionFusion

    model = AutoModelForCausalLM.from_pretrained(build_tiny_model("llama", tmp_path / "m", num_hidden_layers=1)).eval()
    quantize_linears(model, use_scaled_mm=False)
    input_ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fusion = ProjectionFusion.watch(model)
        want = model(input_ids).logits
        fusion.apply()
        swap = use_decode_linear(model)
        swapped = {type(m) for m in swap.modules}
        got = model(input_ids[:, :1]).logits  # one row: through the op (on CPU its library fallback)
        assert torch.allclose(got, want[:, :1], atol=1e-5)
    # o_proj and down_proj, the q/k/v and gate/up leads; the LM head stays bf16 and takes the bf16 kernel
    assert swapped == {DecodeFp8Linear, DecodeFp8FusedLead, DecodeLinear}
    swap.undo()
    assert {type(m) for m in model.modules()} >= {Fp8Linear, Fp8FusedLead}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_FP8_GPU, reason="needs a Hopper or newer GPU (compute capability 9.0+)")
@pytest.mark.parametrize("shape", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])
def test_one_row_reads_fp8_weights_on_the_gpu(shape: tuple[int, int]) -> None:
    from pagedserve.engine.kernels.decode_linear import decode_linear_fp8, uses_kernel

    torch.manual_seed(3)
    weight, scale = quantize_weight(torch.randn(*shape, device="cuda", dtype=torch.bfloat16))
    x = torch.randn(1, shape[1], device="cuda", dtype=torch.bfloat16)
    assert uses_kernel(x, weight)
    out = decode_linear_fp8(x, weight, scale, None, True, False)
    want = x.float() @ (weight.float() * scale[:, None]).T
    assert (out.float() - want).norm() / want.norm() < 1e-2
