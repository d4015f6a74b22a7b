"""k8s/*.yaml against KubeRay's CRD schemas and Kubernetes' own, plus the rules no schema states.

Schemas say a manifest is well-formed; the second half checks that it is what docs/deploy.md
promises: one replica per GPU pod, probes that cannot deadlock, the API key from a Secret, one model
cache volume, one Ray version everywhere.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any

import pytest
import yaml
from k8s_schema import (
    K8S_DIR,
    REPO_ROOT,
    SKIPPED_KINDS,
    crd_errors,
    documents_of_kind,
    load_documents,
    load_manifest,
    pod_templates,
    ray_cluster_spec,
    uncomment_options,
)

RAY_MANIFESTS = ["rayservice.yaml", "raycluster.yaml"]
ALL_MANIFESTS = [*RAY_MANIFESTS, "secret.example.yaml"]
RAY_KINDS = {"RayService", "RayCluster"}
# RayServiceUpgradeType in ray-operator/apis/ray/v1/rayservice_types.go; the CRD has no enum for it.
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}
# KubeRay names the serve Service "<name>-serve-svc": 63 characters - len("-serve-svc").
MAX_RAY_CR_NAME = 53
API_KEY_ENV = "PAGEDSERVE_API_KEY"
CACHE_ENVS = ("HF_HOME", "PAGEDSERVE_CACHE")


def _builtin_errors(document: dict[str, Any], k8s_validate: Any) -> list[str]:
    """Kubernetes-schema errors of a built-in object, or of the built-in parts inside a Ray CR."""
    kind = document.get("kind")
    if kind not in RAY_KINDS:
        return k8s_validate(document)
    # The CRDs leave metadata open; check it as the ObjectMeta it is, through a kind that has one.
    errors = k8s_validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": document["metadata"]})
    for where, template in pod_templates(ray_cluster_spec(document)):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": template.get("metadata", {}), "spec": template["spec"]}
        errors += [f"{where} pod template: {error}" for error in k8s_validate(pod)]
    if kind == "RayService" and "serveService" in document["spec"]:
        service = {"apiVersion": "v1", "kind": "Service", **document["spec"]["serveService"]}
        errors += [f"serveService: {error}" for error in k8s_validate(service)]
    return errors


def _documents_to_validate(manifest: str, *, with_options: bool) -> list[dict[str, Any]]:
    text = (K8S_DIR / manifest).read_text()
    if with_options:
        text, names = uncomment_options(text)
        assert names, f"{manifest} documents no `# >>> option:` block (node selector / tolerations)"
    documents = load_documents(text)
    assert documents, f"{manifest} is empty"
    # Prometheus operator kinds: their CRDs are not vendored in ../shared.
    return [document for document in documents if document.get("kind") not in SKIPPED_KINDS]


def _report(manifest: str, document: dict[str, Any], errors: list[str]) -> str:
    return f"{manifest} {document.get('kind')}/{document['metadata'].get('name')}:\n" + "\n".join(errors)


CASES = [(name, False) for name in ALL_MANIFESTS] + [(name, True) for name in RAY_MANIFESTS]
CASE_IDS = [f"{name}{'-options-uncommented' if with_options else ''}" for name, with_options in CASES]


@pytest.mark.parametrize(("manifest", "with_options"), CASES, ids=CASE_IDS)
def test_kuberay_resources_validate_against_the_crds(manifest: str, with_options: bool, crd_validators: Any) -> None:
    for document in _documents_to_validate(manifest, with_options=with_options):
        if document.get("kind") in RAY_KINDS:
            errors = crd_errors(crd_validators, document)
            assert not errors, _report(manifest, document, errors)


@pytest.mark.parametrize(("manifest", "with_options"), CASES, ids=CASE_IDS)
def test_builtin_objects_validate_against_kubernetes(manifest: str, with_options: bool, k8s_validate: Any) -> None:
    for document in _documents_to_validate(manifest, with_options=with_options):
        errors = _builtin_errors(document, k8s_validate)
        assert not errors, _report(manifest, document, errors)


def test_strict_schema_catches_a_misspelt_field(crd_validators: Any) -> None:
    """The API server would silently prune an unknown field; the test must not let one through."""
    (rayservice,) = documents_of_kind(load_manifest("rayservice.yaml"), "RayService")
    rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscalling"] = True
    rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"].append(
        {"name": API_KEY_ENV, "value": "duplicate"}
    )
    # Kubernetes' own JSON schema leaves quantities unchecked; the CRD's pattern catches them.
    rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "memory"
    ] = "8 gigs"
    errors = "\n".join(crd_errors(crd_validators, rayservice))
    assert "enableInTreeAutoscalling" in errors
    assert "x-kubernetes-list-type map" in errors
    assert "8 gigs" in errors


@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    (document,) = documents_of_kind(load_manifest("rayservice.yaml"), "RayService")
    return document


@pytest.fixture(scope="module")
def raycluster() -> dict[str, Any]:
    (document,) = documents_of_kind(load_manifest("raycluster.yaml"), "RayCluster")
    return document


@pytest.fixture(scope="module")
def serve_config(rayservice: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def test_raycluster_spec_is_the_rayservice_cluster(rayservice: dict[str, Any], raycluster: dict[str, Any]) -> None:
    assert raycluster["spec"] == rayservice["spec"]["rayClusterConfig"], (
        "k8s/raycluster.yaml's spec must equal rayClusterConfig of k8s/rayservice.yaml; edit both"
    )


@pytest.mark.parametrize("manifest", RAY_MANIFESTS)
def test_names_fit_kuberay_service_names(manifest: str) -> None:
    for document in load_manifest(manifest):
        name = document["metadata"]["name"]
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name
        if document["kind"] in RAY_KINDS:
            assert len(name) <= MAX_RAY_CR_NAME, f"{name}: KubeRay appends -serve-svc; keep it <= {MAX_RAY_CR_NAME}"


def test_upgrade_strategy_is_known(rayservice: dict[str, Any]) -> None:
    assert rayservice["spec"]["upgradeStrategy"]["type"] in UPGRADE_TYPES


def test_autoscaling_on_both_levels(rayservice: dict[str, Any], serve_config: dict[str, Any]) -> None:
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    (group,) = cluster["workerGroupSpecs"]
    for app in serve_config["applications"]:
        scaling = app["args"]["autoscaling"]
        # One replica per pod: the pod bounds are the replica bounds.
        assert (group["minReplicas"], group["maxReplicas"]) == (scaling["min_replicas"], scaling["max_replicas"])
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        # Replicas scale on the engines' own signals (serve_app/autoscaling.py), and a pod that is going
        # gives its replica the whole drain: Kubernetes kills the pod after terminationGracePeriodSeconds.
        assert scaling.get("policy", "engine_load") == "engine_load"
        drain_timeout_s = float(app["args"].get("drain_timeout_s", 30))
        assert group["template"]["spec"]["terminationGracePeriodSeconds"] > drain_timeout_s


def _container(template: dict[str, Any]) -> dict[str, Any]:
    return template["spec"]["containers"][0]


def test_head_has_no_gpu_and_no_work(rayservice: dict[str, Any]) -> None:
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    container = _container(head["template"])
    for section in ("requests", "limits"):
        assert "nvidia.com/gpu" not in container["resources"][section]
    assert head["rayStartParams"]["num-cpus"] == "0"
    # KubeRay deploys serveConfigV2 only once the head is Ready: a /health readiness probe would deadlock.
    assert "readinessProbe" not in container


def test_one_replica_per_gpu_pod(rayservice: dict[str, Any], serve_config: dict[str, Any]) -> None:
    (group,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    resources = _container(group["template"])["resources"]
    gpus_requested = int(resources["requests"]["nvidia.com/gpu"])
    assert gpus_requested == int(resources["limits"]["nvidia.com/gpu"]), "extended resources need requests == limits"
    for app in serve_config["applications"]:
        args = app["args"]
        # As ServeArgs.from_args reads it: a top-level engine field wins over the one under `engine:`.
        tp_size = int(args.get("tp_size", (args.get("engine") or {}).get("tp_size", 1)))
        assert args["use_gpu"] is True
        assert gpus_requested == tp_size, (
            f"worker pods hold {gpus_requested} GPUs but a replica takes tp_size={tp_size}"
        )


@pytest.mark.parametrize("manifest", RAY_MANIFESTS)
def test_every_container_has_requests_and_limits(manifest: str) -> None:
    for document in documents_of_kind(load_manifest(manifest), "RayService") + documents_of_kind(
        load_manifest(manifest), "RayCluster"
    ):
        cluster = ray_cluster_spec(document)
        for where, template in pod_templates(cluster):
            resources = _container(template)["resources"]
            for section in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[section]), f"{manifest} {where}: {section} lacks cpu/memory"
        assert {"requests", "limits"} <= set(cluster["autoscalerOptions"]["resources"])


def test_worker_readiness_is_the_ingress_health_route(rayservice: dict[str, Any], serve_config: dict[str, Any]) -> None:
    (group,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    container = _container(group["template"])
    probe = container["readinessProbe"]["httpGet"]
    (app,) = [app for app in serve_config["applications"] if app["import_path"].startswith("pagedserve.")]
    assert probe["path"] == posixpath.join(app.get("route_prefix", "/"), "health")
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports[probe["port"]] == serve_config["http_options"]["port"] == 8000
    assert "livenessProbe" in container


def test_serve_service_exposes_the_api_port(rayservice: dict[str, Any]) -> None:
    service = rayservice["spec"]["serveService"]
    assert [(port["port"], port["targetPort"]) for port in service["spec"]["ports"]] == [(8000, 8000)]
    head_ports = {
        port["name"]: port["containerPort"]
        for port in _container(rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"])["ports"]
    }
    assert head_ports["serve"] == 8000


def test_raycluster_service_selects_the_worker_pods() -> None:
    documents = load_manifest("raycluster.yaml")
    (service,) = documents_of_kind(documents, "Service")
    (cluster,) = documents_of_kind(documents, "RayCluster")
    assert service["spec"]["selector"] == {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "worker"}
    assert service["spec"]["ports"][0]["port"] == 8000


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container.get("env", [])}


@pytest.mark.parametrize("manifest", RAY_MANIFESTS)
def test_api_key_comes_from_the_example_secret(manifest: str) -> None:
    secrets = {
        doc["metadata"]["name"]: doc for doc in documents_of_kind(load_manifest("secret.example.yaml"), "Secret")
    }
    for document in load_manifest(manifest):
        if document["kind"] not in RAY_KINDS:
            continue
        for where, template in pod_templates(ray_cluster_spec(document)):
            entry = _env(_container(template))[API_KEY_ENV]
            assert "value" not in entry, f"{where}: never a literal key in a manifest"
            reference = entry["valueFrom"]["secretKeyRef"]
            assert reference["key"] in secrets[reference["name"]]["stringData"], where
            assert not reference.get("optional", False), f"{where}: a missing API key Secret must stop the pod"
            # Every other Secret a pod reads is documented in the example too.
            for other in _env(_container(template)).values():
                other_reference = other.get("valueFrom", {}).get("secretKeyRef")
                if other_reference:
                    assert other_reference["key"] in secrets[other_reference["name"]]["stringData"], where


# Ray's HAProxy ingress: HAProxy on each node forwards to the ingress replicas' own HTTP ports, 30000-31000 by
# default (RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT / _MAX_); Ray reads the switch on every node.
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
DIRECT_INGRESS_PORTS = range(30000, 31001)


@pytest.mark.parametrize("manifest", RAY_MANIFESTS)
def test_every_ray_container_runs_the_haproxy_ingress(manifest: str) -> None:
    """Head and workers alike (a node without it would start Serve's Python proxy beside HAProxy's), and no Ray
    worker port range over the ingress replicas' ports."""
    for document in load_manifest(manifest):
        if document["kind"] not in RAY_KINDS:
            continue
        cluster = ray_cluster_spec(document)
        groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
        for where, group in groups:
            env = _env(_container(group["template"]))
            assert env.get(HAPROXY_ENV, {}).get("value") == "1", f"{manifest} {where}: {HAPROXY_ENV} not set to 1"
            params = group.get("rayStartParams") or {}
            low, high = int(params.get("min-worker-port", 10002)), int(params.get("max-worker-port", 19999))
            assert high < DIRECT_INGRESS_PORTS.start or low > DIRECT_INGRESS_PORTS.stop - 1, (
                f"{manifest} {where}: Ray worker ports {low}-{high} overlap the ingress replicas' 30000-31000")


