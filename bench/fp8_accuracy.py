"""FP8 fidelity (issue 25): how far FP8 weights, and an FP8 KV cache, move a model's outputs, measured two ways.

(a) Logits, same inputs: the baseline model (bf16 on a GPU) and the same model with every decoder `nn.Linear`
    swapped for `Fp8Linear` (`quantize_linears`: e4m3 weights with a scale per output feature, activations
    quantized per token; the LM head and embeddings stay in the baseline dtype). Over every position of a few
    sequences: the relative error ||fp8 - base|| / ||base|| of the logits (Frobenius norms over all positions),
    the mean and largest KL(base || fp8) of the next-token distributions, and how often the two agree on the
    top-1 token. Inputs are random token ids (`--num-sequences` x `--seq-len`, seeded); with `--heldout` the
    first windows of held-out text too, where a trained model's distributions are peaked.
(b) `--heldout`: perplexity on the held-out text of a folder written by bench/train_text_model.py
    (`heldout.jsonl`: the files the model never saw), baseline vs FP8 weights, their ratio and the verdict:
    FP8 within 1% of the baseline's perplexity. Perplexity is exp(mean NLL) over non-overlapping windows
    (`train_text_model.perplexity`). A float32 row (the weights as trained) shows what bf16 alone costs.
(c) The FP8 KV cache (`kv_cache_dtype="fp8"`: e4m3 K and V with per-layer scales of 1.0), with the baseline
    weights, through the engine itself (`PagedForward`: each window is one prefill step of the engine's runner,
    its K/V written to the paged cache and read back from it by the attention, which is teacher-forced decoding
    over that cache): the engine with an FP8 cache against the same engine with a cache in the baseline dtype,
    on the inputs of (a) (logits) and, with `--heldout`, the held-out windows of (b) (perplexity, and the
    within-1% verdict against the engine's own baseline-dtype row, which shows what the engine path alone
    changes next to transformers' forward).

The FP8 copy is the baseline model quantized in place, layer by layer (`quantize_linears` frees each bf16
weight before quantizing the next), after every baseline output has been taken: one model's memory, not two.
On a GPU with compute capability 8.9+ the FP8 layers run `torch._scaled_mm`; anywhere else (CPU) they run the
float32 reference of the same math, and a CPU run's baseline is float32 (the output says both). The FP8 cache
runs the Triton attention kernels on such a GPU (8.9+) and the reference attention elsewhere.

On one H200 (python3 there is 3.12 with torch and transformers; from the repository root). The 8B shape
(random weights, the `build_model` of bench/gpu_bench.py), about 2 minutes (building 8B random weights on the
GPU dominates):

    PYTHONPATH=. python3 bench/fp8_accuracy.py --shape 8b --out $OUT/fp8_8b.json

A trained model, in the same call that trains it (bench/train_text_model.py: its weights do not come back
from a device call), about 5 minutes in all, the training budget included:

    PYTHONPATH=. python3 bench/train_text_model.py --preset target --minutes 4 --out-dir /tmp/target && \\
    PYTHONPATH=. python3 bench/fp8_accuracy.py --model /tmp/target --heldout --out $OUT/fp8_text.json

On CPU (float32 baseline, FP8 reference path), after `train_text_model.py --preset tiny`:

    python bench/fp8_accuracy.py --model /tmp/tiny-text-model --heldout --num-sequences 2 --seq-len 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))  # `python bench/fp8_accuracy.py` finds common.py and train_text_model.py
from common import git_commit, machine_description, write_json  # noqa: E402
from train_text_model import HELDOUT_FILE, STATS_FILE, encode_documents, perplexity, read_heldout  # noqa: E402

WITHIN_FRACTION = 0.01  # issue 25: FP8 perplexity within 1% of bf16's


# ---- comparisons ---------------------------------------------------------------------------------------------
def relative_error(test: torch.Tensor, reference: torch.Tensor) -> float:
    """||test - reference|| / ||reference||, Frobenius norms over every element, in float64."""
    reference64 = reference.double()
    return ((test.double() - reference64).norm() / reference64.norm()).item()


def kl_divergence(reference_logits: torch.Tensor, test_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(reference) || softmax(test)) in nats, one value per position ([..., vocab] -> [...])."""
    reference_logp = torch.log_softmax(reference_logits.float(), dim=-1)
    test_logp = torch.log_softmax(test_logits.float(), dim=-1)
    return (reference_logp.exp() * (reference_logp - test_logp)).sum(dim=-1)


