"""bench/fp8_accuracy.py and bench/train_text_model.py: the comparisons (relative error, KL, top-1, the 1%
verdict) on tensors with known answers, the held-out split, perplexity as exp(mean NLL), and the tiny preset
end to end (training lowers the loss, the folder loads, the FP8 report runs on the CPU reference). CPU only."""

from __future__ import annotations

import json
import math
from types import ModuleType

import pytest
import torch
from bench_scripts import bench_script



@pytest.fixture(scope="module")
def fp8_accuracy() -> ModuleType:
    yield from bench_script("fp8_accuracy")


@pytest.fixture(scope="module")
def train_text_model(fp8_accuracy) -> ModuleType:
    import train_text_model  # bench/ is on sys.path once fp8_accuracy is loaded

    return train_text_model


# ---- comparisons ---------------------------------------------------------------------------------------------
def test_relative_error_is_the_norm_of_the_difference_over_the_reference_norm(fp8_accuracy) -> None:
    reference = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))
    assert fp8_accuracy.relative_error(reference * 1.01, reference) == pytest.approx(0.01, rel=1e-5)  # float32 product
    assert fp8_accuracy.relative_error(reference, reference) == 0.0
    offset = torch.zeros_like(reference)
    offset[0, 0, 0] = 3.0
    assert fp8_accuracy.relative_error(reference + offset, reference) == pytest.approx(3.0 / reference.norm().item())


def test_kl_matches_the_formula_is_zero_for_shifted_logits_and_is_not_symmetric(fp8_accuracy) -> None:
    uniform = torch.tensor([0.0, 0.0])
    skewed = torch.tensor([math.log(3.0), 0.0])  # softmax (0.75, 0.25)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert fp8_accuracy.kl_divergence(uniform, skewed).item() == pytest.approx(expected, rel=1e-6)
    reverse = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert fp8_accuracy.kl_divergence(skewed, uniform).item() == pytest.approx(reverse, rel=1e-6)
    logits = torch.randn(4, 9, generator=torch.Generator().manual_seed(1))
    assert fp8_accuracy.kl_divergence(logits, logits + 5.0).abs().max().item() < 1e-6
    assert fp8_accuracy.kl_divergence(logits, logits).shape == (4,)


def test_logit_comparison_pools_the_norms_of_all_sequences(fp8_accuracy) -> None:
    generator = torch.Generator().manual_seed(2)
    references = [torch.randn(6, 11, generator=generator) * scale for scale in (1.0, 10.0)]
    tests = [reference + 0.1 * torch.randn(6, 11, generator=generator) for reference in references]
    tests[0][0] = -tests[0][0]  # position 0 of sequence 0: a different top-1 token
    comparison = fp8_accuracy.LogitComparison()
    for reference, test in zip(references, tests, strict=True):
        comparison.add(reference, test)
    summary = comparison.summary()
    # One norm over both sequences, not the mean of per-sequence errors (the large one dominates).
    assert summary["relative_error"] == pytest.approx(
        fp8_accuracy.relative_error(torch.cat(tests), torch.cat(references)), rel=1e-9)
    kl = fp8_accuracy.kl_divergence(torch.cat(references), torch.cat(tests))
    assert summary["kl_mean"] == pytest.approx(kl.mean().item(), rel=1e-5)
    assert summary["kl_max"] == pytest.approx(kl.max().item(), rel=1e-5)
    agreeing = (torch.cat(references).argmax(-1) == torch.cat(tests).argmax(-1)).sum().item()
    assert agreeing < 12 and summary["top1_agreement"] == agreeing / 12 and summary["num_positions"] == 12


def test_within_one_percent_either_way(fp8_accuracy) -> None:
    assert fp8_accuracy.within_fraction(10.099, 10.0)
    assert fp8_accuracy.within_fraction(9.901, 10.0)
    assert not fp8_accuracy.within_fraction(10.11, 10.0)
    assert not fp8_accuracy.within_fraction(9.8, 10.0)


# ---- corpus --------------------------------------------------------------------------------------------------
def test_stdlib_split_is_deterministic_disjoint_and_every_20th_file(train_text_model) -> None:
    paths = train_text_model.corpus_files(train_text_model.stdlib_root())
    assert paths == sorted(paths) and len(paths) > 500 and "os.py" in paths
    assert paths == train_text_model.corpus_files(train_text_model.stdlib_root())
    train, heldout = train_text_model.split_files(paths)
    assert (train, heldout) == train_text_model.split_files(list(paths))
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == paths
    assert heldout == paths[19::20]
    assert not any("site-packages" in path or "__pycache__" in path for path in paths)


def test_corpus_keeps_text_suffixes_and_skips_site_packages_and_non_utf8(train_text_model, tmp_path) -> None:
    for relative, content in {"b.py": b"x = 1\n", "a/c.txt": b"docs\n", "a/d.rst": b"title\n",
                              "site-packages/e.py": b"y = 2\n", "__pycache__/f.py": b"z\n", "g.so": b"\x7fELF",
                              "h.py": "caf\xe9".encode("latin-1"), "empty.txt": b"  \n"}.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(content)
    paths = train_text_model.corpus_files(tmp_path)
    assert paths == ["a/c.txt", "a/d.rst", "b.py", "empty.txt", "h.py"]
    documents = train_text_model.read_documents(tmp_path, paths)
    assert documents == [("a/c.txt", "docs\n"), ("a/d.rst", "title\n"), ("b.py", "x = 1\n")]
    assert train_text_model.evenly_spaced(list(range(10)), 3) == [0, 3, 6]
    assert train_text_model.evenly_spaced(list(range(4)), None) == [0, 1, 2, 3]


