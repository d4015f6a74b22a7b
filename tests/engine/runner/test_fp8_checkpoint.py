"""FP8 checkpoints (engine/runner/fp8_checkpoint.py): transformers' fine-grained format and compressed-tensors
FP8, saved from a tiny Llama, loaded into FP8 layers or dequantized, on CPU.

What is exact, and asserted so:
- dequantized (quantization='none' on CPU), our weights are transformers' dequantized weights bit for bit, so
  greedy tokens equal transformers' `generate` on the same checkpoint;
- kept FP8 from a checkpoint whose rows share a scale (per tensor, per channel), every layer holds the
  checkpoint's e4m3 values and scales: greedy tokens equal transformers' dequantized model with those layers
  swapped for FP8 reference layers built from the checkpoint's tensors (the same e4m3 operands, float32
  accumulation; the paged attention differs from transformers' by float32 rounding only, as in every
  token-for-token test of the suite);
- block scales that differ along a row are rescaled into the row's largest: within half an e4m3 step.

FP8 layers run on CPU through the float32 reference GEMM (engine/kernels/fp8_linear.py). Resolution refuses
quantization='fp8' off Hopper, so, as in tests/engine/kernels/test_fp8_linear.py, these tests build the FP8
model themselves (`load_model` with quantization='fp8') and hand it to the engine.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from pagedserve.config.engine import ConfigError, EngineConfig
from pagedserve.config.resolve import ModelFacts, Platform, resolve
from pagedserve.engine.core.llm_engine import LLMEngine
from pagedserve.engine.core.request import SamplingParams
from pagedserve.engine.kernels.fp8_linear import FP8_DTYPE, Fp8Linear, quantize_rows, supports_fp8_gemm
from pagedserve.engine.runner.fp8_checkpoint import (
    dequantize_blocks,
    fp8_checkpoint_format,
    rows_from_blocks,
    scale_grid,
)
from pagedserve.engine.runner.loader import LoadedModel, load_model, weights_footprint_bytes
from pagedserve.engine.runner.platform import model_facts
from resolved import resolved
from tiny_models import build_tiny_model, engine_greedy, save_fp8_checkpoint, transformers_greedy

HAS_FP8_GPU = torch.cuda.is_available() and supports_fp8_gemm(torch.device("cuda"))
SKIPPED = "model.layers.1.mlp.down_proj"  # stored unquantized (modules_to_not_convert / ignore)
PROMPTS = [[5, 17, 42, 99, 7, 130, 64, 201, 12], [33, 8, 250, 71, 4], list(range(20, 50))]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp8-checkpoints")
    source = build_tiny_model("llama", root / "bf16", num_hidden_layers=2)
    return {
        "source": source,
        # 32x32 blocks: every width of the tiny model (32, 64, 128) divides, so transformers' own quantizer
        # writes every projection, and a row spans several blocks with different scales.
        "blocks": save_fp8_checkpoint(source, root / "blocks", weight_block_size=(32, 32),
                                      modules_to_not_convert=(SKIPPED,)),
        "tensor": save_fp8_checkpoint(source, root / "tensor", weight_block_size=None,
                                      modules_to_not_convert=(SKIPPED,)),
        "channel": save_fp8_checkpoint(source, root / "channel", method="compressed-tensors",
                                       modules_to_not_convert=(SKIPPED,), static_input_scales=True),
    }


def _load(path: Path, quantization: str, **config) -> tuple[EngineConfig, LoadedModel]:
    engine_config = EngineConfig(model=str(path), block_size=8, num_blocks=64, max_num_seqs=4, **config)
    load = dataclasses.replace(resolved(engine_config).load, quantization=quantization)
    return engine_config, load_model(load)


def _greedy(engine: LLMEngine) -> list[list[int]]:
    return engine_greedy(engine, PROMPTS, MAX_TOKENS)


def _transformers_greedy(model: nn.Module) -> list[list[int]]:
    return transformers_greedy(model, PROMPTS, MAX_TOKENS)


def test_transformers_reads_the_fine_grained_checkpoint_and_so_do_we(checkpoints, caplog) -> None:
    """The format as transformers' code defines it; dequantized on CPU, our tokens are transformers'."""
    from transformers import AutoConfig
    from transformers.integrations.finegrained_fp8 import FP8Linear

    path = checkpoints["blocks"]
    tensors = load_file(path / "model.safetensors")
    quantization = AutoConfig.from_pretrained(path).quantization_config
    assert quantization["quant_method"] == "fp8" and quantization["weight_block_size"] == [32, 32]
    layers = [key.removesuffix(".weight_scale_inv") for key in tensors if key.endswith(".weight_scale_inv")]
    assert len(layers) == 13 and SKIPPED not in layers and tensors[f"{SKIPPED}.weight"].dtype == torch.float32
    for name in layers:  # the shapes transformers' FP8 layer allocates for this checkpoint's tensors
        weight = tensors[f"{name}.weight"]
        expected = FP8Linear(weight.shape[1], weight.shape[0], block_size=(32, 32))
        assert weight.dtype == expected.weight.dtype == FP8_DTYPE
        assert tensors[f"{name}.weight_scale_inv"].shape == expected.weight_scale_inv.shape

    caplog.set_level(logging.INFO)
    engine = LLMEngine(EngineConfig(model=str(path), block_size=8, num_blocks=64, max_num_seqs=4))
    assert engine.settings.load.quantization == "none"
    assert "quantization=none (the checkpoint's FP8 weights are dequantized to float32 at load" in engine.settings.describe()
    model = engine.runner.model
    assert not any(isinstance(m, Fp8Linear) for m in model.modules())
    reference = AutoModelForCausalLM.from_pretrained(path).eval()  # transformers dequantizes it on CPU
    linears = [(n, m) for n, m in reference.named_modules() if isinstance(m, nn.Linear)]
    assert all(torch.equal(model.get_submodule(n).weight, m.weight) for n, m in linears)  # fused: their rows
    assert _greedy(engine) == _transformers_greedy(reference)


@pytest.mark.parametrize("name", ["tensor", "channel"])
def test_fp8_layers_hold_the_checkpoint_values_and_match_a_reference(checkpoints, name: str, caplog) -> None:
    """Rows that share a scale convert without loss: the e4m3 bytes and scales of the checkpoint, the
    unquantized layers, LM head and embeddings in the model's dtype, and the memory plan counts 1 byte a weight
    plus a float32 scale per row. The static activation scales of the compressed-tensors checkpoint are left
    unused (activations are scaled per token), and said so."""
    path = checkpoints[name]
    caplog.set_level(logging.INFO)
    config, loaded = _load(path, "fp8", fuse_projections=False)
    assert any("static activation scales are not used" in r.getMessage() for r in caplog.records) == (name == "channel")
    model = loaded.model
    tensors = load_file(path / "model.safetensors")
    scale_suffix = ".weight_scale_inv" if name == "tensor" else ".weight_scale"
    layers = {key.removesuffix(scale_suffix): tensors[key] for key in tensors if key.endswith(scale_suffix)}
    reference = AutoModelForCausalLM.from_pretrained(checkpoints["source"]).eval()
    expected_bytes = weights_footprint_bytes(reference)
    for layer, scale in layers.items():
        ours = model.get_submodule(layer)
        values = tensors[f"{layer}.weight"]
        row_scale = scale.float().reshape(-1).expand(values.shape[0])
        assert isinstance(ours, Fp8Linear) and not ours.use_scaled_mm
        assert torch.equal(ours.weight.view(torch.uint8), values.view(torch.uint8))
        assert torch.equal(ours.weight_scale, row_scale)
        parent, _, child = layer.rpartition(".")
        setattr(reference.get_submodule(parent), child, Fp8Linear(values, row_scale.contiguous(), None, False))
        expected_bytes -= values.numel() * 4 - values.numel() - values.shape[0] * 4  # float32 -> e4m3 + scales
    for plain in (model.get_submodule(SKIPPED), model.get_output_embeddings()):
        assert type(plain) is nn.Linear and plain.weight.dtype == torch.float32
    assert model.get_input_embeddings().weight.dtype == torch.float32
    engine = LLMEngine(config, loaded=loaded)
    assert engine.memory_plan.weights_bytes == expected_bytes == weights_footprint_bytes(model)
    assert _greedy(engine) == _transformers_greedy(reference)


def test_block_scales_are_rescaled_into_each_rows_largest(checkpoints) -> None:
    """32x32 blocks: the blocks holding a row's largest scale keep their bytes, the others move by at most
    half an e4m3 step; the engine serves the checkpoint with its projections fused."""
    path = checkpoints["blocks"]
    tensors = load_file(path / "model.safetensors")
    for layer in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        values, grid = tensors[f"{layer}.weight"], tensors[f"{layer}.weight_scale_inv"]
        weight, row_scale = rows_from_blocks(values, grid, (32, 32))
        exact = dequantize_blocks(values, grid, (32, 32))
        got = weight.float() * row_scale[:, None]
        is_max_block = (grid.repeat_interleave(32, 0) == row_scale[:, None]).repeat_interleave(32, 1)
        assert torch.equal(got[is_max_block], exact[is_max_block])
        assert (~is_max_block).any()  # the checkpoint really has rows with unequal block scales
        assert torch.all((got - exact).abs() <= exact.abs() * 2**-4 + row_scale[:, None] * 2**-10)
    config, loaded = _load(path, "fp8")
    assert len(_greedy(LLMEngine(config, loaded=loaded))[0]) == MAX_TOKENS


def test_blocks_that_do_not_divide_the_weight_and_transformers_dequantization() -> None:
    """A partial last block (DeepSeek-style ceil grids) takes its own scale; on a dividing grid our
    dequantization is transformers' `Fp8Dequantize`, bit for bit."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    generator = torch.Generator().manual_seed(0)
    values = (torch.randn(100, 80, generator=generator) * 100).clamp(-448, 448).to(FP8_DTYPE)
    grid = torch.rand(4, 3, generator=generator) + 0.01  # ceil(100 / 32) x ceil(80 / 32)
    expanded = grid.repeat_interleave(32, 0)[:100].repeat_interleave(32, 1)[:, :80]
    assert torch.equal(dequantize_blocks(values, grid, (32, 32)), values.float() * expanded)
    weight, row_scale = rows_from_blocks(values, grid, (32, 32))
    assert torch.equal(row_scale, expanded.amax(dim=1))
    with pytest.raises(ConfigError, match=r"layer\.weight_scale_inv has \(3, 3\) scales for a \(100, 80\) weight"):
        scale_grid(torch.ones(3, 3), values.shape, (32, 32), "layer.weight_scale_inv")
    dividing, dividing_grid = values[:96, :64], grid[:3, :2]
    theirs = Fp8Dequantize(None)._dequantize_one(dividing, dividing_grid, output_dtype=torch.float32)
    assert torch.equal(dequantize_blocks(dividing, dividing_grid, (32, 32)), theirs)
    # One scale per row (channel) or per tensor: nothing to rescale, the same bytes come back.
    per_row, scales = quantize_rows(torch.randn(16, 48, generator=generator))
    assert rows_from_blocks(per_row, scales, (1, None))[0] is per_row


