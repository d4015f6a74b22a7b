"""OpenAI-compatible HTTP front: FastAPI routes, SSE streaming, and every error mapped to an OpenAI body.

The ingress never touches the engine: it validates bodies (`openai_protocol`), tokenizes with the
tokenizer fetched once from a replica (for the context check and the router's block demand), sends
`GenerateRequest`s to the replicas (`replica_calls`: routed by `FreeBlocksRequestRouter`; when a replica
is lost, sent again, or continued elsewhere from the tokens already received), and formats their deltas,
which arrive for all its requests on a replica through one stream channel (`stream_channel`);
errors become OpenAI bodies (`api_errors`). Callers are API keys (`tenants`): each key's limits answer 429
with Retry-After, its requests and tokens are counted under its name, and with several keys the requests
waiting for a replica are taken fairly across keys (`fair_queue`). Streaming sends each delta once, so a token
costs the same at any length. Leaving a stream early (client gone) cancels the replica call, which aborts the engine request.
"""


import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve
from ray.serve.handle import DeploymentHandle

from pagedserve.cache.prefix_cache import first_block_key
from pagedserve.config.serve import ServeArgs
from pagedserve.engine.core.limits import CONTEXT, KV_CACHE, check_fits
from pagedserve.engine.errors import InvalidRequestError, RequestTooLargeError
from pagedserve.engine.core.request import CompletionOutput, RequestOutput, SamplingParams

from pagedserve.serve_app import openai_protocol as oai
from pagedserve.serve_app.api_errors import APIError, as_api_error, bad_request, routing_error
from pagedserve.serve_app.channel_socket import node_ip
from pagedserve.serve_app.chunk_format import ChunkFormat
from pagedserve.serve_app.event_pacer import HAPROXY_EVENTS_PER_S, EventPacer, default_events_per_s
from pagedserve.serve_app.fair_queue import FairAdmission, FairQueue
from pagedserve.serve_app.key_limiter import KeyBudgets
from pagedserve.serve_app.loop_lag import watch_loop_lag
from pagedserve.serve_app.lora_registry import LoraSubscription, LoraView
from pagedserve.serve_app.metrics import IngressMetrics
from pagedserve.serve_app.messages import GenerateRequest, ModelInfo, ReplicaError
from pagedserve.serve_app.replica_calls import ReplicaCalls
from pagedserve.serve_app.stream_channel import ChannelHub
from pagedserve.serve_app.tenants import (
    KeyLimits,
    NotAuthenticatedError,
    PromptOverBudgetError,
    RateLimitedError,
    Tenant,
    Tenants,
)
from pagedserve.serve_app.tool_calls import ToolPlan, parser_for_template
from pagedserve.serve_app.tool_stream import ToolCallStream, tool_call_models

logger = logging.getLogger("ray.serve")

# /health: an engine output received this recently shows a replica serving, without asking one.
RECENT_OUTPUT_S = 5.0
# A stream's wait for its turn among the server-sent events shorter than this is not worth a timer.
MIN_PAUSE_S = 0.002
# Levels of nesting a request body may have (OpenAI allows 10 in a strict schema): a body of 500 decodes, but
# pickling it for a replica then overflows Python's recursion limit.
MAX_JSON_DEPTH = 128


def _validation_detail(error: Any) -> str:
    """One pydantic error as the 400's message words it: the field, the complaint, the value given."""
    where = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":  # a field the request does not define: OpenAI's words
        return f"{oai.UNRECOGNIZED}: {where}"
    if not error["loc"]:  # a check of the whole body: its message names the fields; its input is the body
        return str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {error['msg']} (got {error.get('input')!r:.80})"


def _nesting_depth(value: Any) -> int:
    """Levels of lists and objects in a decoded JSON value, counted without recursion."""
    depth, level = 0, [value]
    while level:
        containers = [item for item in level if isinstance(item, (dict, list))]
        depth += bool(containers)
        level = [child for c in containers for child in (c.values() if isinstance(c, dict) else c)]
    return depth

fastapi_app = FastAPI(title="pagedserve", openapi_url=None, docs_url=None, redoc_url=None)


