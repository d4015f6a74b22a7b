"""Serve args validation, the shipped YAML, and the deployment options built from them. No Ray cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pagedserve.config.engine import ConfigError
from pagedserve.config.serve import API_KEY_ENV, GPU_INGRESS_REPLICAS, ServeArgs
from pagedserve.serve_app.app import build_app, ingress_options, replica_options

REPO = Path(__file__).resolve().parents[2]


def test_flat_engine_fields_and_cli_strings() -> None:
    args = ServeArgs.from_args({"model": "/m", "num_replicas": "2", "num_blocks": "64", "block_size": "8"})
    assert args.num_replicas == 2
    assert args.engine.model == "/m" and args.engine.num_blocks == 64 and args.engine.block_size == 8


def test_bad_values_name_the_field() -> None:
    with pytest.raises(ConfigError, match="num_replicas"):
        ServeArgs.from_args({"num_replicas": 0})
    with pytest.raises(ConfigError, match="block_size"):
        ServeArgs.from_args({"block_size": 0})
    with pytest.raises(ConfigError, match="no_such_field"):
        ServeArgs.from_args({"no_such_field": 1})
    with pytest.raises(ConfigError, match="engine_overrides_by_rank"):
        ServeArgs.from_args({"engine_overrides_by_rank": [{"bogus": 1}]})
    with pytest.raises(ConfigError, match="min_replicas"):
        ServeArgs.from_args({"autoscaling": {"min_replicas": 3, "max_replicas": 2}})
    with pytest.raises(ConfigError, match="max_stream_events_per_s"):
        ServeArgs.from_args({"max_stream_events_per_s": 0})
    # Unset: the ingress picks the budget by the path its events take (serve_app/event_pacer.py).
    assert ServeArgs.from_args({}).max_stream_events_per_s is None
    assert ServeArgs.from_args({"max_stream_events_per_s": "2500"}).max_stream_events_per_s == 2500.0


def test_overrides_by_rank() -> None:
    args = ServeArgs.from_args({"num_blocks": 64, "engine_overrides_by_rank": [{"num_blocks": 64}, {"num_blocks": 8}]})
    assert [args.engine_config_for_rank(r).num_blocks for r in range(3)] == [64, 8, 64]


def test_api_key_from_env_and_never_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, "env-key")
    assert ServeArgs.from_args({}).resolved_api_key() == "env-key"
    args = ServeArgs.from_args({"api_key": "s3cret"})
    assert args.resolved_api_key() == "s3cret"
    assert "s3cret" not in repr(args) and "s3cret" not in str(args.model_dump())


def test_shipped_yaml_validates() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO / "config" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(config)
    assert schema.http_options.host == "127.0.0.1" and schema.http_options.port == 8000
    application = config["applications"][0]
    assert application["import_path"] == "pagedserve.serve_app:app"
    args = ServeArgs.from_args(application["args"])
    assert args.engine.model is None
    options = replica_options(args)
    assert options["autoscaling_config"].max_replicas == args.autoscaling.max_replicas
    assert options["request_router_config"].request_router_class.endswith("FreeBlocksRequestRouter")
    build_app(application["args"])  # binds without a cluster


def test_autoscaling_runs_the_engine_load_policy_and_a_removed_replica_drains() -> None:
    options = replica_options(ServeArgs.from_args({
        "drain_timeout_s": 12, "autoscaling": {"max_replicas": 4, "target_kv_cache_usage": 0.6,
                                               "look_back_period_s": 5, "metrics_interval_s": 0.5}}))
    config = options["autoscaling_config"]
    assert config.policy.policy_function == "pagedserve.serve_app.autoscaling:EngineLoadPolicy"
    assert config.policy.policy_kwargs == {"target_ongoing_requests": 16.0, "target_kv_cache_usage": 0.6,
                                           "max_waiting_per_replica": 1.0}
    assert (config.look_back_period_s, config.metrics_interval_s) == (5, 0.5)
    assert options["graceful_shutdown_timeout_s"] == 12
    serve_default = replica_options(ServeArgs.from_args({"autoscaling": {"policy": "ongoing_requests"}}))
    assert serve_default["autoscaling_config"].policy.is_default_policy_function()
    with pytest.raises(ConfigError, match="target_kv_cache_usage"):
        ServeArgs.from_args({"autoscaling": {"target_kv_cache_usage": 1.5}})


def test_fixed_replicas_without_autoscaling() -> None:
    options = replica_options(ServeArgs.from_args({"num_replicas": 3, "use_gpu": True, "tp_size": 2}))
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["ray_actor_options"]["num_gpus"] == 2


def test_ingress_replicas_follow_the_engines_device_unless_set() -> None:
    """Unset, one ingress feeds CPU engines and GPU_INGRESS_REPLICAS feed GPU engines (one process admits
    too few requests per second for a GPU replica); a set count is kept either way."""
    assert ingress_options(ServeArgs.from_args({"use_gpu": False}))["num_replicas"] == 1
    assert ingress_options(ServeArgs.from_args({"use_gpu": True}))["num_replicas"] == GPU_INGRESS_REPLICAS > 1
    for use_gpu in (False, True):
        options = ingress_options(ServeArgs.from_args({"use_gpu": use_gpu, "ingress_num_replicas": 2}))
        assert options["num_replicas"] == 2
    with pytest.raises(ConfigError, match="ingress_num_replicas"):
        ServeArgs.from_args({"ingress_num_replicas": 0})
    options = ingress_options(ServeArgs.from_args({"name_prefix": "a_", "log_level": "DEBUG"}))
    assert options["name"] == "a_OpenAIIngress" and options["logging_config"]["log_level"] == "DEBUG"


def test_app_builder_import_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """`pagedserve.serve_app:app` and, from the repo root, `serve_app:app` are Serve application builders."""
    import sys

    from ray.serve import Application
    from ray.serve._private.utils import import_attr

    builder = import_attr("pagedserve.serve_app:app")
    assert isinstance(builder({"num_blocks": "8", "num_replicas": "2"}), Application)
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.delitem(sys.modules, "serve_app", raising=False)
    top_level = import_attr("serve_app:app")
    assert top_level is builder  # same function: deployments pickle under pagedserve.serve_app.*


def test_api_key_env_is_captured_at_build(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    app_module = importlib.import_module("pagedserve.serve_app.app")

    captured = {}
    real = app_module.serve.deployment

    def spy(target):
        deployment = real(target)
        original_options = deployment.options

        def options(**kwargs):
            bound = original_options(**kwargs)
            original_bind = bound.bind

            def bind(*args):
                captured[target.__name__] = args
                return original_bind(*args)

            bound.bind = bind
            return bound

        deployment.options = options
        return deployment

    monkeypatch.setenv(API_KEY_ENV, "from-env")
    monkeypatch.setattr(app_module.serve, "deployment", spy)
    app_module.build_app({})
    serve_args = captured["OpenAIIngress"][1]
    assert serve_args.api_key.get_secret_value() == "from-env"


def test_metrics_observe_without_cluster() -> None:
    from pagedserve.engine.core.stats import EngineStats
    from pagedserve.serve_app.metrics import ReplicaMetrics

    stats = EngineStats(num_free_blocks=3, num_total_blocks=4, block_size=16, num_running=1, num_waiting=0,
                        num_preempted_waiting=0, max_model_len=64, kv_cache_usage=0.25, kv_cache_bytes_total=1,
                        kv_cache_bytes_used=0)
    ReplicaMetrics(model_name="m", replica="r").observe(stats)  # never raises, even with no metrics agent
