"""Fixtures of tests/k8s: the KubeRay CRD validators and the Kubernetes built-in schema validator.

Both skip, with the reason, when their inputs are absent: ../shared/kuberay/ (relative to the
repository root) and the kubernetes-validate package.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# The helpers sit beside this file under a name no other test folder uses; put the folder on the path
# whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from k8s_schema import (  # noqa: E402
    CRD_FILES,
    KUBERAY_CRD_DIR,
    KUBERNETES_VERSIONS,
    BuiltinSchemas,
    crd_validators_by_kind,
)


@pytest.fixture(scope="session")
def crd_validators() -> dict[tuple[str, str], Any]:
    if not all((KUBERAY_CRD_DIR / name).is_file() for name in CRD_FILES.values()):
        pytest.skip(f"KubeRay CRDs not found in {KUBERAY_CRD_DIR} (expected {sorted(CRD_FILES.values())})")
    return crd_validators_by_kind()


@pytest.fixture(scope="session")
def k8s_validate() -> Callable[[dict[str, Any]], list[str]]:
    """validate(object) -> errors, against each of KUBERNETES_VERSIONS, strict (unknown fields fail)."""
    pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed (pip install kubernetes-validate)"
    )
    return BuiltinSchemas(KUBERNETES_VERSIONS).errors
