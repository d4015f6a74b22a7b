"""Serve args validation, the shipped YAML, and the deployment options built from them. No Ray cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pagedserve.config.engine import ConfigError
from pagedserve.config.serve import API_KEY_ENV, ServeArgs
from pagedserve.serve_app.app import build_app, replica_options

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


def test_fixed_replicas_without_autoscaling() -> None:
    options = replica_options(ServeArgs.from_args({"num_replicas": 3, "use_gpu": True, "tp_size": 2}))
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["ray_actor_options"]["num_gpus"] == 2
