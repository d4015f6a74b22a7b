"""bench/distillation.py and train_text_model.py --distill-from: the loss against formulas, the agreement count,
and a tiny draft distilled on the CPU from the tiny target (tests/bench/conftest.py), whose training.json holds
the step it kept and an agreement that the saved folders reproduce."""

from __future__ import annotations

import json
import math
from types import ModuleType

import pytest
import torch
from bench_scripts import bench_script


@pytest.fixture(scope="module")
def train_text_model() -> ModuleType:
    yield from bench_script("train_text_model")


@pytest.fixture(scope="module")
def distillation(train_text_model) -> ModuleType:
    import distillation  # bench/ is on sys.path once train_text_model is loaded

    return distillation


def _logits(seed: int, shape: tuple[int, ...] = (2, 5, 7)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2.0


def test_loss_is_the_kl_to_the_target_per_position_and_mixes_in_the_next_token_loss(distillation) -> None:
    draft, target = _logits(0), _logits(1)
    input_ids = torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(2))
    p = torch.softmax(target.double(), -1)
    kl = (p * (torch.log_softmax(target.double(), -1) - torch.log_softmax(draft.double(), -1))).sum(-1)
    expected_kl = kl.mean().item()  # every position, the window's last one too
    loss = distillation.distillation_loss(draft, target, input_ids)
    assert loss.item() == pytest.approx(expected_kl, rel=1e-5)
    # weight 0: the plain next-token loss, as the model computes it (labels shifted, last position dropped).
    cross_entropy = torch.nn.functional.cross_entropy(draft[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
    assert distillation.distillation_loss(draft, target, input_ids, 0.0).item() == pytest.approx(
        cross_entropy.item(), rel=1e-5)
    assert distillation.distillation_loss(draft, target, input_ids, 0.25).item() == pytest.approx(
        0.25 * expected_kl + 0.75 * cross_entropy.item(), rel=1e-5)
    # Zero where the draft's distribution is the target's (logits shifted by a constant).
    assert distillation.distillation_loss(target + 3.0, target, input_ids).item() == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="share the tokenizer"):
        distillation.distillation_loss(_logits(0, (2, 5, 8)), target, input_ids)
    with pytest.raises(ValueError, match="weight"):
        distillation.distillation_loss(draft, target, input_ids, 1.5)


class _FixedLogits(torch.nn.Module):
    """A model whose logits are a function of the input ids alone: logits[b, t] = table[input_ids[b, t]]."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids: torch.Tensor):
        return type("Output", (), {"logits": self.table[input_ids]})()


def test_agreement_counts_positions_whose_argmaxes_match(distillation) -> None:
    target_table = torch.eye(4) * 5.0  # the target predicts the token it reads
    draft_table = target_table.clone()
    draft_table[3] = torch.tensor([0.0, 5.0, 0.0, 0.0])  # after token 3 the draft says 1
    teacher = distillation.Teacher(_FixedLogits(target_table))
    # Positions scored: all but each window's last. Window 1 reads 0, 3, 2 (scores 0, 3); window 2 reads 3, 3, 1.
    batches = [torch.tensor([[0, 3, 2], [3, 3, 1]])]
    result = teacher.agreement(_FixedLogits(draft_table), batches)
    assert result["num_positions"] == 4 and result["agreement"] == 1 / 4  # only the 0 agrees
    assert result["kl_mean"] > 0.0
    same = teacher.agreement(_FixedLogits(target_table.clone()), batches)
    assert same["agreement"] == 1.0 and same["kl_mean"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="weight"):
        distillation.Teacher(_FixedLogits(target_table), weight=-0.1)


def test_a_tokenizer_with_another_vocabulary_is_refused(distillation, tiny_text_model_dir) -> None:
    from transformers import AutoTokenizer

    from pagedserve.demo.model import train_byte_level_bpe

    same = AutoTokenizer.from_pretrained(tiny_text_model_dir)
    distillation.check_same_vocabulary(same, tiny_text_model_dir)
    other = train_byte_level_bpe(["def main():\n    return 0\n" * 20], 300, 64)
    with pytest.raises(SystemExit, match="share its target's tokenizer"):
        distillation.check_same_vocabulary(other, tiny_text_model_dir)


def test_distill_weight_needs_a_target(train_text_model, tmp_path) -> None:
    args = train_text_model.parse_args(["--preset", "tiny", "--out-dir", str(tmp_path), "--distill-weight", "0.5"])
    with pytest.raises(SystemExit, match="needs --distill-from"):
        train_text_model.recipe_from_args(args)


def test_a_draft_distilled_from_the_tiny_target_keeps_its_best_probe_and_reports_its_agreement(
        train_text_model, distillation, tiny_text_model_dir, tmp_path, one_thread) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    draft_dir = tmp_path / "draft"
    assert train_text_model.main(["--preset", "tiny", "--layers", "1", "--steps", "12", "--max-files", "30",
                                  "--eval-every", "4", "--distill-from", str(tiny_text_model_dir),
                                  "--out-dir", str(draft_dir), "--device", "cpu"]) == 0
    stats = json.loads((draft_dir / "training.json").read_text())
    assert stats["distilled_from"] == stats["tokenizer_from"] == str(tiny_text_model_dir)
    assert stats["objective"] == "KL(target || draft)" and stats["recipe"]["distill_weight"] == 1.0
    assert stats["final_loss"] < stats["initial_loss"]
    probes = stats["heldout_probes"]
    assert [probe["step"] for probe in probes] == [4, 8, 12]
    assert all(0.0 <= probe["agreement"] <= 1.0 and probe["kl_mean"] >= 0.0 for probe in probes)
    # The kept step is the probe of the highest agreement (a tie: the later one).
    best = max(probes, key=lambda probe: (probe["agreement"], probe["step"]))
    assert stats["kept_step"] == best["step"] and stats["kept_by"] == "best probe agreement"
    assert 0.0 < stats["target_agreement"] <= 1.0 and math.isfinite(stats["target_kl_mean"])

    # The draft shares the target's tokenizer, and the saved pair reproduces the recorded agreement.
    tokenizer = AutoTokenizer.from_pretrained(draft_dir)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tiny_text_model_dir).get_vocab()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32)
    assert draft.config.num_hidden_layers == 1
    teacher = distillation.Teacher.load(tiny_text_model_dir, torch.device("cpu"))
    texts = [text for _, text in train_text_model.read_heldout(draft_dir / "heldout.jsonl")]
    heldout_ids = train_text_model.encode_documents(tokenizer, texts)[:stats["recipe"]["eval_tokens"]]
    recipe = stats["recipe"]
    again = teacher.agreement(draft, train_text_model.window_batches(heldout_ids, recipe["seq_len"],
                                                                     recipe["batch_size"], torch.device("cpu")))
    assert again["agreement"] == pytest.approx(stats["target_agreement"], abs=1e-9)
    assert again["kl_mean"] == pytest.approx(stats["target_kl_mean"], rel=1e-4)
