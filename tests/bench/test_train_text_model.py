"""bench/train_text_model.py's guard against overfitting: the probes' windows spread over the held-out split, and
the model saved is the one of the best probe, not the last step's (a probe forced to fall, then rise). CPU only;
the corpus, perplexity and the tiny preset end to end are in test_fp8_accuracy.py."""

from __future__ import annotations

import json
from types import ModuleType

import pytest
import torch
from bench_scripts import bench_script


@pytest.fixture(scope="module")
def train_text_model() -> ModuleType:
    yield from bench_script("train_text_model")


def test_probe_stream_takes_whole_windows_spread_over_the_stream(train_text_model) -> None:
    stream = torch.arange(100)
    probe = train_text_model.probe_stream(stream, window_len=10, num_tokens=30)
    assert probe.tolist() == [*range(0, 10), *range(30, 40), *range(60, 70)]
    batches = list(train_text_model.window_batches(probe, 10, 2, torch.device("cpu")))
    assert [batch.shape for batch in batches] == [(2, 10), (1, 10)]  # cut back into the same windows
    assert batches[1][0].tolist() == list(range(60, 70))
    assert train_text_model.probe_stream(stream, 10, 100).equal(stream)  # as large as the split: all of it
    assert train_text_model.probe_stream(stream, 10, 5).tolist() == list(range(10))  # at least one window


def test_best_weights_restores_the_best_offer_and_a_tie_goes_to_the_later_step(train_text_model) -> None:
    model = torch.nn.Linear(2, 1)
    best = train_text_model.BestWeights()
    with pytest.raises(ValueError, match="no weights"):
        best.restore(model)
    for step, score in ((1, 3.0), (2, 2.0), (3, 4.0)):
        torch.nn.init.constant_(model.weight, float(step))
        assert best.offer(model, step, score) == (step != 3)
    best.restore(model)
    assert model.weight.eq(2.0).all() and (best.step, best.score) == (2, 2.0)
    highest = train_text_model.BestWeights(higher_is_better=True)
    for step, score in ((1, 0.5), (2, 0.7), (3, 0.7), (4, 0.6)):
        torch.nn.init.constant_(model.weight, float(step))
        highest.offer(model, step, score)
    highest.restore(model)
    assert model.weight.eq(3.0).all() and highest.step == 3


@pytest.mark.parametrize("keep_last", [False, True])
def test_the_saved_model_is_the_best_probes(train_text_model, tmp_path, monkeypatch, one_thread,
                                            keep_last: bool) -> None:
    from transformers import AutoModelForCausalLM

    scores = iter([5.0, 3.0, 4.0, 6.0])  # the probe falls, then rises: the second probe (step 8) is the best
    weights_at_probe: dict[int, dict[str, torch.Tensor]] = {}

    def rising_probe(model, probe_ids, recipe, teacher) -> dict[str, float]:
        weights_at_probe[len(weights_at_probe)] = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        return {"perplexity": next(scores), "num_tokens": probe_ids.numel()}

    monkeypatch.setattr(train_text_model, "run_probe", rising_probe)
    out_dir = tmp_path / "model"
    # 14 steps, a probe every 4: steps 4, 8, 12, then the last step's, 14.
    argv = ["--preset", "tiny", "--steps", "14", "--max-files", "30", "--eval-every", "4", "--out-dir", str(out_dir),
            "--device", "cpu"]
    assert train_text_model.main(argv + (["--keep-last"] if keep_last else [])) == 0
    stats = json.loads((out_dir / "training.json").read_text())
    assert [probe["step"] for probe in stats["heldout_probes"]] == [4, 8, 12, 14]
    assert [probe["perplexity"] for probe in stats["heldout_probes"]] == [5.0, 3.0, 4.0, 6.0]
    assert stats["num_steps"] == 14 and stats["recipe"]["keep_best"] is not keep_last
    kept_probe = 3 if keep_last else 1
    assert stats["kept_step"] == (14 if keep_last else 8)
    assert stats["kept_by"] == ("last step" if keep_last else "best probe perplexity")

    saved = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).state_dict()
    expected = weights_at_probe[kept_probe]
    assert set(saved) <= set(expected)
    for name, tensor in saved.items():
        assert torch.equal(tensor, expected[name]), name
    assert not torch.equal(weights_at_probe[1]["model.embed_tokens.weight"],
                           weights_at_probe[3]["model.embed_tokens.weight"])


def test_without_probes_the_last_step_is_kept(tiny_text_model_dir) -> None:
    stats = json.loads((tiny_text_model_dir / "training.json").read_text())  # the tiny preset probes nothing
    assert stats["heldout_probes"] == [] and stats["kept_step"] == stats["num_steps"] == 24
    assert stats["kept_by"] == "last step" and stats["objective"] == "next-token cross-entropy"
