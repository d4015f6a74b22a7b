"""A draft model taught by its target: token-level knowledge distillation for bench/train_text_model.py.

Speculative decoding accepts a draft's proposal where it equals the target's own choice (greedy in
bench/spec_bench.py), so a draft is good to the extent that it predicts the target, not the text. Trained on the
corpus's next tokens, a draft learns the corpus instead; and the corpus is small enough (Python's stdlib text) that a
minutes-long budget is dozens of epochs, so it learns the training files by heart and matches the target on new
text ever less.

The scheme here: on the same random corpus windows the draft would train on, the target (eval mode, no gradient,
in the same process and autocast as the draft) gives its next-token distribution at every position, and the loss
is the forward KL divergence KL(target || draft), summed over the vocabulary and averaged over positions (equal to
the cross-entropy against the target's soft labels up to the target's entropy, a constant for the draft). Why this
and not sequence-level distillation (the target generates greedy continuations, the draft trains on them):
- the soft labels say where the target puts its top choice (what greedy acceptance checks) and how sure it is, at
  every position, where a generated sequence gives one token a position;
- one batched target forward a step, where generating the same number of tokens takes one forward a token;
- soft targets are harder to memorise than the corpus's exact next tokens, which is what overfitted the draft.
`weight` < 1 mixes in the plain next-token loss: weight * KL + (1 - weight) * cross-entropy on the corpus tokens.

`agreement` is the greedy acceptance proxy: the share of held-out positions where the draft's argmax equals the
target's. It is teacher-forced on real text, where the engine's drafts run on the target's own output, and it
counts every position alone, where a round stops at the first miss; it ranks drafts, it does not predict the
acceptance rate exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F


def distillation_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor, input_ids: torch.Tensor,
                      weight: float = 1.0) -> torch.Tensor:
    """weight * KL(target || draft) per position + (1 - weight) * next-token cross-entropy, in float32.

    The logits are (batch, positions, vocab) over `input_ids` (batch, positions). KL counts every position (the
    target's distribution after a window's last token is as good a label as any); the cross-entropy, as the
    model's own loss, every position but the last (its next token is outside the window)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    if draft_logits.shape != target_logits.shape:
        raise ValueError(f"draft logits {tuple(draft_logits.shape)} and target logits "
                         f"{tuple(target_logits.shape)} differ: do draft and target share the tokenizer?")
    draft_log_probs = torch.log_softmax(draft_logits.float(), dim=-1).flatten(0, 1)
    loss = draft_log_probs.new_zeros(())
    if weight > 0.0:
        target_log_probs = torch.log_softmax(target_logits.float(), dim=-1).flatten(0, 1)
        # batchmean: the sum over the vocabulary and positions, over the number of positions (rows).
        loss = loss + weight * F.kl_div(draft_log_probs, target_log_probs, reduction="batchmean", log_target=True)
    if weight < 1.0:
        positions = draft_logits.shape[1]
        shifted = draft_log_probs.unflatten(0, draft_logits.shape[:2])[:, :positions - 1].flatten(0, 1)
        loss = loss + (1.0 - weight) * F.nll_loss(shifted, input_ids[:, 1:].flatten())
    return loss


class Teacher:
    """The target a draft learns from; owns the target model (frozen, eval mode) on the draft's device."""

    def __init__(self, model: torch.nn.Module, weight: float = 1.0) -> None:
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"distill weight must be in [0, 1], got {weight}")
        self.model = model.eval().requires_grad_(False)
        self.weight = weight

    @classmethod
    def load(cls, target_dir: Path, device: torch.device, weight: float = 1.0) -> Teacher:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).to(device)
        return cls(model, weight)

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def loss(self, draft: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """The draft's training loss on a batch of windows (run under the caller's autocast)."""
        with torch.no_grad():
            target_logits = self.model(input_ids=input_ids).logits
        draft_logits = draft(input_ids=input_ids).logits
        return distillation_loss(draft_logits, target_logits, input_ids, self.weight)

    @torch.no_grad()
    def agreement(self, draft: torch.nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, float]:
        """Over batches of windows: the share of positions where the draft's argmax is the target's (`agreement`)
        and the mean KL(target || draft) in nats (`kl_mean`). The positions are those perplexity scores: all but
        each window's last."""
        num_agreeing = 0
        kl_sum = 0.0
        num_positions = 0
        was_training = draft.training
        draft.eval()
        try:
            for input_ids in batches:
                draft_logits = draft(input_ids=input_ids).logits[:, :-1].float()
                target_logits = self.model(input_ids=input_ids).logits[:, :-1].float()
                num_agreeing += (draft_logits.argmax(-1) == target_logits.argmax(-1)).sum().item()
                kl_sum += F.kl_div(torch.log_softmax(draft_logits, -1), torch.log_softmax(target_logits, -1),
                                   reduction="sum", log_target=True).item()
                num_positions += draft_logits.shape[0] * draft_logits.shape[1]
        finally:
            draft.train(was_training)
        if num_positions == 0:
            raise ValueError("no positions to compare: every window is a single token")
        return {"agreement": num_agreeing / num_positions, "kl_mean": kl_sum / num_positions,
                "num_positions": num_positions}


def check_same_vocabulary(tokenizer, target_dir: Path) -> None:
    """A draft must tokenize as its target does: its proposals are token ids the target verifies."""
    from transformers import AutoTokenizer

    target_tokenizer = AutoTokenizer.from_pretrained(target_dir)
    if tokenizer.get_vocab() != target_tokenizer.get_vocab():
        raise SystemExit(f"the tokenizer differs from {target_dir}'s ({len(tokenizer)} vs {len(target_tokenizer)} "
                         "tokens): a distilled draft must share its target's tokenizer (drop --tokenizer-from)")
