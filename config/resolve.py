"""`EngineConfig` resolved once, at start-up, into the frozen settings each part of the engine receives.

`EngineConfig` is what users write (flags, yaml args, `LLM(...)` keywords), with "auto" (`None`) where the
right value depends on the machine or the model. `resolve` decides every such value here, in one place,
from plain facts: the `Platform` (what the device offers, gathered by `engine/runner/platform.py`) and the
`ModelFacts` (read from the model's config before its weights load). The result is a `ResolvedConfig` of
per-component settings (load, scheduler, cache, runner with its compile settings); the engine logs its
`describe()` once. Nothing below this module reads `EngineConfig` or decides an "auto" again.

Pure Python on purpose: the rules can be tested without a GPU, and a server that has not imported torch
can still ask `resolve_engine_process`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

from pagedserve.config.engine import ConfigError, EngineConfig, SchedulingPolicy

DeviceType = Literal["cpu", "cuda"]
DTypeName = Literal["float32", "bfloat16", "float16"]
KVCacheDTypeName = Literal["float32", "bfloat16", "float16", "fp8_e4m3"]  # what the cache tensors hold
# Triton's float8e4nv (e4m3) casts compile for compute capability 8.9 (Ada) and newer only.
FP8_KV_MIN_CAPABILITY = (8, 9)

CPU_MAX_BATCH_TOKENS = 2048
GPU_MAX_BATCH_TOKENS = 8192
# Prompt tokens a CUDA step takes beside decodes (max_prefill_tokens_while_decoding auto). Chosen on one H200
# with bench/online_engine_bench.py (docs/benchmarks.md, 8B shape, prompts 64..1024): none, 1024, 2048 and
# 4096 all kept the goodput SLOs to 45 req/s, 512 missed TTFT from 40; 2048 had the lowest ITL p99 there
# (46.9 ms vs 54.0 unbounded). On CPU auto is no bound, as before the knob: nothing measured there asks for one.
GPU_MAX_PREFILL_TOKENS_WHILE_DECODING = 2048
# prefill_step_time_ratio auto on CUDA where steps with prompt tokens replay CUDA graphs (cuda_graph_max_mixed_tokens):
# 1.5. Measured on one H100 at 08f75c0 (bench/online_engine_bench.py --rates 10 25 40 --prefill-bounds ratio:2
# ratio:1.5; docs/benchmarks.md): both met the SLOs at every rate; 1.5 kept ITL closer to TPOT at every rate (ITL /
# TPOT p99 1.83 / 1.23 / 1.48 against 1.99 / 1.71 / 1.59 at 10 / 25 / 40 req/s; ITL p99 15.2 / 11.6 / 31.2 ms against
# 18.8 / 20.5 / 31.1) for 0-2.4% of output tok/s and TTFT p99 +4-8%; served W1 (a burst) at 1.5 took 8,757 output tok/s
# engine-side against 8,790 offline at 2. Ratio 2 had replaced the constant bound 2048 alone (21cc4cf: ITL / TPOT p99
# 2.48-2.98 with the bound alone). Where those steps run eagerly a step with any prompt token pays a fixed host cost
# that the ratio's budget cannot see, and on an H200 (d9dfec0, eager) no rule was better at every rate: off, the
# constant bound alone. On CPU auto is off.
GPU_PREFILL_STEP_TIME_RATIO = 1.5
# attention_backend auto on CUDA, by compute capability major (the GPU generation): the backend that
# bench/attention_bench.py --backends triton flash_paged and bench/gpu_bench.py (W1, batch 1) measured faster
# there, in one run. Triton everywhere until such a run says otherwise; a generation not listed gets Triton.
# flash_paged is taken only where it can run (installed, a GPU it supports), else Triton, and the log says why.
AUTO_ATTENTION_BACKEND_BY_CAPABILITY_MAJOR: dict[int, Literal["triton", "flash_paged"]] = {
    8: "triton",  # Ampere, Ada: FlashAttention 4 has no paged-KV kernel there
    9: "triton",  # Hopper: measured on an H200 at dab14b2, Triton faster (W1 9,680 vs 8,421; docs/kernels.md)
    10: "triton",  # Blackwell (B200, B300): not yet measured
}
# Backends whose decode steps can be captured in CUDA graphs (every per-step value in device tensors).
CAPTURABLE_ATTENTION_BACKENDS = ("triton", "flash_paged")

# cuda_graph_max_mixed_tokens auto never captures larger steps: past a few thousand tokens a step's kernels outlast
# the host's launches (sizes 64 tokens apart up to 4,096 are already 66 graphs to capture at start-up).
AUTO_MAX_MIXED_GRAPH_TOKENS = 4096

DEFAULT_MAX_MODEL_LEN = 4096  # a model whose config names no context length
MAX_AUTO_MODEL_LEN = 32768  # auto never plans for longer contexts than this; set max_model_len to go past it


@dataclass(frozen=True)
class Platform:
    """What the machine offers the engine, as found on it."""

    cuda_available: bool
    bf16_supported: bool = False  # on the CUDA device
    supports_programmatic_launch: bool = False  # Hopper or newer with a Triton that has the intrinsics
    triton_unavailable_reason: str = "no CUDA device"  # "" when the Triton attention kernels can run
    flash_unavailable_reason: str = "no CUDA device"  # "" when FlashAttention 4's paged kernels can run (flash_paged)
    compute_capability: tuple[int, int] | None = None  # of the CUDA device

    @classmethod
    def cpu_only(cls) -> "Platform":
        return cls(cuda_available=False)


@dataclass(frozen=True)
class ModelFacts:
    """What resolution needs to know of the model, read from its config (no weights)."""

    max_position_embeddings: int | None
    bnb_quantization: Literal["none", "4bit", "8bit"] = "none"  # layers bitsandbytes will hold
    fp8_checkpoint: bool = False  # the checkpoint stores FP8 weights (transformers' fine-grained or compressed-tensors)
    has_moe_experts: bool = False  # the config names routed experts (num_experts / num_local_experts)


@dataclass(frozen=True)
class LoadSettings:
    """What the loader needs: which model, how to read it, where to put it."""

    model: str | None
    tokenizer: str | None
    revision: str | None
    trust_remote_code: bool
    load_format: Literal["auto", "dummy"]
    quantization: str  # as decided: an FP8 checkpoint asked for with 'none' may be served as 'fp8'
    bnb_4bit_compute_dtype: DTypeName
    device: DeviceType
    dtype: DTypeName
    seed: int
    # MoE experts in FP8 (engine/kernels/moe/fp8.py): quantization 'fp8' with the fused MoE path, whose kernels
    # run them; transformers' expert code takes the model's dtype, so with moe_backend 'transformers' they stay.
    fp8_experts: bool = False


# Scheduler settings that size nothing (no memory plan, no CUDA graph, no warm-up shape depends on them), so
# a running engine may change them between steps (`LLMEngine.update_scheduler`): a benchmark compares
# values on one warm engine.
RUNTIME_SCHEDULER_FIELDS = ("max_prefill_tokens_while_decoding", "prefill_step_time_ratio", "ttft_target_s", "policy")


@dataclass(frozen=True)
class SchedulerSettings:
    """The scheduler's limits, no auto values left.

    `max_prefill_tokens_while_decoding`: None, no bound beyond `max_batch_tokens`; else the most prompt
    tokens a step takes while requests are decoding (engine/core/scheduler.py has the rule).
    `prefill_step_time_ratio`: None, off; else such a step takes at most this many times the decode-only step's
    time, while the waiting prompts still make `ttft_target_s` (the scheduler's budget rule).
    """

    max_num_seqs: int
    max_batch_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True
    policy: SchedulingPolicy = "fifo"
    max_prefill_tokens_while_decoding: int | None = None
    prefill_step_time_ratio: float | None = None
    ttft_target_s: float = 0.5
    max_loras: int = 0  # distinct LoRA adapters one step may run (0: LoRA off)

    def __post_init__(self) -> None:
        if not self.enable_chunked_prefill and self.max_batch_tokens < self.max_model_len:
            raise ConfigError(
                f"max_batch_tokens={self.max_batch_tokens} must be >= max_model_len={self.max_model_len} "
                "when chunked prefill is off (a whole prompt must fit in one step)"
            )
        check_runtime_scheduler_changes({name: getattr(self, name) for name in RUNTIME_SCHEDULER_FIELDS})

    def updated(self, **changes: Any) -> "SchedulerSettings":
        """These settings with `changes` to fields of RUNTIME_SCHEDULER_FIELDS; `ConfigError` for others."""
        check_runtime_scheduler_changes(changes)
        return replace(self, **changes)


def check_runtime_scheduler_changes(changes: dict[str, Any]) -> None:
    """Raise `ConfigError` naming the field unless every change is to a RUNTIME_SCHEDULER_FIELDS field with a
    valid value. Callers of an engine in another process check here, before the change crosses the pipe."""
    for name, value in changes.items():
        if name not in RUNTIME_SCHEDULER_FIELDS:
            raise ConfigError(f"SchedulerSettings.{name} cannot change on a running engine (it sizes memory or "
                              f"captures); those that can: {', '.join(RUNTIME_SCHEDULER_FIELDS)}")
        if name == "max_prefill_tokens_while_decoding" and value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"max_prefill_tokens_while_decoding={value!r}: must be an integer >= 1, or None "
                              "for no bound")
        if name == "prefill_step_time_ratio" and value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not 1.0 <= value <= 100.0):
            raise ConfigError(f"prefill_step_time_ratio={value!r}: must be a number in [1, 100], or None for off")
        if name == "ttft_target_s" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                        or not 0.0 < value <= 3600.0):
            raise ConfigError(f"ttft_target_s={value!r}: must be a number of seconds in (0, 3600]")
        if name == "policy" and value not in get_args(SchedulingPolicy):
            raise ConfigError(f"policy={value!r}: must be one of {', '.join(get_args(SchedulingPolicy))}")


@dataclass(frozen=True)
class CacheSettings:
    """The KV cache's geometry, storage and budget; `num_blocks` None: planned from memory at start-up.

    `kv_cache_dtype`: the model's dtype, or fp8_e4m3 (values stored as value / scale, read as stored * scale,
    one float32 scale per layer for K and for V; engine/kernels/attention/base.py)."""

    block_size: int
    num_blocks: int | None
    enable_prefix_caching: bool
    max_memory_percent: float
    max_cpu_kv_cache_gib: float
    kv_cache_dtype: KVCacheDTypeName


@dataclass(frozen=True)
class CompileSettings:
    """torch.compile of the decoder layers; `enabled` already decided."""

    enabled: bool
    fullgraph: bool = False
    dynamic: bool | None = None
    mode: str | None = None
    backend: str = "inductor"
    combo_kernels: bool = True


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters as decided (engine/runner/lora.py); `enabled` False: no layer is wrapped, no slot held."""

    enabled: bool = False
    modules: tuple[tuple[str, str], ...] = ()  # (name, path) loaded at start-up
    max_lora_rank: int = 16
    max_loras: int = 1
    max_cpu_loras: int = 1


