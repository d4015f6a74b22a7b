"""bitsandbytes 4-bit and 8-bit through the engine on CPU: same tokens as transformers, measured sizing.

bitsandbytes runs on CPU, so a tiny random Llama (hidden size 64) is quantized at load time exactly as a
hub model would be on a GPU.
"""

from __future__ import annotations

import builtins
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve.config.engine import ConfigError, EngineConfig
from pagedserve.engine.runner import model_runner as model_runner_module
from resolved import resolved
from pagedserve.engine.llm import LLM
from pagedserve.engine.runner.loader import load_model, quantization_kwargs, weights_footprint_bytes
from pagedserve.engine.runner.model_runner import ModelRunner
from pagedserve.engine.core.request import SamplingParams

pytest.importorskip("bitsandbytes")

QUANTIZATIONS = ("bnb-4bit", "bnb-8bit")
PROMPTS = [[5, 17, 42, 99, 7, 130, 64, 201, 12], [33, 8, 250, 71, 4]]
MAX_TOKENS = 6


def quantized_reference(model_dir, quantization: str) -> AutoModelForCausalLM:
    """transformers' own model, quantized by the same BitsAndBytesConfig the engine uses."""
    config = EngineConfig(model=str(model_dir), dtype="float32", quantization=quantization)
    kwargs = quantization_kwargs(resolved(config).load, torch.float32)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation="eager", dtype=torch.float32, device_map={"": "cpu"}, **kwargs
    )
    return model.eval()


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_quantized_greedy_matches_transformers(tiny_model_dir, quantization):
    model_dir = tiny_model_dir("llama")
    reference = quantized_reference(model_dir, quantization)
    want = [
        reference.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False)[0, len(prompt):].tolist()
        for prompt in PROMPTS
    ]
    llm = LLM(str(model_dir), dtype="float32", block_size=8, quantization=quantization, max_cpu_kv_cache_gib=0.01)
    linear = llm.engine.runner.model.model.layers[0].self_attn.q_proj
    assert type(linear.weight).__name__ == ("Params4bit" if quantization == "bnb-4bit" else "Int8Params")
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == want
    stats = llm.engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def _serialized_bytes(model: torch.nn.Module) -> int:
    """Bytes of the state dict's tensors, without bitsandbytes' serialization-only entries."""
    total, seen = 0, set()
    for name, tensor in model.state_dict().items():
        if "quant_state.bitsandbytes__" in name or name.endswith("weight_format"):
            continue
        key = (tensor.data_ptr(), tensor.numel() * tensor.element_size())
        if key not in seen:
            seen.add(key)
            total += key[1]
    return total


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_weights_footprint_counts_quantization_state(tiny_model_dir, quantization):
    """Packed weights alone undercount: 4-bit absmax (and its nested absmax) and 8-bit row scales count too."""
    model = load_model(resolved(EngineConfig(model=str(tiny_model_dir("llama")), dtype="float32", quantization=quantization)).load).model
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    footprint = weights_footprint_bytes(model)
    assert footprint > parameter_bytes + buffer_bytes
    # An independent measurement: what the checkpoint of the quantized model stores.
    serialized = _serialized_bytes(model)
    assert abs(footprint - buffer_bytes - serialized) <= 0.02 * serialized


def test_memory_plan_gives_quantized_weights_room_to_the_kv_cache(tiny_model_dir, monkeypatch, caplog):
    """Same machine, same budget: fewer weight bytes, more KV blocks; the plan line names all three parts.

    On CPU the runner reads MemAvailable after the weights are loaded; a fixed RAM size minus this model's
    measured weights makes that deterministic, with the KV cap above the budget so the budget binds.
    """
    ram_bytes = 2 * 1024 * 1024
    plans = {}
    for quantization in ("none", "bnb-4bit", "bnb-8bit"):
        config = EngineConfig(model=str(tiny_model_dir("llama")), dtype="float32", quantization=quantization,
                              block_size=8, max_memory_percent=1.0, max_cpu_kv_cache_gib=1.0)
        settings = resolved(config)
        runner = ModelRunner(load_model(settings.load), settings.runner, settings.cache)
        weights = runner.weights_bytes()
        monkeypatch.setattr(model_runner_module, "cpu_available_bytes", lambda weights=weights: ram_bytes - weights)
        plans[quantization] = runner.plan_memory(max_num_seqs=4, max_model_len=512, max_batch_tokens=64)
    none, four, eight = plans["none"], plans["bnb-4bit"], plans["bnb-8bit"]
    assert four.weights_bytes < eight.weights_bytes < none.weights_bytes
    assert none.num_blocks[0] < eight.num_blocks[0] < four.num_blocks[0]
    assert four.weights_bytes < 0.4 * none.weights_bytes  # 4-bit linears, fp32 embeddings and norms

    caplog.set_level(logging.INFO)
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", block_size=8, quantization="bnb-4bit",
              max_cpu_kv_cache_gib=0.01)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("memory plan"))
    for part in ("weights", "activations", "KV cache"):
        assert part in line
    assert llm.engine.memory_plan.weights_bytes == weights_footprint_bytes(llm.engine.runner.model)


def test_missing_bitsandbytes_is_a_config_error(monkeypatch):
    real_import = builtins.__import__

    def import_without_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", import_without_bitsandbytes)
    with pytest.raises(ConfigError, match=r"EngineConfig.quantization='bnb-4bit' needs bitsandbytes"):
        quantization_kwargs(resolved(EngineConfig(quantization="bnb-4bit")).load, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_device_the_build_cannot_run_is_a_config_error(monkeypatch, quantization):
    """A build without kernels for the device fails in the first matmul: caught before loading weights."""
    import bitsandbytes.nn

    def no_kernel(self, x):
        raise NotImplementedError("Could not run 'bitsandbytes::gemv_4bit' with arguments from the 'CPU' backend")

    layer = bitsandbytes.nn.Linear4bit if quantization == "bnb-4bit" else bitsandbytes.nn.Linear8bitLt
    monkeypatch.setattr(layer, "forward", no_kernel)
    with pytest.raises(ConfigError, match=r"cannot run on EngineConfig.device='cpu'.*NotImplementedError"):
        quantization_kwargs(resolved(EngineConfig(quantization=quantization)).load, torch.float32, torch.device("cpu"))


def test_unsupported_device_type_is_a_config_error():
    with pytest.raises(ConfigError, match=r"not supported on device 'meta'"):
        quantization_kwargs(resolved(EngineConfig(quantization="bnb-4bit")).load, torch.float32, torch.device("meta"))


def test_bfloat16_compute_dtype_on_a_gpu_without_bfloat16_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args, **kwargs: "Tesla T4")
    config = EngineConfig(quantization="bnb-4bit", bnb_4bit_compute_dtype="bfloat16", device="cuda")
    with pytest.raises(ConfigError, match=r"EngineConfig.bnb_4bit_compute_dtype: bfloat16 is not supported by Tesla T4"):
        quantization_kwargs(resolved(config, cuda=True).load, torch.float16, torch.device("cuda", 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_runs_every_dtype_the_config_allows(dtype):
    """The installed build runs 4-bit NF4 and 8-bit on CPU in float32, bfloat16 and float16: no error."""
    for quantization in QUANTIZATIONS:
        assert "quantization_config" in quantization_kwargs(
            resolved(EngineConfig(quantization=quantization)).load, dtype, torch.device("cpu")
        )
