"""Structured outputs under load: W1 with a share of the requests under a JSON schema, against plain W1 in the
same process, plus grammar compile times and the per-step cost of the masks.

The model is the Llama-3-8B shape with random weights (GPU) or a small one (`--layers`, `--hidden`, CPU);
the tokenizer is a byte-level BPE trained here on Python's help text and generated words up to the model's
vocabulary, so that JSON can be spelled (the W1 word-level tokenizer cannot). Constrained requests ask for
an array of exactly `--array-items` integers in [0, 999], which random weights fill to about the length of
a plain request; plain requests ignore EOS as in W1. Prints a table last; `--out` writes JSON.

    python bench/structured_bench.py                     # GPU: 512 requests, half constrained
    python bench/structured_bench.py --layers 2 --hidden 256 --num-requests 32 --max-new-tokens 64 --array-items 16
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, percentile, random_token_workload, write_json  # noqa: E402

SCHEMAS_FOR_COMPILE = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name"]},
    {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 8},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}}}},
    {"type": "object", "properties": {"when": {"type": "string", "format": "date"}, "ok": {"type": "boolean"}}},
    {"type": "object", "properties": {"p": {"$ref": "#/$defs/point"}, "q": {"$ref": "#/$defs/point"}},
     "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}}}}},
    {"type": "object", "properties": {"items": {"type": "array", "items": {
        "type": "object", "properties": {"id": {"type": "integer"}, "price": {"type": "number", "minimum": 0}},
        "required": ["id", "price"]}}}, "required": ["items"]},
    {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "integer", "minimum": 0, "maximum": 9}]},
    {"type": "object", "properties": {"level": {"enum": [1, 2, 3, "high"]}, "note": {"type": ["string", "null"]}}},
]


def train_tokenizer(vocab_size: int):
    """A byte-level BPE of about `vocab_size` tokens: Python's help text plus generated words for the rest."""
    import pydoc_data.topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiouy"] + list("aeiou")
    words = [" ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 5))) for _ in range(40))
             for _ in range(max(2000, vocab_size // 8))]
    texts = list(pydoc_data.topics.topics.values()) + words
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_model(args: argparse.Namespace, tokenizer, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = args.hidden
    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=hidden, intermediate_size=hidden * 7 // 2,
        num_hidden_layers=args.layers, num_attention_heads=max(1, hidden // 128),
        num_key_value_heads=max(1, hidden // 512), max_position_embeddings=8192, rope_theta=500000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval().requires_grad_(False)


class MaskTimer:
    """Host time of each step's mask fill (engine/core/grammar.fill_bitmask), summed per step."""

    def __init__(self, engine) -> None:
        from pagedserve.engine.core import grammar

        self.per_step: list[float] = []
        self._current = 0.0
        original = grammar.fill_bitmask

        def timed(*args):
            started = time.perf_counter()
            try:
                return original(*args)
            finally:
                self._current += time.perf_counter() - started

        grammar.fill_bitmask = timed  # the sampler looks it up at each step
        engine_step = engine.step

        def step():
            self._current = 0.0
            outputs = engine_step()
            if self._current:
                self.per_step.append(self._current)
            return outputs

        engine.step = step


def run(llm, workload, params) -> tuple[float, list]:
    started = time.perf_counter()
    outputs = llm.generate(workload.prompts, params, use_tqdm=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall_s = time.perf_counter() - started
    return sum(len(o.outputs[0].token_ids) for o in outputs) / wall_s, outputs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--min-prompt-len", type=int, default=64)
    parser.add_argument("--max-prompt-len", type=int, default=1024)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab-size", type=int, default=128256)
    parser.add_argument("--constrained-fraction", type=float, default=0.5)
    parser.add_argument("--array-items", type=int, default=96,
                        help="integers in each constrained answer (96: about as many tokens as a plain request)")
    parser.add_argument("--constrained-max-tokens", type=int, default=None,
                        help="room for the constrained answers to finish (default: twice --max-new-tokens)")
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from pagedserve import LLM, SamplingParams
    from pagedserve.engine.core.request import StructuredOutputsParams

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    tokenizer = train_tokenizer(min(args.vocab_size, 128256))
    print(f"tokenizer: byte-level BPE of {len(tokenizer)} tokens in {time.perf_counter() - started:.1f} s", flush=True)
    model = build_model(args, tokenizer, device)
    llm = LLM.from_model(model, tokenizer, served_name="structured-bench", max_num_seqs=args.max_num_seqs,
                         enable_prefix_caching=False)
    specials = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    workload = random_token_workload(args.num_requests, args.min_prompt_len, args.max_prompt_len,
                                     args.max_new_tokens, len(tokenizer), seed=0, excluded_token_ids=specials)
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999},
              "minItems": args.array_items, "maxItems": args.array_items}
    plain = SamplingParams(temperature=0, max_tokens=args.max_new_tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=args.constrained_max_tokens or 2 * args.max_new_tokens,
                                 structured_outputs=StructuredOutputsParams(json=schema))
    every = max(1, round(1 / args.constrained_fraction)) if args.constrained_fraction > 0 else 0
    mixed = [constrained if every and index % every == 0 else plain for index in range(args.num_requests)]

    llm.generate([workload.prompts[0][:64]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    llm.generate([workload.prompts[1][:64]], constrained, use_tqdm=False)
    plain_tps, _ = run(llm, workload, plain)
    timer = MaskTimer(llm.engine)
    mixed_tps, outputs = run(llm, workload, mixed)
    plain_again_tps, _ = run(llm, workload, plain)

    import jsonschema

    num_constrained = sum(1 for p in mixed if p is constrained)
    valid = lengths = 0
    for output, params in zip(outputs, mixed):
        if params is not constrained:
            continue
        lengths += len(output.outputs[0].token_ids)
        try:
            jsonschema.validate(json.loads(output.outputs[0].text), schema)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass

    compiler = llm.engine._grammars()
    compile_ms = []
    for index, compile_schema in enumerate(SCHEMAS_FOR_COMPILE * 3):
        varied = {**compile_schema, "title": f"schema {index}"}  # a new text each time: no cache hit
        started = time.perf_counter()
        compiler.compile(StructuredOutputsParams(json=varied))
        compile_ms.append((time.perf_counter() - started) * 1e3)
    started = time.perf_counter()
    compiler.compile(StructuredOutputsParams(json={**SCHEMAS_FOR_COMPILE[0], "title": "schema 0"}))
    cached_ms = (time.perf_counter() - started) * 1e3

    mask_ms = [value * 1e3 for value in timer.per_step]
    baseline = (plain_tps + plain_again_tps) / 2
    rows = [
        ("device", machine_description() if device.type == "cuda" else "cpu"),
        ("workload", workload.description),
        ("plain W1 output tok/s (before, after)", f"{plain_tps:.1f}, {plain_again_tps:.1f}"),
        (f"W1 with {num_constrained} of {args.num_requests} under a JSON schema, output tok/s", f"{mixed_tps:.1f}"),
        ("ratio to plain (mean of before and after)", f"{mixed_tps / baseline:.3f}"),
        ("constrained outputs that parse and validate", f"{valid}/{num_constrained} "
                                                        f"(mean {lengths / max(num_constrained, 1):.0f} tokens)"),
        ("output tokens: plain W1, mixed", f"{args.num_requests * args.max_new_tokens}, "
                                           f"{(args.num_requests - num_constrained) * args.max_new_tokens + lengths}"),
        ("grammar compile ms p50 / p99 (new schemas)", f"{statistics.median(compile_ms):.2f} / "
                                                       f"{percentile(compile_ms, 99):.2f}"),
        ("grammar compile ms, cached schema", f"{cached_ms:.3f}"),
        ("mask fill ms a step (host) p50 / p99 / steps", f"{statistics.median(mask_ms):.2f} / "
                                                         f"{percentile(mask_ms, 99):.2f} / {len(mask_ms)}"
         if mask_ms else "n/a"),
    ]
    if args.out:
        write_json(args.out, {"args": vars(args) | {"out": str(args.out)}, "rows": dict(rows),
                              "compile_ms": compile_ms, "mask_ms": mask_ms})
    print("| metric | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    llm.engine.shutdown()
    return 0 if valid == num_constrained else 1


if __name__ == "__main__":
    raise SystemExit(main())
