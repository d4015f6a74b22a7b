"""`EngineConfig`: every engine setting a user writes, under the same names as flags, yaml args and `LLM(...)` keywords.

Checked once, at the edge (Python API, CLI, Serve args), with pydantic; a bad value raises `ConfigError`
naming the field, the value and the allowed range. Values left on "auto" (`None`, or "auto") are decided
by `config/resolve.py` at start-up, into the frozen settings that the engine's parts receive.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

AttentionBackendName = Literal["auto", "reference", "triton", "flash_paged"]
SchedulingPolicy = Literal["fifo", "prefill_first", "priority"]
Quantization = Literal["none", "bnb-4bit", "bnb-8bit", "fp8"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
KVCacheDType = Literal["auto", "fp8"]
SpeculativeMethod = Literal["none", "ngram", "draft"]
MoeBackend = Literal["auto", "fused", "transformers"]


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent; the message names the field."""


class EngineConfig(BaseModel):
    """Every knob of the engine, under the names that transformers' continuous batching and vLLM use.

    `None` means "auto": resolved from the model and the free device memory at start-up.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    # Model
    model: str | None = Field(None, description="Hub id or local path; None serves the built-in demo model.")
    tokenizer: str | None = Field(None, description="Tokenizer hub id or path; defaults to the model's.")
    revision: str | None = Field(None, description="Model revision (branch, tag or commit) on the hub.")
    trust_remote_code: bool = Field(False, description="Allow custom modeling code from the hub.")
    dtype: DType = Field("auto", description="Weights and KV dtype; auto is bfloat16 on GPU, float32 on CPU.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the engine runs.")
    load_format: Literal["auto", "dummy"] = Field(
        "auto", description="auto reads the weights; dummy builds random weights from the model's config (benchmarks)."
    )
    quantization: Quantization = Field(
        "none", description="Weight quantization: bitsandbytes (bnb-4bit, bnb-8bit), or fp8 (e4m3 weights with a scale "
        "per output feature, activations per token; MoE experts too on the fused MoE path; Hopper or newer GPUs: "
        "compute capability 9.0+). An FP8 "
        "checkpoint (transformers' fp8 or compressed-tensors FP8) loads as fp8 where that runs, even with none, and "
        "is dequantized to dtype elsewhere.")
    bnb_4bit_compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype of bnb-4bit layers; auto follows dtype."
    )

    # KV cache
    block_size: int = Field(16, ge=1, le=512, description="Tokens per KV-cache block.")
    num_blocks: int | None = Field(None, ge=1, description="KV-cache blocks per layer group; auto sizes from memory.")
    max_memory_percent: float = Field(
        0.9, gt=0.0, le=1.0, description="Share of device memory the engine may use (weights + activations + KV)."
    )
    max_cpu_kv_cache_gib: float = Field(
        4.0, gt=0.0, description="Upper bound of the KV cache on CPU, where RAM is shared with everything else."
    )
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of shared prompt prefixes.")
    kv_cache_dtype: KVCacheDType = Field(
        "auto", description="What the KV cache stores: auto, the model's dtype; fp8, float8 e4m3 (1 byte a value: "
        "twice the tokens in the same memory), written as value / scale clamped to +-448 and read as stored * "
        "scale, with a float32 scale per layer for K and one for V: the checkpoint's where it stores them "
        "(self_attn.k_scale / v_scale), else 1.0 (no calibration of our own: values are stored as they come, with "
        "e4m3's 3 mantissa bits). Triton attention needs compute capability 8.9+; the "
        "reference backend runs it anywhere, CPU included.",
    )

    # Scheduler
    max_batch_tokens: int | None = Field(None, ge=1, description="Token budget of one step; auto from memory.")
    max_num_seqs: int = Field(256, ge=1, le=65536, description="Most requests running at once.")
    max_model_len: int | None = Field(None, ge=1, description="Longest prompt + output; auto from the model config.")
    enable_chunked_prefill: bool = Field(True, description="Split long prompts across steps.")
    scheduling_policy: SchedulingPolicy = Field(
        "fifo", description="fifo (vLLM's fcfs): decodes first, then prompts in arrival order; prefill_first: "
        "prompts first; priority (vLLM's): requests carry a priority (an int, lower is served earlier, default 0), "
        "waiting ones are admitted and running ones preempted by it, arrival order within a level.",
    )
    max_prefill_tokens_while_decoding: int | None = Field(
        None, ge=1, description="Most prompt tokens (prefill chunks, recomputes of preempted requests) one step "
        "takes while requests are decoding, so that long prompts do not stretch every decode's step (TPOT); a "
        "step without decodes keeps all of max_batch_tokens. None: auto (no bound on CPU, a fixed bound on "
        "CUDA: config/resolve.py); max_batch_tokens or more: no bound.",
    )
    prefill_step_time_ratio: float | Literal["auto", "off"] = Field(
        "auto", description="A step that carries prompt tokens beside decodes may take at most this many times the "
        "decode-only step of the same batch (plus any fixed cost a step with prompt tokens brings, such as running "
        "eagerly where cuda_graph_max_mixed_tokens does not capture it): its prompt tokens are the fewer of "
        "max_prefill_tokens_while_decoding and "
        "those whose time is at most (ratio - 1) decode steps, as predicted by a cost model the engine fits from "
        "its own step times (engine/core/step_cost.py), and never fewer than 64. When the waiting prompts would not "
        "get their first token within ttft_target_s at that rate, steps take as many prompt tokens as that needs, "
        "up to max_prefill_tokens_while_decoding. off: the constant bound alone; auto: off on CPU, on CUDA "
        "GPU_PREFILL_STEP_TIME_RATIO of config/resolve.py (1.5, measured with bench/online_engine_bench.py) where "
        "steps with prompt tokens replay CUDA graphs, else off.",
    )
    ttft_target_s: float = Field(
        0.5, gt=0.0, le=3600.0, description="The time to first token that prefill_step_time_ratio plans for: the "
        "deadline by which the waiting prompts (and a preempted request's recompute, from its last token) are to be "
        "computed; unused without the ratio. Under load prompts wait up to about this long, so that steps beside "
        "decodes stay small; 0.5 s is half of a 1 s p99 time-to-first-token objective, the other half left to the "
        "cost model's errors, bursts, and the queues in front of the engine.",
    )

    # Execution
    attention_backend: AttentionBackendName = Field(
        "auto", description="Paged attention implementation: reference (PyTorch, any device), triton (our kernels, "
        "CUDA), flash_paged (FlashAttention 4's paged kernels on Hopper or Blackwell GPUs: pip install "
        "'pagedserve[flash]'; layers it cannot run, e.g. over an FP8 KV cache, run Triton); auto: the faster one "
        "measured for the GPU generation (config/resolve.py), the reference on CPU.",
    )
    async_scheduling: bool = Field(
        True, description="Schedule and prepare the next step while the device runs this one (tp_size 1 only)."
    )
    engine_process: bool | None = Field(
        None, description="Servers: run the step loop in a process of its own, so the server's event loop never "
        "shares its GIL; None: on for CUDA, off on CPU (a thread).",
    )
    step_timeout_s: float = Field(
        300.0, gt=0.0, description="Servers: a step still running after this long marks the engine dead (a hung "
        "device or peer), so its streams fail and the health check asks for a replacement.",
    )
    enable_cuda_graphs: bool = Field(True, description="Capture decode steps in CUDA graphs (GPU only).")
    cuda_graph_max_batch_size: int = Field(512, ge=1, le=4096, description="Largest decode batch captured.")
    cuda_graph_max_mixed_tokens: int | Literal["auto"] = Field(
        "auto", description="Steps with prompt tokens (prompt chunks and the decodes beside them) of up to this many "
        "tokens replay CUDA graphs too, one per padded token count, where eagerly the host's kernel launches "
        "would set their pace; 0: only decode steps are captured. auto: max_prefill_tokens_while_decoding plus "
        "the largest decode batch captured (every step with decodes), within max_batch_tokens, where decode steps "
        "are captured with the Triton attention backend.",
    )
    fuse_projections: bool = Field(
        True, description="Run sibling projections of one input (q/k/v, gate/up) as one GEMM over their "
        "concatenated weights; no extra memory.",
    )
    decode_linear: bool = Field(
        True, description="On a GPU, run the bf16/fp16 linear layers of one-token steps (batch-1 decode) with a "
        "Triton GEMM that streams each weight once over every SM (engine/kernels/decode_linear.py); cuBLAS otherwise.",
    )
    moe_backend: MoeBackend = Field(
        "auto", description="Mixture-of-experts layers. fused: the experts of Qwen2-MoE, Qwen3-MoE, Mixtral and OLMoE "
        "(transformers' fused-experts layout with a SiLU gate) run as grouped GEMMs (engine/kernels/moe/: Triton "
        "kernels, torch grouped_mm on Hopper in bf16, a PyTorch reference on CPU); other MoE families (gpt-oss, "
        "per-expert modules) keep transformers' code, logged at start-up. transformers: transformers' own experts "
        "code for every family. auto: fused on a GPU with Triton, transformers elsewhere.",
    )
    compile: bool | None = Field(
        None, description="torch.compile the decoder layers; None: on for CUDA (not with bitsandbytes), off on CPU."
    )
    compile_fullgraph: bool = Field(False, description="torch.compile fullgraph.")
    compile_dynamic: bool | None = Field(None, description="torch.compile dynamic shapes (None: torch decides).")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = Field(
        None, description="torch.compile mode."
    )
    compile_backend: str = Field("inductor", description="torch.compile backend.")
    compile_combo_kernels: bool = Field(
        True, description="Inductor's combo kernels (independent small kernels fused side by side); only with "
        "the inductor backend and no compile_mode.",
    )
    programmatic_launch: bool = Field(
        True, description="On Hopper and newer GPUs, launch the engine's Triton kernels and inductor's compiled "
        "ones with programmatic dependent launch, so each kernel starts while the one before it finishes "
        "(engine/kernels/launch.py).",
    )
    tp_size: int = Field(1, ge=1, le=64, description="Tensor-parallel ranks per replica.")
    # Speculative decoding (vLLM's names; docs/speculative.md)
    speculative_method: SpeculativeMethod = Field(
        "none", description="Propose tokens and verify them in one forward: ngram (prompt lookup: the tokens that "
        "followed an earlier occurrence of the last n tokens); draft (a smaller model, speculative_model). Output is "
        "exactly what it would be without: greedy token for token, sampling in distribution.",
    )
    num_speculative_tokens: int = Field(3, ge=1, le=16, description="Tokens proposed per request and step (k).")
    prompt_lookup_min: int = Field(1, ge=1, le=64, description="ngram: shortest suffix matched.")
    prompt_lookup_max: int = Field(4, ge=1, le=64, description="ngram: longest suffix matched (tried first).")
    speculative_model: str | None = Field(None, description="draft: the draft model, a smaller causal LM with the "
                                          "model's tokenizer (path or hub id).")
    speculative_disable_batch_size: int = Field(
        8, ge=0, description="Steps with more running requests than this do not speculate (0: never speculate); "
        "also the largest batch of the verification CUDA graphs (and of the draft model's cache). Within it, "
        "speculative_adaptive decides.",
    )
    speculative_adaptive: bool = Field(
        True, description="Each step, speculate only where it commits more tokens per second than plain "
        "decoding: by the engine's fitted step costs and each request's acceptance, which requests propose and "
        "how many tokens (up to num_speculative_tokens). False: every request that may speculates, in every step "
        "within speculative_disable_batch_size.",
    )
    speculative_pipelining: bool = Field(
        True, description="ngram: launch a verification before the one in flight delivers, on the guess that it "
        "accepts every proposal (where every running request verifies and none samples from a seed or reads earlier "
        "tokens); a wrong guess drops the new step's rows. False: each verification is delivered before the next "
        "step is prepared.",
    )
    # LoRA adapters (vLLM's names; docs/lora.md)
    enable_lora: bool = Field(
        False, description="Serve LoRA adapters over the base model (on when lora_modules names any; needed to "
        "load adapters at run time).",
    )
    lora_modules: dict[str, str] | None = Field(
        None, description="Adapters loaded at start-up: name -> path of a PEFT adapter folder (adapter_config.json "
        "+ adapter_model.safetensors) or a hub id; a request selects one by its name as the model. On the command "
        "line: name=path[,name=path...].",
    )
    max_lora_rank: int = Field(16, ge=1, le=512, description="Largest rank of an adapter (every slot is this wide).")
    max_loras: int = Field(
        4, ge=1, le=256, description="Adapters on the device at once (slots, least recently used evicted); one "
        "step's rows use at most this many.",
    )
    max_cpu_loras: int | None = Field(
        None, ge=1, description="Adapters kept in host memory (least recently used evicted, read again from their "
        "path when needed); None: max_loras or the number of lora_modules, whichever is larger.",
    )
    seed: int = Field(0, ge=0, description="Seed of unseeded sampling.")

    @field_validator("scheduling_policy", mode="before")
    @classmethod
    def _accept_hyphenated_policy(cls, value: Any) -> Any:
        if value == "fcfs":  # vLLM's name of the same policy
            return "fifo"
        return value.replace("-", "_") if isinstance(value, str) else value

    @field_validator("prefill_step_time_ratio", mode="before")
    @classmethod
    def _ratio_in_range(cls, value: Any) -> Any:
        """'auto', 'off', or a number in [1, 100] (as text too: flags and `serve run` args arrive as strings)."""
        if value in ("auto", "off"):
            return value
        try:
            ratio = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            ratio = None
        if ratio is None or not 1.0 <= ratio <= 100.0:
            raise ValueError("must be 'auto', 'off' or a number in [1, 100]")
        return ratio

    @field_validator("cuda_graph_max_mixed_tokens", mode="before")
    @classmethod
    def _mixed_tokens_in_range(cls, value: Any) -> Any:
        """'auto' or an integer >= 0 (as text too: flags and `serve run` args arrive as strings)."""
        if value == "auto":
            return value
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError("must be 'auto' or an integer >= 0 (0: only decode steps are captured)")
        return value

    @field_validator("lora_modules", mode="before")
    @classmethod
    def _lora_modules_from_text(cls, value: Any) -> Any:
        """`name=path,name=path` (the command line) or a list of `name=path` into a dict."""
        if isinstance(value, str):
            value = [item for item in value.split(",") if item.strip()]
        if isinstance(value, (list, tuple)):
            pairs = {}
            for item in value:
                name, sep, path = str(item).partition("=")
                if not sep or not name.strip() or not path.strip():
                    raise ValueError(f"expected name=path, got {item!r}")
                pairs[name.strip()] = path.strip()
            return pairs
        return value

    @field_validator("tp_size")
    @classmethod
    def _tp_size_power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"must be a power of two (1, 2, 4, 8, ...), got {value}")
        return value

    @classmethod
    def create(cls, **kwargs: Any) -> "EngineConfig":
        """Validate keyword arguments; raise `ConfigError` with one line per bad field."""
        try:
            return cls(**kwargs)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, cls.__name__)) from None

    @classmethod
    def field_names(cls) -> list[str]:
        return list(cls.model_fields)


def format_validation_error(exc: ValidationError, owner: str) -> str:
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "<root>"
        value = error.get("input")
        lines.append(f"{owner}.{field}={value!r}: {error['msg']}")
    return "invalid configuration: " + "; ".join(lines)
