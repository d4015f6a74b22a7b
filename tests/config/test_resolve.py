"""config/resolve.py: every auto value decided in one place, from plain facts (no GPU needed)."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from pagedserve.config.engine import ConfigError, EngineConfig
from pydantic import ValidationError
from pagedserve.config.resolve import (
    CPU_MAX_BATCH_TOKENS,
    GPU_MAX_BATCH_TOKENS,
    GPU_MAX_PREFILL_TOKENS_WHILE_DECODING,
    GPU_PREFILL_STEP_TIME_RATIO,
    MAX_AUTO_MODEL_LEN,
    ModelFacts,
    Platform,
    resolve,
    resolve_engine_process,
)

CPU = Platform.cpu_only()
HOPPER = Platform(cuda_available=True, bf16_supported=True, supports_programmatic_launch=True,
                  triton_unavailable_reason="")
OLD_GPU = Platform(cuda_available=True, bf16_supported=False, supports_programmatic_launch=False,
                   triton_unavailable_reason="")
LLAMA = ModelFacts(max_position_embeddings=8192)


def test_auto_on_a_cpu() -> None:
    settings = resolve(EngineConfig(), CPU, LLAMA)
    runner = settings.runner
    assert (runner.device, runner.dtype, runner.attention_backend) == ("cpu", "float32", "reference")
    assert not runner.compile.enabled and not runner.cuda_graphs and not runner.decode_linear
    assert not runner.programmatic_launch
    assert settings.scheduler.max_batch_tokens == CPU_MAX_BATCH_TOKENS
    assert settings.scheduler.max_model_len == 8192
    assert settings.load.device == "cpu" and settings.load.bnb_4bit_compute_dtype == "float32"


def test_auto_on_a_hopper_gpu() -> None:
    runner = resolve(EngineConfig(), HOPPER, LLAMA).runner
    assert (runner.device, runner.dtype, runner.attention_backend) == ("cuda", "bfloat16", "triton")
    assert runner.compile.enabled and runner.cuda_graphs and runner.decode_linear and runner.programmatic_launch
    assert resolve(EngineConfig(), HOPPER, LLAMA).scheduler.max_batch_tokens == GPU_MAX_BATCH_TOKENS
    # A GPU without bfloat16 or PDL; and the user's "off" always wins over the platform.
    old = resolve(EngineConfig(), OLD_GPU, LLAMA).runner
    assert old.dtype == "float16" and not old.programmatic_launch
    assert not resolve(EngineConfig(programmatic_launch=False), HOPPER, LLAMA).runner.programmatic_launch


def test_triton_unavailable_falls_back_to_the_reference_and_graphs_off() -> None:
    no_triton = Platform(cuda_available=True, bf16_supported=True, triton_unavailable_reason="triton is not installed")
    settings = resolve(EngineConfig(), no_triton, LLAMA)
    assert settings.runner.attention_backend == "reference" and not settings.runner.cuda_graphs
    assert any("triton is not installed" in line for line in settings.decisions)
    with pytest.raises(ConfigError, match="attention_backend='triton' is unavailable: triton is not installed"):
        resolve(EngineConfig(attention_backend="triton"), no_triton, LLAMA)
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        resolve(EngineConfig(attention_backend="triton"), CPU, LLAMA)


def test_bitsandbytes_turns_compile_off_and_8bit_turns_graphs_off() -> None:
    four = resolve(EngineConfig(quantization="bnb-4bit"), HOPPER, LLAMA).runner
    eight = resolve(EngineConfig(quantization="bnb-8bit"), HOPPER, LLAMA).runner
    assert not four.compile.enabled and four.cuda_graphs
    assert not eight.compile.enabled and not eight.cuda_graphs
    # A checkpoint saved quantized counts too, and an explicit compile=True is kept.
    saved = resolve(EngineConfig(compile=True), HOPPER, ModelFacts(8192, bnb_quantization="8bit")).runner
    assert saved.compile.enabled and not saved.cuda_graphs


def test_context_length_and_batch_budget() -> None:
    assert resolve(EngineConfig(), CPU, ModelFacts(None)).scheduler.max_model_len == 4096
    assert resolve(EngineConfig(), CPU, ModelFacts(131072)).scheduler.max_model_len == MAX_AUTO_MODEL_LEN
    assert resolve(EngineConfig(max_model_len=100000), CPU, ModelFacts(131072)).scheduler.max_model_len == 100000
    no_chunks = resolve(EngineConfig(enable_chunked_prefill=False), CPU, LLAMA).scheduler
    assert no_chunks.max_batch_tokens == 8192  # a whole prompt fits one step
    assert resolve(EngineConfig(max_batch_tokens=300), CPU, LLAMA).scheduler.max_batch_tokens == 300


def test_explicit_values_are_kept_and_only_autos_are_reported() -> None:
    explicit = EngineConfig(device="cpu", dtype="bfloat16", max_model_len=256, max_batch_tokens=128,
                            max_prefill_tokens_while_decoding=64, prefill_step_time_ratio="off",
                            attention_backend="reference", compile=False,
                            engine_process=False, enable_cuda_graphs=False)
    settings = resolve(explicit, HOPPER, LLAMA)
    assert settings.runner.device == "cpu" and settings.runner.dtype == "bfloat16"
    assert settings.decisions == ()
    auto = resolve(EngineConfig(), HOPPER, LLAMA)
    names = [line.split("=")[0] for line in auto.decisions]
    assert names == ["device", "dtype", "max_model_len", "max_batch_tokens", "max_prefill_tokens_while_decoding",
                     "attention_backend", "compile", "cuda_graph_max_mixed_tokens", "prefill_step_time_ratio"]
    assert auto.describe().startswith("resolved settings: device=cuda (a CUDA device is visible)")


def test_steps_with_prompt_tokens_are_captured_where_decode_steps_are_with_triton() -> None:
    """auto: every step with decodes (the prompt bound beside decodes plus the largest decode graph); off where
    decode steps are not captured, with another attention backend, or with transformers' expert code."""
    gpu = resolve(EngineConfig(), HOPPER, LLAMA)
    expected = GPU_MAX_PREFILL_TOKENS_WHILE_DECODING + min(EngineConfig().max_num_seqs, 512)
    assert gpu.runner.cuda_graph_max_mixed_tokens == expected
    assert f"cuda_graph_max_mixed_tokens={expected} (" in gpu.describe()
    assert resolve(EngineConfig(max_num_seqs=64), HOPPER, LLAMA).runner.cuda_graph_max_mixed_tokens == 2048 + 64
    assert resolve(EngineConfig(max_batch_tokens=1024), HOPPER, LLAMA).runner.cuda_graph_max_mixed_tokens == 1024
    unbounded = EngineConfig(max_prefill_tokens_while_decoding=8192, max_batch_tokens=8192)  # at most 4,096 (auto)
    assert resolve(unbounded, HOPPER, LLAMA).runner.cuda_graph_max_mixed_tokens == 4096
    as_text = resolve(EngineConfig(cuda_graph_max_mixed_tokens="300"), HOPPER, LLAMA)  # a flag's value
    assert as_text.runner.cuda_graph_max_mixed_tokens == 300
    assert resolve(EngineConfig(), CPU, LLAMA).runner.cuda_graph_max_mixed_tokens == 0
    for config in (EngineConfig(cuda_graph_max_mixed_tokens=0), EngineConfig(enable_cuda_graphs=False),
                   EngineConfig(attention_backend="reference")):
        assert resolve(config, HOPPER, LLAMA).runner.cuda_graph_max_mixed_tokens == 0
    refused = resolve(EngineConfig(cuda_graph_max_mixed_tokens=512, attention_backend="reference"), HOPPER, LLAMA)
    assert "cuda_graph_max_mixed_tokens=0 (decode steps are not captured)" in refused.describe()
    moe = dataclasses.replace(LLAMA, has_moe_experts=True)
    assert resolve(EngineConfig(moe_backend="transformers"), HOPPER, moe).runner.cuda_graph_max_mixed_tokens == 0
    assert resolve(EngineConfig(moe_backend="fused"), HOPPER, moe).runner.cuda_graph_max_mixed_tokens == expected
    for bad in (-1, "many", True, 2.5):
        with pytest.raises(ValidationError, match="cuda_graph_max_mixed_tokens"):
            EngineConfig(cuda_graph_max_mixed_tokens=bad)


