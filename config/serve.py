"""Serve application arguments: one dict (YAML `args` or `serve run ... key=value`) validated once.

`ServeArgs.from_args` splits the flat dict into serving knobs (replicas, router, API key, HTTP limits)
and engine knobs: every `EngineConfig` field may be given at the top level (`num_blocks=64`) or under
`engine:`. Values from the command line arrive as strings; pydantic's lax mode converts them. A bad or
unknown key raises `ConfigError` naming the field, the value and the rule.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from pagedserve.config.engine import ConfigError, EngineConfig, format_validation_error

API_KEY_ENV = "PAGEDSERVE_API_KEY"
# Ingress replicas when the engine replicas have GPUs and `ingress_num_replicas` is not set (see its description).
GPU_INGRESS_REPLICAS = 4


class RouterSettings(BaseModel):
    """The free-blocks router (serve_app/router.py) and its admission queue."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_queued_requests: int = Field(
        64, ge=0, description="Requests that may wait for a replica with room, in each ingress replica; past it, 429."
    )
    queue_timeout_s: float = Field(
        30.0, gt=0.0, description="Longest a request waits for a replica with room before 429."
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After header of a 429.")
    stats_period_s: float = Field(1.0, gt=0.0, description="How often replicas report free blocks.")
    affinity_tolerance: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="A replica holding the prompt's prefix wins if its headroom is within this share of "
        "its total blocks (or within the request's own blocks, if more) of the best replica's headroom.",
    )
    lora_affinity_tolerance: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="A replica with the request's LoRA adapter in a device slot (or in host memory) goes before "
        "replicas that must load it only while its headroom is within this share of its total blocks (or within "
        "the request's own blocks, if more) of the best replica's headroom: a hot adapter's requests spread to "
        "another replica, which loads it, instead of filling its holders while the others idle. 1: always first.",
    )
    initial_backoff_s: float = Field(0.02, gt=0.0, description="First retry delay while no replica has room.")
    max_routing_per_key: int = Field(
        4, ge=1, description="With api_keys: requests of one key that an ingress replica hands the router at once "
        "(sent, not yet accepted by a replica); the key's others wait in the ingress, in order, and count toward "
        "max_queued_requests and queue_timeout_s. A key that floods the service then waits behind itself: another "
        "key's request waits behind at most this many of it (serve_app/fair_queue.py). Lower is fairer when "
        "saturated; higher admits one key's bursts faster.",
    )
    max_backoff_s: float = Field(0.2, gt=0.0, description="Longest retry delay while no replica has room.")
    fair_share_window_s: float = Field(
        10.0, ge=0.0, description="With api_keys: a key that sent a request, or held KV blocks (as the replicas "
        "report them, whichever ingress sent its requests), within this many seconds is owed its "
        "fair share of each replica's KV blocks (max-min over the keys' recent peak use): another key's request "
        "may not take that room, so a flooding key cannot fill the replicas while another key is active; one "
        "key alone uses every block (serve_app/key_shares.py). 0: no shares.",
    )


