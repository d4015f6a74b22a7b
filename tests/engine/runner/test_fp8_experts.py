"""FP8 MoE experts at load (engine/kernels/moe/fp8.py, engine/runner/fp8_checkpoint.py): quantized from a
checkpoint in the model's dtype, or read from an FP8 checkpoint whose experts are FP8 (saved per expert, as
transformers saves them), on CPU; the resolve rules; on a GPU, the engine end to end.

Resolution refuses quantization='fp8' off Hopper, so, as in test_fp8_checkpoint.py, the CPU tests call
`load_model` with quantization 'fp8' themselves and hand the model to an engine whose MoE backend is 'fused' (on
CPU the op runs the float32 reference on the dequantized experts).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from pagedserve.config.engine import ConfigError, EngineConfig
from pagedserve.config.resolve import ModelFacts, Platform, resolve
from pagedserve.engine.core.llm_engine import LLMEngine
from pagedserve.engine.core.request import SamplingParams
from pagedserve.engine.kernels.fp8_linear import FP8_DTYPE, Fp8Linear, supports_fp8_gemm
from pagedserve.engine.kernels.moe.fp8 import dequantize_expert_weight
from pagedserve.engine.runner.fp8_checkpoint import convert_fp8_experts, fp8_checkpoint_format
from pagedserve.engine.runner.loader import LoadedModel, load_model, weights_footprint_bytes
from pagedserve.engine.runner.platform import model_facts
from resolved import resolved
from tiny_models import build_tiny_model, engine_greedy, save_fp8_checkpoint, transformers_greedy

HAS_FP8_GPU = torch.cuda.is_available() and supports_fp8_gemm(torch.device("cuda"))
PROMPTS = [[5, 17, 42, 99, 7, 130, 64], [33, 8, 250, 71, 4]]
MAX_TOKENS = 6
PROJECTIONS = {"qwen3_moe": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w3", "w2")}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp8-experts")
    qwen = build_tiny_model("qwen3_moe", root / "qwen3_moe", num_hidden_layers=2)
    mixtral = build_tiny_model("mixtral", root / "mixtral", num_hidden_layers=1)
    return {
        "qwen3_moe": qwen,
        "mixtral": mixtral,
        # One scale per tensor, i.e. per expert's projection: rows share it, so the experts convert exactly.
        "qwen3_moe-fp8": save_fp8_checkpoint(qwen, root / "qwen3_moe-fp8", weight_block_size=None),
        # Per-channel scales, Mixtral's w1/w3/w2 under block_sparse_moe (renamed to mlp by transformers at load).
        "mixtral-fp8": save_fp8_checkpoint(mixtral, root / "mixtral-fp8", method="compressed-tensors"),
    }


def _load(path: Path, quantization: str, fp8_experts: bool) -> tuple[EngineConfig, LoadedModel]:
    config = EngineConfig(model=str(path), block_size=8, num_blocks=64, max_num_seqs=4, moe_backend="fused")
    load = dataclasses.replace(resolved(config).load, quantization=quantization, fp8_experts=fp8_experts)
    return config, load_model(load)


def _expert_blocks(model: nn.Module) -> list[nn.Module]:
    return [layer.mlp.experts for layer in model.model.layers]


def test_resolve_rules_for_fp8_experts() -> None:
    """FP8 experts with quantization 'fp8' on the fused MoE path; with moe_backend 'transformers' they stay in the
    model's dtype, said once among the resolved settings (for MoE models only)."""
    hopper = Platform(cuda_available=True, bf16_supported=True, triton_unavailable_reason="", compute_capability=(9, 0))
    moe, dense = ModelFacts(512, has_moe_experts=True), ModelFacts(512)
    fused = resolve(EngineConfig(quantization="fp8"), hopper, moe)
    assert fused.load.fp8_experts and "fp8_experts" not in fused.describe()
    kept = resolve(EngineConfig(quantization="fp8", moe_backend="transformers"), hopper, moe)
    assert not kept.load.fp8_experts
    assert "fp8_experts=False (moe_backend='transformers' runs transformers' expert code" in kept.describe()
    assert "fp8_experts" not in resolve(EngineConfig(quantization="fp8", moe_backend="transformers"), hopper,
                                        dense).describe()
    assert not resolve(EngineConfig(), hopper, moe).load.fp8_experts
    with pytest.raises(ConfigError, match="EngineConfig.quantization='fp8' cannot run here"):
        resolve(EngineConfig(quantization="fp8", moe_backend="fused"), Platform.cpu_only(), moe)


