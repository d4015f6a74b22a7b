"""FP8 MLPs whose down projection's input is quantized by the activation's kernel (engine/kernels/fp8_mlp.py).

On CPU the fused op runs its PyTorch reference and the FP8 GEMM its float32 reference, so the fused forward must
give the unfused forward's values bit for bit: on tiny random Llama and Qwen2 models (with and without projection
fusion, float32 and bfloat16), and through the engine (greedy tokens and logprobs with the fusion on and off).
MLPs the fused path must not take keep their forward: GELU-tanh (Gemma2), a down projection under LoRA or with a
hook (tensor parallel's all-reduce), a forward that computes something else, one-row inputs, torch.compile by a
compiler other than Inductor on CUDA, and the engine with LoRA enabled. On a GPU (`gpu` in the test's name):
the engine with compile and CUDA graphs gives the same tokens and logprobs with the fusion on and off.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from pagedserve.config.engine import EngineConfig
from pagedserve.engine.core.llm_engine import LLMEngine
from pagedserve.engine.core.request import SamplingParams
from pagedserve.engine.kernels import fp8_mlp
from pagedserve.engine.kernels.fp8_linear import Fp8Linear, quantize_linears, supports_fp8_gemm
from pagedserve.engine.kernels.fp8_mlp import FusedFp8MlpForward, use_fp8_mlps, why_not_fused
from pagedserve.engine.kernels.fused_projections import ProjectionFusion
from pagedserve.engine.runner.loader import load_model
from resolved import resolved
from tiny_models import build_tiny_model

HAS_FP8_GPU = torch.cuda.is_available() and supports_fp8_gemm(torch.device("cuda"))
PROMPTS = [[5, 17, 42, 99, 7, 130, 64, 201, 12], [33, 8, 250, 71, 4], list(range(20, 50))]
MAX_TOKENS = 8


def fp8_model(tmp_path, arch: str, dtype: torch.dtype = torch.float32, fuse_projections: bool = True) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(arch, tmp_path / arch, num_hidden_layers=2),
                                                 dtype=dtype).eval()
    quantize_linears(model, use_scaled_mm=False)
    if fuse_projections:
        fusion = ProjectionFusion.watch(model)
        with torch.no_grad():
            model(torch.tensor([[5, 6, 7]]))
        fusion.apply()
    return model


@pytest.fixture
def fused_op_calls(monkeypatch) -> list[int]:
    """How many times the fused MLPs called the fused op (one entry per call: its rows)."""
    calls: list[int] = []
    op = fp8_mlp.silu_mul_quantize_fp8

    def counted(gate: torch.Tensor, up: torch.Tensor, inductor: bool):
        calls.append(gate.shape[0])
        return op(gate, up, inductor)

    monkeypatch.setattr(fp8_mlp, "silu_mul_quantize_fp8", counted)
    return calls


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fuse_projections", [True, False])
def test_the_fused_forward_gives_the_unfused_values(tmp_path, arch: str, dtype: torch.dtype, fuse_projections: bool,
                                                    fused_op_calls: list[int]) -> None:
    model = fp8_model(tmp_path, arch, dtype, fuse_projections)
    input_ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids).logits
        swap = use_fp8_mlps(model, dtype)
        fused_op_calls.clear()  # the check's calls
        got = model(input_ids).logits
    mlps = [layer.mlp for layer in model.model.layers]
    assert [module for module, _ in swap.modules] == mlps and all(isinstance(m, FusedFp8MlpForward) for m in mlps)
    assert type(mlps[0]).__name__ == f"FusedFp8{type(mlps[0]).__mro__[2].__name__}"  # a subclass of its own class
    assert fused_op_calls == [24, 24]  # each layer's MLP took the fused path over every row
    assert torch.equal(got, want)
    swap.undo()
    assert not any(isinstance(m, FusedFp8MlpForward) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, want)


def test_one_row_takes_the_mlps_own_forward(tmp_path, fused_op_calls: list[int]) -> None:
    """A one-token step's down projection reads its activations unquantized (the one-row GEMM): nothing to fuse."""
    model = fp8_model(tmp_path, "llama")
    use_fp8_mlps(model, torch.float32)
    fused_op_calls.clear()
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp(torch.randn(1, 1, mlp.gate_proj.in_features))
    assert fused_op_calls == []


