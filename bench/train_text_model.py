"""Train a small Llama on the text that ships with Python, for measurements that random weights cannot make.

FP8 fidelity (issue 25: perplexity of bf16 vs FP8 weights on held-out text) and speculative decoding (issue 27:
a target model and a smaller draft model that predict the same text) need models that have learned something.
No model hub is reachable, so this script makes them: a byte-level BPE tokenizer and a `LlamaForCausalLM`
(random init) trained on the standard library's sources and docs (`.py`, `.txt`, `.rst` under
`sysconfig.get_paths()["stdlib"]`, site-packages excluded, files that are not UTF-8 skipped).

The corpus: files in sorted order of their relative path; every `HELDOUT_EVERY`th file (index 19, 39, ...) is
held out, so the split is by file, deterministic and disjoint. Each file is one document, `<|bos|>text<|end|>`,
and the documents are concatenated into one token stream. Training takes random windows of it (AdamW, linear
warmup then cosine decay, bf16 autocast on CUDA); the held-out perplexity is exp(mean next-token NLL) over
non-overlapping windows of `--seq-len` tokens (each window starts without context).

The output folder loads with `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` and pagedserve serves it.
Beside the weights it holds `heldout.jsonl` (the held-out documents, `{"path", "text"}` a line: the machine that
evaluates need not have the same Python) and `training.json` (sizes, steps, tokens seen, losses, perplexity,
wall time). Presets (flags override any field):

- `--preset target`: about 42M parameters (12 layers, hidden 512, GQA 8/4 heads); issue 27's target.
- `--preset draft`: about 7M parameters (6 layers, hidden 256); pass `--tokenizer-from TARGET_DIR` so draft
  and target share one vocabulary.
- `--preset draft-shallow`: about 15M parameters in 2 layers of the target's width (hidden 512): a draft whose
  step costs about a sixth of the target's where both are bound by their kernels' launches and latencies
  (batch 1 on a GPU: the 6-layer draft's round took 1.84 ms against the target's 0.49 ms step on an H100, so it
  could not pay for itself); `--tokenizer-from TARGET_DIR` as for `draft`.
- `--preset tiny`: a CPU check, a few seconds on a subset of the files.

The corpus is small: Python 3.11's gives about 8.1M train and 0.8M held-out tokens with the 8,192-token BPE
(reading, BPE training and encoding took 12 s on 2 CPU cores). A GPU budget of minutes is many epochs, so every
`--eval-every` steps the perplexity of a fixed held-out prefix is printed and kept in `training.json`
(`heldout_probes`): where it turns up, the budget is past what the text supports.

On one H200 (python3 there is 3.12 with torch and transformers; run from the repository root), both models in
one device call, about 7 minutes (corpus and tokenizer well under a minute, then the two time budgets plus
evaluation and saving):

    PYTHONPATH=. python3 bench/train_text_model.py --preset target --minutes 4 --out-dir /tmp/target
    PYTHONPATH=. python3 bench/train_text_model.py --preset draft --minutes 1.5 --out-dir /tmp/draft \\
        --tokenizer-from /tmp/target

The weights (160 MB for the target in float32) are over what a device call brings back, so whatever uses them
(bench/fp8_accuracy.py, a speculative-decoding bench) runs in the same call. On CPU:

    python bench/train_text_model.py --preset tiny --out-dir /tmp/tiny-text-model
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `python bench/train_text_model.py` finds common.py
from common import write_json  # noqa: E402

# The demo model's tokenizer recipe (pad, BOS and an EOS that closes every document) and LR schedule.
from pagedserve.demo.model import learning_rate, train_byte_level_bpe  # noqa: E402

HELDOUT_EVERY = 20
CORPUS_SUFFIXES = (".py", ".txt", ".rst")
HELDOUT_FILE = "heldout.jsonl"
STATS_FILE = "training.json"


@dataclass(frozen=True)
class TrainRecipe:
    """Everything that decides the trained model, but the corpus and the seed."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    seq_len: int
    batch_size: int
    num_steps: int | None  # exactly one of num_steps and minutes is set
    minutes: float | None
    peak_lr: float
    max_files: int | None = None  # evenly spaced subset of the corpus files, for quick checks
    warmup_fraction: float = 0.03
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    log_every: int = 100
    eval_every: int = 500  # steps between held-out probes (0: none), to see when more epochs stop helping
    probe_tokens: int = 32_768  # held-out tokens per probe: a prefix, the same each time
    eval_tokens: int = 262_144  # held-out tokens for the final perplexity (the whole split is ~0.8M)