def test_experts_quantized_at_load(checkpoints) -> None:
    """A checkpoint in the model's dtype: with fp8_experts every block's experts become e4m3 with row scales
    (beside the FP8 linears); without, they keep the model's dtype. model_facts sees the experts."""
    path = checkpoints["qwen3_moe"]
    assert model_facts(AutoConfig.from_pretrained(path)).has_moe_experts
    _, loaded = _load(path, "fp8", fp8_experts=True)
    for experts in _expert_blocks(loaded.model):
        assert experts.gate_up_proj.dtype == experts.down_proj.dtype == FP8_DTYPE
        assert experts.gate_up_proj_scale.shape == (8, 64) and experts.down_proj_scale.dtype == torch.float32
    assert isinstance(loaded.model.model.layers[0].self_attn.q_proj, Fp8Linear)
    _, plain = _load(path, "fp8", fp8_experts=False)
    assert all(e.gate_up_proj.dtype == torch.float32 and not hasattr(e, "gate_up_proj_scale")
               for e in _expert_blocks(plain.model))


def test_fp8_checkpoint_experts_dequantized_as_transformers_does(checkpoints) -> None:
    """Experts in the model's dtype (quantization 'none', or moe_backend 'transformers'): the checkpoint's FP8
    experts are dequantized to exactly what transformers' own FP8 load dequantizes them to (no longer refused)."""
    path = checkpoints["qwen3_moe-fp8"]
    _, loaded = _load(path, "none", fp8_experts=False)
    reference = AutoModelForCausalLM.from_pretrained(path).eval()  # transformers dequantizes it on CPU
    for ours, theirs in zip(_expert_blocks(loaded.model), _expert_blocks(reference)):
        assert torch.equal(ours.gate_up_proj, theirs.gate_up_proj) and torch.equal(ours.down_proj, theirs.down_proj)


@pytest.mark.parametrize("name", ["qwen3_moe-fp8", "mixtral-fp8"])
def test_fp8_checkpoint_experts_kept_fp8(checkpoints, name: str) -> None:
    """Each expert's projection keeps the checkpoint's e4m3 bytes and scales (gate rows, then up rows, then down),
    and the memory plan counts the experts at 1 byte a weight plus a float32 scale per row, exactly; Qwen3-MoE's
    greedy tokens equal transformers' model holding the same FP8 linears and the dequantized experts."""
    path = checkpoints[name]
    arch = name.removesuffix("-fp8")
    fmt = fp8_checkpoint_format(AutoConfig.from_pretrained(path))
    config, loaded = _load(path, "fp8", fp8_experts=True)
    tensors = load_file(path / "model.safetensors")
    block = "mlp" if arch == "qwen3_moe" else "block_sparse_moe"
    gate, up, down = PROJECTIONS[arch]
    saved_bytes = 0
    for layer, experts in enumerate(_expert_blocks(loaded.model)):
        intermediate = experts.gate_up_proj.shape[1] // 2
        for expert in range(experts.gate_up_proj.shape[0]):
            prefix = f"model.layers.{layer}.{block}.experts.{expert}"
            for projection, weight, scale, rows in (
                (gate, experts.gate_up_proj, experts.gate_up_proj_scale, slice(0, intermediate)),
                (up, experts.gate_up_proj, experts.gate_up_proj_scale, slice(intermediate, None)),
                (down, experts.down_proj, experts.down_proj_scale, slice(None)),
            ):
                values = tensors[f"{prefix}.{projection}.weight"]
                assert torch.equal(weight[expert, rows].view(torch.uint8), values.view(torch.uint8))
                want = tensors[f"{prefix}.{projection}.{fmt.scale_name}"].float().reshape(-1)
                assert torch.equal(scale[expert, rows], want.expand(values.shape[0]))
                saved_bytes += values.numel() * 3 - values.shape[0] * 4  # float32 -> e4m3 and a scale per row
    source = AutoModelForCausalLM.from_pretrained(checkpoints[arch]).eval()
    # Before the engine fuses projections: the reference takes our FP8 linears as they were loaded.
    linear_layers = {name: m for name, m in loaded.model.named_modules() if isinstance(m, Fp8Linear)}
    saved_bytes += sum(m.weight.numel() * 3 - m.weight.shape[0] * 4 for m in linear_layers.values())
    engine = LLMEngine(config, loaded=loaded)
    assert engine.memory_plan.weights_bytes == weights_footprint_bytes(source) - saved_bytes
    if arch != "qwen3_moe":
        engine.shutdown()
        return
    for module_name, module in linear_layers.items():  # the reference: our FP8 linears, experts dequantized
        parent, _, child = module_name.rpartition(".")
        setattr(source.get_submodule(parent), child, module)
    for ours, theirs in zip(_expert_blocks(loaded.model), _expert_blocks(source)):
        theirs.gate_up_proj.data = dequantize_expert_weight(ours.gate_up_proj, ours.gate_up_proj_scale)
        theirs.down_proj.data = dequantize_expert_weight(ours.down_proj, ours.down_proj_scale)
    assert engine_greedy(engine, PROMPTS, MAX_TOKENS) == transformers_greedy(source, PROMPTS, MAX_TOKENS)


