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
evaluates need not have the same Python) and `training.json` (sizes, steps, tokens seen, losses, probes, the step
whose weights were kept, perplexity, wall time). Presets (flags override any field):

- `--preset target`: about 42M parameters (12 layers, hidden 512, GQA 8/4 heads); issue 27's target.
- `--preset draft`: about 7M parameters (6 layers, hidden 256); pass `--distill-from TARGET_DIR` (below), or at
  least `--tokenizer-from TARGET_DIR` so draft and target share one vocabulary.
- `--preset draft-shallow`: about 15M parameters in 2 layers of the target's width (hidden 512): a draft whose
  step costs about a sixth of the target's where both are bound by their kernels' launches and latencies
  (batch 1 on a GPU: the 6-layer draft's round took 1.84 ms against the target's 0.49 ms step on an H100, so it
  could not pay for itself); `--distill-from TARGET_DIR` as for `draft`.
- `--preset tiny`: a CPU check, a few seconds on a subset of the files.

The corpus is small: Python 3.11's gives about 8.1M train and 0.8M held-out tokens with the 8,192-token BPE,
Python 3.12's (the GPU machines') about 2.7M and 0.13M. A GPU budget of minutes is many epochs of it, and a model
trained that long learns the training files by heart: its held-out perplexity falls, then climbs. So every
`--eval-every` steps (and after the last) a probe scores `probe_tokens` of held-out text, whole windows spread
over the split, the same each time; it is printed and kept in `training.json` (`heldout_probes`), and the model
saved is the one of the best probe (`kept_step`, `kept_by`), not the last step's. That is right for every use
here: fp8_accuracy compares one model's perplexity across number formats (any trained model serves; the best one
on held-out text is the least peculiar), and spec_bench runs models on held-out prompts, where a model past its
best probe is one nobody would deploy. `--keep-last` saves the last step's weights instead (to reproduce runs
made before). The probe selects on held-out text that the final perplexity also scores, so that figure is a
little optimistic; the split is too small to cut a third part from.

