"""The built-in demo model, served when no `--model` is given (no model hub is reachable).

`demo_model_path()` owns the cache folder: it builds the model once per machine and returns a folder
that loads through `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` like any hub checkpoint.
The build trains a byte-level BPE tokenizer and a tiny Llama on the prose of `pydoc_data.topics` (the
English help text that ships with every Python) for about a minute and a half on two idle CPU cores
(longer on a loaded machine: the step count is fixed, so the result does not depend on speed). It answers with
English-like sentences, nothing more.

Invariants of the cache folder: a folder named `demo-llama-v<N>` is always complete, because it only
ever appears by an atomic rename of a finished temp folder; building happens under an exclusive
`fcntl.flock`, so processes that start together (two Ray replicas) build it once. Bump
`_FORMAT_VERSION` whenever the recipe changes, so existing caches rebuild instead of going stale.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "pagedserve-demo"
_FORMAT_VERSION = 2  # 2: the chat template takes tools
_FOLDER_NAME = f"demo-llama-v{_FORMAT_VERSION}"
# Files whose presence marks a finished build; the atomic rename already guarantees it, this guards
# against a user deleting files inside the cache by hand.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|end|>"  # ends every chat turn and every training document, so generation stops on it
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# One header token per role, `<|end|>` after each turn. The prompt starts with BOS because
# apply_chat_template tokenizes without special tokens; plain completions get BOS from the tokenizer.
# Tools follow the Hermes convention (serve_app/tool_calls.py reads it back): the functions in a system turn
# inside <tools>, a call as <tool_call>{"name": ..., "arguments": ...}</tool_call> in the assistant's turn, a
# result as <tool_response> in a user turn. Without tools a chat renders exactly as the model was trained.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}"
    "{{ '<|system|>\\nYou may call these functions. To call one, answer with <tool_call>{\\\"name\\\": ..., "
    "\\\"arguments\\\": {...}}</tool_call>.\\n<tools>' }}"
    "{% for tool in tools %}{{ tool | tojson }}{% endfor %}"
    "{{ '</tools><|end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('pagedserve-demo supports the roles system, user, assistant and tool, not ' + message['role']) }}"
    "{% endif %}"
    "{% if message['role'] == 'tool' %}"
    "{{ '<|user|>\\n<tool_response>' + (message['content'] | trim) + '</tool_response><|end|>\\n' }}"
    "{% elif message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{ '<|assistant|>\\n' }}"
    "{% for call in message['tool_calls'] %}"
    "{{ '<tool_call>' + ({'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson)"
    " + '</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|end|>\\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\\n' + ((message['content'] or '') | trim) + '<|end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Openers for the synthetic chats that teach the model the turn format; the topic title fills in.
_QUESTION_FORMS = ("Tell me about {title}.", "Explain {title}.", "What should I know about {title}?")


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that decides the built model. Sized so training takes 80-90 s on 2 idle CPU cores."""

    vocab_size: int = 3072
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4  # head_dim 32: a power of two, which paged-attention kernels prefer
    num_key_value_heads: int = 2  # grouped-query attention, so the engine's GQA path gets exercised
    context_len: int = 256
    batch_size: int = 8
    # A step count, not a time budget, so every machine (every Ray replica) builds the same model;
    # on an idle 2-core machine it takes 80-90 s, a loaded one just takes longer.
    num_steps: int = 450
    peak_lr: float = 6e-3  # high, but a model this small trains stably at it and gets English sooner
    warmup_fraction: float = 0.05
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    space_split_fraction: float = 0.05