def test_unreadable_fp8_variants_are_config_errors(checkpoints, tmp_path) -> None:
    class Config:
        def __init__(self, quantization_config: dict) -> None:
            self.quantization_config = quantization_config

    def fmt(**quantization):
        return fp8_checkpoint_format(Config({"quant_method": "fp8", **quantization}))

    assert fmt(weight_block_size=[128, 128]).block_size == (128, 128)
    assert fmt(weight_block_size=None).description == "fine-grained FP8 (one scale per tensor)"
    with pytest.raises(ConfigError, match="scale_fmt='ue8m0'"):
        fmt(scale_fmt="ue8m0")
    with pytest.raises(ConfigError, match="FP8 embeddings"):
        fmt(modules_to_convert=["embed_tokens"])
    int4 = {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"g": {"weights": {"type": "int", "num_bits": 4, "strategy": "group"}}}}
    with pytest.raises(ConfigError, match="int4: .*needs the compressed-tensors package"):
        fp8_checkpoint_format(Config(int4))
    # bitsandbytes cannot requantize FP8 weights; 'none' and 'fp8' are the two ways to serve such a checkpoint.
    with pytest.raises(ConfigError, match=r"quantization='bnb-8bit': the checkpoint stores FP8 weights"):
        resolve(EngineConfig(quantization="bnb-8bit"), Platform.cpu_only(), ModelFacts(512, fp8_checkpoint=True))
    from transformers import AutoConfig

    assert model_facts(AutoConfig.from_pretrained(checkpoints["channel"])).fp8_checkpoint
    assert not model_facts(AutoConfig.from_pretrained(checkpoints["source"])).fp8_checkpoint
    # An FP8 tensor without its scale would load as unscaled values: refused.
    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for item in checkpoints["tensor"].iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"q_proj\.weight is FP8 without a weight_scale_inv"):
        _load(broken, "none")


