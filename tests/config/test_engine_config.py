"""EngineConfig: defaults under their usual names, and bad values named with their allowed range."""

from __future__ import annotations

import re

import pytest

from pagedserve.config.engine import ConfigError, EngineConfig
from pagedserve.config.resolve import SchedulerSettings


def test_defaults_follow_transformers_continuous_batching_names():
    config = EngineConfig.create()
    assert config.num_blocks is None and config.max_batch_tokens is None  # auto
    assert config.max_memory_percent == 0.9 and config.block_size == 16
    assert config.scheduling_policy == "fifo" and config.quantization == "none"
    assert config.kv_cache_dtype == "auto"  # the model's dtype


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("block_size", 0, "greater than or equal to 1"),
        ("max_memory_percent", 0, "greater than 0"),
        ("max_memory_percent", 1.2, "less than or equal to 1"),
        ("max_num_seqs", -3, "greater than or equal to 1"),
        ("max_prefill_tokens_while_decoding", 0, "greater than or equal to 1"),
        ("prefill_step_time_ratio", 0.5, "a number in [1, 100]"),
        ("prefill_step_time_ratio", "on", "'auto', 'off' or a number"),
        ("ttft_target_s", 0, "greater than 0"),
        ("tp_size", 6, "power of two"),
        ("scheduling_policy", "lifo", "fifo"),
        ("quantization", "gptq", "bnb-4bit"),
        ("attention_backend", "magic", "reference"),
        ("kv_cache_dtype", "int8", "'auto' or 'fp8'"),
    ],
)
def test_bad_values_name_field_value_and_range(field, value, message):
    with pytest.raises(ConfigError) as error:
        EngineConfig.create(**{field: value})
    text = str(error.value)
    assert f"EngineConfig.{field}={value!r}" in text and message in text


def test_unknown_field_is_rejected_and_hyphenated_policy_accepted():
    with pytest.raises(ConfigError, match="max_batch_token"):
        EngineConfig.create(max_batch_token=5)
    assert EngineConfig.create(scheduling_policy="prefill-first").scheduling_policy == "prefill_first"
    assert EngineConfig.create(scheduling_policy="fcfs").scheduling_policy == "fifo"  # vLLM's name
    assert EngineConfig.create(scheduling_policy="priority").scheduling_policy == "priority"


def test_scheduler_config_without_chunking_needs_room_for_a_whole_prompt():
    with pytest.raises(ConfigError, match="max_batch_tokens=512 must be >= max_model_len=1024"):
        SchedulerSettings(max_num_seqs=4, max_batch_tokens=512, max_model_len=1024, enable_chunked_prefill=False)


def test_scheduler_settings_change_at_run_time_only_where_nothing_is_sized():
    settings = SchedulerSettings(max_num_seqs=4, max_batch_tokens=512, max_model_len=1024)
    assert settings.max_prefill_tokens_while_decoding is None  # no bound unless resolved to one
    updated = settings.updated(max_prefill_tokens_while_decoding=128, policy="prefill_first")
    assert (updated.max_prefill_tokens_while_decoding, updated.policy) == (128, "prefill_first")
    assert updated.updated(max_prefill_tokens_while_decoding=None).max_prefill_tokens_while_decoding is None
    with pytest.raises(ConfigError, match=r"SchedulerSettings.max_batch_tokens cannot change on a running engine"):
        settings.updated(max_batch_tokens=64)
    with pytest.raises(ConfigError, match=r"max_prefill_tokens_while_decoding=0: must be an integer >= 1"):
        settings.updated(max_prefill_tokens_while_decoding=0)
    with pytest.raises(ConfigError, match=r"max_prefill_tokens_while_decoding='512'"):
        SchedulerSettings(4, 512, 1024, max_prefill_tokens_while_decoding="512")
    with pytest.raises(ConfigError, match=r"policy='lifo'"):
        settings.updated(policy="lifo")
    updated = settings.updated(prefill_step_time_ratio=2.5, ttft_target_s=0.25)
    assert (updated.prefill_step_time_ratio, updated.ttft_target_s) == (2.5, 0.25)
    assert updated.updated(prefill_step_time_ratio=None).prefill_step_time_ratio is None
    with pytest.raises(ConfigError, match=r"prefill_step_time_ratio=0.5: must be a number in \[1, 100\]"):
        settings.updated(prefill_step_time_ratio=0.5)
    with pytest.raises(ConfigError, match=r"ttft_target_s=0: must be a number of seconds"):
        settings.updated(ttft_target_s=0)


def test_the_prefill_bound_reaches_every_surface_by_its_name():
    from pagedserve.config.serve import ServeArgs
    from pagedserve.engine.cli import build_parser, engine_kwargs

    flags = build_parser().parse_args(["generate", "--max-prefill-tokens-while-decoding", "512"])
    assert engine_kwargs(flags) == {"max_prefill_tokens_while_decoding": 512}
    # `serve run ... max_prefill_tokens_while_decoding=256` arrives as a string at the top level.
    assert ServeArgs.from_args({"max_prefill_tokens_while_decoding": "256"}).engine.max_prefill_tokens_while_decoding == 256
    with pytest.raises(ConfigError, match=r"EngineConfig.max_prefill_tokens_while_decoding=0"):
        ServeArgs.from_args({"engine": {"max_prefill_tokens_while_decoding": 0}})
    flags = build_parser().parse_args(["generate", "--prefill-step-time-ratio", "2.5", "--ttft-target-s", "0.3"])
    assert engine_kwargs(flags) == {"prefill_step_time_ratio": "2.5", "ttft_target_s": 0.3}
    assert EngineConfig.create(**engine_kwargs(flags)).prefill_step_time_ratio == 2.5
    assert ServeArgs.from_args({"prefill_step_time_ratio": "off"}).engine.prefill_step_time_ratio == "off"


def test_the_kv_cache_dtype_reaches_every_surface_by_its_name():
    from pagedserve.config.serve import ServeArgs
    from pagedserve.engine.cli import build_parser, engine_kwargs

    assert engine_kwargs(build_parser().parse_args(["generate", "--kv-cache-dtype", "fp8"])) == {"kv_cache_dtype": "fp8"}
    assert ServeArgs.from_args({"kv_cache_dtype": "fp8"}).engine.kv_cache_dtype == "fp8"
    assert ServeArgs.from_args({"engine": {"kv_cache_dtype": "fp8"}}).engine.kv_cache_dtype == "fp8"
    with pytest.raises(ConfigError, match=r"EngineConfig.kv_cache_dtype='fp8_e5m2'"):
        ServeArgs.from_args({"engine": {"kv_cache_dtype": "fp8_e5m2"}})


def test_generate_help_states_each_default_once():
    """The engine options state EngineConfig's defaults themselves (their parser default None means "not
    given"): the help shows that one, not argparse's None beside it; the CLI's own options show argparse's."""
    from pagedserve.engine.cli import build_parser

    parser = build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]
    text = " ".join(generate.format_help().split())
    assert not re.search(r"\(default: [^)]*\) \(default: ", text), re.search(r".{80}\(default: [^)]*\) \(default: ", text)
    assert "--kv-cache-dtype" in text and "(default: auto)" in text
    assert "hold the output to any JSON object (default: False)" in text  # a CLI option: argparse's
