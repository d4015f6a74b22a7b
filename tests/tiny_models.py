"""Tiny random-weight models of real architectures, saved like hub checkpoints: the one builder of the suite.

Each is built from its transformers config (no download), saved with save_pretrained together with a
small tokenizer, and loaded back by path: the same path a hub model takes. Two tokenizers:
- "word-level" (the default): `w<i>` words, one id each, so engine tests write prompts as ids and compare
  with transformers token for token;
- "byte-bpe": a byte-level BPE trained on a few sentences, with special tokens and a role chat template,
  so the serve tests send real text and chat messages through the OpenAI routes.
Random weights are enough: tests compare the engine with transformers, or the service with the offline
engine, never with good text.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

VOCAB_SIZE = 256
EOS_ID, BOS_ID, PAD_ID = 1, 2, 0
ARCHS = ("llama", "mistral", "gemma2", "qwen2")
# Mixture-of-experts families whose experts take the fused path (engine/kernels/moe/); gpt-oss keeps
# transformers' code (and its attention sinks are not run by the paged attention), so it is not built here.
MOE_ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")

BPE_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
_BPE_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention stores keys and values in fixed-size blocks.",
    "Continuous batching adds and removes requests at every step.",
    "Ray Serve routes requests to replicas through deployment handles.",
    "Hello world! Numbers 0123456789 and symbols ,.;:!?()[]{}<>-_=+*/\\'\"",
] * 20

Tokenizer = Literal["word-level", "byte-bpe"]


def make_tokenizer():
    """The word-level tokenizer: `w3`..`w255` are ids 3..255; 0, 1, 2 are pad, EOS and BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB_SIZE)}
    vocab.update({"<pad>": PAD_ID, "</s>": EOS_ID, "<s>": BOS_ID})
    del vocab["w0"], vocab["w1"], vocab["w2"]
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", bos_token="<s>", pad_token="<pad>")
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w3{% endif %}"
    )
    return tokenizer