def test_quantized_before_the_tensor_parallel_cut(checkpoints) -> None:
    """Under tensor parallelism the cut sees FP8 layers (a row-parallel layer keeps each whole row's scale),
    from a checkpoint in the model's dtype and from an FP8 one."""
    for name in ("source", "tensor"):
        seen: list[set[type]] = []
        load = dataclasses.replace(resolved(EngineConfig(model=str(checkpoints[name]))).load, quantization="fp8")
        load_model(load, shard=lambda model: seen.append({type(m) for m in model.modules()}))
        assert Fp8Linear in seen[0], name


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_FP8_GPU, reason="needs a Hopper or newer GPU (compute capability 9.0+)")
def test_an_fp8_checkpoint_on_hopper_is_served_in_fp8_and_never_widened_on_the_gpu(checkpoints, tmp_path) -> None:
    """quantization left 'none': resolved to FP8 on Hopper; the tensor-core FP8 layers get the checkpoint's
    weights without a wider copy on the GPU (the load's peak stays below the linear weights in bfloat16), and
    greedy tokens agree with transformers' model holding the same FP8 layers for most prompts (bfloat16:
    random-weight near ties may flip a token, as between bf16 runs)."""
    from transformers import AutoConfig, LlamaConfig

    from pagedserve.engine.llm import LLM
    from pagedserve.engine.runner.platform import detect_platform
    from tiny_models import make_tokenizer

    # Wide enough that a bfloat16 copy of the linears would dwarf the CUDA allocator's slack.
    source = tmp_path / "wide"
    config = LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                         eos_token_id=1, bos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(source)
    make_tokenizer().save_pretrained(source)
    path = save_fp8_checkpoint(source, tmp_path / "wide-fp8", weight_block_size=(128, 128))
    settings = resolve(EngineConfig(model=str(path)), detect_platform(), model_facts(AutoConfig.from_pretrained(path)))
    assert settings.load.quantization == "fp8" and settings.load.dtype == "bfloat16"
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loaded = load_model(settings.load)
    peak = torch.cuda.max_memory_allocated() - before
    linears = [m for m in loaded.model.modules() if isinstance(m, Fp8Linear)]
    assert len(linears) == 28 and all(m.use_scaled_mm for m in linears)
    linear_bf16_bytes = sum(m.weight.numel() * 2 for m in linears)
    largest_fp32_temporary = max(m.weight.numel() * 4 for m in linears)
    assert peak <= weights_footprint_bytes(loaded.model) + 2 * largest_fp32_temporary < linear_bf16_bytes + 2 * largest_fp32_temporary
    del loaded
    torch.cuda.empty_cache()

    # The tiny checkpoint of 32x32 blocks, end to end, against transformers with the same FP8 layers.
    path = checkpoints["blocks"]
    llm = LLM(str(path), block_size=8, max_num_seqs=8)
    assert llm.engine.settings.load.quantization == "fp8"
    prompts = [[5 + i, 17, 23 + 2 * i, 40] for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    llm.engine.shutdown()
    reference = AutoModelForCausalLM.from_pretrained(checkpoints["source"], dtype=torch.bfloat16).cuda().eval()
    tensors = load_file(path / "model.safetensors")
    for key in [k for k in tensors if k.endswith(".weight_scale_inv")]:
        layer = key.removesuffix(".weight_scale_inv")
        weight, row_scale = rows_from_blocks(tensors[f"{layer}.weight"].cuda(), tensors[key].cuda(), (32, 32))
        parent, _, child = layer.rpartition(".")
        setattr(reference.get_submodule(parent), child, Fp8Linear(weight, row_scale, None, True))
    agree = 0
    for prompt, output in zip(prompts, outputs):
        ids = torch.tensor([prompt], device="cuda")
        want = reference.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, len(prompt):].tolist()
        agree += output.outputs[0].token_ids == want
    assert agree >= 6, agree