def test_partly_fp8_experts_are_refused() -> None:
    """A block whose experts are FP8 for some projections only is a ConfigError naming the module (the others'
    rows would hold unscaled values)."""
    from tiny_models import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe", num_hidden_layers=1))
    scales = {f"model.layers.0.mlp.experts.{expert}.{projection}": torch.ones(1, 1)
              for expert in range(8) for projection in ("gate_proj", "up_proj", "down_proj")}
    del scales["model.layers.0.mlp.experts.3.up_proj"]
    fmt = fp8_checkpoint_format(type("Config", (), {"quantization_config": {"quant_method": "fp8"}})())
    with pytest.raises(ConfigError, match=r"experts of model\.layers\.0\.mlp\.experts are only partly FP8"):
        convert_fp8_experts(model, scales, fmt, torch.device("cpu"), keep_fp8=True)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_FP8_GPU, reason="needs a Hopper or newer GPU (compute capability 9.0+)")
@pytest.mark.parametrize("source", ["qwen3_moe", "qwen3_moe-fp8"])
def test_gpu_engine_with_fp8_experts_matches_transformers_on_the_dequantized_model(checkpoints, source: str) -> None:
    """quantization='fp8' on Hopper (fused MoE, compiled, decode graphs): from a checkpoint in the model's dtype
    (quantized at load) and from the FP8 checkpoint (kept FP8, no wider copy). The experts are e4m3 on the GPU;
    scored teacher-forced along the engine's greedy paths, its tokens' log-probabilities are those of
    transformers' model (bf16) holding the same FP8 linears and the experts dequantized, within the FP8
    activations' rounding (batch 1-8 steps take the per-pair W8A16 kernels, the prompts the W8A8 grouped one,
    whose e4m3 inputs the reference does not round). A wrong scale or layout is off by whole nats; greedy paths
    compared token for token failed without a bug (a near tie parts them, after which contexts differ)."""
    from pagedserve.engine.llm import LLM
    from tiny_models import forced_logprobs

    llm = LLM(str(checkpoints[source]), quantization="fp8", block_size=8, max_num_seqs=8)
    assert llm.engine.settings.load.fp8_experts and llm.engine.settings.runner.moe_backend == "fused"
    model = llm.engine.runner.model
    experts = _expert_blocks(model)
    assert all(e.gate_up_proj.dtype == FP8_DTYPE and e.gate_up_proj.is_cuda for e in experts)
    assert llm.engine.memory_plan.weights_bytes == weights_footprint_bytes(model)
    reference = AutoModelForCausalLM.from_pretrained(checkpoints["qwen3_moe"], dtype=torch.bfloat16).cuda().eval()
    loaded = load_model(dataclasses.replace(llm.engine.settings.load))  # the same FP8 weights, unfused layers
    for module_name, module in loaded.model.named_modules():
        if isinstance(module, Fp8Linear):
            parent, _, child = module_name.rpartition(".")
            setattr(reference.get_submodule(parent), child, module)
    for ours, theirs in zip(_expert_blocks(loaded.model), _expert_blocks(reference)):
        theirs.gate_up_proj.data = dequantize_expert_weight(ours.gate_up_proj, ours.gate_up_proj_scale, torch.bfloat16)
        theirs.down_proj.data = dequantize_expert_weight(ours.down_proj, ours.down_proj_scale, torch.bfloat16)
    prompts = [[5 + i, 17, 23 + 2 * i, 40, 9 * i + 3] for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    llm.engine.shutdown()
    ours, theirs = [], []
    for prompt, output in zip(prompts, outputs):
        tokens = output.outputs[0].token_ids
        ours.append(torch.tensor([top[token].logprob for token, top in zip(tokens, output.outputs[0].logprobs)]))
        theirs.append(forced_logprobs(reference, prompt, tokens))
    error = (torch.cat(ours) - torch.cat(theirs)).abs()
    summary = f"{source}: |engine - reference| over {len(error)} tokens: mean {error.mean():.4f}, max {error.max():.4f}"
    print(summary)
    # Bounds for wiring, not for rounding: a wrong scale, layout or expert is off by nats on most tokens; the
    # FP8 activations' rounding moves a random tiny model's log-probabilities by hundredths (the figures print).
    assert error.mean() <= 0.1 and error.max() <= 1.0, summary
