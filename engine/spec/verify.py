"""Verification of proposed tokens against the target model's own choices, one rule for greedy and sampling.

The target model scores the last known token and the k proposals in one forward: k + 1 rows of logits.
The sampler picks a token from every row exactly as it would without speculation (greedy: the argmax;
sampling: the exponential race `argmax(p / E)` with the request's own noise for that output position).
Proposal j is accepted while every earlier one was and the target's token of row j equals it; the
committed tokens are the target's tokens of rows 0..a (a accepted proposals, then one more: the target's
correction, or the bonus token after all k).

For a deterministic proposer (n-gram: q is a point mass on d) this is standard speculative rejection
sampling: d is accepted with probability P(argmax(p / E) = d) = p(d) = min(1, p(d) / q(d)), and on rejection
the token is the race's winner among the others, distributed as p with d removed, renormalized: the residual
max(p - q, 0) normalized. Every committed token is the one plain decoding would have drawn with the same
noise, so a seeded request's output is the same with and without speculation (given equal logits).
The draft-model proposer (draft.py) proposes its greedy tokens, point masses too; a sampled draft (q not a
point mass) would need the general rule, not built.
"""

from __future__ import annotations


def num_accepted(target_token_ids: list[int], draft_token_ids: list[int]) -> int:
    """How many leading proposals equal the target's tokens (`target_token_ids` has one more row)."""
    if len(target_token_ids) != len(draft_token_ids) + 1:
        raise ValueError(f"{len(draft_token_ids)} proposals need {len(draft_token_ids) + 1} target tokens, "
                         f"got {len(target_token_ids)}")
    accepted = 0
    for target, draft in zip(target_token_ids, draft_token_ids):
        if target != draft:
            break
        accepted += 1
    return accepted