@pytest.mark.parametrize("manifest", RAY_MANIFESTS)
def test_model_cache_volume_is_the_claim_and_the_cache_dirs(manifest: str) -> None:
    documents = load_manifest(manifest)
    (claim,) = documents_of_kind(documents, "PersistentVolumeClaim")
    for document in documents:
        if document["kind"] not in RAY_KINDS:
            continue
        for where, template in pod_templates(ray_cluster_spec(document)):
            volumes = {volume["name"]: volume for volume in template["spec"]["volumes"]}
            container = _container(template)
            (mount,) = [m for m in container["volumeMounts"] if "persistentVolumeClaim" in volumes[m["name"]]]
            assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"], where
            env = _env(container)
            for name in CACHE_ENVS:
                assert env[name]["value"].startswith(mount["mountPath"].rstrip("/") + "/"), f"{where}: {name}"


def _dockerfile_ray_version() -> str:
    text = (REPO_ROOT / "Dockerfile").read_text()
    (image,) = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-gpu", image)
    assert match, f"Dockerfile FROM {image}: expected the official rayproject/ray:<x.y.z>-py3XX-gpu family"
    return match[1]


@pytest.mark.parametrize("manifest", RAY_MANIFESTS)
def test_one_ray_version_and_one_image(manifest: str) -> None:
    ray_version = _dockerfile_ray_version()
    for document in load_manifest(manifest):
        if document["kind"] not in RAY_KINDS:
            continue
        cluster = ray_cluster_spec(document)
        assert cluster["rayVersion"] == ray_version, "rayVersion must be the Ray of the Dockerfile's base image"
        images = {_container(template)["image"] for _, template in pod_templates(cluster)}
        assert len(images) == 1, f"head and workers must run one image: {images}"


