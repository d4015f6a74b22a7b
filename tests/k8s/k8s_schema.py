"""Offline validation of k8s/: loaders, KubeRay CRD schemas made strict, Kubernetes built-in schemas.

Helpers; the fixtures that use them are in conftest.py.

KubeRay's CRDs (../shared/kuberay/, relative to the repository root) carry OpenAPI v3 "structural"
schemas. The API server prunes unknown fields silently, so a misspelt field would vanish on apply;
here every object schema with `properties` is closed (`additionalProperties: false`) unless it says
`x-kubernetes-preserve-unknown-fields`, so a typo fails the test instead. The `x-kubernetes-*`
extensions are honoured where they change what is valid:

- `x-kubernetes-int-or-string`: an integer or a string (quantities, ports);
- `nullable`: null is allowed too;
- `x-kubernetes-list-type: map|set`: no two items share their map keys / no duplicate items, as the
  API server enforces (e.g. two env vars of one name);
- `x-kubernetes-validations` (CEL rules): not evaluated offline, so a manifest that sets such a field
  fails with a message saying so, rather than passing unchecked.

Built-in kinds (PersistentVolumeClaim, Service, Secret, and the pod templates inside the Ray CRs) are
checked with kubernetes-validate's bundled, strict Kubernetes schemas, offline.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "k8s"
KUBERAY_CRD_DIR = REPO_ROOT.parent / "shared" / "kuberay"
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
# The oldest Kubernetes we document (docs/deploy.md) and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.29", "latest")
# Kinds a later issue may add (Prometheus operator); their CRDs are not in ../shared, so they are skipped.
SKIPPED_KINDS = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}

OPTION_BEGIN = re.compile(r"^(?P<indent>\s*)# >>> option: (?P<name>[a-z0-9-]+)")
OPTION_END = re.compile(r"^\s*# <<< option")


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys, as kubectl does (PyYAML keeps the last one)."""


def _construct_mapping_without_duplicates(loader: StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_without_duplicates)


class FastLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """libyaml when PyYAML has it: the two CRD files are 2 MB of YAML (1 s instead of 3.5 s each)."""


def load_documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.load_all(text, Loader=StrictLoader) if doc is not None]


def load_manifest(name: str) -> list[dict[str, Any]]:
    return load_documents((K8S_DIR / name).read_text())


def uncomment_options(text: str) -> tuple[str, list[str]]:
    """Text with every `# >>> option: NAME ... # <<< option` block uncommented, and the option names."""
    out, names, indent = [], [], None
    for line in text.splitlines(keepends=True):
        begin = OPTION_BEGIN.match(line)
        if begin:
            indent, names = begin["indent"], names + [begin["name"]]
            continue
        if indent is not None and OPTION_END.match(line):
            indent = None
            continue
        if indent is not None:
            prefix = indent + "# "
            assert line.startswith(prefix), f"option line not commented at the block's indent: {line!r}"
            line = indent + line[len(prefix) :]
        out.append(line)
    assert indent is None, "an option block is not closed with '# <<< option'"
    return "".join(out), names


def documents_of_kind(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in documents if doc.get("kind") == kind]


def ray_cluster_spec(document: dict[str, Any]) -> dict[str, Any]:
    return document["spec"]["rayClusterConfig"] if document["kind"] == "RayService" else document["spec"]


