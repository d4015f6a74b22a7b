"""What a replica reports to the routers (`EngineReplica.record_routing_stats`), on the replica object itself (no
Ray cluster): each API key's committed blocks, the same worst case as its free blocks, so every ingress's router
charges a key what it holds here (serve_app/router.py)."""

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
from pagedserve.serve_app.replica import EngineReplica, blocks_by_key  # noqa: E402

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


def test_blocks_by_key_sums_each_keys_requests_and_leaves_out_keys_with_none() -> None:
    assert blocks_by_key([("a", 3), ("b", 2), ("a", 4), ("", 1), ("c", 0)]) == {"a": 7, "b": 2, "": 1}
    assert blocks_by_key([]) == {}