def test_builtin_schema_catches_a_bad_pod_template(k8s_validate: Any) -> None:
    (rayservice,) = documents_of_kind(load_manifest("rayservice.yaml"), "RayService")
    (group,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    spec = group["template"]["spec"]
    spec["tolerations"] = [{"key": "nvidia.com/gpu", "operater": "Exists"}]
    errors = "\n".join(k8s_validate({"apiVersion": "v1", "kind": "Pod", "metadata": {}, "spec": spec}))
    assert "operater" in errors


@pytest.mark.parametrize("manifest", RAY_MANIFESTS)
def test_kuberay_controller_rules(manifest: str) -> None:
    """Rules KubeRay's controller enforces beyond the CRD schema (ray-operator/controllers/ray/utils/validation.go)."""
    for document in load_manifest(manifest):
        if document["kind"] not in RAY_KINDS:
            continue
        cluster = ray_cluster_spec(document)
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        for group in groups:
            start_params = group.get("rayStartParams", {})
            assert "labels" not in start_params, "use the group's labels field"
            if {"num-cpus", "num-gpus", "memory", "resources"} & set(start_params):
                assert not group.get("resources"), "resources in both rayStartParams and the group's resources"
            # Autoscaler v2 needs pods that are replaced, not restarted in place.
            assert group["template"]["spec"].get("restartPolicy", "Never") == "Never"
        for group in cluster["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group["maxReplicas"]
        options = cluster.get("autoscalerOptions", {})
        assert options.get("idleTimeoutSeconds", 0) >= 0
        head_env = _env(_container(cluster["headGroupSpec"]["template"]))
        assert not ("version" in options and "RAY_ENABLE_AUTOSCALER_V2" in head_env)
        if document["kind"] == "RayService":
            assert "name" not in cluster["headGroupSpec"].get("headService", {}).get("metadata", {})
            strategy = document["spec"].get("upgradeStrategy", {})
            if strategy.get("type") == "NewClusterWithIncrementalUpgrade":
                assert cluster.get("enableInTreeAutoscaling"), "incremental upgrade needs the Ray autoscaler"
                assert strategy["clusterUpgradeOptions"]["gatewayClassName"]


def test_deploy_doc_names_what_the_manifests_use(rayservice: dict[str, Any]) -> None:
    """docs/deploy.md's commands must keep working when a name changes here."""
    doc = (REPO_ROOT / "docs" / "deploy.md").read_text()
    secrets = documents_of_kind(load_manifest("secret.example.yaml"), "Secret")
    for secret in secrets:
        (key,) = secret["stringData"]
        assert f"create secret generic {secret['metadata']['name']} --from-literal={key}=" in doc
    assert f"svc/{rayservice['spec']['serveService']['metadata']['name']} 8000:8000" in doc
    assert f"svc/{rayservice['metadata']['name']}-head-svc 8265:8265" in doc
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    (base_image,) = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.MULTILINE)
    (torch_spec,) = re.findall(r'^ARG TORCH_SPEC="([^"]+)"', dockerfile, flags=re.MULTILINE)
    assert base_image in doc and f'pip install "{torch_spec}"' in doc