def pod_templates(cluster_spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", cluster_spec["headGroupSpec"]["template"]
    for group in cluster_spec.get("workerGroupSpecs", []):
        yield f"worker group {group['groupName']}", group["template"]


# ---------------------------------------------------------------------------------------------
# CRD schemas


def _strict_schema(node: Any) -> Any:
    """Translate one structural-schema node (and its children) to a closed JSON Schema."""
    if not isinstance(node, dict):
        return node
    out = dict(node)
    if "properties" in node:
        out["properties"] = {name: _strict_schema(child) for name, child in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in node:
            out["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict_schema(node["additionalProperties"])
    if isinstance(node.get("items"), dict):
        out["items"] = _strict_schema(node["items"])
    for keyword in ("anyOf", "allOf", "oneOf"):
        if keyword in node:
            out[keyword] = [_strict_schema(child) for child in node[keyword]]
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node and "type" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and isinstance(node.get("type"), str):
        out["type"] = [node["type"], "null"]
    return out


def _list_type(validator: Any, list_type: str, instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    if not isinstance(instance, list):
        return
    if list_type == "set":
        seen: list[Any] = []
        for item in instance:
            if item in seen:
                yield jsonschema.ValidationError(f"x-kubernetes-list-type set: duplicate item {item!r}")
            seen.append(item)
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen_keys: set[tuple[Any, ...]] = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            key = tuple(item.get(name) for name in keys)
            if key in seen_keys:
                yield jsonschema.ValidationError(
                    f"x-kubernetes-list-type map: two items with {dict(zip(keys, key, strict=True))}"
                )
            seen_keys.add(key)


def _cel_rules(validator: Any, rules: list[dict[str, Any]], instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    yield jsonschema.ValidationError(
        "this field has CEL rules (x-kubernetes-validations) that cannot be evaluated offline: "
        + "; ".join(rule.get("message", rule.get("rule", "?")) for rule in rules)
        + ". Leave it unset, or teach tests/k8s/conftest.py the rule."
    )


_FORMATS = jsonschema.FormatChecker()


@_FORMATS.checks("int32")
def _is_int32(value: Any) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@_FORMATS.checks("int64")
def _is_int64(value: Any) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


CRDValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator,
    {"x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel_rules},
)


def crd_validators_by_kind() -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) -> validator, for every served version of the KubeRay CRDs."""
    validators = {}
    for kind, file_name in CRD_FILES.items():
        crd = yaml.load((KUBERAY_CRD_DIR / file_name).read_text(), Loader=FastLoader)
        assert crd["spec"]["names"]["kind"] == kind
        for version in crd["spec"]["versions"]:
            if not version.get("served", False):
                continue
            schema = _strict_schema(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
            api_version = f"{crd['spec']['group']}/{version['name']}"
            validators[(api_version, kind)] = CRDValidator(schema, format_checker=_FORMATS)
    return validators


def crd_errors(validators: dict[tuple[str, str], Any], document: dict[str, Any]) -> list[str]:
    key = (document.get("apiVersion"), document.get("kind"))
    if key not in validators:
        return [f"no served KubeRay CRD version for {key}; known: {sorted(validators)}"]
    errors = sorted(validators[key].iter_errors(document), key=lambda error: list(error.absolute_path))
    return [f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}" for error in errors]


# ---------------------------------------------------------------------------------------------
# Kubernetes built-in schemas (kubernetes-validate's bundled files, strict variant)


class BuiltinSchemas:
    """Cached validators over kubernetes-validate's offline schemas.

    `kubernetes_validate.validate` re-reads the 3 MB definitions file on every call; this builds one
    validator per (Kubernetes version, kind, apiVersion) the same way and keeps it.
    """

    def __init__(self, versions: tuple[str, ...]) -> None:
        import kubernetes_validate.utils as kv_utils

        self._kv_utils = kv_utils
        known = kv_utils.all_versions()
        self.versions = []
        for wanted in versions:
            if wanted == "latest":
                self.versions.append(known[-1])
                continue
            matching = [v for v in known if kv_utils.major_minor(v) == wanted]
            assert matching, f"kubernetes-validate has no schemas for Kubernetes {wanted}; it has {known}"
            self.versions.append(matching[-1])
        self._definitions: dict[str, Any] = {}
        self._validators: dict[tuple[str, str, str], Any] = {}

    def _validator(self, version: str, kind: str, api_version: str) -> Any:
        key = (version, kind, api_version)
        if key not in self._validators:
            from referencing import Registry, Resource

            # rbac.authorization.k8s.io/v1 -> rbac-v1, v1 -> v1: kubernetes-validate's file naming.
            api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
            folder = f"kubernetes-json-schema/v{version}-local-strict"
            schema = self._kv_utils.schema_contents(f"{folder}/{kind.lower()}-{api}.json", version)
            if version not in self._definitions:
                self._definitions[version] = self._kv_utils.schema_contents(f"{folder}/_definitions.json", version)
            registry = Resource.from_contents(self._definitions[version]) @ (
                Resource.from_contents(schema) @ Registry()
            )
            self._validators[key] = jsonschema.Draft202012Validator(schema, registry=registry)
        return self._validators[key]

    def errors(self, document: dict[str, Any]) -> list[str]:
        errors = []
        for version in self.versions:
            try:
                validator = self._validator(version, document["kind"], document["apiVersion"])
            except FileNotFoundError:
                errors.append(f"Kubernetes {version}: no schema for {document['apiVersion']} {document['kind']}")
                continue
            for error in sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path)):
                where = ".".join(map(str, error.absolute_path)) or "<root>"
                errors.append(f"Kubernetes {version}: {where}: {error.message}")
        return errors
