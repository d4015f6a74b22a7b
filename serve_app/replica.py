"""`EngineReplica`: the deployment that owns one `AsyncLLMEngine` (one per GPU, or per CPU slot).

The ingress starts each request with `submit` (routed by `FreeBlocksRequestRouter`) and reads the deltas
of all its requests here through one `channel` call (serve_app/stream_channel.py); `generate` streams one
request's deltas on its own call, for callers without a channel. Engine errors become `ReplicaError` items,
so a failed request never breaks the replica; a request whose call is cancelled or dropped is aborted (the
engine frees its blocks). Free/total KV blocks and queue sizes go to the routers through Ray Serve's
`record_routing_stats` hook (serve_app/router.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib
import json
import logging
import time
from typing import Any, AsyncIterator, Iterator

from ray import serve
from ray.serve.handle import DeploymentHandle

from pagedserve.cache.blocks import blocks_for
from pagedserve.config.serve import ServeArgs
from pagedserve.engine.errors import EngineDeadError, InvalidRequestError, RequestTooLargeError
from pagedserve.engine.core.request import RequestOutput, merge_delta

from pagedserve.serve_app.autoscaling import (
    INGRESS_HELD_TTL_S,
    KV_CACHE_USAGE_METRIC,
    NUM_HELD_IN_INGRESSES_METRIC,
    NUM_RUNNING_METRIC,
    NUM_WAITING_METRIC,
)
from pagedserve.serve_app.metrics import ReplicaMetrics, RequestTiming
from pagedserve.serve_app.engine_protocol import ServingEngine
from pagedserve.serve_app.errors import KeyOverShareError
from pagedserve.serve_app.key_shares import CommittedBlocks
from pagedserve.serve_app.lora_registry import LoraSubscription, LoraView
from pagedserve.serve_app.channel_socket import ChannelAddress, ChannelServer, node_ip
from pagedserve.serve_app.loop_lag import watch_loop_lag
from pagedserve.serve_app.messages import Accepted, ChannelMessage, ChannelOpen, GenerateRequest, ModelInfo, ReplicaError
from pagedserve.serve_app.stream_channel import Outboxes, for_the_wire, is_last

logger = logging.getLogger("ray.serve")

# How long a request's call waits for its last item to leave on a channel (`EngineReplica.submit`).
LAST_ITEM_SENT_TIMEOUT_S = 5.0

# A request received within this long is listed in the routing stats (`recent_request_ids`): routers then know
# the report counts it. Past the routers' transit grace (router.py), with room for a report's delay.
RECENT_ARRIVALS_S = 2.0


def log_engine_through_serve() -> None:
    """The engine's `pagedserve.*` records into this replica's Serve log, at its level and in its format.

    Left alone they reach only the root logger, which drops INFO, and the engine's start-up account (model
    loaded, memory plan, kernels compiled, graphs captured) never showed in a replica's log. The engine
    core process takes the level from here too.
    """
    serve_logger = logging.getLogger("ray.serve")
    engine_logger = logging.getLogger("pagedserve")
    engine_logger.setLevel(serve_logger.getEffectiveLevel())
    for handler in serve_logger.handlers:
        if handler not in engine_logger.handlers:
            engine_logger.addHandler(handler)
    engine_logger.propagate = not serve_logger.handlers  # Serve's handlers, or the root's when it has none


class EngineReplica:
    """Owns one engine. Methods are called through a DeploymentHandle routed by `FreeBlocksRequestRouter`."""

    def __init__(self, serve_args: ServeArgs, lora_registry: DeploymentHandle | None = None) -> None:
        log_engine_through_serve()
        context = serve.get_replica_context()
        rank = context.rank.rank if context is not None and context.rank is not None else 0
        self.engine_config = serve_args.engine_config_for_rank(rank)
        module_name, _, class_name = serve_args.engine_class.partition(":")
        engine_cls = getattr(importlib.import_module(module_name), class_name)  # heavy: torch, transformers
        self.engine: ServingEngine = engine_cls.from_config(self.engine_config)
        if not isinstance(self.engine, ServingEngine):
            raise TypeError(f"{serve_args.engine_class} does not offer what a replica needs (serve_app/engine_protocol.py)")
        self.replica_tag = context.replica_tag if context is not None else "local"
        # What routers call this replica (ChannelOpen names it); unique across the deployment's lifetime.
        self.replica_id = context.replica_id.unique_id if context is not None else "local"
        self.outboxes = Outboxes()
        self._channel_server = ChannelServer(self.outboxes, node_ip=node_ip())  # listens once an ingress asks
        self._finished_by_reason: collections.Counter[str] = collections.Counter()  # requests ended, by reason
        # Worst-case blocks of every request this replica holds (prompt + n * max_tokens), by API key too: the
        # engine's free blocks only show what is allocated so far, not what running requests will grow to.
        self._committed_blocks = CommittedBlocks(serve_args.router.fair_share_window_s, time.monotonic)
        self._recent_arrivals: collections.deque[tuple[float, str]] = collections.deque()  # (monotonic s, id)
        # Each ingress's latest count of requests its fair queue held back, and when it came (autoscaling).
        self._held_by_ingress: dict[str, tuple[int, float]] = {}
        self.log_prompts = serve_args.log_prompts
        self._lora_lock = asyncio.Lock()  # one run-time adapter load at a time (two requests may want one)
        # The service's adapters (serve_app/lora_registry.py): one the registry dropped is unloaded here, or,
        # while requests still run under it, refused to new ones and unloaded when they end.
        self._lora_unloading: set[str] = set()
        self._lora_tasks: set[asyncio.Task] = set()
        if lora_registry is not None:
            subscriber = f"engine:{self.replica_id}"
            subscription = LoraSubscription(
                lambda epoch, version: lora_registry.updates.remote(subscriber, epoch, version), self._lora_changed)
            self._start(subscription.run())
        self.metrics = ReplicaMetrics(
            model_name=serve_args.served_model_name or self.engine.model_name, replica=self.replica_tag
        )
        self.engine.add_step_listener(self.metrics.observe_step)
        # Every stream's deltas pass through this replica's event loop: how late it runs (a metric).
        self._loop_lag_task: asyncio.Task | None = None
        with contextlib.suppress(RuntimeError):  # no running loop: built outside a Serve replica
            self._loop_lag_task = asyncio.get_running_loop().create_task(watch_loop_lag(self.metrics.loop_lag))
        stats = self.engine.get_stats()
        self.metrics.observe(stats)
        self.block_size = stats.block_size
        logger.info(
            "replica %s (rank %d) serving %s: %d KV blocks of %d tokens, max_model_len %d",
            self.replica_tag, rank, self.engine.model_name, stats.num_total_blocks, stats.block_size,
            self.engine.max_model_len,
        )

    async def submit(self, request: GenerateRequest) -> AsyncIterator[Accepted | KeyOverShareError]:
        """Run one request for the ingress replica `request.reply_to`: `Accepted` first, then every item goes
        to that ingress's outbox (its channel sends it); the call ends after the last one. Cancelling the
        call aborts the request. A request turned back gets `KeyOverShareError` as its only item (sent, not
        raised: a turn-back is routine under a flood, not an error for Serve to log)."""
        self._held_by_ingress[request.reply_to] = (request.num_held_by_ingress, time.monotonic())
        num_blocks = self._blocks_of(request)
        if not self._committed_blocks.leaves_others_room(request.api_key_name, num_blocks,
                                                         self.engine.get_stats().num_total_blocks):
            # Several ingresses' routers sent this key past its share here within one report period: the
            # sending ingress's fair queue holds the request and sends it again (serve_app/fair_queue.py).
            yield KeyOverShareError(f"API key {request.api_key_name!r} would take room other keys are owed on "
                                    f"replica {self.replica_id}")
            return
        # Committed before the first await, so the next request's check counts this one.
        last_sent: asyncio.Future | None = None
        with self._committed(request, num_blocks), self.outboxes.request(request.reply_to) as outbox:
            yield Accepted(self.replica_id)
            async for item in self._run(request):
                item = for_the_wire(item) if isinstance(item, RequestOutput) else item
                outbox.put(request.request_id, item)
                if is_last(item):
                    last_sent = outbox.when_sent(request.request_id)
        if last_sent is not None:
            # Serve drains a replica by waiting for its calls, and a socket channel is none: so this call ends once
            # its last item is on its way to the ingress, not when it is queued (a replica removed right after
            # would take it along). An ingress that never opens its channel again holds it no longer than this.
            try:
                async with asyncio.timeout(LAST_ITEM_SENT_TIMEOUT_S):
                    await last_sent
            except TimeoutError:
                pass
            finally:
                outbox.forget_sent(request.request_id)

    def _blocks_of(self, request: GenerateRequest) -> int:
        """The request's worst case here: prompt + n * max_tokens, in blocks."""
        return blocks_for(request.routing_demand.num_tokens, self.block_size)

    @contextlib.contextmanager
    def _committed(self, request: GenerateRequest, num_blocks: int) -> Iterator[None]:
        """The request's blocks count as committed (routing stats, the share check) until it ends."""
        self._committed_blocks.add(request.request_id, request.api_key_name, num_blocks)
        try:
            yield
        finally:
            self._committed_blocks.remove(request.request_id)

    async def channel_address(self, channel: ChannelOpen) -> ChannelAddress | None:
        """Where `channel.ingress_id` reads this replica's stream channel over a TCP connection of its own
        (serve_app/channel_socket.py): loopback for an ingress on this node, the node's address for another;
        None where it cannot listen for it (then `channel`, a Ray call)."""
        return await self._channel_server.address_for(channel.ingress_node_ip)

    async def channel(self, channel: ChannelOpen) -> AsyncIterator[ChannelMessage]:
        """The stream channel to one ingress replica: each message holds every item its requests produced
        since the previous one, (request id, item) in order; it lasts until the ingress cancels it."""
        async for message in self.outboxes.channel(channel.ingress_id):
            yield message

    def serving_stats(self) -> dict[str, Any]:
        """Stream channels open, messages sent on them, requests ended by reason (stop, length, abort, error,
        rejected) and prompt tokens looked up in and found in the prefix cache, under this replica's tag: what it
        saw, for diagnostics and for tests to hold against a client's."""
        stats = self.engine.get_stats()
        return {**self.outboxes.stats(), "finished_by_reason": dict(self._finished_by_reason),
                "replica": self.replica_tag, "prefix_cache_queries": stats.num_prefix_cache_queries_total,
                "prefix_cache_hits": stats.num_prefix_cache_hits_total}

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput | ReplicaError]:
        """Stream one request's deltas on this call (for callers without a channel); its blocks count as
        committed while it runs, as a submitted request's do."""
        with self._committed(request, self._blocks_of(request)):
            async for item in self._run(request):
                yield item

    async def _run(self, request: GenerateRequest) -> AsyncIterator[RequestOutput | ReplicaError]:
        """Stream the engine's deltas; on any exit before the end, abort so the blocks return."""
        is_finished = False
        timing = RequestTiming(request.request_id)
        self._recent_arrivals.append((time.monotonic(), request.request_id))
        prompt = request.prompt if request.prompt_token_ids is None else request.prompt_token_ids
        stream = self._engine_stream(request, prompt)
        try:
            async with contextlib.aclosing(stream):
                held: RequestOutput | None = None  # deltas merged for a non-streaming request
                sent_first = False
                async for output in stream:
                    is_finished = output.finished
                    timing.add_delta(output)
                    if not request.stream and sent_first:
                        held = output if held is None else merge_delta(held, output)
                        if not is_finished:
                            continue
                        output, held = held, None
                    yield output
                    sent_first = True
        except RequestTooLargeError as exc:
            timing.finish_reason = "rejected"
            yield ReplicaError(400, "invalid_request_error", exc.message, exc.param)
        except InvalidRequestError as exc:
            timing.finish_reason = "rejected"
            yield ReplicaError(400, "invalid_request_error", exc.message, exc.param)
        except EngineDeadError as exc:
            timing.finish_reason = "error"
            yield ReplicaError(503, "service_unavailable", f"engine is not running: {exc}")
        except Exception as exc:  # one request's failure must not take the replica down
            timing.finish_reason = "error"
            logger.exception("request %s failed", request.request_id)
            yield ReplicaError(500, "internal_server_error", f"request failed: {type(exc).__name__}: {exc}")
        finally:
            if not is_finished and timing.finish_reason is None:
                timing.finish_reason = "abort"
            self._record_request(timing, request)
            if not is_finished:
                # The consumer left (client disconnect, cancellation): free the request's blocks now.
                with contextlib.suppress(Exception):
                    await self.engine.abort(request.request_id)

    async def _engine_stream(self, request: GenerateRequest, prompt: str | list[int]) -> AsyncIterator[RequestOutput]:
        """The engine's deltas; a LoRA request first loads its adapter here if this replica lacks it."""
        lora = {}
        if request.lora_name is not None:
            await self._hold_lora(request.lora_name, request.lora_path)
            lora = {"lora": request.lora_name}
        stream = self.engine.generate(prompt, request.sampling_params, request.request_id,
                                      continuation=request.continuation, priority=request.priority, **lora)
        async with contextlib.aclosing(stream):
            async for output in stream:
                yield output

    def _lora_names(self) -> list[str]:
        names = getattr(self.engine, "lora_names", None)  # engines without LoRA (test fakes) hold none
        return names() if names is not None else []

    def _start(self, work: Any) -> None:
        with contextlib.suppress(RuntimeError):  # no running loop: built outside a Serve replica
            task = asyncio.get_running_loop().create_task(work)
            self._lora_tasks.add(task)
            task.add_done_callback(self._lora_tasks.discard)

    async def _lora_changed(self, old: LoraView | None, new: LoraView) -> None:
        """Unload what the registry dropped: since the last view of the same registry, or, in the first view,
        start-up adapters (`lora_modules`) unloaded before this replica started. A registry that started anew
        has lost run-time adapters until the ingresses give them back: nothing is unloaded for that."""
        if old is None:
            gone = set(self.engine_config.lora_modules or {}) - set(new.adapters)
        elif old.epoch != new.epoch:
            gone = set()
        else:
            gone = {name for name, path in old.adapters.items() if new.adapters.get(name) != path}
        for name in gone & set(self._lora_names()):
            self._lora_unloading.add(name)
            if not await self._unload_lora(name):
                self._start(self._unload_lora_when_idle(name))

    async def _unload_lora(self, name: str) -> bool:
        """Unload an adapter the service dropped; False while requests still run under it."""
        async with self._lora_lock:
            try:
                if name in self._lora_names():
                    await self.engine.unload_lora_adapter(name)
                    logger.info("LoRA adapter %r unloaded (the service dropped it)", name)
            except InvalidRequestError:  # still serving requests
                return False
            except Exception:  # noqa: BLE001 - a dead engine holds nothing anyway
                logger.exception("unloading LoRA adapter %r failed", name)
            self._lora_unloading.discard(name)
            return True

    async def _unload_lora_when_idle(self, name: str, period_s: float = 0.5) -> None:
        while not await self._unload_lora(name):
            await asyncio.sleep(period_s)

    async def _hold_lora(self, name: str, path: str | None) -> None:
        async with self._lora_lock:
            if name in self._lora_unloading:
                raise InvalidRequestError(f"the LoRA adapter {name!r} was unloaded", param="model")
            if name in self._lora_names():
                return
            if path is None:
                raise InvalidRequestError(f"the LoRA adapter {name!r} is not loaded on this replica", param="model")
            started = time.perf_counter()
            await self.engine.load_lora_adapter(name, path)
            logger.info("LoRA adapter %r loaded from %s in %.2f s (asked for by a request)", name, path,
                        time.perf_counter() - started)

    async def load_lora_adapter(self, name: str, path: str) -> ReplicaError | None:
        """vLLM's load_lora_adapter on this replica; a ReplicaError (400) when the engine refuses it."""
        try:
            await self._hold_lora(name, path)
        except InvalidRequestError as exc:
            return ReplicaError(400, "invalid_request_error", exc.message, exc.param)
        return None

    def _record_request(self, timing: RequestTiming, request: GenerateRequest) -> None:
        """Histograms and one structured INFO line per request; the prompt only with `log_prompts`."""
        self._finished_by_reason[timing.finish_reason or "unknown"] += 1
        try:
            if timing.finish_reason != "rejected":
                self.metrics.observe_request(timing, request.lora_name)
            fields = timing.log_fields(self.replica_tag, request.prompt if self.log_prompts else None)
            logger.info("request_finished %s", json.dumps(fields, separators=(",", ":")))
        except Exception:  # noqa: BLE001 - observability must never fail a request
            logger.debug("recording request %s failed", request.request_id, exc_info=True)

    def model_info(self) -> ModelInfo:
        stats = self.engine.get_stats()
        return ModelInfo(
            model_name=self.engine.model_name,
            max_model_len=self.engine.max_model_len,
            block_size=stats.block_size,
            num_total_blocks=stats.num_total_blocks,
            tokenizer=self.engine.tokenizer,
            lora_names=tuple(self._lora_names()),
        )

    def get_stats(self) -> Any:
        return self.engine.get_stats()

    def record_routing_stats(self) -> dict[str, Any]:
        """Ray Serve calls this every `request_routing_stats_period_s`; routers read the result.

        `num_free_blocks` is what is free once every held request reaches its max_tokens (never more than
        the engine's free blocks now), the same worst case the router reserves for requests it sends;
        `blocks_by_key` splits those committed blocks by the API key that sent each request, and
        `peak_blocks_by_key` gives each key's largest total here within `router.fair_share_window_s`, so every
        router sees what each key holds and wants here, whichever ingress sent it (serve_app/key_shares.py).
        """
        stats = self.engine.get_stats()
        self.metrics.observe(stats)
        # A dead engine holds nothing and would look the emptiest replica until Serve's health check
        # replaces it; routers skip it instead.
        engine_dead = self.engine.is_dead
        return {
            "engine_dead": engine_dead,
            "num_free_blocks": 0 if engine_dead else self._routable_free_blocks(stats),
            "engine_free_blocks": stats.num_free_blocks,
            "num_total_blocks": stats.num_total_blocks,
            "block_size": stats.block_size,
            "num_running": stats.num_running,
            "num_waiting": stats.num_waiting,
            "report_time_s": time.time(),
            # Adapter affinity: what sits in the engine's device slots (and host memory) after its latest step,
            # not only what is registered (with lora_modules every replica registers every adapter).
            "num_lora_slots": stats.num_lora_slots,
            "lora_slot_names": list(stats.lora_slot_names),
            "lora_host_names": list(stats.lora_host_names),
            "recent_request_ids": self._recent_request_ids(),
            "blocks_by_key": {} if engine_dead else self._committed_blocks.by_key(),
            "peak_blocks_by_key": {} if engine_dead else self._committed_blocks.peak_by_key(),
        }

    def _recent_request_ids(self) -> list[str]:
        """Ids of the requests received within `RECENT_ARRIVALS_S` (their blocks are in this report's counts)."""
        oldest_s = time.monotonic() - RECENT_ARRIVALS_S
        while self._recent_arrivals and self._recent_arrivals[0][0] < oldest_s:
            self._recent_arrivals.popleft()
        # A copy first: submits append on the event loop while Serve runs this in its thread pool, and a deque
        # walked in Python while it grows raises.
        return [request_id for _, request_id in list(self._recent_arrivals)]

    def _routable_free_blocks(self, stats: Any) -> int:
        """Blocks free once every held request reaches its max_tokens (never more than the engine's free now)."""
        uncommitted = stats.num_total_blocks - self._committed_blocks.total
        return max(0, min(stats.num_free_blocks, uncommitted))

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve calls this every autoscaling record interval; the controller averages each value over
        `look_back_period_s` and hands it to `EngineLoadPolicy` (serve_app/autoscaling.py). The KV share is
        the router's worst case, so a replica that routers see as full counts as full here too."""
        stats = self.engine.get_stats()
        held = 1.0 - self._routable_free_blocks(stats) / stats.num_total_blocks if stats.num_total_blocks else 0.0
        return {KV_CACHE_USAGE_METRIC: held, NUM_RUNNING_METRIC: float(stats.num_running),
                NUM_WAITING_METRIC: float(stats.num_waiting),
                NUM_HELD_IN_INGRESSES_METRIC: float(self._num_held_in_ingresses())}

    def _num_held_in_ingresses(self) -> int:
        """Requests the ingresses' fair queues hold back: the latest count of each ingress heard from within
        `INGRESS_HELD_TTL_S` (older ones are forgotten)."""
        now = time.monotonic()
        # A copy first (one step under the GIL): submits add entries on the event loop while Serve's thread pool
        # runs this.
        for ingress_id in [i for i, (_, at) in list(self._held_by_ingress.items()) if now - at > INGRESS_HELD_TTL_S]:
            self._held_by_ingress.pop(ingress_id, None)
        return sum(count for count, _ in list(self._held_by_ingress.values()))

    async def check_health(self) -> None:
        """Ray Serve's health check: an exception marks the replica unhealthy and it is replaced."""
        await self.engine.check_health()

    async def health(self) -> dict[str, Any]:
        await self.engine.check_health()
        stats = self.engine.get_stats()
        return {"replica": self.replica_tag, "num_free_blocks": stats.num_free_blocks,
                "num_total_blocks": stats.num_total_blocks}

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            with contextlib.suppress(Exception):
                engine.shutdown()
