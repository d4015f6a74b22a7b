"""The LoRA registry and its subscriptions (serve_app/lora_registry.py), without Ray: the calls a deployment
handle would make are made directly. Through Ray, with two ingress replicas: tests/serve_app/test_ingress_replicas.py."""

from __future__ import annotations

import asyncio

import pytest

from pagedserve.serve_app import lora_registry as registry_module
from pagedserve.serve_app.lora_registry import LoraRegistry, LoraSubscription, LoraView


class Subscriber:
    """A replica's side: its subscription, and what it did with each view (an engine replica unloads slowly)."""

    def __init__(self, name: str, registry: LoraRegistry, apply_s: float = 0.0) -> None:
        self.changes: list[tuple[LoraView | None, LoraView]] = []
        self.apply_s = apply_s
        self.subscription = LoraSubscription(lambda epoch, version: registry.updates(name, epoch, version),
                                             self.on_change, retry_s=0.01)

    async def on_change(self, old: LoraView | None, new: LoraView) -> None:
        await asyncio.sleep(self.apply_s)
        self.changes.append((old, new))

    @property
    def adapters(self) -> dict[str, str]:
        return self.subscription.view.adapters


async def _until(predicate, timeout_s: float = 2.0) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout_s)


def test_a_change_is_answered_once_every_live_subscriber_applied_it(monkeypatch) -> None:
    async def run() -> None:
        registry = LoraRegistry({"start": "/adapters/start"})
        ingress, engine = Subscriber("ingress:a", registry), Subscriber("engine:r", registry, apply_s=0.05)
        tasks = [asyncio.create_task(s.subscription.run()) for s in (ingress, engine)]
        await _until(lambda: len(registry.subscribers()) == 2 and all(v == 0 for v in registry.subscribers().values()))
        assert ingress.adapters == engine.adapters == {"start": "/adapters/start"}

        added = await registry.add("late", "/adapters/late")
        assert added.version == 1 and await registry.add("late", "/elsewhere") is None  # a name is taken once
        assert await registry.wait_seen(added.version) == []
        # Both applied it (the engine's slow on_change included) before wait_seen answered.
        assert ingress.adapters == engine.adapters == {"start": "/adapters/start", "late": "/adapters/late"}

        removed = await registry.remove("start")
        assert await registry.remove("start") is None
        assert await registry.wait_seen(removed.version) == []
        old, new = engine.changes[-1]
        assert set(old.adapters) - set(new.adapters) == {"start"} and old.epoch == new.epoch

        # A subscriber that stops polling (its replica died) holds a change up to the timeout; once silent for
        # longer than a poll and the grace, not at all.
        tasks[1].cancel()
        changed = await registry.add("third", "/adapters/third")
        assert await registry.wait_seen(changed.version, timeout_s=0.1) == ["engine:r"]
        monkeypatch.setattr(registry_module, "POLL_S", 0.0)
        monkeypatch.setattr(registry_module, "LIVENESS_GRACE_S", 0.0)
        assert await registry.wait_seen(changed.version, timeout_s=0.1) == []

        # A view fetched directly (an ingress that misses a name) is taken if newer than the one held, not if older.
        late = Subscriber("ingress:b", registry)
        await late.subscription.apply(registry.view())
        assert "third" in late.adapters
        await late.subscription.apply(added)
        assert late.subscription.view.version == changed.version and len(late.changes) == 1
        tasks[0].cancel()

    asyncio.run(run())


def test_a_registry_started_anew_gets_back_what_a_subscriber_knew() -> None:
    async def run() -> None:
        first = LoraRegistry()
        await first.add("a", "/a")
        second = LoraRegistry()  # Serve replaced the registry: it starts from lora_modules (none here)
        polls = iter([first.view(), second.view()])

        async def poll(epoch: str | None, version: int) -> LoraView:
            return next(polls)

        changes: list[tuple[LoraView | None, LoraView]] = []

        async def on_change(old: LoraView | None, new: LoraView) -> None:
            if old is not None and old.epoch != new.epoch:  # what an ingress does: give back what it knew
                new = await second.restore(old.adapters)
            changes.append((old, new))

        subscription = LoraSubscription(poll, on_change, retry_s=0.01)
        task = asyncio.create_task(subscription.run())
        await _until(lambda: len(changes) == 2)
        task.cancel()
        assert changes[1][0].epoch != changes[1][1].epoch
        assert second.view().adapters == {"a": "/a"} and second.view().version == 1

    asyncio.run(run())


class RegistryHandle:
    """What a deployment handle to the registry offers a replica: `.method.remote(...)`, awaitable."""

    def __init__(self, registry: LoraRegistry) -> None:
        self.updates = type("Method", (), {"remote": staticmethod(registry.updates)})()


def test_an_engine_replica_unloads_a_dropped_adapter_once_its_requests_end(tiny_model_path, tmp_path,
                                                                           monkeypatch) -> None:
    """The registry drops an adapter while a request runs under it on an engine replica: the replica has
    applied the change when `wait_seen` answers (new requests for it are refused), and unloads it once that
    request ends."""
    pytest.importorskip("ray")
    from ray import serve

    from pagedserve.config.serve import ServeArgs
    from pagedserve.engine.core.request import SamplingParams
    from pagedserve.serve_app.messages import GenerateRequest, ReplicaError
    from pagedserve.serve_app.replica import EngineReplica

    monkeypatch.setattr(serve, "get_replica_context", lambda: None)  # outside a deployment

    def request(request_id: str, prompt: str) -> GenerateRequest:
        params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        return GenerateRequest(request_id, prompt, params, 4, max_new_tokens=3, lora_name="a", lora_path=str(tmp_path))

    async def run() -> None:
        registry = LoraRegistry({"a": str(tmp_path)})
        replica = EngineReplica(ServeArgs.from_args({
            "model": tiny_model_path, "engine_class": "fake_engine:FakeAsyncEngine", "num_blocks": 64,
            "lora_modules": {"a": str(tmp_path)}}), RegistryHandle(registry))
        await _until(lambda: registry.subscribers() == {"engine:local": 0})
        slow = replica.generate(request("slow", "SLOW lora"))  # 0.2 s a token
        assert not isinstance(await anext(slow), ReplicaError)
        removed = await registry.remove("a")
        assert await registry.wait_seen(removed.version) == []
        assert replica.engine.lora_names() == ["a"]  # still serving the slow request
        refused = [item async for item in replica.generate(request("late", "late lora"))]
        assert isinstance(refused[0], ReplicaError) and "was unloaded" in refused[0].message
        assert all(not isinstance(item, ReplicaError) for item in [item async for item in slow])
        await _until(lambda: replica.engine.lora_names() == [] and not replica._lora_unloading)

    asyncio.run(run())
