"""The ingress applies the engine's rules, not copies: its 400 for a request too large carries
engine/core/limits.py's message (the router's refusal of the same request reads the same), and the
router's affinity key it computes is the cache's chained key of the first prompt block. No cluster:
the ingress's checks read only their arguments."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")
pytestmark = pytest.mark.filterwarnings("ignore:coroutine .*was never awaited:RuntimeWarning")
from pagedserve.cache.prefix_cache import extend_block_hashes  # noqa: E402
from pagedserve.engine.core.limits import CONTEXT, KV_CACHE, too_large  # noqa: E402
from pagedserve.engine.core.request import SamplingParams  # noqa: E402
from pagedserve.serve_app.api_errors import APIError  # noqa: E402
from pagedserve.serve_app.ingress import OpenAIIngress  # noqa: E402
from pagedserve.serve_app.messages import ModelInfo, ReplicaReport  # noqa: E402
from pagedserve.serve_app.router import FreeBlocksPolicy  # noqa: E402

BLOCK_SIZE = 16
NUM_BLOCKS = 8  # 128 tokens of KV cache
CACHE_TOKENS = BLOCK_SIZE * NUM_BLOCKS


def ingress() -> OpenAIIngress:
    return OpenAIIngress.__new__(OpenAIIngress)  # check_length and make_request read no ingress state


def test_the_ingress_refuses_with_the_engines_message_naming_both_numbers() -> None:
    info = ModelInfo("tiny", 256, BLOCK_SIZE, 64, tokenizer=None)
    assert ingress().check_length(info, 200, 56) == 56
    with pytest.raises(APIError) as error:
        ingress().check_length(info, 200, 57)
    expected = too_large(200, 57, 256, CONTEXT)
    assert error.value.status_code == 400
    assert (error.value.message, error.value.param) == (expected.message, expected.param)
    assert "257 tokens" in error.value.message and "holds 256" in error.value.message


def test_the_ingress_and_the_router_refuse_a_request_beyond_the_cache_alike() -> None:
    # max_tokens left out: the rest of the context, capped by the cache, which is smaller than the context.
    info = ModelInfo("tiny", 1024, BLOCK_SIZE, NUM_BLOCKS, tokenizer=None)
    assert ingress().check_length(info, CACHE_TOKENS - 1, None) == 1
    with pytest.raises(APIError) as error:
        ingress().check_length(info, CACHE_TOKENS, None)
    policy = FreeBlocksPolicy(transit_grace_s=0.0)
    policy.update_report("a", ReplicaReport(num_free_blocks=NUM_BLOCKS, num_total_blocks=NUM_BLOCKS,
                                            block_size=BLOCK_SIZE))
    request = ingress().make_request(info, "r", list(range(CACHE_TOKENS)), list(range(CACHE_TOKENS)),
                                     SamplingParams(max_tokens=1))
    decision = policy.decide(["a"], request.routing_demand)
    assert decision.kind == "too_large"
    assert error.value.message == decision.message == too_large(CACHE_TOKENS, 1, CACHE_TOKENS, KV_CACHE).message


def test_the_ingress_keys_a_request_by_the_caches_first_block_hash() -> None:
    info = ModelInfo("tiny", 256, BLOCK_SIZE, 64, tokenizer=None)
    tokens = list(range(7, 7 + 40))
    chain: list[bytes] = []
    extend_block_hashes(chain, tokens, BLOCK_SIZE)
    request = ingress().make_request(info, "r", tokens, tokens, SamplingParams(max_tokens=4, n=2))
    assert request.prefix_key == request.routing_demand.prefix_key == chain[0]
    assert request.routing_demand.max_new_tokens == 8  # n completions, each with its own blocks
    short = ingress().make_request(info, "s", tokens[:BLOCK_SIZE - 1], tokens[:BLOCK_SIZE - 1], SamplingParams())
    assert short.prefix_key is None  # no full block: nothing a replica's prefix cache could hold