def make_bpe_tokenizer(max_position_embeddings: int = 512):
    """A byte-level BPE of about 400 tokens trained on `_BPE_CORPUS` (any text encodes), with role tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_BPE_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        chat_template=BPE_CHAT_TEMPLATE, model_max_length=max_position_embeddings, clean_up_tokenization_spaces=False,
    )


def _configs(vocab_size: int, eos_id: int, bos_id: int, pad_id: int, num_hidden_layers: int,
             num_key_value_heads: int, max_position_embeddings: int) -> dict:
    from transformers import (Gemma2Config, LlamaConfig, MistralConfig, MixtralConfig, OlmoeConfig, Qwen2Config,
                              Qwen2MoeConfig, Qwen3MoeConfig)

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_hidden_layers,
        num_attention_heads=4, num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings,
        eos_token_id=eos_id, bos_token_id=bos_id, pad_token_id=pad_id,
    )
    moe = dict(common, intermediate_size=32, initializer_range=0.1)
    return {
        "llama": LlamaConfig(**common),
        # A window shorter than most prompts, so the ring of blocks really recycles.
        "mistral": MistralConfig(**common, sliding_window=24),
        # Hybrid: sliding and full layers alternate, with attention and final logit soft-capping.
        "gemma2": Gemma2Config(**common, head_dim=16, sliding_window=24, attn_logit_softcapping=50.0,
                               final_logit_softcapping=30.0, query_pre_attn_scalar=16),
        "qwen2": Qwen2Config(**common),
        # 8 experts of width 32, top-2 (top-3 for Qwen3-MoE, whose top-k weights are renormalized), weights of
        # std 0.1 (not 0.02) so that the experts move the logits enough for a wrong expert to change a token.
        "qwen3_moe": Qwen3MoeConfig(**moe, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=3,
                                    norm_topk_prob=True, head_dim=16),
        # A shared expert beside the routed ones, and top-k weights left unnormalized.
        "qwen2_moe": Qwen2MoeConfig(**moe, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                    num_experts=8, num_experts_per_tok=2),
        # Softmax over all experts, then the top-k renormalized (kept in float32).
        "mixtral": MixtralConfig(**moe, num_local_experts=8, num_experts_per_tok=2),
        "olmoe": OlmoeConfig(**moe, num_experts=8, num_experts_per_tok=2),
    }


def tiny_config(arch: str, *, num_hidden_layers: int = 4, num_key_value_heads: int = 2,
                max_position_embeddings: int = 512):
    """The config `build_tiny_model` saves for `arch` with the word-level tokenizer (for models built in memory)."""
    return _configs(vocab_size=VOCAB_SIZE, eos_id=EOS_ID, bos_id=BOS_ID, pad_id=PAD_ID,
                    num_hidden_layers=num_hidden_layers, num_key_value_heads=num_key_value_heads,
                    max_position_embeddings=max_position_embeddings)[arch]


def build_tiny_model(
    arch: str,
    out_dir: Path,
    seed: int = 0,
    *,
    tokenizer: Tokenizer = "word-level",
    num_hidden_layers: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 512,
) -> Path:
    """Save a random `arch` model (hidden size 64, 4 attention heads) and its tokenizer in `out_dir`."""
    from transformers import AutoModelForCausalLM

    if tokenizer == "word-level":
        saved_tokenizer = make_tokenizer()
        ids = dict(vocab_size=VOCAB_SIZE, eos_id=EOS_ID, bos_id=BOS_ID, pad_id=PAD_ID)
    elif tokenizer == "byte-bpe":
        saved_tokenizer = make_bpe_tokenizer(max_position_embeddings)
        ids = dict(vocab_size=len(saved_tokenizer), eos_id=saved_tokenizer.eos_token_id,
                   bos_id=saved_tokenizer.bos_token_id, pad_id=saved_tokenizer.pad_token_id)
    else:
        raise ValueError(f"tokenizer must be 'word-level' or 'byte-bpe', not {tokenizer!r}")
    config = _configs(**ids, num_hidden_layers=num_hidden_layers, num_key_value_heads=num_key_value_heads,
                      max_position_embeddings=max_position_embeddings)[arch]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = ids["eos_id"]
    model.generation_config.pad_token_id = ids["pad_id"]
    model.save_pretrained(out_dir)
    saved_tokenizer.save_pretrained(out_dir)
    return out_dir


def save_fp8_checkpoint(
    model_dir: Path,
    out_dir: Path,
    *,
    method: Literal["fp8", "compressed-tensors"] = "fp8",
    weight_block_size: tuple[int, int] | None = (128, 128),
    modules_to_not_convert: tuple[str, ...] = (),
    static_input_scales: bool = False,
    quantize_experts: bool = True,
) -> Path:
    """`model_dir`'s tiny model saved again as an FP8 checkpoint: every projection of its decoder layers (not
    the embeddings, norms or LM head, nor `modules_to_not_convert`) in float8_e4m3fn with its scales.

    MoE models (saved by transformers per expert: `experts.<e>.gate_proj/up_proj/down_proj`, Mixtral's
    `experts.<e>.w1/w3/w2`) get FP8 experts the same way, each expert's projection a weight with its own scales,
    as transformers writes an FP8 model's merged experts back (the layout of Qwen3-30B-A3B-FP8);
    `quantize_experts=False` leaves them in the model's dtype. Routers are not linears there and stay unquantized.

    - "fp8": transformers' fine-grained format, written by transformers' own code: its `Fp8Quantize` for
      the tensors (`weight_scale_inv` per `weight_block_size` block) and a `FineGrainedFP8Config` in
      config.json, as `save_pretrained` writes them after an FP8 load.
    - "compressed-tensors": llm-compressor's FP8 (format float-quantized) with a bfloat16 `weight_scale` per
      output channel [N, 1] (the FP8_DYNAMIC scheme), and with `static_input_scales` an `input_scale` [1] per
      layer (the static FP8 scheme). transformers needs the compressed-tensors package to read it.
    """
    import json
    import re
    import shutil
    from types import SimpleNamespace

    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    out_dir.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        if path.name not in ("model.safetensors", "config.json"):
            shutil.copy(path, out_dir / path.name)
    fine_grained = FineGrainedFP8Config(weight_block_size=weight_block_size,
                                        modules_to_not_convert=list(modules_to_not_convert) or None)
    quantize = Fp8Quantize(SimpleNamespace(quantization_config=fine_grained))
    tensors = {}
    for key, value in load_file(model_dir / "model.safetensors").items():
        layer = key.removesuffix(".weight")
        is_expert = re.search(r"\.experts\.\d+\.", key) is not None
        is_projection = (key.endswith("_proj.weight") and ".layers." in key) or \
            re.search(r"\.experts\.\d+\.w[123]\.weight$", key) is not None
        if not is_projection or layer in modules_to_not_convert or (is_expert and not quantize_experts):
            tensors[key] = value
        elif method == "fp8":
            tensors.update(quantize.convert({key: value}))
        else:
            scale = (value.abs().amax(dim=1, keepdim=True) / 448.0).to(torch.bfloat16)
            tensors[key] = (value / scale.float()).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
            tensors[f"{layer}.weight_scale"] = scale
            if static_input_scales:
                tensors[f"{layer}.input_scale"] = torch.tensor([0.02])
    save_file({k: v.contiguous() for k, v in tensors.items()}, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = AutoConfig.from_pretrained(model_dir)
    if method == "fp8":
        config.quantization_config = fine_grained
        config.save_pretrained(out_dir)
    else:
        activations = ({"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
                       if static_input_scales else
                       {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True})
        config_dict = json.loads((model_dir / "config.json").read_text())
        config_dict["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {
                "targets": ["Linear"], "input_activations": activations,
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": False, "symmetric": True},
            }},
            "ignore": ["lm_head", *modules_to_not_convert],
        }
        (out_dir / "config.json").write_text(json.dumps(config_dict, indent=2))
    return out_dir


LORA_PROJECTIONS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def save_random_lora(model_dir: Path, out_dir: Path, seed: int, targets: tuple[str, ...], rank: int = 4,
                     lora_alpha: int = 8) -> str:
    """A random LoRA adapter of the model in `model_dir`, written as peft saves one (adapter_config.json and
    adapter_model.safetensors, `base_model.model.` keys) without importing peft; large enough to change the
    greedy tokens (A ~ N(0, 1/in), B ~ N(0, 0.05^2), scale alpha / r). Returns the folder."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_width, kv_width = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {"q_proj": (q_width, hidden), "k_proj": (kv_width, hidden), "v_proj": (kv_width, hidden),
              "o_proj": (hidden, q_width), "gate_proj": (config.intermediate_size, hidden),
              "up_proj": (config.intermediate_size, hidden), "down_proj": (hidden, config.intermediate_size)}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for target in targets:
            out_features, in_features = shapes[target]
            key = f"base_model.model.model.layers.{layer}.{LORA_PROJECTIONS[target]}.{target}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) / in_features**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.05
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    (out_dir / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": lora_alpha, "target_modules": list(targets), "bias": "none"}))
    return str(out_dir)


def engine_greedy(engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Each prompt's greedy tokens (EOS ignored) from an `LLMEngine` stepped to the end; shuts the engine down."""
    from pagedserve.engine.core.request import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for index, prompt in enumerate(prompts):
        engine.add_request(f"r{index}", prompt, params)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens.setdefault(output.request_id, []).extend(output.outputs[0].token_ids)
    engine.shutdown()
    return [tokens[f"r{index}"] for index in range(len(prompts))]


def transformers_greedy(model, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Each prompt's greedy tokens from transformers' `generate`, exactly `max_tokens` of them."""
    return [model.generate(torch.tensor([p]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                           do_sample=False)[0, len(p):].tolist() for p in prompts]


def forced_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """[len(tokens)] float32: the log-probability `model` (transformers, one forward over prompt + tokens) gives
    each of `tokens` after the context before it: a teacher-forced score along a path another engine chose, so
    two implementations are compared under the same context at every position (greedy paths, once apart,
    compare different contexts; in bf16 a near tie, in the logits or in a MoE router's top k, parts them)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + tokens], device=device)
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, ids[0, len(prompt):, None]).squeeze(1).cpu()