# ---- perplexity ----------------------------------------------------------------------------------------------
def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


# 23 tokens: windows of 8, 8, 7; 25: 8, 8, 8 and a last window of one token, which predicts nothing.
@pytest.mark.parametrize(("num_tokens", "num_predicted"), [(23, 7 + 7 + 6), (25, 7 + 7 + 7)])
def test_perplexity_is_exp_of_the_mean_nll_over_windows(train_text_model, num_tokens: int,
                                                        num_predicted: int) -> None:
    model = _tiny_llama()
    stream = torch.randint(0, 32, (num_tokens,), generator=torch.Generator().manual_seed(3))
    nlls = []
    with torch.no_grad():
        for start in range(0, num_tokens, 8):
            window = stream[start:start + 8]
            if window.numel() < 2:
                continue
            logp = torch.log_softmax(model(input_ids=window[None]).logits[0].double(), dim=-1)
            nlls.extend((-logp[position, window[position + 1]]).item() for position in range(window.numel() - 1))
    result = train_text_model.perplexity(model, stream, window_len=8, batch_size=2)
    assert result["num_tokens"] == len(nlls) == num_predicted
    assert result["mean_nll"] == pytest.approx(sum(nlls) / len(nlls), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)
    assert train_text_model.perplexity(model, stream, 8, 2, max_tokens=8)["num_tokens"] == 7


# ---- the tiny preset end to end ------------------------------------------------------------------------------
def test_tiny_preset_lowers_the_loss_and_its_folder_serves_the_fp8_report(
        train_text_model, fp8_accuracy, tiny_text_model_dir, tmp_path, one_thread) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny_text_model_dir  # the tiny preset, 24 steps, 30 files (tests/bench/conftest.py)
    stats = json.loads((model_dir / "training.json").read_text())
    assert stats["num_steps"] == 24 and stats["tokens_seen"] == 24 * 8 * 64
    assert stats["final_loss"] < stats["initial_loss"] - 0.3
    assert math.isfinite(stats["heldout_perplexity"]) and stats["heldout_perplexity"] < 512  # below uniform
    paths = train_text_model.evenly_spaced(train_text_model.corpus_files(train_text_model.stdlib_root()), 30)
    _, heldout_paths = train_text_model.split_files(paths)
    stored = [path for path, _ in train_text_model.read_heldout(model_dir / "heldout.jsonl")]
    assert stored and set(stored) <= set(heldout_paths)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tokenizer("def main():\n    return 0\n")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids[1:]) == "def main():\n    return 0\n"
    assert model.config.vocab_size == len(tokenizer)

    out = tmp_path / "fp8.json"
    assert fp8_accuracy.main(["--model", str(model_dir), "--heldout", "--num-sequences", "2", "--seq-len", "32",
                              "--eval-tokens", "2048", "--device", "cpu", "--exact-accum", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["baseline_dtype"] == "float32" and report["fp8_path"].startswith("reference")
    baseline, on_random, on_heldout, exact_random, exact_heldout, engine, kv_on_random, kv_on_heldout = report["rows"]
    # --exact-accum's rows: the same layers again; the CPU reference has no accumulation mode, so the same figures.
    assert exact_random["weights"] == exact_heldout["weights"] == "fp8, exact accumulation"
    assert exact_heldout["perplexity"] == on_heldout["perplexity"]
    assert exact_random["logits"] == on_random["logits"]
    assert on_random["logits"]["num_positions"] == on_heldout["logits"]["num_positions"] == 64
    assert 0 < on_heldout["logits"]["relative_error"] < 0.1
    assert on_heldout["perplexity_ratio"] == pytest.approx(on_heldout["perplexity"] / baseline["perplexity"])
    assert on_heldout["num_tokens"] == baseline["num_tokens"] == 2048 - 2048 // 32
    # The FP8 KV cache, through the engine (reference attention on CPU), against the engine's float32 cache;
    # that cache itself scores what transformers' forward does, to float rounding.
    assert report["fp8_kv"] == "engine, fp8_e4m3 cache, reference attention vs float32 cache, reference attention; e4m3 scales 1.0"
    assert engine["kv_cache"] == "float32 (engine)" and kv_on_heldout["kv_cache"] == "fp8_e4m3 (engine)"
    assert engine["perplexity"] == pytest.approx(baseline["perplexity"], rel=1e-4)
    assert kv_on_random["logits"]["num_positions"] == kv_on_heldout["logits"]["num_positions"] == 64
    assert 0 < kv_on_heldout["logits"]["relative_error"] < 0.1
    assert kv_on_heldout["perplexity_ratio"] == pytest.approx(kv_on_heldout["perplexity"] / engine["perplexity"])
    assert kv_on_heldout["num_tokens"] == engine["num_tokens"] == baseline["num_tokens"]
