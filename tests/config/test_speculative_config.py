"""The speculative fields: names shared by EngineConfig, flags and yaml args; cross-field checks in resolve."""

from __future__ import annotations

import pytest

from pagedserve.config.engine import ConfigError, EngineConfig
from pagedserve.config.resolve import SpeculativeSettings, resolve_speculative
from pagedserve.config.serve import ServeArgs


def test_ngram_resolves_and_none_is_off():
    config = EngineConfig.create(speculative_method="ngram", num_speculative_tokens=5, prompt_lookup_min=2,
                                 prompt_lookup_max=3, speculative_disable_batch_size=4)
    assert resolve_speculative(config) == SpeculativeSettings("ngram", 5, 2, 3, 4)
    assert resolve_speculative(config).enabled
    assert not resolve_speculative(EngineConfig.create()).enabled
    assert not resolve_speculative(EngineConfig.create(speculative_method="ngram",
                                                       speculative_disable_batch_size=0)).enabled
    draft = EngineConfig.create(speculative_method="draft", speculative_model="small", num_speculative_tokens=4)
    assert resolve_speculative(draft) == SpeculativeSettings("draft", 4, 1, 4, 8, "small")


@pytest.mark.parametrize("fields, words", [
    (dict(speculative_method="draft"), "needs speculative_model"),
    (dict(speculative_method="ngram", prompt_lookup_min=5, prompt_lookup_max=2), "prompt_lookup_min=5"),
    (dict(speculative_method="ngram", speculative_model="x"), "speculative_model"),
    (dict(speculative_method="ngram", tp_size=2), "tp_size=2"),
])
def test_inconsistent_fields_are_config_errors(fields, words):
    with pytest.raises(ConfigError, match=words):
        resolve_speculative(EngineConfig.create(**fields))


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError, match="num_speculative_tokens"):
        EngineConfig.create(num_speculative_tokens=0)
    with pytest.raises(ConfigError, match="speculative_method"):
        EngineConfig.create(speculative_method="eagle")


def test_flags_and_serve_args_carry_the_fields():
    import argparse

    from pagedserve.engine.cli import add_engine_arguments, engine_kwargs

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    args = parser.parse_args(["--speculative-method", "ngram", "--num-speculative-tokens", "4"])
    assert engine_kwargs(args) == {"speculative_method": "ngram", "num_speculative_tokens": 4}
    serve = ServeArgs.from_args({"speculative_method": "ngram", "prompt_lookup_max": 6})
    assert (serve.engine.speculative_method, serve.engine.prompt_lookup_max) == ("ngram", 6)
