"""engine/core/limits.py: one fit check and one vocabulary check, with the same message wherever applied."""

from __future__ import annotations

import pytest

from pagedserve.engine.core.limits import CONTEXT, KV_CACHE, check_fits, check_token_ids, too_large
from pagedserve.engine.errors import InvalidRequestError, RequestTooLargeError
from pagedserve.serve_app.messages import ReplicaReport, RoutingDemand
from pagedserve.serve_app.router import FreeBlocksPolicy


def test_the_fit_check_names_both_numbers_and_the_field_to_change() -> None:
    check_fits(100, 28, 128, CONTEXT)
    with pytest.raises(RequestTooLargeError) as error:
        check_fits(100, 29, 128, CONTEXT)
    assert error.value.message.startswith("the request needs 129 tokens (100 in the prompt + 29 to generate) "
                                          "but this model's context holds 128")
    assert error.value.param == "max_tokens"
    with pytest.raises(RequestTooLargeError) as error:
        check_fits(128, 1, 128, CONTEXT)
    assert error.value.param == "prompt"


def test_the_router_refuses_with_the_engines_message() -> None:
    policy = FreeBlocksPolicy(transit_grace_s=0.0)
    policy.update_report("a", ReplicaReport(num_free_blocks=10, num_total_blocks=10, block_size=16))
    decision = policy.decide(["a"], RoutingDemand(150, 20))
    assert decision.kind == "too_large"
    assert decision.message == too_large(150, 20, 160, KV_CACHE).message


def test_token_ids_outside_the_vocabulary() -> None:
    check_token_ids([0, 5, 9], 10, "prompt")
    with pytest.raises(InvalidRequestError, match=r"token id 10 is outside the vocabulary \[0, 10\)") as error:
        check_token_ids([3, 10, 11], 10, "logit_bias")
    assert error.value.param == "logit_bias"
