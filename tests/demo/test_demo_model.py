"""Tests of the built-in demo model: one build per module, of a small recipe, through the public entry point.

The shipped recipe trains for about 1.5 min on 2 idle cores, too long for the suite; `SMALL_RECIPE` is
the same pipeline (tokenizer, documents, chats, training schedule, saving, model card) with a third of the
vocabulary, half the layers, a quarter of the parameters and windows of 64 tokens; it trains in about 25 s
of one core and already writes English-like text and ends its chat turns, so every check of the built model
below is one of a trained model. The session trains it in the background while the other tests run, and
runs this module last (tests/demo_background.py). The shipped recipe's own size is checked without training;
`PAGEDSERVE_TEST_DEMO_RECIPE=shipped` runs this whole module on the real build instead. The cache-folder
tests swap `build_demo_model` for a stub, so locking and atomic replacement are checked without training
anything.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

import demo_background
from pagedserve.demo import model as demo_model
from pagedserve.demo.model import DEMO_MODEL_NAME, DemoRecipe, build_demo_model, default_cache_dir, demo_model_path

# Trained on one thread, as the background build does, each of seeds 0-3 passes every text check below, with
# generation on one thread or two (the build is deterministic for a seed and a thread count on a machine; the
# test's is seed 0). Another machine's rounding is another sample: over 12 sampling seeds the chat check passed
# 9-11 times a model (900 steps: 4-12; the windows of 128 tokens, 8 a batch, that this recipe had before: 4
# and 9), the others 11-12. Fewer steps fail (600 steps: 2 of 4 seeds), so the checks still tell a trained
# model from noise.
SMALL_RECIPE = DemoRecipe(
    vocab_size=1024,
    hidden_size=96,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    context_len=64,
    batch_size=16,
    num_steps=1200,
)
RECIPE = DemoRecipe() if os.environ.get("PAGEDSERVE_TEST_DEMO_RECIPE") == "shipped" else SMALL_RECIPE

# The one build trains a fixed number of steps on one thread, in the background from the start of the session
# (tests/demo_background.py): seconds on an idle 2-core machine (the shipped recipe: a minute and a half),
# several times that on a loaded one; whichever test first asks for it waits for what is left.
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def built_cache() -> Path:
    """A cache dir holding one build of `RECIPE`, made through the public entry point (in a process the
    session started once collection was done: tests/demo_background.py)."""
    return demo_background.built_cache(RECIPE)


@pytest.fixture(scope="module")
def model_dir(built_cache: Path) -> Path:
    return demo_model_path(built_cache)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def model(model_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def training_words() -> set[str]:
    from pydoc_data.topics import topics

    return {word.lower() for text in topics.values() for word in re.findall(r"[A-Za-z]{3,}", text)}


# A sampled check draws this many answers and wants at least `MIN_PASSING` of them right: one draw is a coin
# weighted 0.75-0.92 (above), so a single one would fail on some machines, while a model that learned nothing
# passes none. At a weight of 0.75, 2 of 6 fail together 0.5% of the time.
NUM_SAMPLES, MIN_PASSING = 6, 2


def _generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, *, do_sample: bool) -> list[str]:
    """The greedy continuation, or `NUM_SAMPLES` sampled ones."""
    inputs = tokenizer(prompt, return_tensors="pt")
    # generate() samples from the global RNG; fork it so other tests see it untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # min_new_tokens holds off EOS: this judges the text, the chat test judges where it ends.
        output_ids = model.generate(
            **inputs,
            max_new_tokens=48,
            min_new_tokens=24,
            do_sample=do_sample,
            temperature=0.8 if do_sample else None,
            top_k=50 if do_sample else None,
            num_return_sequences=NUM_SAMPLES if do_sample else 1,
        )
    return tokenizer.batch_decode(output_ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def _english_like_failure(text: str, training_words: set[str]) -> str | None:
    """Why `text` is not English-like text of the training documents (None: it is)."""
    if len(text) < 20:
        return f"continuation too short: {text!r}"
    letters_and_spaces = sum(char.isascii() and (char.isalpha() or char == " ") for char in text)
    if letters_and_spaces / len(text) < 0.8:
        return f"not mostly letters and spaces: {text!r}"
    words = re.findall(r"[A-Za-z]{3,}", text)
    known = [word for word in words if word.lower() in training_words]
    if len(set(known)) < 4:
        return f"too few known words in {text!r}"
    if len(known) < 0.6 * len(words):
        return f"too many made-up words in {text!r}"
    return None


def _assert_enough_pass(failures: list[str | None]) -> None:
    """One answer: it passes; several (sampled): at least `MIN_PASSING` do."""
    needed = 1 if len(failures) == 1 else MIN_PASSING
    assert sum(failure is None for failure in failures) >= needed, "\n".join(f for f in failures if f)


# ---------------------------------------------------------------------------------------------------
# The build


def test_folder_is_versioned_and_loads_through_auto_classes(model_dir: Path, model: PreTrainedModel) -> None:
    assert model_dir.name.startswith("demo-llama-v")
    assert model.config.model_type == "llama"
    assert model.config.max_position_embeddings == RECIPE.context_len
    assert model.num_parameters() < 10_000_000


def test_the_shipped_recipe_is_a_llama_of_256_positions_under_10m_parameters() -> None:
    """The shipped model's shape, from its recipe and its trained tokenizer, without training it."""
    recipe = DemoRecipe()
    topics = demo_model._load_topics()
    tokenizer = demo_model._train_tokenizer([text for _, paragraphs in topics for text in paragraphs], recipe)
    config = demo_model._model_config(recipe, tokenizer)
    with torch.device("meta"):
        shipped = AutoModelForCausalLM.from_config(config)
    assert shipped.config.model_type == "llama"
    assert shipped.config.max_position_embeddings == 256
    assert shipped.num_parameters() < 10_000_000