def resolve_lora(config: EngineConfig) -> LoraSettings:
    """Check the LoRA fields together (under tensor parallel each rank cuts the adapters as its layers)."""
    modules = tuple((config.lora_modules or {}).items())
    if not (config.enable_lora or modules):
        return LoraSettings()
    max_cpu_loras = config.max_cpu_loras or max(config.max_loras, len(modules))
    if max_cpu_loras < config.max_loras:
        raise ConfigError(f"EngineConfig.max_cpu_loras={config.max_cpu_loras} must be >= max_loras={config.max_loras} "
                          "(an adapter on the device is also held in host memory)")
    return LoraSettings(True, modules, config.max_lora_rank, config.max_loras, max_cpu_loras)


@dataclass(frozen=True)
class RunnerSettings:
    """The device side: where the model runs and which kernels and captures it uses."""

    device: DeviceType
    dtype: DTypeName
    attention_backend: Literal["reference", "triton", "flash_paged"]
    fuse_projections: bool
    decode_linear: bool  # the one-row Triton GEMM (GPU only)
    programmatic_launch: bool  # PDL for the engine's Triton kernels and inductor's
    cuda_graphs: bool  # capture decode steps (GPU, a backend that can be captured, no bnb 8-bit layers)
    cuda_graph_max_batch_size: int
    tp_size: int
    compile: CompileSettings = field(default_factory=lambda: CompileSettings(enabled=False))
    cuda_graph_max_mixed_tokens: int = 0  # capture steps with prompt tokens up to this many tokens (0: none)
    moe_backend: Literal["fused", "transformers"] = "transformers"  # experts of MoE blocks (engine/kernels/moe/)
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass(frozen=True)
class SpeculativeSettings:
    """Speculative decoding as decided: `method` none turns everything else off (engine/spec/)."""

    method: Literal["none", "ngram", "draft"] = "none"
    num_tokens: int = 0  # k, proposed per request and step
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    disable_batch_size: int = 0  # steps with more running requests than this do not speculate
    model: str | None = None  # draft: the draft model (path or hub id)
    adaptive: bool = True  # the per-step rule of engine/spec/adaptive.py decides within disable_batch_size
    pipelining: bool = True  # ngram: a verification may be launched before the one in flight delivers

    @property
    def enabled(self) -> bool:
        return self.method != "none" and self.num_tokens > 0 and self.disable_batch_size > 0