Distillation (`--distill-from TARGET_DIR`, bench/distillation.py says why this scheme): the draft trains on the
target's next-token distributions over the same corpus windows, loss KL(target || draft), the target run in the
same process (eval mode, no gradient, the draft's autocast); `--distill-weight W` < 1 mixes in the next-token loss.
The tokenizer is the target's (`--tokenizer-from` defaults to TARGET_DIR; another must have the same vocabulary).
Each step costs a target forward besides the draft's step, so a distilled draft takes fewer steps a minute. Its
probes also measure the agreement with the target (the share of positions where the two argmaxes match: greedy
acceptance's proxy) and keep the best agreement, not perplexity; the final agreement on the held-out windows the
perplexity scores is printed and saved (`target_agreement`, `target_kl_mean`).

On one H200 or H100 (python3 there is 3.12 with torch and transformers; run from the repository root), both
models in one device call (corpus and tokenizer well under a minute, then the two time budgets plus evaluation and
saving):

    PYTHONPATH=. python3 bench/train_text_model.py --preset target --minutes 4 --out-dir /tmp/target
    PYTHONPATH=. python3 bench/train_text_model.py --preset draft --minutes 1.5 --out-dir /tmp/draft \\
        --distill-from /tmp/target

The weights (160 MB for the target in float32) are over what a device call brings back, so whatever uses them
(bench/fp8_accuracy.py, a speculative-decoding bench) runs in the same call. On CPU:

    python bench/train_text_model.py --preset tiny --out-dir /tmp/tiny-text-model
    python bench/train_text_model.py --preset tiny --layers 1 --eval-every 10 --out-dir /tmp/tiny-draft \\
        --distill-from /tmp/tiny-text-model
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `python bench/train_text_model.py` finds common.py
from common import write_json  # noqa: E402
from distillation import Teacher, check_same_vocabulary  # noqa: E402

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
    eval_every: int = 100  # steps between held-out probes (0: none), to see when more epochs stop helping
    probe_tokens: int = 32_768  # held-out tokens per probe: whole windows spread over the split, the same each time
    eval_tokens: int = 262_144  # held-out tokens for the final perplexity (a prefix; Python 3.12's split is ~0.13M)
    keep_best: bool = True  # save the weights of the best probe, not the last step's (needs eval_every)
    distill_weight: float = 1.0  # with a teacher: weight of KL(target || draft), the rest plain next-token loss


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
def window_batches(token_ids: torch.Tensor, window_len: int, batch_size: int,
                   device: torch.device) -> Iterator[torch.Tensor]:
    """Consecutive non-overlapping windows of a 1-D stream, stacked in batches of one length on `device`: all full
    windows, then the shorter last one alone. A last window of a single token predicts nothing and is dropped."""
    if window_len < 2:
        raise ValueError(f"window_len must be >= 2, got {window_len}")
    windows = [token_ids[start:start + window_len] for start in range(0, token_ids.numel(), window_len)]
    windows = [window for window in windows if window.numel() >= 2]
    index = 0
    while index < len(windows):
        batch = [windows[index]]
        while (index + len(batch) < len(windows) and len(batch) < batch_size
               and windows[index + len(batch)].numel() == batch[0].numel()):
            batch.append(windows[index + len(batch)])
        index += len(batch)
        yield torch.stack(batch).to(device)


def probe_stream(token_ids: torch.Tensor, window_len: int, num_tokens: int) -> torch.Tensor:
    """About `num_tokens` of a stream as whole windows spread evenly over it, concatenated (so `window_batches`
    cuts them apart again): the same windows every call. Spread, not a prefix: the held-out files come in sorted
    order and the first few are not like the rest, so a prefix probe would pick its own best checkpoint, not the
    split's."""
    num_windows = token_ids.numel() // window_len
    wanted = max(1, num_tokens // window_len)
    if wanted >= num_windows:
        return token_ids
    starts = [(index * num_windows // wanted) * window_len for index in range(wanted)]
    return torch.cat([token_ids[start:start + window_len] for start in starts])


@torch.no_grad()
def perplexity(model, token_ids: torch.Tensor, window_len: int, batch_size: int,
               max_tokens: int | None = None) -> dict[str, float]:
    """exp(mean next-token NLL) over consecutive non-overlapping windows of `token_ids` (a 1-D stream; the last
    window may be shorter, one of a single token predicts nothing and is dropped). Each window starts without
    context. Returns the perplexity, the mean NLL in nats and the number of predicted tokens."""
    stream = token_ids if max_tokens is None else token_ids[:max_tokens]
    device = next(model.parameters()).device
    total_nll = 0.0
    num_predicted = 0
    for input_ids in window_batches(stream, window_len, batch_size, device):
        logits = model(input_ids=input_ids).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten(),
                                                reduction="sum")
        total_nll += nll.item()
        num_predicted += input_ids[:, 1:].numel()
    if num_predicted == 0:
        raise ValueError(f"a stream of {stream.numel()} tokens has nothing to predict")
    mean_nll = total_nll / num_predicted
    return {"perplexity": math.exp(mean_nll), "mean_nll": mean_nll, "num_tokens": num_predicted}


def run_probe(model, probe_ids: torch.Tensor, recipe: TrainRecipe, teacher: Teacher | None) -> dict[str, float]:
    """One held-out probe of the model being trained: its perplexity, and with a teacher its agreement with it."""
    probe = perplexity(model, probe_ids, recipe.seq_len, recipe.batch_size)
    if teacher is not None:
        device = next(model.parameters()).device
        probe.update(teacher.agreement(model, window_batches(probe_ids, recipe.seq_len, recipe.batch_size, device)))
    return probe


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


class BestWeights:
    """A copy of the weights at the best probe so far (on the model's device: a state dict of the model's size),
    to put back when training ends. Lower scores are better unless `higher_is_better`."""

    def __init__(self, higher_is_better: bool = False) -> None:
        self.higher_is_better = higher_is_better
        self.step: int | None = None
        self.score: float | None = None
        self._state: dict[str, torch.Tensor] | None = None

    def is_better(self, score: float) -> bool:
        # A tie goes to the later step, further along the LR schedule (agreement counts positions: ties happen).
        if self.score is None:
            return True
        return score >= self.score if self.higher_is_better else score <= self.score

    def offer(self, model: torch.nn.Module, step: int, score: float) -> bool:
        """Keep the model's weights if `score` beats the best so far; says whether it did."""
        if not self.is_better(score):
            return False
        self.step, self.score = step, score
        self._state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        return True

    def restore(self, model: torch.nn.Module) -> None:
        if self._state is None:
            raise ValueError("no weights were offered")
        model.load_state_dict(self._state)


def train(model, token_ids: torch.Tensor, recipe: TrainRecipe, seed: int,
          log: Callable[[str], None] = print, heldout_ids: torch.Tensor | None = None,
          teacher: Teacher | None = None) -> dict[str, Any]:
    """AdamW on random windows of the stream, for `recipe.num_steps` steps or `recipe.minutes` of wall time
    (the LR schedule follows progress either way, so a time budget anneals like a step count). The loss is the
    next-token cross-entropy, or with a `teacher` the distillation loss against it (bench/distillation.py).

    With `heldout_ids`, every `recipe.eval_every` steps and after the last, a probe scores `probe_tokens` of them
    (the same windows each time) and is logged and kept (`heldout_probes`): the corpus is small, so a long budget
    means many epochs, and the probe says when they stop helping. With `recipe.keep_best` the model ends with the
    weights of the best probe: the lowest perplexity, or with a teacher the highest agreement with it (what a
    draft is for). `kept_step` says which step's weights the model holds."""
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
    is_probing = heldout_ids is not None and recipe.eval_every > 0
    probe_ids = probe_stream(heldout_ids, window_len, recipe.probe_tokens) if is_probing else None
    best = BestWeights(higher_is_better=teacher is not None)
    score_name = "perplexity" if teacher is None else "agreement"
    probes: list[dict[str, float]] = []

    def probe(step: int) -> None:
        model.eval()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=is_cuda):
            result = run_probe(model, probe_ids, recipe, teacher)
        model.train()
        epochs = step * recipe.batch_size * window_len / token_ids.numel()
        record = {"step": step, "epochs": epochs, "perplexity": result["perplexity"]}
        line = f"step {step}: held-out perplexity {result['perplexity']:.3f}"
        if teacher is not None:
            record.update(agreement=result["agreement"], kl_mean=result["kl_mean"])
            line += f", agreement with the target {result['agreement']:.4f} (KL {result['kl_mean']:.3f})"
        probes.append(record)
        is_best = recipe.keep_best and best.offer(model, step, record[score_name])
        log(f"{line} ({result['num_tokens']:,} tokens spread over the split), {epochs:.1f} epochs"
            f"{', best so far' if is_best else ''}")

    model.train()
    losses: list[torch.Tensor] = []  # kept on the device: one host sync per log line, not per step
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
            if teacher is None:
                loss = model(input_ids=windows, labels=windows).loss  # the model shifts the labels itself
            else:
                loss = teacher.loss(model, windows)
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
        if is_probing and step % recipe.eval_every == 0:
            probe(step)
    train_s = time.monotonic() - start_s
    if is_probing and step % recipe.eval_every:
        probe(step)  # the last step's weights compete too
    kept_step, kept_by = step, "last step"
    if recipe.keep_best and best.step is not None:
        kept_step, kept_by = best.step, f"best probe {score_name}"
        if best.step != step:
            best.restore(model)
            log(f"kept the weights of step {best.step} (probe {score_name} {best.score:.4f}), not step {step}'s")
    all_losses = torch.stack(losses).float().cpu()
    tail = all_losses[-max(1, len(losses) // 10):]  # mean over the last tenth: one batch is noisy
    model.eval()
    tokens_seen = step * recipe.batch_size * window_len
    return {"num_steps": step, "tokens_seen": tokens_seen, "epochs": tokens_seen / token_ids.numel(),
            "objective": objective(teacher), "initial_loss": all_losses[0].item(), "final_loss": tail.mean().item(),
            "train_s": train_s, "stopped_by": "steps" if budget_s is None else "time", "heldout_probes": probes,
            "kept_step": kept_step, "kept_by": kept_by}


def objective(teacher: Teacher | None) -> str:
    if teacher is None:
        return "next-token cross-entropy"
    if teacher.weight == 1.0:
        return "KL(target || draft)"
    return f"{teacher.weight:g} * KL(target || draft) + {1.0 - teacher.weight:g} * next-token cross-entropy"


# ---- main ----------------------------------------------------------------------------------------------------
def recipe_from_args(args: argparse.Namespace) -> TrainRecipe:
    recipe = PRESETS[args.preset]
    fields = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "seq_len",
              "batch_size", "peak_lr", "max_files", "log_every", "eval_every", "eval_tokens")
    overrides = {field: getattr(args, field) for field in fields if getattr(args, field) is not None}
    if args.keep_last:
        overrides.update(keep_best=False)
    if args.distill_weight is not None:
        if args.distill_from is None:
            raise SystemExit("--distill-weight needs --distill-from")
        if not 0.0 <= args.distill_weight <= 1.0:
            raise SystemExit(f"--distill-weight must be in [0, 1], got {args.distill_weight}")
        overrides.update(distill_weight=args.distill_weight)
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
                        help="reuse the tokenizer of a folder this script wrote (a draft for that target; "
                             "default with --distill-from: that folder)")
    parser.add_argument("--distill-from", type=Path, default=None,
                        help="a target folder this script wrote: train on its next-token distributions "
                             "(knowledge distillation, bench/distillation.py) instead of the corpus tokens")
    parser.add_argument("--distill-weight", type=float, default=None,
                        help="with --distill-from: weight of the distillation loss, the rest the plain "
                             "next-token loss (default 1: distillation alone)")
    parser.add_argument("--keep-last", action="store_true",
                        help="save the last step's weights, not the best probe's (as this script did before it chose)")
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

    tokenizer_from = args.tokenizer_from if args.tokenizer_from is not None else args.distill_from
    if tokenizer_from is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    else:
        tokenizer = train_byte_level_bpe([text for _, text in train_documents], recipe.vocab_size, recipe.seq_len)
    teacher = None
    if args.distill_from is not None:
        if tokenizer_from != args.distill_from:
            check_same_vocabulary(tokenizer, args.distill_from)
        teacher = Teacher.load(args.distill_from, device, recipe.distill_weight)
        if teacher.vocab_size != len(tokenizer):
            raise SystemExit(f"{args.distill_from} has {teacher.vocab_size} logits, the tokenizer "
                             f"{len(tokenizer)} tokens")
    train_ids = encode_documents(tokenizer, [text for _, text in train_documents])
    heldout_ids = encode_documents(tokenizer, [text for _, text in heldout_documents])
    print(f"tokenizer: {len(tokenizer)} tokens; {train_ids.numel():,} train and {heldout_ids.numel():,} held-out "
          f"tokens ({time.monotonic() - started_s:.1f} s)", flush=True)

    model = build_model(recipe, tokenizer, args.seed).to(device)
    num_params = sum(parameter.numel() for parameter in model.parameters())
    budget = f"{recipe.num_steps} steps" if recipe.minutes is None else f"{recipe.minutes:g} min"
    print(f"model: {num_params / 1e6:.2f}M parameters ({recipe.num_layers} layers, hidden {recipe.hidden_size}, "
          f"heads {recipe.num_heads}/{recipe.num_kv_heads}), {budget} on {device}", flush=True)
    if teacher is not None:
        num_target_params = sum(parameter.numel() for parameter in teacher.model.parameters())
        print(f"distilled from {args.distill_from} ({num_target_params / 1e6:.2f}M parameters): "
              f"{objective(teacher)}", flush=True)
    train_stats = train(model, train_ids, recipe, args.seed, log=lambda line: print(line, flush=True),
                        heldout_ids=heldout_ids, teacher=teacher)
    target_agreement = None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        heldout = perplexity(model, heldout_ids, recipe.seq_len, recipe.batch_size, recipe.eval_tokens)
        if teacher is not None:
            # The greedy acceptance proxy on the same held-out windows the perplexity scored.
            target_agreement = teacher.agreement(model, window_batches(heldout_ids[:recipe.eval_tokens],
                                                                       recipe.seq_len, recipe.batch_size, device))

    args.out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out_dir)
    tokenizer.save_pretrained(args.out_dir)
    write_heldout(args.out_dir / HELDOUT_FILE, heldout_documents)
    stats = {
        "preset": args.preset, "recipe": asdict(recipe), "seed": args.seed, "num_params": num_params,
        "vocab_size": len(tokenizer),
        "tokenizer_from": None if tokenizer_from is None else str(tokenizer_from),
        "distilled_from": None if args.distill_from is None else str(args.distill_from),
        "python": sys.version.split()[0], "corpus_root": str(root), "heldout_every": HELDOUT_EVERY,
        "num_train_files": len(train_documents), "num_heldout_files": len(heldout_documents),
        "num_train_tokens": train_ids.numel(), "num_heldout_tokens": heldout_ids.numel(), **train_stats,
        "heldout_perplexity": heldout["perplexity"], "heldout_eval_tokens": heldout["num_tokens"],
        "target_agreement": None if target_agreement is None else target_agreement["agreement"],
        "target_kl_mean": None if target_agreement is None else target_agreement["kl_mean"],
        "device": str(device), "wall_s": time.monotonic() - started_s,
    }
    write_json(args.out_dir / STATS_FILE, stats)
    print(f"held-out perplexity {heldout['perplexity']:.3f} over {heldout['num_tokens']:,} tokens; "
          f"train loss {train_stats['initial_loss']:.3f} -> {train_stats['final_loss']:.3f} in "
          f"{train_stats['num_steps']} steps ({train_stats['tokens_seen']:,} tokens, "
          f"{train_stats['epochs']:.1f} epochs), weights of step {train_stats['kept_step']} "
          f"({train_stats['kept_by']}); wall {stats['wall_s']:.1f} s; saved to {args.out_dir}", flush=True)
    if target_agreement is not None:
        print(f"agreement with the target (greedy acceptance proxy): {target_agreement['agreement']:.4f} of "
              f"{target_agreement['num_positions']:,} held-out positions; KL(target || draft) "
              f"{target_agreement['kl_mean']:.4f} nats", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