class ApiKeySettings(BaseModel):
    """One API key (a tenant): its `name` labels metrics and logs (the key never does) and its limits apply to
    every request that sends it. Give the key itself through `key_env` (an environment variable read where
    `serve run` starts) or, for tests, `key`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Label of the key's metrics and logs.")
    key: SecretStr | None = Field(None, description="The bearer token itself (prefer key_env).")
    key_env: str | None = Field(None, description="Environment variable that holds the bearer token.")
    requests_per_s: float | None = Field(
        None, gt=0.0, description="Requests a second over the whole service, whichever ingress replica they reach "
        "(token bucket; bursts up to one second's worth); None: no limit.")
    tokens_per_min: float | None = Field(
        None, gt=0.0, description="Prompt + generated tokens a minute (token bucket; bursts up to one minute's "
        "worth; prompt tokens are taken on admission, generated ones when the request ends); None: no limit.")

    @model_validator(mode="after")
    def _one_source(self) -> "ApiKeySettings":
        if (self.key is None) == (self.key_env is None):
            raise ValueError(f"API key {self.name!r}: give exactly one of key and key_env")
        return self

    def resolved(self) -> "ApiKeySettings":
        """With `key` read from `key_env` (here, where `serve run` started: replicas may not have it)."""
        if self.key is not None:
            return self
        value = os.environ.get(self.key_env or "")
        if not value:
            raise ConfigError(f"ServeArgs.api_keys: the key of {self.name!r} comes from ${self.key_env}, which is "
                              "not set")
        return self.model_copy(update={"key": SecretStr(value), "key_env": None})


class AutoscalingSettings(BaseModel):
    """Replica autoscaling (Ray Serve's autoscaling_config). With `policy: engine_load` (the default) Serve
    scales on what the engines report (serve_app/autoscaling.py): requests running and waiting in the engines
    plus those queued in the ingresses, per replica, against `target_ongoing_requests`; the share of KV blocks
    held against `target_kv_cache_usage`; and one more replica while requests keep waiting. With
    `policy: ongoing_requests` it is Serve's own rule on ongoing calls. Either way a change must hold for
    `upscale_delay_s` / `downscale_delay_s` and stays within `min_replicas..max_replicas`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    policy: Literal["engine_load", "ongoing_requests"] = Field(
        "engine_load", description="engine_load: the engines' own signals; ongoing_requests: Serve's default rule.")
    target_ongoing_requests: float = Field(
        16.0, gt=0.0, description="Requests per replica (engine_load: running + waiting in the engine + queued in "
        "the ingresses) the autoscaler aims at.")
    target_kv_cache_usage: float = Field(
        0.75, gt=0.0, le=1.0, description="engine_load: share of a replica's KV blocks held (worst case, as the "
        "router counts them) the autoscaler aims at.")
    max_waiting_per_replica: float = Field(
        1.0, ge=0.0, description="engine_load: past this many waiting requests per replica (engine queues plus "
        "ingress queues, averaged over look_back_period_s) at least one replica more is wanted.")
    upscale_delay_s: float = Field(10.0, ge=0.0)
    downscale_delay_s: float = Field(60.0, ge=0.0)
    look_back_period_s: float = Field(
        30.0, gt=0.0, description="Window over which Serve averages the reported signals.")
    metrics_interval_s: float | None = Field(
        None, gt=0.0, description="How often replicas and handles push their signals to Serve's controller; None: "
        "Ray's default (10 s). Ray marks this field deprecated in favour of the RAY_SERVE_*_AUTOSCALING_METRIC_"
        "PUSH_INTERVAL_S environment variables, which it still reads only at process start.")

    @model_validator(mode="after")
    def _min_below_max(self) -> "AutoscalingSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        return self


class ServeArgs(BaseModel):
    """Everything `build_app` needs. Frozen; build with `ServeArgs.from_args(dict)`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    engine: EngineConfig = Field(default_factory=EngineConfig)
    num_replicas: int = Field(1, ge=1, le=1024, description="Fixed replica count (ignored with autoscaling).")
    autoscaling: AutoscalingSettings | None = Field(None, description="Scale replicas on ongoing requests.")
    max_ongoing_requests: int = Field(
        256, ge=1, description="Requests one replica accepts at once; the engine queues past its batch."
    )
    num_cpus_per_replica: float = Field(1.0, ge=0.0, description="Logical CPUs of a replica on CPU nodes.")
    use_gpu: bool | None = Field(None, description="Reserve tp_size GPUs per replica; None: if the cluster has GPUs.")
    engine_overrides_by_rank: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Per-replica EngineConfig overrides, replica rank i takes entry i modulo the length "
        "(e.g. different num_blocks per replica).",
    )
    router: RouterSettings = Field(default_factory=RouterSettings)
    api_key: SecretStr | None = Field(None, description=f"Bearer token; default from ${API_KEY_ENV}. With api_keys "
                                      "too, it is one more key, named `default`, without limits.")
    api_keys: list[ApiKeySettings] = Field(
        default_factory=list, description="Several API keys, each with a name and its own limits "
        "(requests_per_s, tokens_per_min); requests are admitted fairly across them (router.max_routing_per_key).")
    tool_call_parser: Literal["auto", "hermes", "llama3_json", "mistral"] = Field(
        "auto", description="How `tool_choice: auto` completions are read for tool calls; auto: the format the "
        "model's chat template shows (serve_app/tool_calls.py).")
    stream_channel_transport: Literal["socket", "ray"] = Field(
        "socket", description="How an engine replica's token deltas reach each ingress replica (the stream "
        "channel, serve_app/stream_channel.py): socket, a TCP connection of its own per replica pair (loopback on "
        "one node; the replica's node address across nodes; serve_app/channel_socket.py), falling back to ray for "
        "a replica it cannot reach; ray, a Ray Serve streaming call (one more hop: about 1-2 ms at the median, more "
        "at the tail).")
    max_stream_events_per_s: float | None = Field(
        None, gt=0.0,
        description="Budget of server-sent events per second one ingress replica writes, over all its streams "
        "(serve_app/event_pacer.py). Each event costs the ingress and Serve's HTTP proxy about the same whatever "
        "it holds, and the proxy carries every ingress replica's events of its node. Below the budget (bursts of "
        "50 ms worth included) nothing waits and every engine step's tokens go out at once; past it the streams "
        "take turns, each waiting about n_streams / this many seconds, and the tokens that arrive meanwhile go "
        "out as one event. None: 1,000 through Serve's Python proxy, 3,000 where Ray's HAProxy ingress carries "
        "the streams (RAY_SERVE_ENABLE_HA_PROXY=1: a 3-4x cheaper event; docs/deploy.md).",
    )
    drain_timeout_s: float = Field(
        30.0, ge=0.0, description="A replica being removed (scale-down, redeploy) takes no new requests and is "
        "given this long for its streams to finish; those still running then go on on another replica from the "
        "tokens already sent (Serve's graceful_shutdown_timeout_s; docs/deploy.md).")
    max_request_body_bytes: int = Field(1 << 20, ge=1024, description="Larger bodies get 413.")
    request_timeout_s: float = Field(600.0, gt=0.0, description="Longest a non-streaming request may run.")
    engine_class: str = Field(
        "pagedserve.engine.async_engine:AsyncLLMEngine",
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="`module:Class` with `from_config(EngineConfig)`; tests swap in fault-injecting engines.",
    )
    served_model_name: str | None = Field(None, description="Model id in the API; default the engine's.")
    ingress_num_replicas: int | None = Field(
        None, ge=1, le=64,
        description="Replicas of the HTTP ingress (OpenAI API parsing and routing). None: 1 when the engine "
        f"replicas run on CPUs, {GPU_INGRESS_REPLICAS} when they have GPUs: one ingress process admits a few "
        "hundred requests/s, less than a GPU replica takes in a burst (docs/deploy.md). Raise it with many "
        "engine replicas.",
    )
    name_prefix: str = Field("", description="Prefix of the deployment names (two apps on one cluster).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Level of the deployments' logs; the per-request lines are INFO."
    )
    log_encoding: Literal["TEXT", "JSON"] = Field("TEXT", description="Ray Serve log record format.")
    log_prompts: bool = Field(
        False, description="Put the prompt into the per-request log line (off: prompts never reach logs)."
    )

    @field_validator("engine_overrides_by_rank")
    @classmethod
    def _overrides_are_engine_fields(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        allowed = set(EngineConfig.field_names())
        for overrides in value:
            unknown = sorted(set(overrides) - allowed)
            if unknown:
                raise ValueError(f"unknown EngineConfig fields {unknown}")
        return value

    @model_validator(mode="after")
    def _overrides_valid(self) -> "ServeArgs":
        for overrides in self.engine_overrides_by_rank:
            self.engine_config_for_rank_overrides(overrides)
        return self

    @property
    def model(self) -> str | None:
        return self.engine.model

    @property
    def tp_size(self) -> int:
        return self.engine.tp_size

    def engine_config_for_rank_overrides(self, overrides: dict[str, Any]) -> EngineConfig:
        return EngineConfig.create(**{**self.engine.model_dump(), **overrides})

    def engine_config_for_rank(self, rank: int) -> EngineConfig:
        if not self.engine_overrides_by_rank:
            return self.engine
        return self.engine_config_for_rank_overrides(
            self.engine_overrides_by_rank[rank % len(self.engine_overrides_by_rank)]
        )

    @field_validator("api_keys")
    @classmethod
    def _unique_key_names(cls, value: list[ApiKeySettings]) -> list[ApiKeySettings]:
        names = [key.name for key in value]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"API key names must be unique; repeated: {repeated}")
        return value

    def resolved_api_keys(self) -> list[ApiKeySettings]:
        """Every key with its value: `api_keys` (from their env vars) and `api_key` / ${API_KEY_ENV} as `default`."""
        keys = [key.resolved() for key in self.api_keys]
        single = self.resolved_api_key()
        if single is not None:
            if any(key.name == "default" for key in keys):
                raise ConfigError("ServeArgs.api_keys: the name 'default' is taken by api_key")
            keys.append(ApiKeySettings(name="default", key=SecretStr(single)))
        values = [key.key.get_secret_value() for key in keys if key.key is not None]
        if len(set(values)) != len(values):
            raise ConfigError("ServeArgs.api_keys: two keys have the same value")
        return keys

    def resolved_api_key(self) -> str | None:
        if self.api_key is not None and self.api_key.get_secret_value():
            return self.api_key.get_secret_value()
        return os.environ.get(API_KEY_ENV) or None

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> "ServeArgs":
        """Validate a flat or nested args dict; engine fields may sit at the top level."""
        args = dict(args or {})
        engine_fields = set(EngineConfig.field_names())
        engine_args = dict(args.pop("engine", None) or {})
        for key in list(args):
            if key in engine_fields and key not in cls.model_fields:
                engine_args[key] = args.pop(key)
        try:
            engine = EngineConfig(**engine_args)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "EngineConfig")) from None
        try:
            return cls(engine=engine, **args)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, cls.__name__)) from None