def resolve_prefill_step_time_ratio(config: EngineConfig, device: DeviceType, mixed_graphs: bool) -> float | None:
    """The ratio of the step-time budget rule, or None for off (auto: GPU_PREFILL_STEP_TIME_RATIO on CUDA where steps
    with prompt tokens replay CUDA graphs, `mixed_graphs`)."""
    if config.prefill_step_time_ratio == "off":
        return None
    if config.prefill_step_time_ratio == "auto":
        return GPU_PREFILL_STEP_TIME_RATIO if device == "cuda" and mixed_graphs else None
    return float(config.prefill_step_time_ratio)


def resolve_speculative(config: EngineConfig) -> SpeculativeSettings:
    """Check the speculative fields together (the draft model itself is checked when it loads: engine/spec/draft.py)."""
    method = config.speculative_method
    if method == "none":
        return SpeculativeSettings()
    if method == "draft" and config.speculative_model is None:
        raise ConfigError("EngineConfig.speculative_method='draft' needs speculative_model (a smaller causal LM "
                          "with the model's tokenizer)")
    if config.prompt_lookup_min > config.prompt_lookup_max:
        raise ConfigError(f"EngineConfig.prompt_lookup_min={config.prompt_lookup_min} must be <= "
                          f"prompt_lookup_max={config.prompt_lookup_max}")
    if method == "ngram" and config.speculative_model is not None:
        raise ConfigError(f"EngineConfig.speculative_model={config.speculative_model!r} is for "
                          "speculative_method='draft'; ngram proposes from the request's own tokens")
    if config.tp_size > 1:
        raise ConfigError(f"EngineConfig.speculative_method={method!r} with tp_size={config.tp_size}: not built "
                          "yet (speculation runs with tp_size 1)")
    return SpeculativeSettings(method, config.num_speculative_tokens, config.prompt_lookup_min,
                               config.prompt_lookup_max, config.speculative_disable_batch_size,
                               config.speculative_model if method == "draft" else None,
                               config.speculative_adaptive, config.speculative_pipelining)