def default_cache_dir() -> Path:
    """`$PAGEDSERVE_CACHE`, else `$XDG_CACHE_HOME/pagedserve`, else `~/.cache/pagedserve`."""
    explicit = os.environ.get("PAGEDSERVE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg_cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg_cache).expanduser() if xdg_cache else Path.home() / ".cache"
    return base / "pagedserve"


def demo_model_path(
    cache_dir: Path | None = None, *, rebuild: bool = False, recipe: DemoRecipe = DemoRecipe()
) -> Path:
    """Return the folder of the cached demo model, building it first if it is missing (or `rebuild`).

    `recipe` is for tests, which build a smaller model the same way in a cache folder of their own: the
    folder name records the format version, not the recipe.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    model_dir = cache_dir / _FOLDER_NAME
    if not rebuild and _is_complete(model_dir):
        return model_dir  # fast path, no lock: the folder only appears complete
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache_dir / f"{_FOLDER_NAME}.lock"):
        if not rebuild and _is_complete(model_dir):
            logger.info("demo model was built by another process while we waited: %s", model_dir)
            return model_dir
        _remove_leftovers(cache_dir)  # we hold the lock, so any temp folder is from a crashed build
        build_dir = Path(tempfile.mkdtemp(prefix=f".{_FOLDER_NAME}.tmp-", dir=cache_dir))
        try:
            build_demo_model(build_dir, recipe=recipe)
            _replace_dir(build_dir, model_dir)
        except BaseException:
            shutil.rmtree(build_dir, ignore_errors=True)
            raise
    return model_dir


def build_demo_model(
    out_dir: Path,
    *,
    seed: int = 0,
    train_seconds: float | None = None,
    log: Callable[[str], None] = logger.info,
    recipe: DemoRecipe = DemoRecipe(),
) -> dict[str, Any]:
    """Train the tokenizer and model and save both, with a model card, into `out_dir`; return stats.

    With `train_seconds=None` training runs `recipe.num_steps` steps, deterministic for a given seed on
    a given machine. A `train_seconds` value trains for that long instead, however many steps fit, so the
    result then depends on the machine's speed.
    """
    start_s = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    topics = _load_topics()
    tokenizer = _train_tokenizer([text for _, paragraphs in topics for text in paragraphs], recipe)
    documents = _training_documents(topics, tokenizer, seed)
    token_ids = _split_some_spaces(_encode(documents, tokenizer), tokenizer, recipe.space_split_fraction, seed)
    log(f"demo model: tokenizer of {len(tokenizer)} tokens, corpus of {token_ids.numel()} tokens")

    # fork_rng keeps the caller's global RNG untouched while weight init uses our seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(_model_config(recipe, tokenizer))
    num_params = sum(parameter.numel() for parameter in model.parameters())
    budget = f"{recipe.num_steps} steps" if train_seconds is None else f"{train_seconds:.0f} s"
    log(f"demo model: {num_params / 1e6:.2f}M parameters, training for {budget}")
    train_stats = _train(model, token_ids, recipe, seed, train_seconds, log)

    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    stats: dict[str, Any] = {
        "num_params": num_params,
        "vocab_size": len(tokenizer),
        "num_corpus_tokens": token_ids.numel(),
        **train_stats,
        "seed": seed,
        "build_seconds": time.monotonic() - start_s,
    }
    (out_dir / "README.md").write_text(_model_card(recipe, stats), encoding="utf-8")
    stats["build_seconds"] = time.monotonic() - start_s
    log(f"demo model: built in {stats['build_seconds']:.1f} s, final loss {stats['final_loss']:.3f}")
    return stats


# ---------------------------------------------------------------------------------------------------
# Cache folder handling


def _is_complete(model_dir: Path) -> bool:
    return all((model_dir / name).is_file() for name in _REQUIRED_FILES)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    # flock locks belong to the open file description, so this excludes other processes and other
    # threads alike. The lock file is never deleted: deleting it would let two holders coexist.
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _remove_leftovers(cache_dir: Path) -> None:
    for leftover in cache_dir.glob(f".{_FOLDER_NAME}.*-*"):
        logger.info("removing leftover of an interrupted demo build: %s", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def _replace_dir(build_dir: Path, model_dir: Path) -> None:
    """Move the finished build into place; an old folder (on rebuild) is renamed away, then deleted."""
    old_dir: Path | None = None
    if model_dir.exists():
        old_dir = model_dir.with_name(f".{_FOLDER_NAME}.old-{os.getpid()}")
        os.rename(model_dir, old_dir)
    os.rename(build_dir, model_dir)
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Data and tokenizer


def _load_topics() -> list[tuple[str, list[str]]]:
    """(title, prose paragraphs) per pydoc topic, in sorted key order so the corpus is deterministic."""
    from pydoc_data.topics import topics

    return [(_topic_title(topics[key], key), _prose_paragraphs(topics[key])) for key in sorted(topics)]


def _topic_title(text: str, fallback: str) -> str:
    first_line = text.lstrip().split("\n", 1)[0].strip()
    return first_line or fallback


_UNDERLINE = re.compile(r"[*=\-~^\"'#+`]{3,}")


def _prose_paragraphs(text: str) -> list[str]:
    """Keep only unindented paragraphs, unwrapped to one line each.

    Indented blocks are code and grammar rules, and underlines are reST headings: training on them
    makes a model this small answer in symbols rather than sentences.
    """
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if any(line[:1] in (" ", "\t") for line in lines):
            continue
        if any(_UNDERLINE.fullmatch(line.strip()) for line in lines):
            continue
        paragraph = re.sub(r"\s+", " ", " ".join(lines)).strip()
        # Short ones are mostly "See also" fragments and table cells; symbol-heavy ones quote code.
        if len(paragraph) >= 40 and _letter_fraction(paragraph) >= 0.9:
            paragraphs.append(paragraph)
    return paragraphs


def _letter_fraction(text: str) -> float:
    return sum(char.isascii() and (char.isalpha() or char == " ") for char in text) / len(text)


def train_byte_level_bpe(
    texts: Sequence[str], vocab_size: int, model_max_length: int, role_tokens: Sequence[str] = (),
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts` (every byte encodes, so no unknown token), with the pad, BOS and
    EOS tokens (and any `role_tokens`) as special tokens; BOS is added to every encoded text, like Llama's."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *role_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    extra: dict[str, Any] = {}
    if role_tokens:
        extra["extra_special_tokens"] = list(role_tokens)
    if chat_template is not None:
        extra["chat_template"] = chat_template
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        add_bos_token=True,  # a plain completion prompt starts with BOS, as in training
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        **extra,
    )


def _train_tokenizer(texts: Sequence[str], recipe: DemoRecipe) -> PreTrainedTokenizerFast:
    return train_byte_level_bpe(texts, recipe.vocab_size, recipe.context_len, ROLE_TOKENS, CHAT_TEMPLATE)


def _training_documents(
    topics: Sequence[tuple[str, list[str]]], tokenizer: PreTrainedTokenizerFast, seed: int
) -> list[str]:
    """Each topic as one plain document and as two chats (question about the title, opening prose).

    Every document is BOS ... <|end|>, so the model learns that <|end|> closes a text and a turn.
    """
    documents = [f"{BOS_TOKEN}{' '.join(paragraphs)}{EOS_TOKEN}" for _, paragraphs in topics if paragraphs]
    for topic_index, (title, paragraphs) in enumerate(topics):
        if not paragraphs:
            continue
        for chat_index in range(2):
            form = _QUESTION_FORMS[(seed + topic_index + chat_index) % len(_QUESTION_FORMS)]
            answer = " ".join(paragraphs[chat_index : chat_index + 2]) or paragraphs[0]
            chat = [{"role": "user", "content": form.format(title=title)}, {"role": "assistant", "content": answer}]
            documents.append(tokenizer.apply_chat_template(chat, tokenize=False))
    return documents


def _encode(documents: Sequence[str], tokenizer: PreTrainedTokenizerFast) -> list[int]:
    # The backend tokenizer, because the wrapper warns about every document longer than the context.
    backend = tokenizer.backend_tokenizer
    return [token_id for document in documents for token_id in backend.encode(document, add_special_tokens=False).ids]


def _split_some_spaces(
    token_ids: list[int], tokenizer: PreTrainedTokenizerFast, fraction: float, seed: int
) -> torch.Tensor:
    """Re-spell a `fraction` of space-led tokens as a lone space token plus the bare word.

    Byte-level BPE glues a space to the word after it, so a prompt ending in a space ("The ") ends in
    a lone space token that plain training text never contains; without these re-spellings the model
    has no idea what follows it and answers with noise.
    """
    space_id = tokenizer.convert_tokens_to_ids("\u0120")  # byte-level BPE's symbol for a space
    generator = torch.Generator().manual_seed(seed)
    is_split = (torch.rand(len(token_ids), generator=generator) < fraction).tolist()
    bare_word_ids: dict[int, list[int]] = {}
    respelled: list[int] = []
    for token_id, should_split in zip(token_ids, is_split, strict=True):
        token = tokenizer.convert_ids_to_tokens(token_id)
        if should_split and len(token) > 1 and token.startswith("\u0120") and token_id not in tokenizer.all_special_ids:
            if token_id not in bare_word_ids:
                bare_word_ids[token_id] = tokenizer.encode(tokenizer.decode([token_id])[1:], add_special_tokens=False)
            respelled.append(space_id)
            respelled.extend(bare_word_ids[token_id])
        else:
            respelled.append(token_id)
    return torch.tensor(respelled, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------
# Model and training


def _model_config(recipe: DemoRecipe, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        max_position_embeddings=recipe.context_len,
        tie_word_embeddings=True,  # half the parameters of a separate head, at this vocab size
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def learning_rate(recipe: Any, progress: float) -> float:
    """Linear warmup, then cosine decay to `final_lr_fraction` of the peak; `progress` runs 0..1. `recipe`: any
    with `peak_lr`, `warmup_fraction` and `final_lr_fraction` (a `DemoRecipe`, bench/train_text_model.py's)."""
    if progress < recipe.warmup_fraction:
        return recipe.peak_lr * progress / recipe.warmup_fraction
    decay_progress = (progress - recipe.warmup_fraction) / (1.0 - recipe.warmup_fraction)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(decay_progress, 1.0)))
    return recipe.peak_lr * (recipe.final_lr_fraction + (1.0 - recipe.final_lr_fraction) * cosine)