@fastapi_app.exception_handler(APIError)
async def _api_error_handler(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


@fastapi_app.exception_handler(StarletteHTTPException)
async def _no_route_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """What no route takes (an unknown path: 404; a known one with another method: 405, its Allow header
    kept) gets an OpenAI error body too, not Starlette's {"detail": ...}."""
    message = f"{exc.detail}: {request.method} {request.url.path}"
    return JSONResponse(oai.error_body(message, "invalid_request_error", exc.status_code),
                        status_code=exc.status_code, headers=exc.headers)


@fastapi_app.exception_handler(Exception)
async def _internal_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A bug (an exception no route turned into an `APIError`) still answers in OpenAI's shape, so a client's
    SDK shows a message rather than failing to parse Starlette's plain-text 500; the traceback goes to the log
    (Starlette raises the exception again after this response)."""
    logger.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path)
    message = f"internal server error ({type(exc).__name__}); the server logged it"
    return JSONResponse(oai.error_body(message, "internal_server_error", 500), status_code=500)


def _counts_rejections(
    route: Callable[[Any, Request], Awaitable[Response]],
) -> Callable[[Any, Request], Awaitable[Response]]:
    """Count a route's refusals (`APIError` before any token) in `pagedserve_rejected_requests`, and per API key
(once the key is known) in `pagedserve_api_key_rejected_requests`."""

    @functools.wraps(route)
    async def counted(self: Any, request: Request) -> Response:
        try:
            return await route(self, request)
        except APIError as exc:
            self.metrics.rejected(exc.status_code)
            api_key_name = getattr(request.state, "api_key_name", None)
            if api_key_name is not None:
                self.metrics.key_rejected(api_key_name, getattr(exc, "limit", None) or str(exc.status_code))
            raise

    return counted


class EventStreamResponse(StreamingResponse):
    """Server-sent events. When the client leaves, Ray Serve's ASGI `receive` may raise the cancelled Ray task
    that was fetching the next message (`TaskCancelledError`) instead of returning `http.disconnect`;
    Starlette would log that as the request failing. It is the client leaving, and is handled as such."""

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def listen_for_disconnect(self, receive: Any) -> None:
        try:
            await super().listen_for_disconnect(receive)
        except Exception as exc:  # noqa: BLE001 - see the class docstring
            logger.debug("receive ended with %s: the client went away", type(exc).__name__)


class KeyLimitError(APIError):
    """429 from the API key's own limits (`limit`: requests_per_s or tokens_per_min)."""

    def __init__(self, error: RateLimitedError) -> None:
        super().__init__(429, error.message, "rate_limit_exceeded", headers={"Retry-After": str(error.retry_after_s)})
        self.limit = error.limit


def _tenants(serve_args: ServeArgs) -> Tenants:
    keys = serve_args.resolved_api_keys()
    return Tenants([(key.name, key.key.get_secret_value(), KeyLimits(key.requests_per_s, key.tokens_per_min))
                    for key in keys if key.key is not None])


def _retrieve(task: asyncio.Task) -> None:
    """Mark a task's outcome as seen (asyncio logs "exception was never retrieved" otherwise)."""
    if not task.cancelled():
        task.exception()


# `serve.ingress` pickles the routes when this module is imported, with the module globals defined by
# then: a helper the methods use must be defined above this class.
@serve.ingress(fastapi_app)
class OpenAIIngress:
    """Routes of the OpenAI API over one `EngineReplica` deployment handle."""

    def __init__(self, replica: DeploymentHandle, serve_args: ServeArgs,
                 lora_registry: DeploymentHandle | None = None, key_limiter: DeploymentHandle | None = None) -> None:
        self.replica = replica
        self.args = serve_args
        self.tenants = _tenants(serve_args)
        # The keys' limits hold for the whole service: one limiter every ingress replica asks (serve_app/key_limiter.py).
        self.budgets = KeyBudgets(
            self.tenants.all(),
            admit_call=None if key_limiter is None else lambda name, tokens: key_limiter.admit.remote(name, tokens),
            charge_call=None if key_limiter is None else lambda name, tokens: key_limiter.charge.remote(name, tokens),
            num_ingresses=serve_args.ingress_num_replicas or 1)
        self._info: ModelInfo | None = None
        # LoRA adapters this ingress serves by name -> where a replica without one loads it: the service's
        # registry as this ingress last saw it (serve_app/lora_registry.py; None without LoRA: no adapters).
        self._loras: dict[str, str | None] = {}
        self.lora_registry = lora_registry
        self._info_task: asyncio.Future | None = None  # the one call for the model's facts in flight
        context = serve.get_replica_context()
        self.metrics = IngressMetrics(
            model_name=serve_args.served_model_name,
            replica=context.replica_tag if context is not None else "local",
            api_key_names=self.tenants.names,
        )
        self.channels = ChannelHub(replica, ingress_id=context.replica_id.unique_id if context is not None else None,
                                   on_message=self.metrics.channel_message,
                                   transport=serve_args.stream_channel_transport, node_ip=node_ip())
        self._lora_subscription: LoraSubscription | None = None
        if lora_registry is not None:
            subscriber = f"ingress:{context.replica_id.unique_id if context is not None else 'local'}"
            self._lora_subscription = LoraSubscription(
                lambda epoch, version: lora_registry.updates.remote(subscriber, epoch, version), self._lora_changed)
        router = serve_args.router
        # With several keys, requests reach the router fairly across them; with one there is no one to be fair to.
        requests = self.channels if len(self.tenants.names) < 2 else FairAdmission(self.channels, FairQueue(
            router.max_routing_per_key, router.max_queued_requests, router.queue_timeout_s, router.retry_after_s,
            share_retry_s=router.stats_period_s), on_turned_back=self.metrics.key_turned_back)
        self.calls = ReplicaCalls(requests, on_resend=self.metrics.resent)
        events_per_s = serve_args.max_stream_events_per_s or default_events_per_s()
        self._pacer = EventPacer(events_per_s)  # every stream's events (see its module)
        logger.info("server-sent events: at most %g a second over this replica's streams%s", events_per_s,
                    "" if serve_args.max_stream_events_per_s else " (max_stream_events_per_s unset: "
                    f"{'HAProxy' if events_per_s == HAPROXY_EVENTS_PER_S else 'Serve proxy'} default)")
        # The tokenizer now rather than with the first request: unpickling it imports transformers and torch
        # (seconds), which on a first burst stalled this replica's event loop and every request it held.
        self._prefetch: asyncio.Task | None = None
        self._lora_task: asyncio.Task | None = None
        self._loop_lag_task: asyncio.Task | None = None  # every stream here is written from this loop (a metric)
        with contextlib.suppress(RuntimeError):  # no running loop: built outside a Serve replica
            self._loop_lag_task = asyncio.get_running_loop().create_task(watch_loop_lag(self.metrics.loop_lag))
            self._prefetch = asyncio.get_running_loop().create_task(self._prefetch_model_info())
            if self._lora_subscription is not None:
                self._lora_task = asyncio.get_running_loop().create_task(self._lora_subscription.run())

    # Plumbing ----------------------------------------------------------------------------------------

    async def model_info(self) -> ModelInfo:
        """The engine's facts (asked once, shared by every caller). A caller waits for them at most the router's
        `queue_timeout_s`, then gets a 503: while no engine replica runs (starting, or failed to start) Serve holds
        the call without an answer, and a request must not hang on it."""
        if self._info is not None:
            return self._info
        task = self._info_task
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self._info_task = asyncio.ensure_future(self._fetch_model_info())
        timeout_s = self.args.router.queue_timeout_s
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout_s)
        except asyncio.TimeoutError:
            raise APIError(503, f"no engine replica answered within {timeout_s:g} s (still starting, or failed to "
                           "start: see the Serve application's status)", "service_unavailable") from None

    async def _fetch_model_info(self) -> ModelInfo:
        try:
            info = await self.replica.model_info.remote()
        except Exception as exc:
            raise routing_error(exc) from None
        self.metrics.set_model_name(self.args.served_model_name or info.model_name)
        if self.lora_registry is None:
            self._loras = {name: None for name in info.lora_names} | self._loras
        self._info = info
        return info

    async def _lora_changed(self, old: LoraView | None, new: LoraView) -> None:
        """The registry's adapters become this ingress's; a registry that started anew (Serve replaced it)
        first gets back the adapters this ingress knew."""
        adapters = new.adapters
        if old is not None and old.epoch != new.epoch and set(old.adapters) - set(adapters):
            adapters = (await self.lora_registry.restore.remote(old.adapters)).adapters
        self._loras = dict(adapters)

    async def _refresh_loras(self) -> None:
        """The registry's current adapters now, not at this ingress's next poll: a name loaded through
        another ingress a moment ago is served here too."""
        if self._lora_subscription is not None:
            with contextlib.suppress(Exception):  # the registry unreachable: the adapters last seen stand
                await self._lora_subscription.apply(await self.lora_registry.view.remote())

    async def _prefetch_model_info(self, first_delay_s: float = 1.0, max_delay_s: float = 30.0) -> None:
        delay = first_delay_s
        while self._info is None:
            try:
                await self.model_info()
            except Exception:  # noqa: BLE001 - no engine replica up yet (requests get the error); try again
                await asyncio.sleep(delay)
                delay = min(2 * delay, max_delay_s)

    async def served_model_name(self) -> str:
        return self.args.served_model_name or (await self.model_info()).model_name

    def authorize(self, request: Request) -> Tenant:
        """The caller's API key (`anonymous` when none is configured); 401 unless the bearer token is one of
        them. Keys are compared in constant time and never logged; the key's name labels what follows."""
        try:
            tenant = self.tenants.identify(request.headers.get("authorization", ""))
        except NotAuthenticatedError as exc:
            raise APIError(401, str(exc), "authentication_error") from None
        request.state.api_key_name = tenant.name
        return tenant

    async def admit(self, tenant: Tenant, body: Any, requests: list[GenerateRequest]) -> None:
        """vLLM's rule that a priority needs the priority scheduling policy, then the key's limits (a request and
        its prompt tokens); then the key's counts."""
        if body.priority != 0 and self.args.engine.scheduling_policy != "priority":
            raise bad_request(f"priority {body.priority} needs scheduling_policy 'priority' (this server's is "
                              f"'{self.args.engine.scheduling_policy}')", "priority")
        num_prompt_tokens = sum(r.num_prompt_tokens for r in requests)
        try:
            await self.budgets.admit(tenant, num_prompt_tokens)
        except RateLimitedError as exc:
            raise KeyLimitError(exc) from None
        except PromptOverBudgetError as exc:  # no wait would let it in: 429 without Retry-After
            raise APIError(429, str(exc), "rate_limit_exceeded", "prompt") from None
        self.metrics.key_admitted(tenant.name, num_prompt_tokens)

    def check_arrival(self, tenant: Tenant) -> None:
        """A key that surely has no request to spend is refused before its body is read."""
        try:
            self.budgets.check_arrival(tenant)
        except RateLimitedError as exc:
            raise KeyLimitError(exc) from None

    def charge(self, tenant: Tenant, num_completion_tokens: int) -> None:
        self.budgets.charge(tenant, num_completion_tokens)
        self.metrics.key_generated(tenant.name, num_completion_tokens)

    async def parse_body(self, request: Request, model_cls: type[BaseModel]) -> Any:
        limit = self.args.max_request_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body of {declared} bytes is over the limit of {limit}", "invalid_request_error")
        body = bytearray()
        async for piece in request.stream():
            body.extend(piece)
            if len(body) > limit:
                raise APIError(413, f"request body is over the limit of {limit} bytes", "invalid_request_error")
        too_deep = f"the JSON body is nested too deeply (at most {MAX_JSON_DEPTH} levels)"
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise bad_request(f"malformed JSON body: {exc}") from None
        except RecursionError:  # the decoder recurses once per level of nesting
            raise bad_request(too_deep) from None
        if not isinstance(payload, dict):
            raise bad_request("the JSON body must be an object")
        if _nesting_depth(payload) > MAX_JSON_DEPTH:
            raise bad_request(too_deep)
        try:
            return model_cls.model_validate(payload)
        except ValidationError as exc:
            # A value of the wrong JSON type ("stream": "yes"): OpenAI's message, naming the field's path.
            wrong_type = oai.json_type_error(model_cls, payload)
            if wrong_type is not None:
                raise bad_request(wrong_type[1], wrong_type[0]) from None
            errors = exc.errors()
            first = errors[0]
            # The top-level field: a union type adds its member's name to the location ("prompt.str"). A check
            # of the whole body names its field first in its message ("tool_choice names ...").
            param = str(first["loc"][0]) if first["loc"] else None
            if param is None:
                word = str(first["msg"]).removeprefix("Value error, ").split(" ", 1)[0]
                param = word if word in model_cls.model_fields or word in oai.UNSUPPORTED else None
            # A field's error names it and echoes its value; a check of the whole body (its message names the
            # fields) echoes nothing: its input is the whole body.
            details = "; ".join(_validation_detail(e) for e in errors)
            raise bad_request(details, param) from None

    async def check_model(self, model: str | None) -> str:
        """The model a request names (the base model's name, or a LoRA adapter's); 404 for anything else."""
        served = await self.served_model_name()
        if model is not None and model != served and model not in self._loras:
            await self._refresh_loras()
        if model is not None and model != served and model not in self._loras:
            adapters = f" and the LoRA adapters {', '.join(sorted(self._loras))}" if self._loras else ""
            raise APIError(404, f"the model `{model}` does not exist; this server serves `{served}`{adapters}",
                           "model_not_found", "model")
        return model if model in self._loras else served

    def lora_for(self, model: str) -> str | None:
        """The LoRA adapter a checked model name selects (None: the base model)."""
        return model if model in self._loras else None

    def check_length(self, info: ModelInfo, num_prompt_tokens: int, max_tokens: int | None) -> int:
        """Resolve max_tokens (None: the rest of the context) and reject what cannot fit (engine/core/limits.py)."""
        try:
            if max_tokens is None:
                # The rest of the context, but never more than a replica's whole KV cache can hold, so that a
                # request without max_tokens is not refused as too large for every replica.
                cache_tokens = info.num_total_blocks * info.block_size
                limit, name = (info.max_model_len, CONTEXT) if info.max_model_len <= cache_tokens else (cache_tokens,
                                                                                                      KV_CACHE)
                check_fits(num_prompt_tokens, 1, limit, name)
                return limit - num_prompt_tokens
            check_fits(num_prompt_tokens, max_tokens, info.max_model_len, CONTEXT)
        except RequestTooLargeError as exc:
            raise bad_request(exc.message, exc.param) from None
        return max_tokens

    def make_request(
        self, info: ModelInfo, request_id: str, prompt: str | list[int], token_ids: list[int],
        sampling_params: SamplingParams, stream: bool = True, priority: int = 0, api_key_name: str = "",
        lora_name: str | None = None,
    ) -> GenerateRequest:
        # Salted by the adapter, as the engine's prefix cache keys its blocks (cache/prefix_cache.py).
        prefix_key = first_block_key(token_ids, info.block_size, salt=lora_name)
        return GenerateRequest(
            request_id=request_id, prompt=prompt, sampling_params=sampling_params,
            num_prompt_tokens=len(token_ids), prefix_key=prefix_key,
            max_new_tokens=sampling_params.n * (sampling_params.max_tokens or 0), stream=stream,
            prompt_token_ids=token_ids, priority=priority, api_key_name=api_key_name,
            lora_name=lora_name, lora_path=self._loras.get(lora_name) if lora_name is not None else None,
        )

    def client_left(self, request_id: str, when: str) -> None:
        """A client that goes away is a normal event: one line and a count, the engine requests aborted."""
        logger.info("request %s: the client went away %s; its engine requests are aborted", request_id, when)
        self.metrics.client_left()

    # Token and logprob formatting --------------------------------------------------------------------

    def token_text(self, info: ModelInfo, token_id: int, logprob: Any) -> str:
        decoded = getattr(logprob, "decoded_token", None)
        return decoded if decoded is not None else info.tokenizer.decode([token_id])

    def completion_logprobs(
        self, info: ModelInfo, token_ids: list[int], logprobs: list[dict[int, Any]], text_offset: int
    ) -> oai.CompletionLogprobs:
        result = oai.CompletionLogprobs()
        for token_id, entry in zip(token_ids, logprobs):
            sampled = entry.get(token_id)
            token = self.token_text(info, token_id, sampled)
            result.tokens.append(token)
            result.token_logprobs.append(None if sampled is None else sampled.logprob)
            result.top_logprobs.append({self.token_text(info, t, lp): lp.logprob for t, lp in entry.items()})
            result.text_offset.append(text_offset)
            text_offset += len(token)
        return result

    def chat_logprobs(
        self, info: ModelInfo, token_ids: list[int], logprobs: list[dict[int, Any]], num_top: int
    ) -> oai.ChatLogprobs:
        content = []
        for token_id, entry in zip(token_ids, logprobs):
            sampled = entry.get(token_id)
            token = self.token_text(info, token_id, sampled)
            top = sorted(entry.items(), key=lambda item: -item[1].logprob)[:num_top]
            content.append(oai.ChatTokenLogprob(
                token=token, logprob=-9999.0 if sampled is None else sampled.logprob,
                bytes=list(token.encode("utf-8")),
                top_logprobs=[
                    oai.TopLogprob(token=(t := self.token_text(info, tid, lp)), logprob=lp.logprob,
                                   bytes=list(t.encode("utf-8")))
                    for tid, lp in top
                ],
            ))
        return oai.ChatLogprobs(content=content)

    # Routes ------------------------------------------------------------------------------------------

    @fastapi_app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: load balancers' probes
    async def health(self) -> Response:
        """200 when an engine replica answers. Outputs received within the last RECENT_OUTPUT_S are that answer:
        a replica at max_ongoing_requests would queue a health call behind its generation requests for as
        long as they run, and a readiness probe that waits fails (Kubernetes would drop a busy pod)."""
        last = self.calls.last_output_s
        if last is not None and time.monotonic() - last < RECENT_OUTPUT_S:
            return JSONResponse({"status": "ok"})
        try:
            await asyncio.wait_for(self.replica.health.remote(), timeout=30)
        except Exception as exc:
            return JSONResponse(oai.error_body(f"unhealthy: {type(exc).__name__}", "service_unavailable", 503), 503)
        return JSONResponse({"status": "ok"})

    @fastapi_app.get("/v1/models")
    @_counts_rejections
    async def models(self, request: Request) -> Response:
        self.authorize(request)
        info = await self.model_info()
        served = await self.served_model_name()
        created = oai.now_s()
        cards = [oai.ModelCard(id=served, created=created, max_model_len=info.max_model_len, root=served)]
        cards += [oai.ModelCard(id=name, created=created, max_model_len=info.max_model_len, root=path or name,
                                parent=served) for name, path in self._loras.items()]
        return JSONResponse(oai.ModelList(data=cards).model_dump())

    @fastapi_app.post("/v1/load_lora_adapter")
    @_counts_rejections
    async def load_lora_adapter(self, request: Request) -> Response:
        """vLLM's route: {"lora_name", "lora_path"}, for the whole service. The name is taken in the registry
        (serve_app/lora_registry.py), one engine replica loads the adapter now (a bad one is a 400 and the
        name is given back), and the answer comes once every ingress serves it; the other engine replicas
        load it when a request for it reaches them."""
        self.authorize(request)
        body: oai.LoadLoraAdapterRequest = await self.parse_body(request, oai.LoadLoraAdapterRequest)
        served = await self.served_model_name()
        already_loaded = bad_request(f"the LoRA adapter `{body.lora_name}` is already loaded", "lora_name")
        if body.lora_name == served or body.lora_name in self._loras:
            raise already_loaded
        if self.lora_registry is None:
            raise bad_request("LoRA is off on this service (start it with enable_lora or lora_modules)", "lora_name")
        try:
            added = await self.lora_registry.add.remote(body.lora_name, body.lora_path)
        except Exception as exc:
            raise routing_error(exc) from None
        if added is None:
            raise already_loaded
        try:
            error = await self._on_a_replica(self.replica.load_lora_adapter.remote(body.lora_name, body.lora_path))
        except APIError:
            await self._give_back(body.lora_name)
            raise
        if error is not None:
            await self._give_back(body.lora_name)
            raise APIError(error.status_code, error.message, error.error_type, error.param)
        await self.lora_registry.wait_seen.remote(added.version)
        return Response(f"Success: LoRA adapter '{body.lora_name}' added successfully.", media_type="text/plain")

    async def _give_back(self, lora_name: str) -> None:
        """Take a name that did not load off the registry again: no ingress serves it."""
        with contextlib.suppress(Exception):  # the registry unreachable: a request for it gets the replica's 400
            removed = await self.lora_registry.remove.remote(lora_name)
            if removed is not None:
                await self.lora_registry.wait_seen.remote(removed.version)

    async def _on_a_replica(self, call: Awaitable[ReplicaError | None]) -> ReplicaError | None:
        try:
            return await call
        except Exception as exc:
            raise routing_error(exc) from None

    @fastapi_app.post("/v1/unload_lora_adapter")
    @_counts_rejections
    async def unload_lora_adapter(self, request: Request) -> Response:
        """vLLM's route: {"lora_name"}, for the whole service: the registry forgets the adapter, and the answer
        comes once every ingress refuses it (404) and every engine replica has unloaded it (one still running
        requests under it refuses new ones and unloads it when they end)."""
        self.authorize(request)
        body: oai.UnloadLoraAdapterRequest = await self.parse_body(request, oai.UnloadLoraAdapterRequest)
        await self.model_info()
        not_found = APIError(404, f"the LoRA adapter `{body.lora_name}` cannot be found", "not_found_error",
                             "lora_name")
        if self.lora_registry is None:  # LoRA is off: nothing is loaded
            raise not_found
        try:
            removed = await self.lora_registry.remove.remote(body.lora_name)
            if removed is not None:
                await self.lora_registry.wait_seen.remote(removed.version)
        except Exception as exc:
            raise routing_error(exc) from None
        if removed is None:
            raise not_found
        return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.", media_type="text/plain")

    @fastapi_app.post("/tokenize")
    @_counts_rejections
    async def tokenize(self, request: Request) -> Response:
        self.authorize(request)
        body: oai.TokenizeRequest = await self.parse_body(request, oai.TokenizeRequest)
        await self.check_model(body.model)
        info = await self.model_info()
        if body.messages is not None:
            tokens = self.chat_token_ids(info, body.messages, body.add_generation_prompt, None)
        else:
            tokens = self.encode_text(info, body.prompt, "prompt", add_special_tokens=body.add_special_tokens)
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": info.max_model_len})

    @fastapi_app.post("/detokenize")
    @_counts_rejections
    async def detokenize(self, request: Request) -> Response:
        self.authorize(request)
        body: oai.DetokenizeRequest = await self.parse_body(request, oai.DetokenizeRequest)
        await self.check_model(body.model)
        info = await self.model_info()
        vocab_size = len(info.tokenizer)
        bad = [t for t in body.tokens if t >= vocab_size]
        if bad:
            raise bad_request(f"token ids {bad[:8]} are outside the vocabulary of {vocab_size}", "tokens")
        return JSONResponse({"prompt": info.tokenizer.decode(body.tokens)})

    def chat_token_ids(
        self, info: ModelInfo, messages: list[oai.ChatMessage], add_generation_prompt: bool,
        template_kwargs: dict[str, Any] | None, tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        try:
            conversation = [m.for_template() for m in messages]
        except ValueError as exc:
            raise bad_request(str(exc), "messages") from None
        if getattr(info.tokenizer, "chat_template", None) is None:
            raise bad_request("this model has no chat template; use /v1/completions", "messages")
        try:
            text = info.tokenizer.apply_chat_template(
                conversation, tools=tools or None, add_generation_prompt=add_generation_prompt, tokenize=False,
                **(template_kwargs or {}),
            )
        except Exception as exc:
            raise bad_request(f"cannot apply the chat template: {exc}", "messages") from None
        return self.encode_text(info, text, "messages", add_special_tokens=False)

    def encode_text(self, info: ModelInfo, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of request text; text the tokenizer cannot take (a lone surrogate) is a bad request."""
        try:
            return info.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        except Exception as exc:  # noqa: BLE001 - tokenizers raise TypeError/ValueError/Rust panics
            raise bad_request(f"the {param} cannot be tokenized: {type(exc).__name__}: {exc}"[:300], param) from None

    def tool_parser(self, info: ModelInfo) -> str:
        if self.args.tool_call_parser != "auto":
            return self.args.tool_call_parser
        return parser_for_template(getattr(info.tokenizer, "chat_template", None))

    def sampling_params(self, body: Any, max_tokens: int, *extra: Any) -> SamplingParams:
        try:
            return body.to_sampling_params(max_tokens, *extra)
        except InvalidRequestError as exc:
            raise bad_request(exc.message, exc.param) from None

    @fastapi_app.post("/v1/completions")
    @_counts_rejections
    async def completions(self, request: Request) -> Response:
        tenant = self.authorize(request)
        self.check_arrival(tenant)
        body: oai.CompletionRequest = await self.parse_body(request, oai.CompletionRequest)
        model = await self.check_model(body.model)
        info = await self.model_info()
        request_id = oai.new_id("cmpl")
        requests = []
        for i, prompt in enumerate(body.prompts()):
            if isinstance(prompt, str):
                token_ids = self.encode_text(info, prompt, "prompt")
            else:
                token_ids = list(prompt)  # their range is checked by the engine (engine/core/limits.py)
            max_tokens = self.check_length(info, len(token_ids), body.max_tokens)
            params = self.sampling_params(body, max_tokens)
            requests.append(self.make_request(info, f"{request_id}-{i}", prompt, token_ids, params,
                                              stream=bool(body.stream), priority=body.priority,
                                              api_key_name=tenant.name, lora_name=self.lora_for(model)))
        await self.admit(tenant, body, requests)
        if body.stream:
            return await self.stream_response(info, model, request_id, requests, body, chat=False, tenant=tenant)
        return await self.full_response(info, model, request_id, requests, body, chat=False, tenant=tenant)

    @fastapi_app.post("/v1/chat/completions")
    @_counts_rejections
    async def chat_completions(self, request: Request) -> Response:
        tenant = self.authorize(request)
        self.check_arrival(tenant)
        body: oai.ChatCompletionRequest = await self.parse_body(request, oai.ChatCompletionRequest)
        model = await self.check_model(body.model)
        info = await self.model_info()
        request_id = oai.new_id("chatcmpl")
        plan = body.tool_plan(self.tool_parser(info))
        token_ids = self.chat_token_ids(info, body.messages, body.add_generation_prompt, body.chat_template_kwargs,
                                        list(plan.tools))
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        try:
            max_tokens = self.check_length(info, len(token_ids), body.requested_max_tokens)
        except APIError as exc:
            exc.param = param if exc.param == "max_tokens" else exc.param
            raise
        params = self.sampling_params(body, max_tokens, plan.constraint)
        requests = [self.make_request(info, f"{request_id}-0", token_ids, token_ids, params,
                                      stream=bool(body.stream), priority=body.priority, api_key_name=tenant.name,
                                      lora_name=self.lora_for(model))]
        await self.admit(tenant, body, requests)
        if body.stream:
            return await self.stream_response(info, model, request_id, requests, body, chat=True, plan=plan,
                                              tenant=tenant)
        return await self.full_response(info, model, request_id, requests, body, chat=True, plan=plan,
                                        tenant=tenant)

    # Responses ---------------------------------------------------------------------------------------

    async def full_response(
        self, info: ModelInfo, model: str, request_id: str, requests: list[GenerateRequest], body: Any, chat: bool,
        plan: ToolPlan | None = None, tenant: Tenant | None = None,
    ) -> Response:
        tasks = [asyncio.ensure_future(self.calls.collect(r)) for r in requests]
        gathered = asyncio.gather(*tasks)
        # Cancelled inside wait_for (the client left, or the timeout), the gather ends with a CancelledError that
        # nothing reads: asyncio would log it with a traceback.
        gathered.add_done_callback(_retrieve)
        try:
            outputs = await asyncio.wait_for(gathered, timeout=self.args.request_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(408, f"request took longer than {self.args.request_timeout_s:g}s", "timeout") from None
        except asyncio.CancelledError:
            self.client_left(request_id, "before its response")
            raise
        finally:
            for task in tasks:  # one prompt failed, or the client left: the others' replica calls end too
                task.cancel()
                # A prompt that failed after another's failure ended the gather: its error is not news.
                task.add_done_callback(_retrieve)
        n = requests[0].sampling_params.n
        # Each prompt's output is whole (its deltas merged): its completions are the response's choices.
        choices: dict[int, CompletionOutput] = {}
        num_prompt_tokens = 0
        for prompt_index, output in enumerate(outputs):
            if output is None:
                continue
            if output.error:
                raise APIError(500, f"request failed in the engine: {output.error}", "internal_server_error")
            num_prompt_tokens += len(output.prompt_token_ids)
            choices.update({prompt_index * n + completion.index: completion for completion in output.outputs})

        usage = oai.UsageInfo(prompt_tokens=num_prompt_tokens,
                              completion_tokens=sum(len(c.token_ids) for c in choices.values()))
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        if tenant is not None:
            self.charge(tenant, usage.completion_tokens)
        ordered = [(index, choices[index]) for index in sorted(choices)]
        if chat:
            chat_choices = []
            for index, c in ordered:
                content, calls = plan.read(c.text) if plan is not None else (c.text, [])
                chat_choices.append(oai.ChatChoice(
                    index=index,
                    message=oai.ChatResponseMessage(content=content, tool_calls=tool_call_models(calls) or None),
                    finish_reason="tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason,
                    stop_reason=c.stop_reason,
                    logprobs=self.chat_logprobs(info, c.token_ids, c.logprobs or [], body.top_logprobs or 0)
                    if body.logprobs else None,
                ))
            response = oai.ChatCompletionResponse(id=request_id, created=oai.now_s(), model=model, usage=usage,
                                                  choices=chat_choices)
        else:
            response = oai.CompletionResponse(
                id=request_id, created=oai.now_s(), model=model, usage=usage,
                choices=[
                    oai.CompletionChoice(
                        index=index, text=c.text, finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                        logprobs=self.completion_logprobs(info, c.token_ids, c.logprobs or [], 0)
                        if body.logprobs is not None else None,
                    )
                    for index, c in ordered
                ],
            )
        return Response(response.model_dump_json(), media_type="application/json")

    async def stream_response(
        self, info: ModelInfo, model: str, request_id: str, requests: list[GenerateRequest], body: Any, chat: bool,
        plan: ToolPlan | None = None, tenant: Tenant | None = None,
    ) -> Response:
        streams = await self.calls.open_streams(requests)
        tool_streams: dict[int, ToolCallStream] = {}
        n = requests[0].sampling_params.n
        created = oai.now_s()
        include_usage = body.include_usage_in_stream

        chunks = ChunkFormat(oai.ChatCompletionChunk if chat else oai.CompletionChunk, request_id, created, model)
        is_plain_chat = plan is None or plan.mode == "none"

        def error_event(message: str, error_type: str, status_code: int, param: str | None = None) -> bytes:
            return f"data: {json.dumps(oai.error_body(message, error_type, status_code, param))}\n\n".encode()

        async def events() -> AsyncIterator[bytes]:
            text_offsets: dict[int, int] = {}
            # Chat choice index -> (token ids, logprobs) of text a tool stream holds back: they go out with the
            # delta that finally carries that text, so the stream's logprobs cover every token, as the response's do.
            held_tokens: dict[int, tuple[list[int], list[dict[int, Any]]]] = {}
            num_prompt_tokens = 0
            num_completion_tokens = 0
            is_complete = False
            try:
                if chat:  # OpenAI sends the role once per choice, before any content
                    yield b"".join(chunks.choice(oai.ChatChunkChoice(index=index, delta=oai.ChatDelta(
                        role="assistant", content=""))) for index in range(len(requests) * n))
                async for prompt_index, item in self.calls.merged(streams):
                    if isinstance(item, (BaseException, ReplicaError)):
                        error = as_api_error(item)
                        yield error_event(error.message, error.error_type, error.status_code, error.param)
                        break
                    output: RequestOutput = item
                    written: list[bytes] = []  # one write for all of this delta's choices
                    for completion in output.outputs:
                        index = prompt_index * n + completion.index
                        num_completion_tokens += len(completion.token_ids)
                        if chat:
                            if is_plain_chat and not body.logprobs:
                                written.append(chunks.content(index, completion.text, completion.finish_reason))
                                continue
                            delta, finish_reason = oai.ChatDelta(content=completion.text), completion.finish_reason
                            token_ids, logprobs = completion.token_ids, completion.logprobs or []
                            if not is_plain_chat:
                                tools = tool_streams.setdefault(index, ToolCallStream(plan))
                                delta, finish_reason = tools.feed(completion.text, completion.finish_reason)
                                held_ids, held_logprobs = held_tokens.pop(index, ([], []))
                                token_ids, logprobs = held_ids + token_ids, held_logprobs + logprobs
                                if delta is None:  # held back: it may be the start of a tool call
                                    held_tokens[index] = (token_ids, logprobs)
                                    continue
                            written.append(chunks.choice(oai.ChatChunkChoice(
                                index=index, delta=delta, finish_reason=finish_reason,
                                logprobs=self.chat_logprobs(info, token_ids, logprobs, body.top_logprobs or 0)
                                if body.logprobs else None,
                            )))
                        elif body.logprobs is None:
                            written.append(chunks.text(index, completion.text, completion.finish_reason,
                                                       completion.stop_reason))
                        else:
                            offset = text_offsets.get(index, 0)
                            logprobs = self.completion_logprobs(info, completion.token_ids,
                                                                completion.logprobs or [], offset)
                            written.append(chunks.choice(oai.CompletionChoice(
                                index=index, text=completion.text, finish_reason=completion.finish_reason,
                                stop_reason=completion.stop_reason, logprobs=logprobs)))
                            # Offsets run on over the tokens' texts, as in one response, not over the delta's
                            # text: a delta holds back the bytes of an unfinished character and cuts a stop
                            # string, and how many tokens one delta holds depends on timing.
                            text_offsets[index] = offset + sum(len(token) for token in logprobs.tokens)
                    if output.finished:
                        num_prompt_tokens += len(output.prompt_token_ids)
                        if output.error:
                            written.append(error_event(f"request failed in the engine: {output.error}",
                                                       "internal_server_error", 500))
                    if written:
                        yield b"".join(written)
                    if not output.finished:
                        # Past max_stream_events_per_s over all streams, wait for this stream's turn: the deltas
                        # that arrive meanwhile go out as one event (`merged` folds them).
                        pause_s = self._pacer.book()
                        if pause_s >= MIN_PAUSE_S:
                            await asyncio.sleep(pause_s)
                if include_usage:
                    yield chunks.usage(oai.UsageInfo(
                        prompt_tokens=num_prompt_tokens, completion_tokens=num_completion_tokens,
                        total_tokens=num_prompt_tokens + num_completion_tokens))
                yield b"data: [DONE]\n\n"
                is_complete = True
            finally:
                # Runs on normal end and when the client disconnects (the generator is closed/cancelled).
                if tenant is not None:
                    self.charge(tenant, num_completion_tokens)
                self.calls.cancel(streams)
                if not is_complete:
                    self.client_left(request_id, f"after {num_completion_tokens} tokens of its stream")

        return EventStreamResponse(events())