@dataclass(frozen=True)
class ResolvedConfig:
    """Everything the engine needs, resolved."""

    load: LoadSettings
    scheduler: SchedulerSettings
    cache: CacheSettings
    runner: RunnerSettings
    async_scheduling: bool
    seed: int
    decisions: tuple[str, ...]  # "name=value (why)" for every value that was auto
    speculative: SpeculativeSettings = field(default_factory=SpeculativeSettings)

    def describe(self) -> str:
        return "resolved settings: " + "; ".join(self.decisions) if self.decisions else "resolved settings: none auto"


def resolve_device(config: EngineConfig, platform: Platform) -> DeviceType:
    if config.device == "cuda" and not platform.cuda_available:
        raise ConfigError("EngineConfig.device='cuda' but no CUDA device is visible")
    if config.device == "auto":
        return "cuda" if platform.cuda_available else "cpu"
    return config.device


def resolve_dtype(config: EngineConfig, device: DeviceType, platform: Platform) -> DTypeName:
    if config.dtype != "auto":
        return config.dtype
    if device == "cuda":
        return "bfloat16" if platform.bf16_supported else "float16"
    return "float32"


def check_fp8_runs(device: DeviceType, dtype: DTypeName, platform: Platform) -> None:
    """FP8 weights take Hopper's FP8 GEMMs and bfloat16 activations; anywhere else they would only be slower
    than the model's own dtype, so they are refused (the reference path that runs anywhere is for tests:
    engine/kernels/fp8_linear.py). The conditions: `fp8_gemm_unavailable`."""
    reason = fp8_gemm_unavailable(device, dtype, platform)
    if reason is not None:
        advice = ("leave dtype auto" if device == "cuda" and reason.startswith("FP8 layers compute")
                  else "use quantization='none' (or 'bnb-8bit' on a GPU)")
        raise ConfigError(f"EngineConfig.quantization='fp8' cannot run here: {reason}; {advice}")