def test_mlps_the_fused_path_must_not_take_keep_their_forward(tmp_path, caplog) -> None:
    from pagedserve.engine.runner.lora import LoraLayer, LoraLinear, LoraStep

    caplog.set_level(logging.INFO)
    gemma = fp8_model(tmp_path, "gemma2")  # GELU-tanh
    assert use_fp8_mlps(gemma, torch.float32).modules == []
    assert "activation GELUTanh" in caplog.text
    assert why_not_fused(AutoModelForCausalLM.from_pretrained(build_tiny_model("llama", tmp_path / "bf16"))
                         .model.layers[0].mlp) == "down projection not FP8"  # a bf16 model is left as it is

    model = fp8_model(tmp_path, "llama")
    lora_mlp, hooked_mlp = (layer.mlp for layer in model.model.layers)
    down = lora_mlp.down_proj
    lora_mlp.down_proj = LoraLinear(down, LoraLayer(down.in_features, [down.out_features], 1, 4, torch.float32,
                                                    torch.device("cpu"), LoraStep()))
    hooked_mlp.down_proj.register_forward_hook(lambda _module, _args, output: output * 2)  # as TP's all-reduce
    caplog.clear()
    assert use_fp8_mlps(model, torch.float32).modules == []
    assert why_not_fused(lora_mlp) == "down projection not FP8" and "1 with down projection with hooks" in caplog.text


def test_a_forward_that_computes_something_else_keeps_its_own(tmp_path) -> None:
    model = fp8_model(tmp_path, "llama")
    mlp = model.model.layers[0].mlp

    class ScaledMLP(type(mlp)):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) * 2)

    mlp.__class__ = ScaledMLP
    swap = use_fp8_mlps(model, torch.float32)
    assert [module for module, _ in swap.modules] == [model.model.layers[1].mlp]
    assert type(mlp) is ScaledMLP


def test_a_fused_op_that_fails_here_leaves_every_mlp_its_own_forward(tmp_path, monkeypatch, caplog) -> None:
    def broken(gate: torch.Tensor, up: torch.Tensor, inductor: bool):
        raise RuntimeError("no kernel for this device")  # as a Triton kernel that does not build on a GPU

    monkeypatch.setattr(fp8_mlp, "silu_mul_quantize_fp8", broken)
    model = fp8_model(tmp_path, "llama")
    with caplog.at_level(logging.WARNING, logger=fp8_mlp.__name__):
        swap = use_fp8_mlps(model, torch.float32)
    assert swap.modules == []
    assert not any(isinstance(layer.mlp, FusedFp8MlpForward) for layer in model.model.layers)
    assert "the fused forward failed (RuntimeError: no kernel for this device)" in caplog.text
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]))  # the model still runs


