"""The service's LoRA adapters, one list for every ingress replica and every engine replica.

`POST /v1/load_lora_adapter` reaches one ingress replica of several (`ingress_num_replicas`), and each engine
replica holds its own adapters. Ray Serve LLM and vLLM serve adapters across replicas the same way: an
adapter is loaded lazily by the engine replica a request for it lands on, from a path every ingress knows
(Ray Serve LLM's `dynamic_lora_loading_path`, vLLM's LoRA resolvers). Here that knowledge is held by one small
deployment, `LoraRegistry` (one replica, no CPU), bound into the application when LoRA is on:

- It holds name -> path, starting from `lora_modules`, changed by `add` and `remove` (the ingress's load and
  unload routes); each change bumps `version`. `epoch` names this registry's life: a registry that Serve
  replaces starts a new one.
- Every ingress replica and every engine replica keeps a copy through a `LoraSubscription`: a long poll
  (`updates`) that answers as soon as the version moves past the one the subscriber has (or after
  `POLL_S` with the same view). Each poll also tells the registry which version that subscriber has seen,
  so `wait_seen(version)` can wait until every live subscriber has applied a change: the ingress answers a
  load or an unload only then. After a 200 from the load route every ingress serves the adapter by name;
  after a 200 from the unload route every ingress answers 404 for it and every engine replica has
  unloaded it (or refuses it and unloads it when its last request under it ends).
- A subscriber is live while it polls: one not heard from for `POLL_S + LIVENESS_GRACE_S` (a replica that
  died or was removed) is not waited for, and `wait_seen` gives up on stragglers after `ACK_TIMEOUT_S`.
- Engine replicas load adapters lazily, as before: each request for an adapter carries its path.
- The list lives in the registry's one replica. If Serve replaces it, the new one starts from `lora_modules`;
  each ingress then gives it back the adapters it knew (`restore`), and engine replicas unload nothing
  across the change of epoch.

The registry and the subscription are plain classes: Serve wraps the first as a deployment (serve_app/app.py)
and the replicas pass the second their handle's calls; tests drive both directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

logger = logging.getLogger("ray.serve")

POLL_S = 10.0  # a long poll answers after this with the same view when nothing changed
LIVENESS_GRACE_S = 5.0  # a subscriber silent for POLL_S + this is gone
ACK_TIMEOUT_S = 5.0  # wait_seen's longest wait for a live subscriber
RETRY_S = 1.0  # a subscription's wait after a failed poll (the registry restarting)


@dataclass(frozen=True)
class LoraView:
    """The registry's adapters (name -> path) at `version` of `epoch`."""

    epoch: str
    version: int
    adapters: dict[str, str] = field(default_factory=dict)

    def is_newer_than(self, other: "LoraView | None") -> bool:
        return other is None or other.epoch != self.epoch or self.version > other.version


class LoraRegistry:
    """Name -> path of every adapter the service serves, and which version each subscriber has seen."""

    def __init__(self, lora_modules: dict[str, str] | None = None) -> None:
        self._adapters = dict(lora_modules or {})
        self._epoch = uuid.uuid4().hex
        self._version = 0
        self._changed = asyncio.Condition()  # a change, or a subscriber's poll
        self._seen: dict[str, tuple[int, float]] = {}  # subscriber -> (version it has, time of its latest poll)

    def view(self) -> LoraView:
        return LoraView(self._epoch, self._version, dict(self._adapters))

    async def add(self, name: str, path: str) -> LoraView | None:
        """Register an adapter; None if the name is taken."""
        if name in self._adapters:
            return None
        self._adapters[name] = path
        return await self._bump()

    async def remove(self, name: str) -> LoraView | None:
        """Forget an adapter; None if there is none by that name."""
        if self._adapters.pop(name, None) is None:
            return None
        return await self._bump()

    async def restore(self, adapters: dict[str, str]) -> LoraView:
        """Adapters a subscriber knew from this registry's previous life (names already here stay as they are)."""
        missing = {name: path for name, path in adapters.items() if name not in self._adapters}
        if not missing:
            return self.view()
        self._adapters.update(missing)
        logger.info("LoRA registry: %d adapters restored (%s)", len(missing), ", ".join(sorted(missing)))
        return await self._bump()

    async def _bump(self) -> LoraView:
        self._version += 1
        async with self._changed:
            self._changed.notify_all()
        return self.view()

    async def updates(self, subscriber: str, epoch: str | None, version: int, timeout_s: float = POLL_S) -> LoraView:
        """The long poll: the view once it is newer than (`epoch`, `version`), which the subscriber has seen
        (or the same view after `timeout_s`)."""
        has = version if epoch == self._epoch else -1
        now = time.monotonic()
        # Forget replicas that ended: the table would otherwise grow with every replica ever started.
        for gone in [name for name, (_, at) in self._seen.items() if now - at >= POLL_S + LIVENESS_GRACE_S]:
            del self._seen[gone]
        self._seen[subscriber] = (has, now)
        async with self._changed:
            self._changed.notify_all()  # wait_seen re-counts
            if has >= self._version:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait_for(lambda: self._version > has), timeout_s)
        return self.view()

    def subscribers(self) -> dict[str, int]:
        """Live subscribers and the version each has seen."""
        now = time.monotonic()
        return {name: version for name, (version, polled_at) in self._seen.items()
                if now - polled_at < POLL_S + LIVENESS_GRACE_S}

    async def wait_seen(self, version: int, timeout_s: float = ACK_TIMEOUT_S) -> list[str]:
        """Wait until every live subscriber has seen `version`; the ones that had not after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        async with self._changed:
            while True:
                behind = sorted(name for name, seen in self.subscribers().items() if seen < version)
                left_s = deadline - time.monotonic()
                if not behind or left_s <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left_s)
        if behind:
            logger.warning("LoRA registry: version %d not yet seen by %s after %.0f s", version, behind, timeout_s)
        return behind


Poll = Callable[[str | None, int], Awaitable[LoraView]]


class LoraSubscription:
    """One replica's copy of the registry. `poll(epoch, version)` is the registry's `updates` for this
    subscriber (through a deployment handle); `on_change(old, new)` runs for every newer view before the next
    poll says it was seen, so what it does (an engine replica's unloads) is done when `wait_seen` returns."""

    def __init__(self, poll: Poll, on_change: Callable[[LoraView | None, LoraView], Awaitable[None]],
                 retry_s: float = RETRY_S) -> None:
        self._poll = poll
        self._on_change = on_change
        self._retry_s = retry_s
        self.view: LoraView | None = None
        self._applying = asyncio.Lock()

    async def apply(self, view: LoraView) -> None:
        """Take `view` if it is newer than the one held (a poll's answer, or a view fetched directly)."""
        async with self._applying:
            if view.is_newer_than(self.view):
                old, self.view = self.view, view
                try:
                    await self._on_change(old, view)
                except Exception:  # noqa: BLE001 - the subscription must go on; the change is logged
                    logger.exception("applying LoRA registry version %d failed", view.version)

    async def run(self) -> None:
        """Poll until cancelled (the replica ends)."""
        while True:
            try:
                view = await self._poll(None if self.view is None else self.view.epoch,
                                        -1 if self.view is None else self.view.version)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the registry is restarting or not up yet: try again
                logger.debug("LoRA registry poll failed (%s); again in %.1f s", exc, self._retry_s)
                await asyncio.sleep(self._retry_s)
                continue
            await self.apply(view)
