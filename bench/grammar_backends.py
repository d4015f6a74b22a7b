"""xgrammar against llguidance on this machine: compile time, per-token mask time, and whether a JSON
string may hold a raw control character (RFC 8259 says no). How engine/core/grammar.py's library was picked.

Needs both libraries (`pip install llguidance`; xgrammar is a dependency). The tokenizer is a byte-level BPE
trained here on Python's help text (about 9k tokens). Prints a table.

    python bench/grammar_backends.py
"""

from __future__ import annotations

import json
import statistics
import time

SCHEMAS = [
    ({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0,
                                                                          "maximum": 150}}, "required": ["name", "age"]},
     {"name": "Ada Lovelace", "age": 36}),
    ({"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {
        "id": {"type": "integer"}, "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                            "minItems": 1, "maxItems": 3}}, "required": ["id"]},
        "minItems": 1, "maxItems": 5}}, "required": ["items"]},
     {"items": [{"id": 1, "tags": ["a", "b"]}, {"id": 22, "tags": ["c"]}]}),
]
# A bounded string: xgrammar compiles it to a character class that admits control bytes (its plain string does not).
STRING_SCHEMA = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 12}}, "required": ["a"]}


def tokenizer():
    import pydoc_data.topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(list(pydoc_data.topics.topics.values()), trainers.BpeTrainer(
        vocab_size=32000, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _allowed(bitmask, token_id: int) -> bool:
    return bool((int(bitmask[0, token_id // 32]) >> (token_id % 32)) & 1)


def run_xgrammar(hf):
    import xgrammar as xgr

    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(hf, vocab_size=len(hf)))
    compile_ms, mask_us = [], []
    for schema, instance in SCHEMAS:
        started = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        compile_ms.append((time.perf_counter() - started) * 1e3)
        matcher, bitmask = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, len(hf))
        for token_id in hf.encode(json.dumps(instance), add_special_tokens=False):
            started = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            mask_us.append((time.perf_counter() - started) * 1e6)
            assert matcher.accept_token(token_id)
    matcher = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(STRING_SCHEMA), any_whitespace=False))
    for token_id in hf.encode('{"a": "x', add_special_tokens=False):
        assert matcher.accept_token(token_id)
    bitmask = xgr.allocate_token_bitmask(1, len(hf))
    matcher.fill_next_token_bitmask(bitmask)
    return compile_ms, mask_us, _allowed(bitmask, hf.convert_tokens_to_ids("Đ"))  # byte 0x10


def run_llguidance(hf):
    import llguidance
    import llguidance.hf
    import llguidance.torch as llg_torch

    tokenizer_info = llguidance.hf.from_tokenizer(hf)
    compile_ms, mask_us = [], []
    for schema, instance in SCHEMAS:
        started = time.perf_counter()
        matcher = llguidance.LLMatcher(tokenizer_info, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema)))
        compile_ms.append((time.perf_counter() - started) * 1e3)
        bitmask = llg_torch.allocate_token_bitmask(1, tokenizer_info.vocab_size)
        for token_id in hf.encode(json.dumps(instance), add_special_tokens=False):
            started = time.perf_counter()
            llg_torch.fill_next_token_bitmask(matcher, bitmask, 0)
            mask_us.append((time.perf_counter() - started) * 1e6)
            assert matcher.consume_token(token_id)
    matcher = llguidance.LLMatcher(tokenizer_info, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(STRING_SCHEMA)))
    for token_id in hf.encode('{"a": "x', add_special_tokens=False):
        assert matcher.consume_token(token_id)
    bitmask = llg_torch.allocate_token_bitmask(1, tokenizer_info.vocab_size)
    llg_torch.fill_next_token_bitmask(matcher, bitmask, 0)
    return compile_ms, mask_us, _allowed(bitmask, hf.convert_tokens_to_ids("Đ"))


def main() -> int:
    hf = tokenizer()
    print(f"byte-level BPE of {len(hf)} tokens; {len(SCHEMAS)} schemas")
    print("| library | compile ms (each schema) | mask us p50 / max | raw control byte allowed in a JSON string |")
    print("|---|---|---|---|")
    for name, run in (("xgrammar", run_xgrammar), ("llguidance", run_llguidance)):
        compile_ms, mask_us, control = run(hf)
        print(f"| {name} | {', '.join(f'{ms:.2f}' for ms in compile_ms)} | {statistics.median(mask_us):.0f} / "
              f"{max(mask_us):.0f} | {'yes' if control else 'no'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