def test_prefill_bound_while_decoding_is_none_on_cpu_and_a_constant_on_cuda() -> None:
    cpu = resolve(EngineConfig(), CPU, LLAMA)
    assert cpu.scheduler.max_prefill_tokens_while_decoding is None  # CPU behaviour unchanged
    assert "max_prefill_tokens_while_decoding=none (no bound on cpu)" in cpu.describe()
    gpu = resolve(EngineConfig(), HOPPER, LLAMA)
    assert gpu.scheduler.max_prefill_tokens_while_decoding == GPU_MAX_PREFILL_TOKENS_WHILE_DECODING
    assert f"max_prefill_tokens_while_decoding={GPU_MAX_PREFILL_TOKENS_WHILE_DECODING} (" in gpu.describe()
    # Explicit values are kept on either device, and also with chunked prefill off (the scheduler admits a
    # whole prompt past the bound as a step's first prefill).
    for platform in (CPU, HOPPER):
        explicit = resolve(EngineConfig(max_prefill_tokens_while_decoding=512, enable_chunked_prefill=False),
                           platform, LLAMA)
        assert explicit.scheduler.max_prefill_tokens_while_decoding == 512
        assert not any(d.startswith("max_prefill_tokens_while_decoding") for d in explicit.decisions)


def test_prefill_step_time_ratio_is_off_on_cpu_the_measured_constant_on_cuda_and_kept_when_set() -> None:
    assert resolve(EngineConfig(), CPU, LLAMA).scheduler.prefill_step_time_ratio is None
    assert "prefill_step_time_ratio=off (default on cpu)" in resolve(EngineConfig(), CPU, LLAMA).describe()
    gpu = resolve(EngineConfig(), HOPPER, LLAMA)
    assert gpu.scheduler.prefill_step_time_ratio == GPU_PREFILL_STEP_TIME_RATIO == 1.5
    assert "prefill_step_time_ratio=1.5 (default where steps with prompt tokens replay CUDA graphs)" in gpu.describe()
    # Where those steps run eagerly (no mixed-step graphs) the rule measured no better than the constant: off.
    for config in (EngineConfig(cuda_graph_max_mixed_tokens=0), EngineConfig(enable_cuda_graphs=False)):
        eager = resolve(config, HOPPER, LLAMA)
        assert eager.scheduler.prefill_step_time_ratio is None
        assert "prefill_step_time_ratio=off (default where steps with prompt tokens run eagerly)" in eager.describe()
    for platform in (CPU, HOPPER):
        for value, want in ((2, 2.0), ("2.5", 2.5), ("off", None)):
            settings = resolve(EngineConfig(prefill_step_time_ratio=value), platform, LLAMA).scheduler
            assert settings.prefill_step_time_ratio == want
    settings = resolve(EngineConfig(prefill_step_time_ratio=3, ttft_target_s=0.25), CPU, LLAMA).scheduler
    assert (settings.prefill_step_time_ratio, settings.ttft_target_s) == (3.0, 0.25)


