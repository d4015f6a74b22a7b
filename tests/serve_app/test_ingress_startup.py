"""An ingress replica fetches the model's tokenizer when it starts, not with its first request.

Unpickling the tokenizer imports transformers and torch: seconds of this replica's event loop, which an
ingress that did it on the first request of a burst spent while it held its share of the burst
(docs/history/benchmarks-2026-11-to-12.md). Checked here without a cluster: the ingress class over
a stand-in deployment handle whose `model_info` call fails until the engine replica is "up".
"""

from __future__ import annotations

import asyncio

import pytest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.filterwarnings("ignore:coroutine .*was never awaited:RuntimeWarning")
from pagedserve.config.serve import ServeArgs  # noqa: E402
from pagedserve.serve_app import ingress as ingress_module  # noqa: E402
from pagedserve.serve_app.ingress import OpenAIIngress  # noqa: E402
from pagedserve.serve_app.messages import ModelInfo  # noqa: E402


class ModelInfoMethod:
    """`handle.model_info`: each `.remote()` takes the next scripted result (an exception is raised)."""

    def __init__(self, results: list) -> None:
        self.results = results
        self.calls = 0

    def remote(self):
        self.calls += 1
        result = self.results.pop(0) if len(self.results) > 1 else self.results[0]

        async def reply():
            if isinstance(result, Exception):
                raise result
            return result

        return reply()


class Handle:
    def __init__(self, results: list) -> None:
        self.model_info = ModelInfoMethod(results)


async def start_ingress(handle: Handle) -> OpenAIIngress:
    # `serve.ingress` makes the constructor a coroutine (Ray actors may have an async __init__).
    ingress = OpenAIIngress.__new__(OpenAIIngress)
    await ingress.__init__(handle, ServeArgs.from_args({}))
    return ingress


def test_the_tokenizer_is_fetched_at_start_and_again_until_a_replica_answers(monkeypatch) -> None:
    monkeypatch.setattr(ingress_module.serve, "get_replica_context", lambda: None)  # outside a replica
    info = ModelInfo("tiny", 128, 16, 64, tokenizer=None)

    async def run() -> None:
        handle = Handle([RuntimeError("no engine replica yet"), RuntimeError("still starting"), info])
        ingress = await start_ingress(handle)
        ingress._prefetch.cancel()  # the real one waits 1 s, then 2 s: run the same loop with short waits
        prefetch = asyncio.create_task(ingress._prefetch_model_info(first_delay_s=0.01, max_delay_s=0.02))
        await asyncio.wait_for(prefetch, 5)
        assert handle.model_info.calls == 3 and ingress._info is info
        assert await ingress.model_info() is info and handle.model_info.calls == 3  # requests reuse it

    asyncio.run(run())


def test_a_request_during_the_prefetch_waits_for_the_same_call(monkeypatch) -> None:
    monkeypatch.setattr(ingress_module.serve, "get_replica_context", lambda: None)
    info = ModelInfo("tiny", 128, 16, 64, tokenizer=None)

    async def run() -> None:
        handle = Handle([info])
        ingress = await start_ingress(handle)
        assert await ingress.model_info() is info  # while the prefetch task is under way or done
        await asyncio.wait_for(ingress._prefetch, 5)
        assert handle.model_info.calls == 1

    asyncio.run(run())
