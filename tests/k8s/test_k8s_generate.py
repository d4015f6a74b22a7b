"""k8s/generate.py: the manifests' Serve config is config/serve.yaml plus the pod overrides, never drifted."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from k8s_schema import K8S_DIR, REPO_ROOT, documents_of_kind, load_documents, load_manifest

SOURCE = REPO_ROOT / "config" / "serve.yaml"
GENERATED_FILES = ("rayservice.yaml", "raycluster.yaml")


@pytest.fixture(scope="module")
def generate() -> ModuleType:
    # k8s/ is a folder of manifests, not a package: load the script from its path.
    spec = importlib.util.spec_from_file_location("pagedserve_k8s_generate", K8S_DIR / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _no_model_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PAGEDSERVE_MODEL", raising=False)


@pytest.fixture()
def source_config() -> dict[str, Any]:
    if not SOURCE.is_file():
        pytest.skip(f"{SOURCE} not written yet (serve_app issue)")
    return yaml.safe_load(SOURCE.read_text())


@pytest.fixture()
def workspace(tmp_path: Path, source_config: dict[str, Any]) -> tuple[Path, Path]:
    """A copy of k8s/ and config/serve.yaml to regenerate into."""
    k8s_dir = tmp_path / "k8s"
    k8s_dir.mkdir()
    for name in (*GENERATED_FILES, "serve_config.yaml"):
        shutil.copy(K8S_DIR / name, k8s_dir / name)
    source = tmp_path / "serve.yaml"
    shutil.copy(SOURCE, source)
    return source, k8s_dir


def _serve_config_of(k8s_dir: Path) -> dict[str, Any]:
    (rayservice,) = documents_of_kind(load_documents((k8s_dir / "rayservice.yaml").read_text()), "RayService")
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def _our_apps(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [app for app in config["applications"] if app["import_path"].startswith("pagedserve.")]


def test_committed_manifests_match_config_serve_yaml(
    generate: ModuleType, source_config: dict[str, Any], capsys: Any
) -> None:
    exit_code = generate.main(["--check"])
    assert exit_code == 0, (
        "k8s/ drifted from config/serve.yaml; run `python k8s/generate.py`\n" + capsys.readouterr().out
    )


def test_check_fails_on_drift_and_generate_fixes_it(generate: ModuleType, workspace: tuple[Path, Path]) -> None:
    source, k8s_dir = workspace
    config = yaml.safe_load(source.read_text())
    (app,) = _our_apps(config)
    args = app.setdefault("args", {})
    engine = args["engine"] if isinstance(args.get("engine"), dict) else args
    engine["tp_size"] = 2
    engine["block_size"] = 32
    source.write_text(yaml.safe_dump(config, sort_keys=False))
    common = ["--source", str(source), "--k8s-dir", str(k8s_dir), "--max-replicas", "8"]

    assert generate.main([*common, "--check"]) == 1
    assert generate.main(common) == 0
    assert generate.main([*common, "--check"]) == 0

    (app,) = _our_apps(_serve_config_of(k8s_dir))
    rendered_engine = app["args"]["engine"] if isinstance(app["args"].get("engine"), dict) else app["args"]
    assert (rendered_engine["tp_size"], rendered_engine["block_size"]) == (2, 32)
    for name in GENERATED_FILES:
        (cluster,) = [
            d for d in load_documents((k8s_dir / name).read_text()) if d["kind"] in {"RayService", "RayCluster"}
        ]
        cluster_spec = cluster["spec"].get("rayClusterConfig", cluster["spec"])
        (group,) = cluster_spec["workerGroupSpecs"]
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "2", name
        assert group["maxReplicas"] == 8, name
    # Only the generated parts changed: every comment line of the hand-written manifest is still there.
    for name in GENERATED_FILES:
        original_comments = [
            line for line in (K8S_DIR / name).read_text().splitlines() if line.lstrip().startswith("#")
        ]
        new_text = (k8s_dir / name).read_text()
        assert all(line in new_text for line in original_comments), name


def test_pod_overrides(generate: ModuleType, workspace: tuple[Path, Path], source_config: dict[str, Any]) -> None:
    source, k8s_dir = workspace
    assert generate.main(["--source", str(source), "--k8s-dir", str(k8s_dir), "--model", "org/some-model"]) == 0
    config = _serve_config_of(k8s_dir)
    # Pods must listen on their own IP; config/serve.yaml's loopback would make the Service and probes fail.
    assert config["http_options"] == {**(source_config.get("http_options") or {}), "host": "0.0.0.0", "port": 8000}
    for app in _our_apps(config):
        args = app["args"]
        engine = args["engine"] if isinstance(args.get("engine"), dict) else args
        assert engine["model"] == "org/some-model"
        assert args["use_gpu"] is True
        assert "api_key" not in args and "num_replicas" not in args and "runtime_env" not in app
        assert 1 <= args["autoscaling"]["min_replicas"] <= args["autoscaling"]["max_replicas"]
    assert yaml.safe_load((k8s_dir / "serve_config.yaml").read_text()) == config


def test_model_override_wins_over_a_top_level_copy(generate: ModuleType, workspace: tuple[Path, Path]) -> None:
    source, k8s_dir = workspace
    config = yaml.safe_load(source.read_text())
    (app,) = _our_apps(config)
    app["args"].setdefault("engine", {})["model"] = "org/nested"
    app["args"]["model"] = "org/top-level"  # ServeArgs.from_args lets this one win
    source.write_text(yaml.safe_dump(config, sort_keys=False))
    assert generate.main(["--source", str(source), "--k8s-dir", str(k8s_dir), "--model", "org/chosen"]) == 0
    (rendered,) = _our_apps(_serve_config_of(k8s_dir))
    assert generate.engine_field(rendered["args"], "model") == "org/chosen"
    assert "model" not in rendered["args"]


def test_model_from_environment(
    generate: ModuleType, workspace: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    source, k8s_dir = workspace
    monkeypatch.setenv("PAGEDSERVE_MODEL", "org/from-env")
    assert generate.main(["--source", str(source), "--k8s-dir", str(k8s_dir)]) == 0
    for app in _our_apps(_serve_config_of(k8s_dir)):
        args = app["args"]
        assert (args["engine"] if isinstance(args.get("engine"), dict) else args)["model"] == "org/from-env"


def test_refuses_an_api_key_in_the_source(generate: ModuleType, workspace: tuple[Path, Path], capsys: Any) -> None:
    source, k8s_dir = workspace
    config = yaml.safe_load(source.read_text())
    _our_apps(config)[0].setdefault("args", {})["api_key"] = "sk-do-not-commit"
    source.write_text(yaml.safe_dump(config))
    before = (k8s_dir / "rayservice.yaml").read_text()
    assert generate.main(["--source", str(source), "--k8s-dir", str(k8s_dir)]) == 2
    assert "api_key" in capsys.readouterr().err
    assert (k8s_dir / "rayservice.yaml").read_text() == before


def test_serve_config_file_is_the_rayservice_config() -> None:
    (rayservice,) = documents_of_kind(load_manifest("rayservice.yaml"), "RayService")
    assert yaml.safe_load((K8S_DIR / "serve_config.yaml").read_text()) == yaml.safe_load(
        rayservice["spec"]["serveConfigV2"]
    )


def test_serve_config_passes_ray_serve_schema() -> None:
    schema = pytest.importorskip("ray.serve.schema", reason="ray[serve] not installed")
    config = yaml.safe_load((K8S_DIR / "serve_config.yaml").read_text())
    schema.ServeDeploySchema.model_validate(config)


def test_serve_config_args_pass_serve_args() -> None:
    serve_config = pytest.importorskip("pagedserve.config.serve", reason="pagedserve not installed")
    config = yaml.safe_load((K8S_DIR / "serve_config.yaml").read_text())
    apps = _our_apps(config)
    assert apps
    for app in apps:
        module_name, _, attribute = app["import_path"].partition(":")
        assert importlib.util.find_spec(module_name) is not None, app["import_path"]
        assert attribute == "app", "the application builder of serve_app"
        args = serve_config.ServeArgs.from_args(app["args"])
        assert args.use_gpu is True
        assert args.autoscaling is not None
        assert args.resolved_api_key() is None or "api_key" not in app["args"]
