"""The names the README's examples import from `pagedserve` itself (the public face, pagedserve/__init__.py)."""

from __future__ import annotations

import subprocess
import sys

import pagedserve


def test_the_readme_names_import_from_the_package() -> None:
    # The README's structured outputs offline: SamplingParams(structured_outputs=StructuredOutputsParams(json=schema)).
    from pagedserve import SamplingParams, StructuredOutputsParams

    params = SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    assert params.structured_outputs.choice == ["yes", "no"]
    for name in pagedserve.__all__:
        assert getattr(pagedserve, name) is not None, name


def test_importing_the_package_loads_neither_torch_nor_pydantic() -> None:
    # The HTTP ingress imports it; the lazy names load torch on first use only.
    code = ("import sys, pagedserve; from pagedserve import SamplingParams, StructuredOutputsParams; "
            "print(sorted({'torch', 'pydantic'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"