PRESETS: dict[str, TrainRecipe] = {
    "target": TrainRecipe(vocab_size=8192, hidden_size=512, num_layers=12, num_heads=8, num_kv_heads=4,
                          intermediate_size=1536, seq_len=512, batch_size=64, num_steps=None, minutes=4.0,
                          peak_lr=1e-3),
    "draft": TrainRecipe(vocab_size=8192, hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=2,
                         intermediate_size=768, seq_len=512, batch_size=64, num_steps=None, minutes=1.5,
                         peak_lr=2e-3),
    "draft-shallow": TrainRecipe(vocab_size=8192, hidden_size=512, num_layers=2, num_heads=8, num_kv_heads=4,
                                 intermediate_size=1536, seq_len=512, batch_size=64, num_steps=None, minutes=1.0,
                                 peak_lr=2e-3),
    "tiny": TrainRecipe(vocab_size=512, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                        intermediate_size=128, seq_len=64, batch_size=8, num_steps=40, minutes=None, peak_lr=3e-3,
                        max_files=60, log_every=10, eval_every=0, eval_tokens=8192),
}


# ---- corpus --------------------------------------------------------------------------------------------------
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path) -> list[str]:
    """Relative POSIX paths of the text files under `root`, sorted: the same list on every run."""
    paths = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if path.suffix not in CORPUS_SUFFIXES or not path.is_file():
            continue
        if "site-packages" in relative.parts or "__pycache__" in relative.parts:
            continue
        paths.append(relative.as_posix())
    return sorted(paths)


def evenly_spaced(paths: Sequence[str], max_files: int | None) -> list[str]:
    """At most `max_files` of `paths`, spread over the whole list (not just its first folder)."""
    if max_files is None or max_files >= len(paths):
        return list(paths)
    if max_files < 1:
        raise ValueError(f"max_files must be >= 1, got {max_files}")
    stride = len(paths) / max_files
    return [paths[int(index * stride)] for index in range(max_files)]


def split_files(paths: Sequence[str], heldout_every: int = HELDOUT_EVERY) -> tuple[list[str], list[str]]:
    """(train, held-out): file i is held out when (i + 1) % heldout_every == 0, so every 20th file by default."""
    if heldout_every < 2:
        raise ValueError(f"heldout_every must be >= 2, got {heldout_every}")
    train = [path for index, path in enumerate(paths) if (index + 1) % heldout_every]
    heldout = [path for index, path in enumerate(paths) if (index + 1) % heldout_every == 0]
    return train, heldout


def read_documents(root: Path, paths: Sequence[str]) -> list[tuple[str, str]]:
    """(path, text) for each file that decodes as UTF-8; a few test files are deliberately in other encodings."""
    documents = []
    for path in paths:
        try:
            text = (root / path).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            documents.append((path, text))
    return documents


def write_heldout(path: Path, documents: Sequence[tuple[str, str]]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for doc_path, text in documents:
            out.write(json.dumps({"path": doc_path, "text": text}) + "\n")


def read_heldout(path: Path) -> list[tuple[str, str]]:
    with path.open(encoding="utf-8") as lines:
        return [(record["path"], record["text"]) for record in map(json.loads, lines)]


# ---- tokenizer -----------------------------------------------------------------------------------------------
def encode_documents(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """One stream: BOS, the text, EOS for each document. The backend tokenizer, in one parallel batch, because
    the wrapper warns about every text longer than the context."""
    encodings = tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)
    stream: list[int] = []
    for encoding in encodings:
        stream.append(tokenizer.bos_token_id)
        stream.extend(encoding.ids)
        stream.append(tokenizer.eos_token_id)
    return torch.tensor(stream, dtype=torch.long)


# ---- evaluation ----------------------------------------------------------------------------------------------
@torch.no_grad()
def perplexity(model, token_ids: torch.Tensor, window_len: int, batch_size: int,
               max_tokens: int | None = None) -> dict[str, float]:
    """exp(mean next-token NLL) over consecutive non-overlapping windows of `token_ids` (a 1-D stream; the last
    window may be shorter, one of a single token predicts nothing and is dropped). Each window starts without
    context. Returns the perplexity, the mean NLL in nats and the number of predicted tokens."""
    if window_len < 2:
        raise ValueError(f"window_len must be >= 2, got {window_len}")
    stream = token_ids if max_tokens is None else token_ids[:max_tokens]
    device = next(model.parameters()).device
    windows = [stream[start:start + window_len] for start in range(0, stream.numel(), window_len)]
    windows = [window for window in windows if window.numel() >= 2]
    total_nll = 0.0
    num_predicted = 0
    index = 0
    while index < len(windows):
        # Batch windows of one length: all full ones, then the shorter last one alone.
        batch = [windows[index]]
        while (index + len(batch) < len(windows) and len(batch) < batch_size
               and windows[index + len(batch)].numel() == batch[0].numel()):
            batch.append(windows[index + len(batch)])
        index += len(batch)
        input_ids = torch.stack(batch).to(device)
        logits = model(input_ids=input_ids).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten(),
                                                reduction="sum")
        total_nll += nll.item()
        num_predicted += input_ids[:, 1:].numel()
    if num_predicted == 0:
        raise ValueError(f"a stream of {stream.numel()} tokens has nothing to predict")
    mean_nll = total_nll / num_predicted
    return {"perplexity": math.exp(mean_nll), "mean_nll": mean_nll, "num_tokens": num_predicted}