def _train(
    model: LlamaForCausalLM,
    token_ids: torch.Tensor,
    recipe: DemoRecipe,
    seed: int,
    train_seconds: float | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """AdamW on random windows of the token stream, for `recipe.num_steps` steps or `train_seconds`."""
    window_len = recipe.context_len
    if token_ids.numel() <= window_len:
        raise ValueError(f"demo corpus has {token_ids.numel()} tokens, fewer than one window of {window_len}")
    # Norms and biases are not decayed: pulling RMSNorm gains toward 0 only hurts.
    decayed = [p for p in model.parameters() if p.dim() >= 2]
    not_decayed = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": recipe.weight_decay}, {"params": not_decayed, "weight_decay": 0.0}],
        lr=recipe.peak_lr,
        betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses: list[float] = []
    start_s = time.monotonic()
    step = 0
    while True:
        elapsed_s = time.monotonic() - start_s
        # The LR schedule runs on progress, so a time budget anneals just like a step count.
        progress = step / recipe.num_steps if train_seconds is None else elapsed_s / train_seconds
        if progress >= 1.0 and step > 0:  # at least one step, so there is a loss to report
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(recipe, progress)
        starts = torch.randint(0, token_ids.numel() - window_len, (recipe.batch_size,), generator=generator)
        windows = torch.stack([token_ids[start : start + window_len] for start in starts.tolist()])
        loss = model(input_ids=windows, labels=windows).loss  # the model shifts labels itself
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            log(f"demo model: step {step}, loss {sum(losses[-50:]) / len(losses[-50:]):.3f}, {elapsed_s:.0f} s")
    tail = losses[-max(1, len(losses) // 10) :]  # mean over the last tenth: one batch is noisy
    return {
        "num_steps": step,
        "stopped_by": "steps" if train_seconds is None else "time",
        "train_seconds": time.monotonic() - start_s,
        "initial_loss": losses[0],
        "final_loss": sum(tail) / len(tail),
        "tokens_seen": step * recipe.batch_size * window_len,
    }


# ---------------------------------------------------------------------------------------------------
# Model card


def _model_card(recipe: DemoRecipe, stats: dict[str, Any]) -> str:
    recipe_lines = "\n".join(f"| {name} | {value} |" for name, value in asdict(recipe).items())
    stopped_note = (
        "It trained for a time budget, not a step count, so a rebuild on another machine will differ."
        if stats["stopped_by"] == "time"
        else "It ran its fixed step count, so a rebuild with the same seed reproduces it up to float rounding."
    )
    return f"""# {DEMO_MODEL_NAME}

A tiny demo model that pagedserve builds for itself when no `--model` is given and no model hub is
reachable. **It is not for real use**: it strings together English-like sentences about Python and
knows nothing else. It exists so the server, the OpenAI API and the paged KV cache can be tried out
offline.

## What it is

- Architecture: `LlamaForCausalLM`, {stats["num_params"] / 1e6:.2f}M parameters,
  {recipe.num_hidden_layers} layers, hidden size {recipe.hidden_size}, {recipe.num_attention_heads} attention heads
  ({recipe.num_key_value_heads} key/value heads), context of {recipe.context_len} tokens, tied input and output
  embeddings, float32.
- Tokenizer: byte-level BPE with {stats["vocab_size"]} tokens, trained with the `tokenizers` library.
  Special tokens: `{BOS_TOKEN}` (bos), `{EOS_TOKEN}` (eos, ends every chat turn), `{PAD_TOKEN}` (pad),
  and the role headers {", ".join(f"`{token}`" for token in ROLE_TOKENS)}.
- Chat template: `{BOS_TOKEN}<|user|>\\n...{EOS_TOKEN}\\n<|assistant|>\\n`; generation stops at `{EOS_TOKEN}`.

## How it was built

- Data: the prose paragraphs (code blocks and headings removed) of `pydoc_data.topics`, the help
  text that ships with Python, {stats["num_corpus_tokens"]} tokens; each topic also appears as two
  short synthetic chats (a question about its title, its opening paragraphs as the answer).
- Training: AdamW, random windows of {recipe.context_len} tokens, batch {recipe.batch_size}, seed {stats["seed"]};
  {stats["num_steps"]} steps ({stats["tokens_seen"]} tokens) in {stats["train_seconds"]:.0f} s on CPU.
  {stopped_note}
- Loss: {stats["initial_loss"]:.2f} at the first step, {stats["final_loss"]:.2f} at the end
  (mean over the last tenth of the steps).
- Total build time: {stats["build_seconds"]:.0f} s.

| recipe field | value |
|---|---|
{recipe_lines}

Built by `pagedserve.demo.model` (folder format v{_FORMAT_VERSION}). The training text is part of the
Python documentation, under the Python Software Foundation License.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build (once) and print the path of pagedserve's demo model.")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="default: $PAGEDSERVE_CACHE or ~/.cache/pagedserve"
    )
    parser.add_argument("--rebuild", action="store_true", help="build again even if a cached copy exists")
    args = parser.parse_args(argv)
    # Progress goes to stderr through logging; stdout carries only the path, for scripts.
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(demo_model_path(args.cache_dir, rebuild=args.rebuild))
    return 0


if __name__ == "__main__":
    sys.exit(main())