def test_device_cuda_without_a_gpu_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="device='cuda' but no CUDA device is visible"):
        resolve(EngineConfig(device="cuda"), CPU, LLAMA)


def test_engine_process_auto() -> None:
    assert resolve_engine_process(EngineConfig(), HOPPER) and not resolve_engine_process(EngineConfig(), CPU)
    assert resolve_engine_process(EngineConfig(engine_process=True), CPU)


def test_async_scheduling_is_off_with_tensor_parallel() -> None:
    assert resolve(EngineConfig(), CPU, LLAMA).async_scheduling
    assert not resolve(EngineConfig(tp_size=2), CPU, LLAMA).async_scheduling


def test_the_engine_logs_its_resolution_once(tiny_model_dir, caplog) -> None:
    from pagedserve.engine.core.llm_engine import LLMEngine

    with caplog.at_level(logging.INFO, logger="pagedserve"):
        engine = LLMEngine(EngineConfig(model=str(tiny_model_dir("llama")), device="cpu", num_blocks=16, max_num_seqs=2))
    try:
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resolved settings:")]
        assert len(lines) == 1 and "max_model_len=512" in lines[0] and "device=" not in lines[0]  # cpu was given
        assert engine.settings.runner.attention_backend == "reference"
        assert engine.max_model_len == engine.settings.scheduler.max_model_len == 512
    finally:
        engine.shutdown()


