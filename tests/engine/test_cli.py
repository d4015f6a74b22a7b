"""`pagedserve generate`: every config field is a flag, and it generates end to end."""

from __future__ import annotations

import json

import pytest

from pagedserve.config.engine import EngineConfig
from pagedserve.engine.cli import build_parser, main


def test_help_lists_every_engine_config_field():
    text = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    for name in EngineConfig.model_fields:
        assert "--" + name.replace("_", "-") in text


def test_generate_prints_completions(tiny_model_dir, capsys):
    code = main(["generate", "--model", str(tiny_model_dir("llama")), "--prompt", "w5 w6 w7", "--max-tokens", "5",
                 "--dtype", "float32", "--block-size", "8", "--no-enable-prefix-caching", "--json"])
    assert code == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["prompt"] == "w5 w6 w7" and line["finish_reason"] in ("length", "stop") and line["text"]


def test_constraints_and_logit_bias_from_flags(tiny_model_dir, capsys):
    model = str(tiny_model_dir("llama"))
    base = ["generate", "--model", model, "--prompt", "w5 w6", "--max-tokens", "6", "--dtype", "float32", "--json"]
    assert main([*base, "--choice", "w9", "--choice", "w11"]) == 0  # one word each: this tokenizer has no spaces
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"].strip() in ("w9", "w11")
    assert main([*base, "--logit-bias", "7=100", "--temperature", "1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"].split() == ["w7"] * 6
    assert main([*base, "--regex", "((("]) == 2
    assert "invalid regex" in capsys.readouterr().err


def test_bad_flag_value_exits_with_the_field_named(tiny_model_dir, capsys):
    code = main(["generate", "--model", str(tiny_model_dir("llama")), "--max-memory-percent", "3"])
    assert code == 2
    assert "max_memory_percent=3.0" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing-path", "not-a-model", "hub-id-offline", "missing-tokenizer",
                                  "missing-draft-model"])
def test_a_model_that_cannot_be_loaded_is_one_error_line(case, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A model, tokenizer or draft model that cannot be read (a path that is not there, a folder that holds no
    model, a hub id with no network and nothing cached) ends the CLI with one line naming the setting and
    the value, and a non-zero status; it raised a transformers traceback (OSError, ValueError) before."""
    import huggingface_hub.constants

    model = str(tiny_model_dir("llama"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("not a model\n")
    flags, field, value = {
        "missing-path": (["--model", str(tmp_path / "no-such-model")], "model", str(tmp_path / "no-such-model")),
        "not-a-model": (["--model", str(tmp_path / "notes")], "model", str(tmp_path / "notes")),
        # No network in the test: offline mode makes the hub answer at once, as an unreachable one does late.
        "hub-id-offline": (["--model", "pagedserve-tests/no-such-model"], "model", "pagedserve-tests/no-such-model"),
        "missing-tokenizer": (["--model", model, "--tokenizer", str(tmp_path / "no-tok")], "tokenizer",
                              str(tmp_path / "no-tok")),
        "missing-draft-model": (["--model", model, "--speculative-method", "draft", "--speculative-model",
                                 str(tmp_path / "no-draft")], "speculative_model", str(tmp_path / "no-draft")),
    }[case]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code = main(["generate", *flags, "--prompt", "w5", "--max-tokens", "2", "--dtype", "float32"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("error: ") and f"EngineConfig.{field}={value!r}" in err, err
    assert "Traceback" not in err


def test_a_run_ends_without_leak_reports(tiny_model_dir):
    """The engine freezes its objects out of garbage collection at start-up; frozen, Triton's nanobind objects
    were never freed at interpreter exit, and every run of the CLI (README's first example) ended with some
    thirty lines of 'nanobind: leaked ... instances! ... a reference counting issue' on stderr."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "pagedserve.engine", "generate", "--model", str(tiny_model_dir("llama")),
                          "--prompt", "w5 w6", "--max-tokens", "2", "--dtype", "float32"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "leaked" not in run.stderr, run.stderr[-2000:]