def test_the_switch_turns_it_off(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(fp8_mlp, "FUSE_ACTIVATION_QUANTIZATION", False)
    model = fp8_model(tmp_path, "llama")
    assert use_fp8_mlps(model, torch.float32).modules == []
    assert not any(isinstance(m, FusedFp8MlpForward) for m in model.modules())


def test_under_compile_other_than_inductor_on_cuda_the_mlp_runs_its_own_forward(tmp_path,
                                                                              fused_op_calls: list[int]) -> None:
    """Only Inductor's Triton kernel computes the unfused product the fused kernel reproduces: traced by another
    compiler (here `eager`), or on CPU, the fused MLP traces its own forward, and gives its values."""
    model = fp8_model(tmp_path, "llama", torch.bfloat16)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        want = mlp(x)
        use_fp8_mlps(model, torch.bfloat16, inductor_compiled=True)  # on CPU: never matched with Inductor
        assert mlp.inductor_compiled and not mlp.inductor_matched
        fused_op_calls.clear()
        got = torch.compile(mlp, backend="eager", fullgraph=True)(x)
    assert fused_op_calls == [] and torch.equal(got, want)


def _engine(path, *, fuse: bool, monkeypatch, dtype: str = "bfloat16", **config) -> LLMEngine:
    """The engine over a model that `load_model` quantized to FP8 (resolution refuses quantization='fp8' off
    Hopper, so the FP8 model is built here and handed over, as tests/engine/runner/test_fp8_checkpoint.py does)."""
    monkeypatch.setattr(fp8_mlp, "FUSE_ACTIVATION_QUANTIZATION", fuse)
    engine_config = EngineConfig(model=str(path), block_size=8, num_blocks=64, max_num_seqs=4, dtype=dtype, **config)
    load = dataclasses.replace(resolved(engine_config).load, quantization="fp8")
    return LLMEngine(engine_config, loaded=load_model(load))


def _greedy_with_logprobs(engine: LLMEngine) -> list[tuple[list[int], list[float]]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    for index, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{index}", prompt, params)
    outputs: dict[str, tuple[list[int], list[float]]] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens, logprobs = outputs.setdefault(output.request_id, ([], []))
            completion = output.outputs[0]
            tokens.extend(completion.token_ids)
            logprobs.extend(step[token] for step, token in zip(completion.logprobs, completion.token_ids))
    engine.shutdown()
    return [outputs[f"r{index}"] for index in range(len(PROMPTS))]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_engines_greedy_output_is_unchanged_by_the_fusion(tiny_model_dir, monkeypatch, dtype: str) -> None:
    path = tiny_model_dir("llama")
    fused = _engine(path, fuse=True, monkeypatch=monkeypatch, dtype=dtype)
    model = fused.runner.model
    assert all(isinstance(layer.mlp, FusedFp8MlpForward) for layer in model.model.layers)
    assert all(isinstance(layer.mlp.down_proj, Fp8Linear) for layer in model.model.layers)
    got = _greedy_with_logprobs(fused)
    assert not any(isinstance(m, FusedFp8MlpForward) for m in model.modules())  # shutdown gave the model back
    want = _greedy_with_logprobs(_engine(path, fuse=False, monkeypatch=monkeypatch, dtype=dtype))
    assert got == want


def test_the_engine_with_lora_enabled_leaves_the_mlps_alone(tiny_model_dir, monkeypatch) -> None:
    engine = _engine(tiny_model_dir("llama"), fuse=True, monkeypatch=monkeypatch, enable_lora=True)
    assert not any(isinstance(m, FusedFp8MlpForward) for m in engine.runner.model.modules())
    engine.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_FP8_GPU, reason="needs a Hopper or newer GPU (compute capability 9.0+)")
def test_gpu_engine_with_compile_and_graphs_gives_the_same_tokens_fused_and_unfused(tiny_model_dir,
                                                                                     monkeypatch) -> None:
    """quantization='fp8' on CUDA: compiled decoder layers (Inductor numerics in the fused kernel), decode CUDA
    graphs (one-row steps keep the one-row GEMM), prompt steps eager through the same compiled layers."""
    from pagedserve.engine.llm import LLM

    path = str(tiny_model_dir("llama"))
    prompts = [[5 + i, 17, 23 + 2 * i, 40] * (1 + i) for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    results = []
    for fuse in (True, False):
        monkeypatch.setattr(fp8_mlp, "FUSE_ACTIVATION_QUANTIZATION", fuse)
        llm = LLM(path, quantization="fp8", block_size=8, max_num_seqs=8)
        mlps = [layer.mlp for layer in llm.engine.runner.model.model.layers]
        assert all(isinstance(m, FusedFp8MlpForward) == fuse for m in mlps)
        assert not fuse or all(m.inductor_compiled and m.inductor_matched for m in mlps)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        results.append([(o.outputs[0].token_ids, [step[t] for step, t in zip(o.outputs[0].logprobs,
                                                                             o.outputs[0].token_ids)])
                        for o in outputs])
        llm.engine.shutdown()
    assert results[0] == results[1]