@dataclass
class LogitComparison:
    """Running sums over the positions of several sequences, so the norms cover all of them at once."""

    squared_error: float = 0.0
    squared_reference: float = 0.0
    kl_sum: float = 0.0
    kl_max: float = 0.0
    num_top1_agreeing: int = 0
    num_positions: int = 0

    def add(self, reference_logits: torch.Tensor, test_logits: torch.Tensor) -> None:
        reference64 = reference_logits.double()
        self.squared_error += (test_logits.double() - reference64).square().sum().item()
        self.squared_reference += reference64.square().sum().item()
        kl = kl_divergence(reference_logits, test_logits)
        self.kl_sum += kl.sum().item()
        self.kl_max = max(self.kl_max, kl.max().item())
        self.num_top1_agreeing += (reference_logits.argmax(-1) == test_logits.argmax(-1)).sum().item()
        self.num_positions += kl.numel()

    def summary(self) -> dict[str, float]:
        return {"relative_error": (self.squared_error / self.squared_reference) ** 0.5,
                "kl_mean": self.kl_sum / self.num_positions, "kl_max": self.kl_max,
                "top1_agreement": self.num_top1_agreeing / self.num_positions, "num_positions": self.num_positions}


def within_fraction(test_perplexity: float, reference_perplexity: float, fraction: float = WITHIN_FRACTION) -> bool:
    return abs(test_perplexity / reference_perplexity - 1.0) <= fraction


# ---- models and inputs ---------------------------------------------------------------------------------------
def random_input_ids(num_sequences: int, seq_len: int, vocab_size: int, excluded_ids: Sequence[int],
                     seed: int) -> list[torch.Tensor]:
    """Uniform token ids but the special ones, [1, seq_len] each, from a generator of our own."""
    allowed = torch.tensor(sorted(set(range(vocab_size)) - set(excluded_ids)))
    generator = torch.Generator().manual_seed(seed)
    return [allowed[torch.randint(0, allowed.numel(), (1, seq_len), generator=generator)]
            for _ in range(num_sequences)]


def heldout_windows(token_ids: torch.Tensor, num_sequences: int, seq_len: int) -> list[torch.Tensor]:
    windows = [token_ids[start:start + seq_len][None] for start in range(0, token_ids.numel() - seq_len + 1, seq_len)]
    return windows[:num_sequences]