def _on_gpu(capability: tuple[int, int] | None) -> Platform:
    return Platform(cuda_available=True, bf16_supported=True, triton_unavailable_reason="", compute_capability=capability)


def test_fp8_weights_need_fp8_tensor_cores_and_bfloat16() -> None:
    config = EngineConfig(quantization="fp8")
    with pytest.raises(ConfigError, match=r"quantization='fp8'.*not device 'cpu'"):
        resolve(config, Platform.cpu_only(), ModelFacts(512))
    with pytest.raises(ConfigError, match=r"quantization='fp8'.*this one is 8\.0"):
        resolve(config, _on_gpu((8, 0)), ModelFacts(512))
    with pytest.raises(ConfigError, match=r"dtype='float16'"):
        resolve(EngineConfig(quantization="fp8", dtype="float16"), _on_gpu((9, 0)), ModelFacts(512))
    settings = resolve(config, _on_gpu((9, 0)), ModelFacts(512))
    assert settings.load.quantization == "fp8" and settings.load.dtype == "bfloat16"
    assert settings.runner.cuda_graphs and settings.runner.compile.enabled  # FP8 layers are captured and compiled
    with pytest.raises(ConfigError, match=r"this one is 8\.9"):  # Ada: torch's row-wise FP8 GEMM needs Hopper
        resolve(config, _on_gpu((8, 9)), ModelFacts(512))


def test_fp8_kv_cache_runs_on_the_reference_backend_anywhere_and_on_triton_from_ada() -> None:
    config = EngineConfig(kv_cache_dtype="fp8")
    assert resolve(EngineConfig(), CPU, LLAMA).cache.kv_cache_dtype == "float32"  # auto: the model's dtype
    assert resolve(EngineConfig(), HOPPER, LLAMA).cache.kv_cache_dtype == "bfloat16"
    assert resolve(config, CPU, LLAMA).cache.kv_cache_dtype == "fp8_e4m3"  # reference backend on CPU: tests
    for capability in ((8, 9), (9, 0), (10, 0)):
        settings = resolve(config, _on_gpu(capability), LLAMA)
        assert settings.cache.kv_cache_dtype == "fp8_e4m3" and settings.runner.attention_backend == "triton"
        assert settings.runner.cuda_graphs and settings.runner.compile.enabled
    for capability in ((8, 0), None):
        with pytest.raises(ConfigError, match=r"EngineConfig.kv_cache_dtype='fp8' with the triton attention backend "
                                              r"needs .*8\.9\+.*this one is (8\.0|unknown)"):
            resolve(config, _on_gpu(capability), LLAMA)
    # The reference backend runs it on an older GPU too, when asked for by name.
    older = resolve(EngineConfig(kv_cache_dtype="fp8", attention_backend="reference"), _on_gpu((8, 0)), LLAMA)
    assert older.cache.kv_cache_dtype == "fp8_e4m3"
    # FP8 weights and an FP8 cache together; a model already in memory keeps its dtype for an auto cache.
    both = resolve(EngineConfig(kv_cache_dtype="fp8", quantization="fp8"), _on_gpu((9, 0)), LLAMA)
    assert both.cache.kv_cache_dtype == "fp8_e4m3" and both.load.quantization == "fp8"
    assert resolve(EngineConfig(), HOPPER, LLAMA, device="cuda", dtype="float16").cache.kv_cache_dtype == "float16"


