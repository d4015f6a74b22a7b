#!/usr/bin/env python3
"""Render the shipped Serve config (config/serve.yaml) into the Kubernetes manifests.

    python k8s/generate.py            rewrite the generated parts of k8s/
    python k8s/generate.py --check    write nothing; exit 1 with a diff if k8s/ has drifted

`config/serve.yaml` is the one source of the application's arguments. This script owns, and is the
only writer of:

- the `serveConfigV2` block of k8s/rayservice.yaml, between the BEGIN/END markers;
- k8s/serve_config.yaml, the same Serve config for `serve deploy` against k8s/raycluster.yaml;
- every line of the manifests that ends in a `(k8s/generate.py)` tag: the worker group's
  `nvidia.com/gpu` (= tp_size: one pod holds one replica, or one tensor-parallel group) and its
  `minReplicas`/`maxReplicas`/`replicas` (= the Serve autoscaling bounds: one replica per pod).

Kubernetes overrides (see `apply_k8s_overrides`): http_options.host 0.0.0.0 and proxy_location
EveryNode; for every pagedserve application `use_gpu: true`, Serve autoscaling between
--min-replicas and --max-replicas (default 1..4) instead of a fixed count, no API key and no
runtime_env in the manifest, and the model from --model or $PAGEDSERVE_MODEL when given.

Needs only Python 3.9+ and PyYAML, so it runs on a laptop without the project installed.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_ENV = "PAGEDSERVE_MODEL"
APP_IMPORT_PREFIX = "pagedserve."
# The container port named "serve" in the manifests; KubeRay's Serve Service and our probes use it.
SERVE_PORT = 8000
DEFAULT_MIN_REPLICAS = 1
DEFAULT_MAX_REPLICAS = 4

BEGIN_MARKER = "# BEGIN serveConfigV2"
END_MARKER = "# END serveConfigV2"
TAG = "(k8s/generate.py)"
# `<indent><key>: <value>  # <source> (k8s/generate.py)`; the value is rewritten, the rest kept.
TAGGED_LINE = re.compile(
    r"^(?P<head>\s*(?:- )?[A-Za-z0-9./_-]+: )(?P<value>\"?[0-9]+\"?)(?P<tail>\s+# (?P<source>[a-z_.]+) "
    + re.escape(TAG)
    + r")$"
)


class GenerateError(Exception):
    """The source config cannot be rendered for Kubernetes; the message says what to change."""


@dataclass(frozen=True)
class Options:
    """Command-line choices; `model=None` keeps the model of config/serve.yaml."""

    source: Path
    k8s_dir: Path
    model: str | None
    min_replicas: int = DEFAULT_MIN_REPLICAS
    max_replicas: int = DEFAULT_MAX_REPLICAS


# ---------------------------------------------------------------------------------------------
# The Serve config


def engine_field(args: dict[str, Any], name: str, default: Any = None) -> Any:
    """An engine field as ServeArgs.from_args reads it: a top-level key wins over the `engine:` one."""
    engine = args.get("engine") if isinstance(args.get("engine"), dict) else {}
    return args.get(name, engine.get(name, default))


def set_engine_field(args: dict[str, Any], name: str, value: Any) -> None:
    """Set an engine field where the source keeps engine fields, leaving no second copy to win over it."""
    if isinstance(args.get("engine"), dict):
        args["engine"][name] = value
        args.pop(name, None)
    else:
        args[name] = value


def apply_k8s_overrides(serve_config: dict[str, Any], options: Options) -> dict[str, Any]:
    """Return a copy of the Serve config with the settings a pod needs; the source is not modified."""
    config = copy.deepcopy(serve_config)
    # One Serve proxy per pod that holds a replica, so every GPU pod can take traffic from the Service
    # and its readiness probe (GET /health on its own port 8000) means something. With HeadOnly the
    # worker pods would have no proxy and never become ready.
    config["proxy_location"] = "EveryNode"
    http_options = dict(config.get("http_options") or {})
    # Inside a pod Serve must listen on the pod's IP, not loopback: the Kubernetes Service and the
    # kubelet's probes reach the proxy at <pod IP>:8000. The Service, not the bind address, limits
    # who can connect (ClusterIP by default).
    http_options["host"] = "0.0.0.0"
    http_options["port"] = SERVE_PORT
    config["http_options"] = http_options

    applications = config.get("applications") or []
    ours = [app for app in applications if str(app.get("import_path", "")).startswith(APP_IMPORT_PREFIX)]
    if not ours:
        raise GenerateError(f"{options.source}: no application with an import_path under {APP_IMPORT_PREFIX!r}")
    for app in ours:
        app["args"] = _k8s_args(dict(app.get("args") or {}), app.get("name", "?"), options)
        # The image already holds the project; a runtime_env pip/working_dir meant for a laptop
        # would reinstall it on every worker. Users who keep the stock Ray image add one back
        # (docs/deploy.md, "Stock Ray image").
        app.pop("runtime_env", None)
    return config


def _k8s_args(args: dict[str, Any], app_name: str, options: Options) -> dict[str, Any]:
    api_key = args.pop("api_key", None)
    if api_key:
        raise GenerateError(
            f"application {app_name!r}: args.api_key is set in {options.source}; a key must not be written "
            "into a manifest. Remove it: pods read $PAGEDSERVE_API_KEY from the Secret."
        )
    if options.model is not None:
        set_engine_field(args, "model", options.model)
    # The autoscaler may start the cluster with no GPU pod at all, so "use a GPU if the cluster has one"
    # would pick CPU. Each replica asks Ray for tp_size GPUs; a worker pod holds exactly that many.
    args["use_gpu"] = True

    # The replica bounds are the cluster's, not the laptop's: they come from the flags (default 1..4),
    # whatever config/serve.yaml says; the rest of autoscaling (target, delays) comes from there.
    autoscaling = dict(args.get("autoscaling") or {})
    autoscaling["min_replicas"] = options.min_replicas
    autoscaling["max_replicas"] = options.max_replicas
    if autoscaling["min_replicas"] > autoscaling["max_replicas"]:
        raise GenerateError(
            f"application {app_name!r}: autoscaling.min_replicas={autoscaling['min_replicas']} is above "
            f"max_replicas={autoscaling['max_replicas']}"
        )
    if autoscaling["min_replicas"] < 1:
        # Zero replicas would also leave no Serve proxy on any worker pod, so nothing would answer.
        raise GenerateError(f"application {app_name!r}: autoscaling.min_replicas must be >= 1 on Kubernetes")
    args["autoscaling"] = autoscaling
    # A fixed count is ignored once autoscaling is on; dropping it keeps the manifest unambiguous.
    args.pop("num_replicas", None)
    return args


@dataclass(frozen=True)
class WorkerShape:
    """What the worker group must match: GPUs per pod and the pod-count bounds."""

    tp_size: int
    min_replicas: int
    max_replicas: int

    def value_for(self, source: str) -> int:
        values = {
            "tp_size": self.tp_size,
            "autoscaling.min_replicas": self.min_replicas,
            "autoscaling.max_replicas": self.max_replicas,
        }
        if source not in values:
            raise GenerateError(f"unknown tag source {source!r}; known: {sorted(values)}")
        return values[source]


def worker_shape(k8s_config: dict[str, Any]) -> WorkerShape:
    """One worker group serves every pagedserve application, so they must agree on tp_size."""
    shapes = set()
    for app in k8s_config["applications"]:
        if not str(app.get("import_path", "")).startswith(APP_IMPORT_PREFIX):
            continue
        args = app["args"]
        tp_size = int(engine_field(args, "tp_size", 1))
        shapes.add((tp_size, args["autoscaling"]["min_replicas"], args["autoscaling"]["max_replicas"]))
    if len(shapes) != 1:
        raise GenerateError(f"applications disagree on (tp_size, min, max replicas): {sorted(shapes)}")
    tp_size, min_replicas, max_replicas = shapes.pop()
    return WorkerShape(tp_size=tp_size, min_replicas=min_replicas, max_replicas=max_replicas)


def dump_serve_config(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=100)


# ---------------------------------------------------------------------------------------------
# The files


SERVE_CONFIG_HEADER = """\
# GENERATED by `python k8s/generate.py` from config/serve.yaml; edit that file, then regenerate.
# The Serve config for a RayCluster you manage yourself (k8s/raycluster.yaml):
#   kubectl port-forward svc/pagedserve-head-svc 8265:8265
#   serve deploy k8s/serve_config.yaml --address http://127.0.0.1:8265
# Differences from config/serve.yaml, all for pods: http_options.host is 0.0.0.0 because a pod must
# listen on its own IP for the Service and the probes to reach Serve (the laptop config keeps
# 127.0.0.1); proxy_location is EveryNode so each GPU pod runs a proxy and can take traffic; each
# replica reserves tp_size GPUs (use_gpu); replicas autoscale between the generator's bounds.
"""


def render_rayservice(text: str, serve_yaml: str, shape: WorkerShape, path: Path) -> str:
    lines = text.splitlines(keepends=True)
    begin = [i for i, line in enumerate(lines) if line.strip().startswith(BEGIN_MARKER)]
    end = [i for i, line in enumerate(lines) if line.strip().startswith(END_MARKER)]
    if len(begin) != 1 or len(end) != 1 or end[0] < begin[0]:
        raise GenerateError(f"{path}: expected one '{BEGIN_MARKER}' line followed by one '{END_MARKER}' line")
    indent = lines[begin[0]][: len(lines[begin[0]]) - len(lines[begin[0]].lstrip())]
    block = [f"{indent}serveConfigV2: |\n"]
    block += [f"{indent}  {line}\n" if line else "\n" for line in serve_yaml.rstrip("\n").split("\n")]
    rendered = "".join(lines[: begin[0] + 1] + block + lines[end[0] :])
    return render_tagged_lines(rendered, shape, path)


def render_tagged_lines(text: str, shape: WorkerShape, path: Path) -> str:
    out = []
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        body = line.rstrip("\n")
        # A tag ends a line of YAML; a comment line that mentions the tag is not one.
        if body.endswith(TAG) and not body.lstrip().startswith("#"):
            match = TAGGED_LINE.match(body)
            if match is None:
                raise GenerateError(f"{path}:{number}: a {TAG} tag on a line of unknown shape: {body.strip()!r}")
            value = shape.value_for(match["source"])
            quoted = match["value"].startswith('"')
            new_value = f'"{value}"' if quoted else str(value)
            line = f"{match['head']}{new_value}{match['tail']}" + ("\n" if line.endswith("\n") else "")
        out.append(line)
    return "".join(out)


def render_all(options: Options) -> dict[Path, str]:
    """Every generated file's full expected text, keyed by path."""
    source = yaml.safe_load(options.source.read_text())
    if not isinstance(source, dict) or "applications" not in source:
        raise GenerateError(f"{options.source}: not a Serve config (no 'applications')")
    k8s_config = apply_k8s_overrides(source, options)
    shape = worker_shape(k8s_config)
    serve_yaml = dump_serve_config(k8s_config)

    rayservice = options.k8s_dir / "rayservice.yaml"
    raycluster = options.k8s_dir / "raycluster.yaml"
    return {
        rayservice: render_rayservice(rayservice.read_text(), serve_yaml, shape, rayservice),
        raycluster: render_tagged_lines(raycluster.read_text(), shape, raycluster),
        options.k8s_dir / "serve_config.yaml": SERVE_CONFIG_HEADER + serve_yaml,
    }


