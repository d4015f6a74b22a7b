"""What a replica reports to the routers (`EngineReplica.record_routing_stats`), on the replica object itself (no
Ray cluster): each API key's committed blocks, the same worst case as its free blocks, so every ingress's router
charges a key what it holds here, and its recent peak, which every router weighs as the key's demand
(serve_app/router.py)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
from pagedserve.cache.blocks import blocks_for  # noqa: E402
from pagedserve.config.serve import ServeArgs  # noqa: E402
from pagedserve.engine.core.request import SamplingParams  # noqa: E402
from pagedserve.serve_app.messages import GenerateRequest, ReplicaReport  # noqa: E402
from pagedserve.serve_app.replica import EngineReplica  # noqa: E402

PROMPT = [5, 6, 7, 8, 9]


def _request(request_id: str, api_key_name: str, max_tokens: int) -> GenerateRequest:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return GenerateRequest(request_id, PROMPT, params, len(PROMPT), max_new_tokens=max_tokens,
                           api_key_name=api_key_name)


@pytest.fixture
def replica(tiny_model_path, monkeypatch) -> EngineReplica:
    from ray import serve

    monkeypatch.setattr(serve, "get_replica_context", lambda: None)  # outside a deployment
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))  # fake_engine
    yield EngineReplica(ServeArgs.from_args({"model": tiny_model_path, "engine_class": "fake_engine:FakeAsyncEngine"}))
    sys.modules.pop("fake_engine", None)


def test_the_routing_stats_give_each_keys_committed_blocks_while_its_requests_run(replica: EngineReplica) -> None:
    short, long = blocks_for(len(PROMPT) + 12, replica.block_size), blocks_for(len(PROMPT) + 40, replica.block_size)

    async def run() -> list[dict]:
        streams = [replica.generate(_request("a1", "alice", 12)), replica.generate(_request("a2", "alice", 40)),
                   replica.generate(_request("b1", "bob", 12))]
        for stream in streams:
            await anext(stream)  # started: its blocks are committed until it ends
        seen = [replica.record_routing_stats()]
        await streams[0].aclose()  # a dropped stream ends its request
        seen.append(replica.record_routing_stats())
        for stream in streams[1:]:
            await stream.aclose()
        seen.append(replica.record_routing_stats())
        return seen

    running, one_ended, idle = asyncio.run(run())
    assert running["blocks_by_key"] == {"alice": short + long, "bob": short}
    assert running["num_total_blocks"] - running["num_free_blocks"] == short + long + short  # one worst case
    assert ReplicaReport.from_routing_stats(running).blocks_by_key == {"alice": short + long, "bob": short}
    assert one_ended["blocks_by_key"] == {"alice": long, "bob": short}
    assert idle["blocks_by_key"] == {} and ReplicaReport.from_routing_stats(idle).blocks_by_key == {}
    # Within the fair-share window each key's largest total stays reported, after its requests ended.
    assert idle["peak_blocks_by_key"] == {"alice": short + long, "bob": short}
    assert ReplicaReport.from_routing_stats(idle).peak_blocks_by_key == {"alice": short + long, "bob": short}


def test_a_replica_turns_back_a_key_that_several_routers_sent_past_its_share(replica: EngineReplica) -> None:
    """Routers add only their own requests to the latest report, so two ingresses can together send a key past
    its share; the replica, which holds the exact count, answers `KeyOverShareError` instead of accepting (the
    ingress's fair queue sends the request again later) while another key is owed the room."""
    from pagedserve.serve_app.errors import KeyOverShareError
    from pagedserve.serve_app.messages import Accepted

    total = replica.engine.get_stats().num_total_blocks
    needed = blocks_for(len(PROMPT) + 40, replica.block_size)
    committed = replica._committed_blocks
    committed.add("calm-0", "calm", 1)
    committed.remove("calm-0")  # ended: still owed its block within the window
    committed.add("flood-0", "flood", total - needed)  # what the flood's requests hold: `needed` left free

    async def first_item(request_id: str, key: str) -> object:
        call = replica.submit(_request(request_id, key, 40))
        try:
            return await anext(call)
        finally:
            await call.aclose()

    turned_back = asyncio.run(first_item("flood-1", "flood"))
    assert isinstance(turned_back, KeyOverShareError) and "'flood'" in str(turned_back)
    assert isinstance(asyncio.run(first_item("calm-1", "calm")), Accepted)  # the calm key takes its room
    committed.remove("flood-0")
    assert isinstance(asyncio.run(first_item("flood-2", "flood")), Accepted)