def test_an_fp8_checkpoint_is_served_in_fp8_where_the_gpu_runs_it_and_dequantized_elsewhere() -> None:
    """quantization='none' (the default) on an FP8 checkpoint: FP8 on Hopper in bfloat16, decided and logged;
    dequantized to the model's dtype on CPU, older GPUs or another dtype; 'fp8' keeps its checks."""
    fp8_checkpoint = ModelFacts(512, fp8_checkpoint=True)
    hopper = resolve(EngineConfig(), _on_gpu((9, 0)), fp8_checkpoint)
    assert hopper.load.quantization == "fp8"
    assert "quantization=fp8 (the checkpoint stores FP8 weights and this GPU runs FP8 GEMMs)" in hopper.describe()
    for platform, config, reason in [
        (Platform.cpu_only(), EngineConfig(), "dequantized to float32 at load: FP8 GEMMs need a Hopper or newer GPU (compute capability 9.0+), not device 'cpu'"),
        (_on_gpu((8, 0)), EngineConfig(), "dequantized to bfloat16 at load: FP8 GEMMs need a Hopper or newer GPU"),
        (_on_gpu((9, 0)), EngineConfig(dtype="float16"), "dequantized to float16 at load: FP8 layers compute in bfloat16, not EngineConfig.dtype='float16'"),
    ]:
        settings = resolve(config, platform, fp8_checkpoint)
        assert settings.load.quantization == "none" and reason in settings.describe()
    assert resolve(EngineConfig(), _on_gpu((9, 0)), ModelFacts(512)).load.quantization == "none"  # not FP8: as asked
    with pytest.raises(ConfigError, match=r"quantization='fp8'.*not device 'cpu'"):
        resolve(EngineConfig(quantization="fp8"), Platform.cpu_only(), fp8_checkpoint)
    with pytest.raises(ConfigError, match=r"quantization='bnb-4bit': the checkpoint stores FP8 weights"):
        resolve(EngineConfig(quantization="bnb-4bit"), _on_gpu((9, 0)), fp8_checkpoint)


NOT_INSTALLED = "the flash-attn-4 package (flash_attn.cute) is not installed: pip install 'pagedserve[flash]'"


def _flash_gpu(flash_reason: str = "", capability: tuple[int, int] = (9, 0)) -> Platform:
    return Platform(cuda_available=True, bf16_supported=True, supports_programmatic_launch=True,
                    triton_unavailable_reason="", flash_unavailable_reason=flash_reason, compute_capability=capability)


def test_flash_paged_where_it_runs_and_a_config_error_naming_the_extra_elsewhere() -> None:
    runner = resolve(EngineConfig(attention_backend="flash_paged"), _flash_gpu(), LLAMA).runner
    assert runner.attention_backend == "flash_paged" and runner.cuda_graphs and runner.compile.enabled
    # The FP8 cache's layers run Triton: the Triton rule (compute capability 8.9+) applies, and Hopper passes it.
    fp8 = resolve(EngineConfig(attention_backend="flash_paged", kv_cache_dtype="fp8"), _flash_gpu(), LLAMA)
    assert fp8.cache.kv_cache_dtype == "fp8_e4m3" and fp8.runner.attention_backend == "flash_paged"
    with pytest.raises(ConfigError, match=r"attention_backend='flash_paged' is unavailable: .*pagedserve\[flash\]"):
        resolve(EngineConfig(attention_backend="flash_paged"), _flash_gpu(NOT_INSTALLED), LLAMA)
    with pytest.raises(ConfigError, match=r"attention_backend='flash_paged' is unavailable: .*pagedserve\[flash\]"
                                          r".*not device 'cpu'"):
        resolve(EngineConfig(attention_backend="flash_paged"), Platform.cpu_only(), LLAMA)


def test_auto_attention_backend_keeps_triton_until_measured_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    import pagedserve.config.resolve as resolve_module

    for capability in ((9, 0), (10, 0), (12, 0), None):
        settings = resolve(EngineConfig(), _flash_gpu(capability=capability), LLAMA)
        assert settings.runner.attention_backend == "triton"
        assert any(line.startswith("attention_backend=triton") for line in settings.decisions)
    # Where the table says flash_paged: taken where it runs, else Triton with the reason in the log.
    monkeypatch.setitem(resolve_module.AUTO_ATTENTION_BACKEND_BY_CAPABILITY_MAJOR, 9, "flash_paged")
    assert resolve(EngineConfig(), _flash_gpu(), LLAMA).runner.attention_backend == "flash_paged"
    fallback = resolve(EngineConfig(), _flash_gpu(NOT_INSTALLED), LLAMA)
    assert fallback.runner.attention_backend == "triton"
    assert any("cannot run" in line and "pagedserve[flash]" in line for line in fallback.decisions)
    assert resolve(EngineConfig(), _flash_gpu(capability=(10, 0)), LLAMA).runner.attention_backend == "triton"