def check_fp8_kv_cache_runs(backend: str, device: DeviceType, platform: Platform) -> None:
    """An FP8 (e4m3) KV cache: the reference backend quantizes and dequantizes with torch casts, which run on
    any device (CPU included: tests, correctness); the Triton kernels cast with float8e4nv, which Triton
    compiles for compute capability 8.9+ only. flash_paged runs layers over an FP8 cache with Triton."""
    if backend not in ("triton", "flash_paged"):
        return
    capability = platform.compute_capability
    if capability is None or capability < FP8_KV_MIN_CAPABILITY:
        found = "unknown" if capability is None else f"{capability[0]}.{capability[1]}"
        raise ConfigError(
            f"EngineConfig.kv_cache_dtype='fp8' with the triton attention backend needs a GPU of compute capability "
            f"8.9+ (Ada, Hopper or newer: Triton's e4m3 casts); this one is {found}. Use kv_cache_dtype='auto', "
            f"or attention_backend='reference' (slower, no CUDA graphs) on {device}")


def fp8_gemm_unavailable(device: DeviceType, dtype: DTypeName, platform: Platform) -> str | None:
    """Why FP8 layers cannot run here, or None when they can: a CUDA GPU of compute capability 9.0+ (torch's
    row-wise scaled FP8 GEMM needs Hopper's TMA, so not Ada's 8.9) and bfloat16 activations."""
    if device != "cuda":
        return f"FP8 GEMMs need a Hopper or newer GPU (compute capability 9.0+), not device {device!r}"
    capability = platform.compute_capability
    if capability is None or capability < (9, 0):
        found = "unknown" if capability is None else f"{capability[0]}.{capability[1]}"
        return f"FP8 GEMMs need a Hopper or newer GPU (compute capability 9.0+: H100, H200, Blackwell); this one is {found}"
    if dtype != "bfloat16":
        return f"FP8 layers compute in bfloat16, not EngineConfig.dtype={dtype!r}"
    return None


def resolve_fp8_checkpoint(config: EngineConfig, device: DeviceType, dtype: DTypeName, platform: Platform
                           ) -> tuple[str, str | None]:
    """(quantization, why) for a checkpoint that stores FP8 weights: what was asked, or for 'none' what a user
    of such a checkpoint expects: served in FP8 where the GPU runs FP8 GEMMs (Hopper and bfloat16, as the
    checkpoint was made for), elsewhere dequantized to `dtype` at load (CPU, older GPUs, float16/float32),
    as transformers does. bitsandbytes cannot quantize weights that are FP8 already."""
    if config.quantization in ("bnb-4bit", "bnb-8bit"):
        raise ConfigError(f"EngineConfig.quantization={config.quantization!r}: the checkpoint stores FP8 weights "
                          "already; use quantization='fp8' or 'none' (FP8 where the GPU runs it, else dequantized)")
    if config.quantization == "fp8":
        return "fp8", None
    unavailable = fp8_gemm_unavailable(device, dtype, platform)
    if unavailable is None:
        return "fp8", "the checkpoint stores FP8 weights and this GPU runs FP8 GEMMs"
    return "none", f"the checkpoint's FP8 weights are dequantized to {dtype} at load: {unavailable}"