@torch.no_grad()
def all_logits(model, sequences: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Logits at every position of each sequence, one sequence at a time (an 8B model's [512, 128256] is
    131 MB in bf16; kept on the device for the comparison)."""
    device = next(model.parameters()).device
    return [model(input_ids=ids.to(device)).logits[0] for ids in sequences]


def fp8_path(model) -> str:
    from pagedserve.engine.kernels.fp8_linear import Fp8Linear

    kinds = {module.use_scaled_mm for module in model.modules() if isinstance(module, Fp8Linear)}
    if kinds == {True}:
        return "torch._scaled_mm (FP8 tensor cores)"
    if kinds == {False}:
        return "reference (dequantized, float32 matmul: no FP8 GEMM on this device)"
    return "mixed: _scaled_mm where both dimensions are multiples of 16, the reference elsewhere"


def load_model(args: argparse.Namespace, device: torch.device):
    """(model, tokenizer, description). The 8B shape is built on the GPU in bf16 by gpu_bench.build_model; a
    folder loads in float32, its dtype as trained."""
    if args.shape == "8b":
        from gpu_bench import build_model

        model, tokenizer = build_model(argparse.Namespace(layers=args.layers))
        return model, tokenizer, f"Llama-3-8B shape, {args.layers} layers, random bf16 weights (seed 0)"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Loaded as saved (float32 from train_text_model.py); main casts to the baseline dtype after the float32 row.
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    num_params = sum(parameter.numel() for parameter in model.parameters())
    return model, tokenizer, f"{args.model} ({num_params / 1e6:.1f}M parameters)"


class PagedForward:
    """The engine's forward as the `model(input_ids=[B, L]).logits` that `all_logits` and `perplexity` call.

    Each call is one prefill step of B windows through the engine's model runner, B disjoint block tables of
    the engine's paged cache: the attention writes every window's K/V to the cache (in its `kv_cache_dtype`)
    and reads them back from it, as generation does, so this scores what the engine computes token by token.
    `close()` shuts the engine down and gives the model back with its own attention implementation."""

    def __init__(self, model, tokenizer, kv_cache_dtype: str, max_windows: int, window_len: int,
                 attention_backend: str = "auto") -> None:
        from pagedserve.cache.blocks import blocks_for
        from pagedserve.engine.llm import LLM

        self._model = model
        self._attn_implementation = model.config._attn_implementation
        block_size = 16
        self._blocks_per_window = blocks_for(window_len, block_size)
        # Exactly the blocks one call needs: the weights' device keeps its memory for the logits.
        self.llm = LLM.from_model(
            model, tokenizer, served_name="fp8-accuracy", kv_cache_dtype=kv_cache_dtype, block_size=block_size,
            num_blocks=max_windows * self._blocks_per_window, max_num_seqs=max_windows, max_model_len=window_len,
            max_batch_tokens=max_windows * window_len, enable_prefix_caching=False, compile=False,
            enable_cuda_graphs=False, attention_backend=attention_backend,
        )
        self.runner = self.llm.engine.runner

    @property
    def description(self) -> str:
        return f"{self.runner.kv_cache_dtype_name} cache, {self.runner.backend.name} attention"

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self._model.parameters()

    def __call__(self, input_ids: torch.Tensor) -> SimpleNamespace:
        from pagedserve.engine.runner.step_input import StepInput

        num_windows, window_len = input_ids.shape
        per_window = self._blocks_per_window
        tables = [[list(range(w * per_window, (w + 1) * per_window)) for w in range(num_windows)]
                  for _ in self.runner.shape.groups]
        step = StepInput(token_ids=input_ids.flatten().tolist(), positions=list(range(window_len)) * num_windows,
                         query_lens=[window_len] * num_windows, seq_lens=[window_len] * num_windows,
                         block_tables=tables, logits_indices=list(range(num_windows * window_len)))
        return SimpleNamespace(logits=self.runner.execute(step).view(num_windows, window_len, -1))

    def close(self) -> None:
        self.llm.engine.shutdown()
        self._model.set_attn_implementation(self._attn_implementation)
        del self.llm, self.runner
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def fp8_kv_rows(model, tokenizer, inputs: dict[str, list[torch.Tensor]], heldout_ids: torch.Tensor | None,
                args: argparse.Namespace, dtype_name: str) -> tuple[list[dict[str, Any]], str]:
    """(c): the engine with an FP8 cache against the engine with a `dtype_name` cache, on the same inputs."""
    max_windows = max(args.batch_size, 1)
    device = next(model.parameters()).device
    # Triton's e4m3 casts need compute capability 8.9+; older GPUs score both caches with the reference.
    is_old_gpu = device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9)
    attention_backend = "reference" if is_old_gpu else "auto"
    logits: dict[str, dict[str, list[torch.Tensor]]] = {}
    perplexities: dict[str, dict[str, float]] = {}
    descriptions = []
    for kv_cache_dtype in ("auto", "fp8"):
        forward = PagedForward(model, tokenizer, kv_cache_dtype, max_windows, args.seq_len, attention_backend)
        try:
            descriptions.append(forward.description)
            logits[kv_cache_dtype] = {name: all_logits(forward, sequences) for name, sequences in inputs.items()}
            if heldout_ids is not None:
                perplexities[kv_cache_dtype] = perplexity(forward, heldout_ids, args.seq_len, max_windows,
                                                          args.eval_tokens)
        finally:
            forward.close()
    engine_baseline: dict[str, Any] = {"weights": dtype_name, "kv_cache": f"{dtype_name} (engine)"}
    rows = [engine_baseline]
    for name, sequences in inputs.items():
        comparison = LogitComparison()
        for reference, test in zip(logits["auto"][name], logits["fp8"][name], strict=True):
            comparison.add(reference, test)
        rows.append({"weights": dtype_name, "kv_cache": "fp8_e4m3 (engine)",
                     "inputs": f"{name}, {len(sequences)}x{args.seq_len}", "logits": comparison.summary()})
    if heldout_ids is not None:
        engine_baseline.update(perplexities["auto"])
        fp8 = perplexities["fp8"]
        ratio = fp8["perplexity"] / engine_baseline["perplexity"]
        rows[-1].update(fp8, perplexity_ratio=ratio,
                        is_within_1_percent=within_fraction(fp8["perplexity"], engine_baseline["perplexity"]))
    return rows, " vs ".join(reversed(descriptions))


# ---- report --------------------------------------------------------------------------------------------------
def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| weights | KV cache | inputs | logits rel. error | KL(base ‖ fp8) mean / max (nats) | top-1 agreement "
             "| held-out ppl | ppl vs baseline |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        logits = row.get("logits") or {}
        kl = "-" if not logits else f"{logits['kl_mean']:.2e} / {logits['kl_max']:.2e}"
        top1 = "-" if not logits else f"{logits['top1_agreement'] * 100:.2f}%"
        ratio = row.get("perplexity_ratio")
        versus = "-" if ratio is None else f"{(ratio - 1) * 100:+.2f}%"
        if row.get("is_within_1_percent") is not None:
            versus += " (within 1%)" if row["is_within_1_percent"] else " (NOT within 1%)"
        lines.append(f"| {row['weights']} | {row.get('kv_cache', 'none (transformers)')} | {row.get('inputs', '-')} "
                     f"| {_cell(logits.get('relative_error'), '.4f')} "
                     f"| {kl} | {top1} | {_cell(row.get('perplexity'), '.4f')} | {versus} |")
    return "\n".join(lines)


# ---- main ----------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shape", choices=["8b"], help="random weights of this shape (needs a GPU)")
    source.add_argument("--model", type=Path, help="a model folder (transformers format)")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of --shape 8b (32 is Llama-3-8B)")
    parser.add_argument("--heldout", action="store_true",
                        help="also held-out perplexity (a --model folder written by train_text_model.py)")
    parser.add_argument("--num-sequences", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per logits sequence and held-out window")
    parser.add_argument("--eval-tokens", type=int, default=262_144, help="held-out tokens scored (a prefix)")
    parser.add_argument("--batch-size", type=int, default=16, help="held-out windows per forward")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="the baseline: bfloat16 on a GPU, float32 on CPU by default")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exact-accum", action="store_true",
                        help="also the FP8 rows without _scaled_mm's fast accumulation (the product's default, "
                             "FAST_ACCUMULATION of engine/kernels/fp8_linear.py, off for them; the reference path "
                             "on CPU has no accumulation mode)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.shape is not None and (args.heldout or not args.device.startswith("cuda")):
        parser.error("--shape 8b needs a GPU (its weights are built there) and has no held-out text")
    if args.heldout and not (args.model / HELDOUT_FILE).is_file():
        parser.error(f"--heldout needs {args.model / HELDOUT_FILE} (a folder written by train_text_model.py)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from pagedserve.engine.kernels.fp8_linear import quantize_linears

    args = parse_args(argv)
    started_s = time.monotonic()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    dtype_name = str(dtype).removeprefix("torch.")
    model, tokenizer, description = load_model(args, device)
    print(f"model: {description}; baseline {dtype_name} on {device}", flush=True)

    inputs = {"random ids": random_input_ids(args.num_sequences, args.seq_len, model.config.vocab_size,
                                             tokenizer.all_special_ids, args.seed)}
    heldout_ids = None
    rows: list[dict[str, Any]] = []
    if args.heldout:
        heldout_ids = encode_documents(tokenizer, [text for _, text in read_heldout(args.model / HELDOUT_FILE)])
        inputs["held-out text"] = heldout_windows(heldout_ids, args.num_sequences, args.seq_len)
        if dtype != torch.float32:  # the trained float32 weights: what the cast to the baseline dtype costs
            trained = perplexity(model, heldout_ids, args.seq_len, args.batch_size, args.eval_tokens)
            rows.append({"weights": "float32 (as trained)", **trained})
    model.to(dtype)

    baseline_logits = {name: all_logits(model, sequences) for name, sequences in inputs.items()}
    baseline: dict[str, Any] = {"weights": f"{dtype_name} (baseline)"}
    if heldout_ids is not None:
        baseline.update(perplexity(model, heldout_ids, args.seq_len, args.batch_size, args.eval_tokens))
    rows.append(baseline)
    print(f"baseline done ({time.monotonic() - started_s:.1f} s)", flush=True)
    # The FP8 cache with the baseline weights, before they are quantized; its rows go last.
    kv_rows, kv_path = fp8_kv_rows(model, tokenizer, inputs, heldout_ids, args, dtype_name)
    print(f"FP8 KV cache done: {kv_path} ({time.monotonic() - started_s:.1f} s)", flush=True)

    num_quantized = quantize_linears(model)  # in place, layer by layer: the baseline outputs are all taken
    if device.type == "cuda":
        torch.cuda.empty_cache()
    path = fp8_path(model)
    print(f"FP8 weights: {num_quantized} linear layers through {path}", flush=True)
    def fp8_rows(label: str) -> None:
        """The FP8 model's logits against the baseline's per input, and its held-out perplexity, as rows."""
        for name, sequences in inputs.items():
            comparison = LogitComparison()
            for reference, test in zip(baseline_logits[name], all_logits(model, sequences), strict=True):
                comparison.add(reference, test)
            rows.append({"weights": label, "inputs": f"{name}, {len(sequences)}x{args.seq_len}",
                         "logits": comparison.summary()})
        if heldout_ids is not None:
            fp8 = perplexity(model, heldout_ids, args.seq_len, args.batch_size, args.eval_tokens)
            rows[-1].update(fp8, perplexity_ratio=fp8["perplexity"] / baseline["perplexity"],
                            is_within_1_percent=within_fraction(fp8["perplexity"], baseline["perplexity"]))

    fp8_rows("fp8")
    if args.exact_accum:  # the same FP8 layers, their partial sums promoted to float32 every few k-steps
        from pagedserve.engine.kernels import fp8_linear

        product_accumulation = fp8_linear.FAST_ACCUMULATION
        fp8_linear.FAST_ACCUMULATION = False
        try:
            fp8_rows("fp8, exact accumulation")
        finally:
            fp8_linear.FAST_ACCUMULATION = product_accumulation
    rows.extend(kv_rows)

    training_stats_path = None if args.model is None else args.model / STATS_FILE
    report = {
        "model": description, "device": str(device), "baseline_dtype": dtype_name, "fp8_path": path,
        "fp8_kv": f"engine, {kv_path}; e4m3 scales 1.0", "rows": rows,
        "training": (json.loads(training_stats_path.read_text())
                     if training_stats_path is not None and training_stats_path.is_file() else None),
        "commit": git_commit(BENCH_DIR.parent), "machine": machine_description(),
        "wall_s": time.monotonic() - started_s,
    }
    if args.out is not None:
        write_json(args.out, report)
    print(f"\n{description}; baseline {dtype_name} on {device}; FP8 GEMM: {path}; FP8 KV: engine, {kv_path}; "
          f"{time.monotonic() - started_s:.1f} s\n")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