# ---- training ------------------------------------------------------------------------------------------------
def build_model(recipe: TrainRecipe, tokenizer, seed: int):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads, max_position_embeddings=max(recipe.seq_len, 2048),
        tie_word_embeddings=True,  # the embedding is a large share of a model this small
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype="float32",
    )
    # fork_rng: weight init follows our seed without moving the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    return model


def train(model, token_ids: torch.Tensor, recipe: TrainRecipe, seed: int,
          log: Callable[[str], None] = print, heldout_ids: torch.Tensor | None = None) -> dict[str, Any]:
    """AdamW on random windows of the stream, for `recipe.num_steps` steps or `recipe.minutes` of wall time
    (the LR schedule follows progress either way, so a time budget anneals like a step count). With
    `heldout_ids`, every `recipe.eval_every` steps the perplexity of its first `probe_tokens` tokens is logged
    and kept (`heldout_probes`): the corpus is small, so a long budget means many epochs."""
    device = next(model.parameters()).device
    window_len = recipe.seq_len
    if token_ids.numel() <= window_len:
        raise ValueError(f"the corpus has {token_ids.numel()} tokens, fewer than one window of {window_len}")
    stream = token_ids.to(device)
    offsets = torch.arange(window_len, device=device)
    # Norms are not decayed: pulling RMSNorm gains toward 0 only hurts.
    decayed = [parameter for parameter in model.parameters() if parameter.dim() >= 2]
    not_decayed = [parameter for parameter in model.parameters() if parameter.dim() < 2]
    is_cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": recipe.weight_decay},
                                   {"params": not_decayed, "weight_decay": 0.0}],
                                  lr=recipe.peak_lr, betas=(0.9, 0.95), fused=is_cuda)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses: list[torch.Tensor] = []  # kept on the device: one host sync per log line, not per step
    probes: list[dict[str, float]] = []
    logged_losses: list[float] = []
    budget_s = None if recipe.minutes is None else recipe.minutes * 60.0
    start_s = time.monotonic()
    step = 0
    while True:
        elapsed_s = time.monotonic() - start_s
        progress = step / recipe.num_steps if budget_s is None else elapsed_s / budget_s
        if progress >= 1.0 and step > 0:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(recipe, progress)
        starts = torch.randint(0, stream.numel() - window_len, (recipe.batch_size, 1), generator=generator)
        windows = stream[starts.to(device) + offsets]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=is_cuda):
            loss = model(input_ids=windows, labels=windows).loss  # the model shifts the labels itself
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.detach())
        step += 1
        if step % recipe.log_every == 0 or step == 1:
            recent = torch.stack(losses[-recipe.log_every:]).mean().item()
            logged_losses.append(recent)
            log(f"step {step}: loss {recent:.3f}, lr {optimizer.param_groups[0]['lr']:.2e}, {elapsed_s:.0f} s")
        if heldout_ids is not None and recipe.eval_every and step % recipe.eval_every == 0:
            model.eval()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=is_cuda):
                probe = perplexity(model, heldout_ids, window_len, recipe.batch_size, recipe.probe_tokens)
            model.train()
            epochs = step * recipe.batch_size * window_len / token_ids.numel()
            probes.append({"step": step, "epochs": epochs, "perplexity": probe["perplexity"]})
            log(f"step {step}: held-out perplexity {probe['perplexity']:.3f} (first {probe['num_tokens']:,} "
                f"tokens), {epochs:.1f} epochs")
    train_s = time.monotonic() - start_s
    all_losses = torch.stack(losses).float().cpu()
    tail = all_losses[-max(1, len(losses) // 10):]  # mean over the last tenth: one batch is noisy
    model.eval()
    tokens_seen = step * recipe.batch_size * window_len
    return {"num_steps": step, "tokens_seen": tokens_seen, "epochs": tokens_seen / token_ids.numel(),
            "initial_loss": all_losses[0].item(), "final_loss": tail.mean().item(), "train_s": train_s,
            "stopped_by": "steps" if budget_s is None else "time", "heldout_probes": probes}


# ---- main ----------------------------------------------------------------------------------------------------
def recipe_from_args(args: argparse.Namespace) -> TrainRecipe:
    recipe = PRESETS[args.preset]
    fields = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "seq_len",
              "batch_size", "peak_lr", "max_files", "log_every", "eval_every", "eval_tokens")
    overrides = {field: getattr(args, field) for field in fields if getattr(args, field) is not None}
    if args.steps is not None:
        overrides.update(num_steps=args.steps, minutes=None)
    elif args.minutes is not None:
        overrides.update(num_steps=None, minutes=args.minutes)
    recipe = replace(recipe, **overrides)
    if recipe.hidden_size % recipe.num_heads or recipe.num_heads % recipe.num_kv_heads:
        raise SystemExit(f"hidden_size={recipe.hidden_size} must divide by heads={recipe.num_heads}, "
                         f"which must divide by kv_heads={recipe.num_kv_heads}")
    return recipe


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="target")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--tokenizer-from", type=Path, default=None,
                        help="reuse the tokenizer of a folder this script wrote (a draft for that target)")
    parser.add_argument("--vocab-size", type=int)
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--layers", dest="num_layers", type=int)
    parser.add_argument("--heads", dest="num_heads", type=int)
    parser.add_argument("--kv-heads", dest="num_kv_heads", type=int)
    parser.add_argument("--intermediate-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--batch-size", type=int)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="a fixed step count (reproducible on one machine)")
    budget.add_argument("--minutes", type=float, help="a wall-clock budget (steps depend on the machine)")
    parser.add_argument("--lr", dest="peak_lr", type=float)
    parser.add_argument("--max-files", type=int, help="an evenly spaced subset of the corpus files")
    parser.add_argument("--log-every", type=int)
    parser.add_argument("--eval-every", type=int, help="steps between held-out perplexity probes (0: none)")
    parser.add_argument("--eval-tokens", type=int, help="held-out tokens for the final perplexity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    recipe = recipe_from_args(args)
    started_s = time.monotonic()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    root = stdlib_root()
    paths = evenly_spaced(corpus_files(root), recipe.max_files)
    train_paths, heldout_paths = split_files(paths)
    train_documents = read_documents(root, train_paths)
    heldout_documents = read_documents(root, heldout_paths)
    print(f"corpus: {root} (Python {sys.version.split()[0]}), {len(train_documents)} train and "
          f"{len(heldout_documents)} held-out files", flush=True)

    if args.tokenizer_from is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_from)
    else:
        tokenizer = train_byte_level_bpe([text for _, text in train_documents], recipe.vocab_size, recipe.seq_len)
    train_ids = encode_documents(tokenizer, [text for _, text in train_documents])
    heldout_ids = encode_documents(tokenizer, [text for _, text in heldout_documents])
    print(f"tokenizer: {len(tokenizer)} tokens; {train_ids.numel():,} train and {heldout_ids.numel():,} held-out "
          f"tokens ({time.monotonic() - started_s:.1f} s)", flush=True)

    model = build_model(recipe, tokenizer, args.seed).to(device)
    num_params = sum(parameter.numel() for parameter in model.parameters())
    budget = f"{recipe.num_steps} steps" if recipe.minutes is None else f"{recipe.minutes:g} min"
    print(f"model: {num_params / 1e6:.2f}M parameters ({recipe.num_layers} layers, hidden {recipe.hidden_size}, "
          f"heads {recipe.num_heads}/{recipe.num_kv_heads}), {budget} on {device}", flush=True)
    train_stats = train(model, train_ids, recipe, args.seed, log=lambda line: print(line, flush=True),
                        heldout_ids=heldout_ids)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        heldout = perplexity(model, heldout_ids, recipe.seq_len, recipe.batch_size, recipe.eval_tokens)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out_dir)
    tokenizer.save_pretrained(args.out_dir)
    write_heldout(args.out_dir / HELDOUT_FILE, heldout_documents)
    stats = {
        "preset": args.preset, "recipe": asdict(recipe), "seed": args.seed, "num_params": num_params,
        "vocab_size": len(tokenizer),
        "tokenizer_from": None if args.tokenizer_from is None else str(args.tokenizer_from),
        "python": sys.version.split()[0], "corpus_root": str(root), "heldout_every": HELDOUT_EVERY,
        "num_train_files": len(train_documents), "num_heldout_files": len(heldout_documents),
        "num_train_tokens": train_ids.numel(), "num_heldout_tokens": heldout_ids.numel(), **train_stats,
        "heldout_perplexity": heldout["perplexity"], "heldout_eval_tokens": heldout["num_tokens"],
        "device": str(device), "wall_s": time.monotonic() - started_s,
    }
    write_json(args.out_dir / STATS_FILE, stats)
    print(f"held-out perplexity {heldout['perplexity']:.3f} over {heldout['num_tokens']:,} tokens; "
          f"train loss {train_stats['initial_loss']:.3f} -> {train_stats['final_loss']:.3f} in "
          f"{train_stats['num_steps']} steps ({train_stats['tokens_seen']:,} tokens, "
          f"{train_stats['epochs']:.1f} epochs); "
          f"wall {stats['wall_s']:.1f} s; saved to {args.out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
