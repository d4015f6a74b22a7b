"""Tiny random-weight models of real architectures, saved like hub checkpoints.

Each is built from its transformers config (no download), saved with save_pretrained together with a
small word-level tokenizer, and loaded back by path: the same path a hub model takes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

VOCAB_SIZE = 256
EOS_ID, BOS_ID, PAD_ID = 1, 2, 0


def make_tokenizer():
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


def _configs():
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=EOS_ID, bos_token_id=BOS_ID, pad_token_id=PAD_ID,
    )
    return {
        "llama": LlamaConfig(**common),
        # A window shorter than most prompts, so the ring of blocks really recycles.
        "mistral": MistralConfig(**common, sliding_window=24),
        # Hybrid: sliding and full layers alternate, with attention and final logit soft-capping.
        "gemma2": Gemma2Config(**common, head_dim=16, sliding_window=24, attn_logit_softcapping=50.0,
                               final_logit_softcapping=30.0, query_pre_attn_scalar=16),
        "qwen2": Qwen2Config(**common),
    }


ARCHS = ("llama", "mistral", "gemma2", "qwen2")


def build_tiny_model(arch: str, out_dir: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_configs()[arch])
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    model.save_pretrained(out_dir)
    make_tokenizer().save_pretrained(out_dir)
    return out_dir