def test_special_tokens_and_eos(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    assert tokenizer.eos_token == "<|end|>"
    assert tokenizer.bos_token is not None and tokenizer.pad_token is not None
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    # A plain completion prompt starts with BOS, as every training document did.
    assert tokenizer("The cat").input_ids[0] == tokenizer.bos_token_id
    # Special tokens are single tokens, so the chat template's markers cannot be split by BPE.
    for token in ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>"):
        assert len(tokenizer(token, add_special_tokens=False).input_ids) == 1


def test_chat_template_renders_roles_and_generation_prompt(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a list?"},
        {"role": "assistant", "content": "A sequence."},
        {"role": "user", "content": "And a tuple?"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nWhat is a list?<|end|>\n"
        "<|assistant|>\nA sequence.<|end|>\n<|user|>\nAnd a tuple?<|end|>\n<|assistant|>\n"
    )
    token_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert token_ids.count(tokenizer.bos_token_id) == 1  # BOS from the template, not added twice


def test_chat_template_rejects_unknown_role(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(Exception, match="roles"):
        tokenizer.apply_chat_template([{"role": "function", "content": "42"}], tokenize=False)


def test_chat_template_takes_tools_calls_and_results(tokenizer: PreTrainedTokenizerBase) -> None:
    """Hermes-style: the tools in a system turn, a call in the assistant's, its result in a user turn."""
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "1 + 1?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 1}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "2"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|bos|><|system|>\nYou may call these functions.")
    assert '<tools>{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}</tools>' in rendered
    assert '<|assistant|>\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 1}}</tool_call><|end|>' in rendered
    assert rendered.endswith("<|user|>\n<tool_response>2</tool_response><|end|>\n<|assistant|>\n")


@pytest.mark.parametrize("prompt", ["The ", "The", "A list is"])
@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_generation_is_english_like(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, training_words: set[str], prompt: str, do_sample: bool
) -> None:
    texts = _generate(model, tokenizer, prompt, do_sample=do_sample)
    _assert_enough_pass([_english_like_failure(text, training_words) for text in texts])


def test_chat_answer_is_english_and_ends_with_eos(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, training_words: set[str]
) -> None:
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me about the assert statement."}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        output_ids = model.generate(**inputs, max_new_tokens=200, do_sample=True, temperature=0.7, top_k=50,
                                    num_return_sequences=NUM_SAMPLES)
    failures = []
    for row in output_ids[:, inputs["input_ids"].shape[1] :].tolist():
        answer_ids = row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row
        failure = _english_like_failure(tokenizer.decode(answer_ids, skip_special_tokens=True), training_words)
        if failure is None and tokenizer.eos_token_id not in answer_ids:
            failure = f"the answer never ended its turn: {tokenizer.decode(answer_ids)!r}"
        failures.append(failure)
    _assert_enough_pass(failures)


def test_model_card_states_what_it_is(model_dir: Path) -> None:
    card = (model_dir / "README.md").read_text(encoding="utf-8")
    assert DEMO_MODEL_NAME in card
    assert "not for real use" in card
    assert "pydoc_data.topics" in card
    assert re.search(r"Loss: \d+\.\d+ at the first step, \d+\.\d+ at the end", card)


def test_cached_call_returns_without_building(
    built_cache: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = json.loads((model_dir / "config.json").read_text())

    def fail_build(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise AssertionError("demo model rebuilt although it is cached")

    monkeypatch.setattr(demo_model, "build_demo_model", fail_build)
    assert demo_model_path(built_cache) == model_dir
    assert json.loads((model_dir / "config.json").read_text()) == before


def test_cli_prints_the_cached_path(built_cache: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo_model.main(["--cache-dir", str(built_cache)]) == 0
    assert capsys.readouterr().out.strip() == str(model_dir)


# ---------------------------------------------------------------------------------------------------
# Cache folder handling, with a stub build


class _StubBuild:
    """Stands in for `build_demo_model`: writes the required files slowly and counts its calls."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.delay_s = delay_s
        self.fail = fail
        self.num_calls = 0
        self._count_lock = threading.Lock()

    def __call__(self, out_dir: Path, **kwargs: Any) -> dict[str, Any]:
        with self._count_lock:
            self.num_calls += 1
            call_number = self.num_calls
        time.sleep(self.delay_s)  # widen the window in which a second caller could slip in
        if self.fail:
            raise RuntimeError("stub build failed")
        for name in demo_model._REQUIRED_FILES:
            (Path(out_dir) / name).write_text(json.dumps({"build": call_number}))
        return {"build": call_number}


def test_concurrent_callers_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stub = _StubBuild(delay_s=0.3)
    monkeypatch.setattr(demo_model, "build_demo_model", stub)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(demo_model_path(tmp_path))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert stub.num_calls == 1
    assert len(set(results)) == 1 and len(results) == 4
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([results[0].name, f"{results[0].name}.lock"])


def test_rebuild_replaces_folder_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stub = _StubBuild()
    monkeypatch.setattr(demo_model, "build_demo_model", stub)
    first = demo_model_path(tmp_path)
    second = demo_model_path(tmp_path, rebuild=True)
    assert first == second
    assert json.loads((second / "config.json").read_text()) == {"build": 2}
    assert not list(tmp_path.glob(".*")), "temp or old folders left behind"


def test_failed_build_leaves_no_folder_and_next_call_retries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_model, "build_demo_model", _StubBuild(fail=True))
    with pytest.raises(RuntimeError, match="stub build failed"):
        demo_model_path(tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == [f"{demo_model._FOLDER_NAME}.lock"]
    monkeypatch.setattr(demo_model, "build_demo_model", _StubBuild())
    assert (demo_model_path(tmp_path) / "config.json").is_file()


def test_leftover_temp_folder_of_a_crash_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    leftover = tmp_path / f".{demo_model._FOLDER_NAME}.tmp-crashed"
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    monkeypatch.setattr(demo_model, "build_demo_model", _StubBuild())
    demo_model_path(tmp_path)
    assert not leftover.exists()


def test_default_cache_dir_follows_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("PAGEDSERVE_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "pagedserve"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "pagedserve"


_TINY_RECIPE = demo_model.DemoRecipe(
    vocab_size=512,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    context_len=32,
    batch_size=2,
    num_steps=3,
)


def test_build_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    first = build_demo_model(tmp_path / "a", seed=3, recipe=_TINY_RECIPE, log=lambda message: None)
    second = build_demo_model(tmp_path / "b", seed=3, recipe=_TINY_RECIPE, log=lambda message: None)
    assert first["stopped_by"] == second["stopped_by"] == "steps"
    assert first["final_loss"] == second["final_loss"]
    for name in ("model.safetensors", "tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_build_with_time_budget_stops_on_time(tmp_path: Path) -> None:
    stats = build_demo_model(tmp_path, train_seconds=0.5, recipe=_TINY_RECIPE, log=lambda message: None)
    assert stats["stopped_by"] == "time"
    assert stats["num_steps"] >= 1 and stats["train_seconds"] >= 0.5
    assert {"num_params", "final_loss", "build_seconds"} <= set(stats)