def resolve_mixed_graph_tokens(config: EngineConfig, cuda_graphs: bool, backend: str, max_batch_tokens: int,
                               max_prefill_tokens_while_decoding: int | None, transformers_experts: bool,
                               decided) -> int:
    """`cuda_graph_max_mixed_tokens` (engine/runner/cuda_graphs.py `MixedGraphs`): 0 where steps with prompt tokens
    cannot be captured (no decode graphs; an attention backend that sizes its launch from host lengths;
    transformers' expert code, whose token routing reads counts on the host), else the configured count or auto's
    (every step with decodes: the prompt bound plus the decode graphs' largest batch), within max_batch_tokens."""
    requested = config.cuda_graph_max_mixed_tokens
    if requested == 0:
        return 0
    why_not = None
    if not cuda_graphs:
        why_not = "decode steps are not captured"
    elif backend != "triton":
        why_not = f"the {backend} attention backend takes host lengths"
    elif transformers_experts:
        why_not = "transformers' expert code reads the routing on the host"
    if why_not is not None:
        if requested != "auto":
            decided("cuda_graph_max_mixed_tokens", 0, why_not)
        return 0
    if requested == "auto":
        prompt_bound = max_prefill_tokens_while_decoding or max_batch_tokens
        tokens = min(max_batch_tokens, AUTO_MAX_MIXED_GRAPH_TOKENS,
                     prompt_bound + min(config.cuda_graph_max_batch_size, config.max_num_seqs))
        decided("cuda_graph_max_mixed_tokens", tokens, "the prompt bound beside decodes plus the largest decode graph")
        return tokens
    if requested > max_batch_tokens:
        decided("cuda_graph_max_mixed_tokens", max_batch_tokens, "no step has more tokens than max_batch_tokens")
        return max_batch_tokens
    return requested


def resolve_moe_backend(config: EngineConfig, device: DeviceType, platform: Platform) -> Literal["fused", "transformers"]:
    """`moe_backend`: auto is fused on a GPU with Triton (CUDA graphs need the Triton/grouped_mm kernels: the
    reference syncs with the host) and transformers' experts code elsewhere; fused on CPU runs the reference
    (tests). Not a logged decision: models without MoE blocks are unaffected, and the runner logs, for a model
    with them, which families take which path."""
    has_triton = platform.triton_unavailable_reason == ""
    if config.moe_backend == "fused" and device == "cuda" and not has_triton:
        raise ConfigError(f"EngineConfig.moe_backend='fused' on CUDA needs Triton ({platform.triton_unavailable_reason}); "
                          "use moe_backend='transformers' or 'auto'")
    if config.moe_backend != "auto":
        return config.moe_backend
    return "fused" if device == "cuda" and has_triton else "transformers"


def resolve_auto_attention_backend(device: DeviceType, platform: Platform) -> tuple[str, str]:
    """(backend, why) for attention_backend auto: the reference off CUDA or without Triton, else the
    GPU generation's entry of AUTO_ATTENTION_BACKEND_BY_CAPABILITY_MAJOR, where it can run."""
    if device != "cuda":
        return "reference", f"the reference on {device}"
    if platform.triton_unavailable_reason:
        return "reference", platform.triton_unavailable_reason
    capability = platform.compute_capability
    major = capability[0] if capability is not None else None
    preferred = AUTO_ATTENTION_BACKEND_BY_CAPABILITY_MAJOR.get(major, "triton") if major is not None else "triton"
    generation = f"compute capability {major}.x" if major is not None else "an unknown GPU generation"
    if preferred == "flash_paged":
        if platform.flash_unavailable_reason:
            return "triton", f"flash_paged measured faster on {generation} but cannot run: {platform.flash_unavailable_reason}"
        return "flash_paged", f"measured faster than triton on {generation}"
    return "triton", f"Triton kernels on CUDA ({generation}: the faster backend measured there, or not measured)"


def check_attention_backend_runs(backend: str, device: DeviceType, platform: Platform) -> None:
    """ConfigError naming the field where an explicitly chosen attention backend cannot run here."""
    if backend == "triton" and (device != "cuda" or platform.triton_unavailable_reason):
        reason = platform.triton_unavailable_reason if device == "cuda" else f"it needs a CUDA device, not {device}"
        raise ConfigError(f"EngineConfig.attention_backend='triton' is unavailable: {reason}")
    if backend == "flash_paged":
        if device != "cuda":
            raise ConfigError(
                f"EngineConfig.attention_backend='flash_paged' is unavailable: it needs a CUDA GPU of compute "
                f"capability 9.0+ (Hopper, Blackwell) with FlashAttention 4 installed (pip install "
                f"'pagedserve[flash]'), not device {device!r}; use attention_backend='auto'")
        if platform.flash_unavailable_reason:
            raise ConfigError(f"EngineConfig.attention_backend='flash_paged' is unavailable: "
                              f"{platform.flash_unavailable_reason}; or use attention_backend='auto'")