def parse_args(argv: list[str] | None) -> tuple[Options, bool]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file would change")
    parser.add_argument(
        "--model",
        default=os.environ.get(MODEL_ENV) or None,
        help=f"hub id or path to serve (default: ${MODEL_ENV}, else config/serve.yaml's model)",
    )
    parser.add_argument(
        "--min-replicas", type=int, default=DEFAULT_MIN_REPLICAS, help="Serve autoscaling minimum = GPU pods kept"
    )
    parser.add_argument(
        "--max-replicas", type=int, default=DEFAULT_MAX_REPLICAS, help="Serve autoscaling maximum = most GPU pods"
    )
    parser.add_argument("--source", type=Path, default=REPO_ROOT / "config" / "serve.yaml",
                        help="the Serve config the manifests embed (default: config/serve.yaml)")
    parser.add_argument("--k8s-dir", type=Path, default=REPO_ROOT / "k8s",
                        help="where the manifests are written (default: k8s/)")
    parsed = parser.parse_args(argv)
    options = Options(
        source=parsed.source,
        k8s_dir=parsed.k8s_dir,
        model=parsed.model,
        min_replicas=parsed.min_replicas,
        max_replicas=parsed.max_replicas,
    )
    return options, parsed.check


def main(argv: list[str] | None = None) -> int:
    options, is_check = parse_args(argv)
    try:
        expected = render_all(options)
    except (GenerateError, OSError, yaml.YAMLError) as exc:
        print(f"k8s/generate.py: {exc}", file=sys.stderr)
        return 2
    drifted = []
    for path, text in expected.items():
        current = path.read_text() if path.exists() else ""
        if current == text:
            continue
        drifted.append(path)
        if is_check:
            diff = difflib.unified_diff(
                current.splitlines(keepends=True), text.splitlines(keepends=True), str(path), f"{path} (generated)"
            )
            sys.stdout.writelines(diff)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if is_check and drifted:
        names = ", ".join(str(path) for path in drifted)
        print(f"\n{names} out of date with {options.source}; run: python k8s/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
