"""`build_app(args)`: validate the args dict once, bind the engine replicas and the OpenAI ingress (and, with
LoRA, the registry of adapters both follow: serve_app/lora_registry.py; with API keys that have limits, the
one set of buckets every ingress replica asks: serve_app/key_limiter.py).

`app` is the Ray Serve application builder (`serve run pagedserve.serve_app:app model=... num_replicas=2`
or the `import_path` of config/serve.yaml); Serve calls it with the args dict.
"""

from __future__ import annotations

import warnings
from typing import Any

from pydantic import SecretStr
from ray import serve
from ray.serve import Application
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig

from pagedserve.config.serve import GPU_INGRESS_REPLICAS, AutoscalingSettings, ServeArgs

from pagedserve.serve_app.ingress import OpenAIIngress
from pagedserve.serve_app.key_limiter import KeyLimiter
from pagedserve.serve_app.lora_registry import LoraRegistry
from pagedserve.serve_app.replica import EngineReplica
from pagedserve.serve_app.tenants import KeyLimits

ROUTER_CLASS_PATH = "pagedserve.serve_app.router.FreeBlocksRequestRouter"
AUTOSCALING_POLICY_PATH = "pagedserve.serve_app.autoscaling:EngineLoadPolicy"
# How often a draining replica checks whether its calls have ended (Serve's default is 2 s).
DRAIN_CHECK_PERIOD_S = 0.5


def _cluster_has_gpus() -> bool:
    try:
        import ray

        if ray.is_initialized():
            return ray.cluster_resources().get("GPU", 0) > 0
    except Exception:
        pass
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def logging_config(serve_args: ServeArgs) -> dict[str, Any]:
    """Ray Serve's per-deployment logging: level and TEXT or JSON records (the replica logs one line per request)."""
    return {"log_level": serve_args.log_level, "encoding": serve_args.log_encoding}


def _uses_gpu(serve_args: ServeArgs) -> bool:
    return _cluster_has_gpus() if serve_args.use_gpu is None else serve_args.use_gpu


def ingress_options(serve_args: ServeArgs) -> dict[str, Any]:
    """Deployment options of `OpenAIIngress`: it only parses, routes and relays, so many requests wait in it
    at once; its replica count follows `ServeArgs.ingress_num_replicas` (None: by whether engines have GPUs)."""
    num_replicas = serve_args.ingress_num_replicas
    if num_replicas is None:
        num_replicas = GPU_INGRESS_REPLICAS if _uses_gpu(serve_args) else 1
    return {
        "name": f"{serve_args.name_prefix}OpenAIIngress",
        "num_replicas": num_replicas,
        "max_ongoing_requests": 4096,
        "ray_actor_options": {"num_cpus": 0.5},
        "logging_config": logging_config(serve_args),
    }


def replica_options(serve_args: ServeArgs) -> dict[str, Any]:
    """Deployment options of `EngineReplica`: resources, concurrency, router, replicas or autoscaling.

    Serve's `max_ongoing_requests` is the configured one plus one stream channel per ingress replica
    (serve_app/stream_channel.py): a replica full of requests still takes the channel their deltas need (with the
    Ray transport; over sockets, the default, the channel is no Serve call and the slot stays free)."""
    use_gpu = _uses_gpu(serve_args)
    actor_options: dict[str, Any] = {"num_cpus": serve_args.num_cpus_per_replica}
    if use_gpu:
        actor_options["num_gpus"] = serve_args.tp_size
    router = serve_args.router
    options: dict[str, Any] = {
        "name": f"{serve_args.name_prefix}EngineReplica",
        "ray_actor_options": actor_options,
        "max_ongoing_requests": serve_args.max_ongoing_requests + ingress_options(serve_args)["num_replicas"],
        "health_check_period_s": 10,
        "health_check_timeout_s": 60,
        # A replica being removed gets no new requests and this long to finish its streams (its stream
        # channels close once idle, serve_app/stream_channel.py); what still runs then goes on elsewhere.
        "graceful_shutdown_timeout_s": serve_args.drain_timeout_s,
        "graceful_shutdown_wait_loop_s": DRAIN_CHECK_PERIOD_S,
        "logging_config": logging_config(serve_args),
        "request_router_config": RequestRouterConfig(
            request_router_class=ROUTER_CLASS_PATH,
            request_router_kwargs=router.model_dump(),
            request_routing_stats_period_s=router.stats_period_s,
            request_routing_stats_timeout_s=max(5.0, 5 * router.stats_period_s),
            initial_backoff_s=router.initial_backoff_s,
            max_backoff_s=router.max_backoff_s,
        ),
    }
    if serve_args.autoscaling is not None:
        options["autoscaling_config"] = autoscaling_config(serve_args.autoscaling)
    else:
        options["num_replicas"] = serve_args.num_replicas
    return options