def resolve_engine_process(config: EngineConfig, platform: Platform) -> bool:
    """`engine_process` auto: a process of its own on CUDA (the server's event loop never shares the step
    loop's GIL), a thread on CPU."""
    if config.engine_process is not None:
        return config.engine_process
    if config.device != "auto":
        return config.device == "cuda"
    return platform.cuda_available


def resolve(
    config: EngineConfig, platform: Platform, model: ModelFacts, device: DeviceType | None = None,
    dtype: DTypeName | None = None,
) -> ResolvedConfig:
    """Decide every auto value of `config`. `device` / `dtype`: where a model already in memory is
    (`LLM.from_model`), instead of what the config and platform would pick."""
    decisions: list[str] = []

    def decided(name: str, value: object, why: str) -> None:
        decisions.append(f"{name}={value} ({why})")

    device = device or resolve_device(config, platform)
    if config.device == "auto":
        decided("device", device, "a CUDA device is visible" if device == "cuda" else "no CUDA device")
    dtype = dtype or resolve_dtype(config, device, platform)
    if config.dtype == "auto":
        decided("dtype", dtype, f"default on {device}")
    compute_dtype = dtype if config.bnb_4bit_compute_dtype == "auto" else config.bnb_4bit_compute_dtype

    if config.max_model_len is not None:
        max_model_len = config.max_model_len
    else:
        max_model_len = min(model.max_position_embeddings or DEFAULT_MAX_MODEL_LEN, MAX_AUTO_MODEL_LEN)
        why = ("the model's max_position_embeddings" if model.max_position_embeddings else "the model names none")
        decided("max_model_len", max_model_len, f"{why}, at most {MAX_AUTO_MODEL_LEN}")
    if config.max_batch_tokens is not None:
        max_batch_tokens = config.max_batch_tokens
    else:
        max_batch_tokens = GPU_MAX_BATCH_TOKENS if device == "cuda" else CPU_MAX_BATCH_TOKENS
        decided("max_batch_tokens", max_batch_tokens, f"default on {device}")
    if not config.enable_chunked_prefill and max_batch_tokens < max_model_len:
        max_batch_tokens = max_model_len
        decided("max_batch_tokens", max_batch_tokens, "chunked prefill is off: a whole prompt fits one step")
    max_prefill_tokens_while_decoding = config.max_prefill_tokens_while_decoding
    if max_prefill_tokens_while_decoding is None:
        if device == "cuda":
            max_prefill_tokens_while_decoding = GPU_MAX_PREFILL_TOKENS_WHILE_DECODING
            decided("max_prefill_tokens_while_decoding", max_prefill_tokens_while_decoding, "default on cuda")
        else:
            decided("max_prefill_tokens_while_decoding", "none", f"no bound on {device}")

    quantization = config.quantization
    if model.fp8_checkpoint:
        quantization, why = resolve_fp8_checkpoint(config, device, dtype, platform)
        if why is not None:
            decided("quantization", quantization, why)
    if quantization == "fp8":
        check_fp8_runs(device, dtype, platform)

    bnb = model.bnb_quantization
    if config.quantization == "bnb-4bit":
        bnb = "4bit"
    elif config.quantization == "bnb-8bit":
        bnb = "8bit"

    if config.attention_backend == "auto":
        backend, why = resolve_auto_attention_backend(device, platform)
        decided("attention_backend", backend, why)
    else:
        backend = config.attention_backend
        check_attention_backend_runs(backend, device, platform)
    # auto: the model's dtype, which is already decided (and logged) above.
    kv_cache_dtype: KVCacheDTypeName = dtype if config.kv_cache_dtype == "auto" else "fp8_e4m3"
    if kv_cache_dtype == "fp8_e4m3":
        check_fp8_kv_cache_runs(backend, device, platform)

    if config.compile is not None:
        compile_enabled = config.compile
    else:
        compile_enabled = device == "cuda" and bnb == "none"
        decided("compile", compile_enabled, "on a GPU without bitsandbytes layers" if compile_enabled else
                ("bitsandbytes layers are not compiled" if device == "cuda" else "off on CPU"))

    cuda_graphs_off = None
    if not config.enable_cuda_graphs:
        cuda_graphs_off = "enable_cuda_graphs is off"
    elif device != "cuda":
        cuda_graphs_off = "not on a GPU"
    elif backend not in CAPTURABLE_ATTENTION_BACKENDS:
        cuda_graphs_off = f"the {backend} attention backend cannot be captured"
    elif bnb == "8bit":
        # LLM.int8 splits outlier columns out with data-dependent shapes: a capture is invalidated.
        cuda_graphs_off = "bitsandbytes 8-bit layers cannot be captured"
    if config.enable_cuda_graphs and cuda_graphs_off is not None:
        decided("cuda_graphs", False, cuda_graphs_off)

    moe_backend = resolve_moe_backend(config, device, platform)
    mixed_tokens = resolve_mixed_graph_tokens(config, cuda_graphs_off is None, backend, max_batch_tokens,
                                              max_prefill_tokens_while_decoding,
                                              model.has_moe_experts and moe_backend != "fused", decided)
    prefill_step_time_ratio = resolve_prefill_step_time_ratio(config, device, mixed_tokens > 0)
    if config.prefill_step_time_ratio == "auto":
        why = (f"default on {device}" if device != "cuda" else
               "default where steps with prompt tokens replay CUDA graphs" if mixed_tokens else
               "default where steps with prompt tokens run eagerly")
        decided("prefill_step_time_ratio", prefill_step_time_ratio or "off", why)

    async_scheduling = config.async_scheduling and config.tp_size == 1
    if config.async_scheduling and not async_scheduling:
        decided("async_scheduling", False, "tensor-parallel ranks run in step")
    speculative = resolve_speculative(config)
    programmatic_launch = config.programmatic_launch and device == "cuda" and platform.supports_programmatic_launch
    decode_linear = config.decode_linear and device == "cuda"
    fp8_experts = quantization == "fp8" and moe_backend == "fused"
    if quantization == "fp8" and model.has_moe_experts and not fp8_experts:
        decided("fp8_experts", False, "moe_backend='transformers' runs transformers' expert code, which takes the "
                f"model's dtype: the experts stay in {dtype}")
    lora = resolve_lora(config)

    return ResolvedConfig(
        load=LoadSettings(
            model=config.model, tokenizer=config.tokenizer, revision=config.revision,
            trust_remote_code=config.trust_remote_code, load_format=config.load_format,
            quantization=quantization, bnb_4bit_compute_dtype=compute_dtype, device=device, dtype=dtype,
            seed=config.seed, fp8_experts=fp8_experts,
        ),
        scheduler=SchedulerSettings(
            max_num_seqs=config.max_num_seqs, max_batch_tokens=max_batch_tokens, max_model_len=max_model_len,
            enable_chunked_prefill=config.enable_chunked_prefill, policy=config.scheduling_policy,
            max_prefill_tokens_while_decoding=max_prefill_tokens_while_decoding,
            prefill_step_time_ratio=prefill_step_time_ratio, ttft_target_s=config.ttft_target_s,
            max_loras=lora.max_loras if lora.enabled else 0,
        ),
        cache=CacheSettings(
            block_size=config.block_size, num_blocks=config.num_blocks,
            enable_prefix_caching=config.enable_prefix_caching, max_memory_percent=config.max_memory_percent,
            max_cpu_kv_cache_gib=config.max_cpu_kv_cache_gib, kv_cache_dtype=kv_cache_dtype,
        ),
        runner=RunnerSettings(
            device=device, dtype=dtype, attention_backend=backend, fuse_projections=config.fuse_projections,
            decode_linear=decode_linear, moe_backend=moe_backend, programmatic_launch=programmatic_launch,
            cuda_graphs=cuda_graphs_off is None, cuda_graph_max_batch_size=config.cuda_graph_max_batch_size,
            cuda_graph_max_mixed_tokens=mixed_tokens,
            tp_size=config.tp_size, lora=lora,
            compile=CompileSettings(
                enabled=compile_enabled, fullgraph=config.compile_fullgraph, dynamic=config.compile_dynamic,
                mode=config.compile_mode, backend=config.compile_backend, combo_kernels=config.compile_combo_kernels,
            ),
        ),
        async_scheduling=async_scheduling,
        seed=config.seed,
        decisions=tuple(decisions),
        speculative=speculative,
    )