def lora_registry_options(serve_args: ServeArgs) -> dict[str, Any]:
    """Deployment options of `LoraRegistry` (serve_app/lora_registry.py): one replica, no CPU of its own; each
    ingress and engine replica keeps a long poll open on it, so its concurrency is not what bounds it, and
    stopping it need not wait for those polls (they are asked again)."""
    return {
        "name": f"{serve_args.name_prefix}LoraRegistry",
        "num_replicas": 1,
        "max_ongoing_requests": 4096,
        "graceful_shutdown_timeout_s": 1,
        "ray_actor_options": {"num_cpus": 0},
        "logging_config": logging_config(serve_args),
    }


def key_limiter_options(serve_args: ServeArgs) -> dict[str, Any]:
    """Deployment options of `KeyLimiter` (serve_app/key_limiter.py): one replica (the buckets are its state), no
    CPU of its own; each call is a few dictionary operations."""
    return {
        "name": f"{serve_args.name_prefix}KeyLimiter",
        "num_replicas": 1,
        "max_ongoing_requests": 4096,
        "ray_actor_options": {"num_cpus": 0},
        "logging_config": logging_config(serve_args),
    }


def key_limits(serve_args: ServeArgs) -> dict[str, KeyLimits]:
    """The limits of each key that has some (keys without limits never ask the limiter)."""
    return {key.name: KeyLimits(key.requests_per_s, key.tokens_per_min) for key in serve_args.api_keys
            if key.requests_per_s is not None or key.tokens_per_min is not None}


def autoscaling_config(scaling: AutoscalingSettings) -> AutoscalingConfig:
    """Serve's autoscaling_config of the engine replicas: with `policy: engine_load`, `EngineLoadPolicy`
    (serve_app/autoscaling.py) on the signals the replicas report; delays and bounds apply either way."""
    options: dict[str, Any] = {}
    if scaling.metrics_interval_s is not None:
        options["metrics_interval_s"] = scaling.metrics_interval_s
    if scaling.policy == "engine_load":
        options["policy"] = AutoscalingPolicy(policy_function=AUTOSCALING_POLICY_PATH, policy_kwargs={
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "target_kv_cache_usage": scaling.target_kv_cache_usage,
            "max_waiting_per_replica": scaling.max_waiting_per_replica,
        })
    with warnings.catch_warnings():  # Ray warns that metrics_interval_s will move to environment variables
        warnings.simplefilter("ignore", DeprecationWarning)
        return AutoscalingConfig(
            min_replicas=scaling.min_replicas,
            initial_replicas=max(scaling.min_replicas, 1),
            max_replicas=scaling.max_replicas,
            target_ongoing_requests=scaling.target_ongoing_requests,
            upscale_delay_s=scaling.upscale_delay_s,
            downscale_delay_s=scaling.downscale_delay_s,
            look_back_period_s=scaling.look_back_period_s,
            **options,
        )


def build_app(args: dict[str, Any] | ServeArgs | None = None) -> Application:
    serve_args = args if isinstance(args, ServeArgs) else ServeArgs.from_args(args)
    if serve_args.api_key is None and serve_args.resolved_api_key() is not None:
        # Read $PAGEDSERVE_API_KEY where `serve run` was started: worker processes may not inherit it.
        serve_args = serve_args.model_copy(update={"api_key": SecretStr(serve_args.resolved_api_key())})
    if any(key.key_env is not None for key in serve_args.api_keys):  # the same for each key's variable
        serve_args = serve_args.model_copy(update={"api_keys": [key.resolved() for key in serve_args.api_keys]})
    if serve_args.use_gpu is None:  # ask the cluster once: both deployments' options follow the answer
        serve_args = serve_args.model_copy(update={"use_gpu": _cluster_has_gpus()})
    if serve_args.ingress_num_replicas is None:  # the ingresses know how many they are (serve_app/key_limiter.py)
        serve_args = serve_args.model_copy(update={"ingress_num_replicas": ingress_options(serve_args)["num_replicas"]})
    replica = serve.deployment(EngineReplica).options(**replica_options(serve_args))
    ingress = serve.deployment(OpenAIIngress).options(**ingress_options(serve_args))
    lora_registry = None
    if serve_args.engine.enable_lora or serve_args.engine.lora_modules:  # one list of adapters for every replica
        lora_registry = serve.deployment(LoraRegistry).options(**lora_registry_options(serve_args)).bind(
            dict(serve_args.engine.lora_modules or {}))
    key_limiter = None
    if limits := key_limits(serve_args):  # one set of buckets for every ingress replica
        key_limiter = serve.deployment(KeyLimiter).options(**key_limiter_options(serve_args)).bind(limits)
    return ingress.bind(replica.bind(serve_args, lora_registry), serve_args, lora_registry, key_limiter)


def app(args: dict[str, Any]) -> Application:
    """Ray Serve application builder."""
    return build_app(args)
