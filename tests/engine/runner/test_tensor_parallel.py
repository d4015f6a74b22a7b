"""Tensor parallelism on CPU with gloo: TP=2 greedy outputs equal TP=1 token for token; clear failures.

Every TP=2 engine spawns one worker process (a few seconds each on a shared CPU), so the cases stay few.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from resolved import resolved
import torch
from pagedserve.config.engine import ConfigError, EngineConfig
from pagedserve.engine.errors import EngineDeadError
from pagedserve.engine.core.llm_engine import LLMEngine
from pagedserve.engine.core.request import SamplingParams
from tiny_models import build_tiny_model

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], list(range(20, 57)), [99]]


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        "llama": tiny_model_dir("llama"),
        "qwen2": tiny_model_dir("qwen2"),
        # GQA with one KV head: fewer KV heads than ranks, so every rank keeps a replica of it.
        "llama-1-kv-head": build_tiny_model("llama", tmp_path_factory.mktemp("tp-llama1kv"), seed=1,
                                            num_hidden_layers=3, num_key_value_heads=1),
    }


def _config(model: Path, tp_size: int) -> EngineConfig:
    # Few blocks and a small token budget: prompts are chunked and batched together, as in serving.
    return EngineConfig.create(
        model=str(model), tp_size=tp_size, device="cpu", num_blocks=48, max_num_seqs=4, max_batch_tokens=32
    )


def _greedy(engine: LLMEngine, max_tokens: int = 12) -> dict[str, list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for index, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{index}", prompt, params)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens.setdefault(output.request_id, []).extend(output.outputs[0].token_ids)
    return tokens


def _kill_between_steps(engine: LLMEngine) -> None:
    """A worker killed while idle: the next step (and the health checks) raise within seconds."""
    from pagedserve.engine.async_engine import AsyncLLMEngine

    engine.add_request("late", PROMPTS[0], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    engine.step()
    worker = engine.runner.workers[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(10)
    started = time.monotonic()
    with pytest.raises(EngineDeadError, match="rank 1"):
        for _ in range(50):
            engine.step()
    assert time.monotonic() - started < 10
    with pytest.raises(EngineDeadError):
        engine.check_health()
    # The async engine's health check reports the dead group even with no request running.
    async_engine = AsyncLLMEngine(engine)
    with pytest.raises(EngineDeadError):
        asyncio.run(async_engine.check_health())
    async_engine.shutdown()


def _kill_inside_step(engine: LLMEngine) -> None:
    """Death after the liveness check: the broken collective raises instead of waiting."""
    engine.add_request("late", PROMPTS[2], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    engine.step()
    worker = engine.runner.workers[0]
    engine.runner.workers = []  # hide the worker from the liveness check
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(10)
    started = time.monotonic()
    with pytest.raises(EngineDeadError, match="tensor-parallel step failed"):
        for _ in range(50):
            engine.step()
    assert time.monotonic() - started < 30


def _async_then_shutdown(engine: LLMEngine) -> None:
    """The async engine streams from a TP engine, and its shutdown stops the worker ranks."""
    from pagedserve.engine.async_engine import AsyncLLMEngine

    workers = list(engine.runner.workers)
    async_engine = AsyncLLMEngine(engine)
    expected = _greedy(LLMEngine(_config(Path(engine.model_name), 1)), max_tokens=5)["r1"]

    async def stream() -> list[int]:
        tokens: list[int] = []
        params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
        async for output in async_engine.generate(PROMPTS[1], params, "async"):
            tokens.extend(output.outputs[0].token_ids)
        await async_engine.check_health()
        return tokens

    assert asyncio.run(stream()) == expected
    async_engine.shutdown()
    assert not any(worker.is_alive() for worker in workers)


# Each TP=2 engine costs a worker start-up, so after its parity check each one also ends in one way.
@pytest.mark.parametrize(
    ("name", "ending"),
    [("llama", _kill_between_steps), ("qwen2", _kill_inside_step), ("llama-1-kv-head", _async_then_shutdown)],
    ids=["llama-then-worker-killed", "qwen2-then-worker-killed-in-step", "llama-1-kv-head-then-async-engine"],
)
def test_tp2_greedy_matches_tp1(model_dirs: dict[str, Path], name: str, ending) -> None:
    single = LLMEngine(_config(model_dirs[name], 1))
    expected = _greedy(single)
    engine = LLMEngine(_config(model_dirs[name], 2))
    try:
        # Per-rank geometry: half the query heads; KV heads halved, or one replicated head.
        assert engine.runner.shape.num_heads == single.runner.shape.num_heads // 2
        assert engine.runner.shape.num_kv_heads == max(1, single.runner.shape.num_kv_heads // 2)
        assert engine.runner.shape.vocab_size == single.runner.shape.vocab_size
        assert engine.kv_cache.num_total_blocks == single.kv_cache.num_total_blocks
        assert _greedy(engine) == expected
        ending(engine)
    finally:
        engine.shutdown()


def test_heads_not_divisible_is_a_config_error_naming_tp_size(model_dirs: dict[str, Path]) -> None:
    # 4 attention heads cannot split over 8 ranks: refused before any process starts.
    with pytest.raises(ConfigError, match="tp_size=8"):
        LLMEngine(_config(model_dirs["llama"], 8))


def test_tp_with_an_in_memory_model_is_refused(model_dirs: dict[str, Path]) -> None:
    from pagedserve.engine.runner.loader import load_model

    loaded = load_model(resolved(_config(model_dirs["llama"], 1)).load)
    with pytest.raises(ConfigError, match="tp_size=2"):
        LLMEngine(_config(model_dirs["llama"], 2), loaded=loaded)


def test_tp2_compiled_layers_break_where_tp1_does(model_dirs: dict[str, Path]) -> None:
    """The all-reduce is a custom op, not a graph break: rank 0's compiled decoder layers trace into as
    many graphs, with as many breaks (the paged attention's, by design), as TP=1's; tokens stay TP=1's."""
    from torch._dynamo.utils import counters

    def compiled_run(tp_size: int) -> tuple[dict[str, list[int]], int, int]:
        torch._dynamo.reset()
        counters.clear()
        config = _config(model_dirs["llama"], tp_size).model_copy(update={"compile": True, "compile_backend": "eager"})
        engine = LLMEngine(config)
        try:
            tokens = _greedy(engine, max_tokens=6)
            assert engine.runner.is_compiled
        finally:
            engine.shutdown()
        return tokens, sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]

    tp1_tokens, tp1_breaks, tp1_graphs = compiled_run(1)
    tp2_tokens, tp2_breaks, tp2_graphs = compiled_run(2)
    assert tp2_tokens == tp1_tokens
    assert (tp2_breaks, tp2_graphs) == (tp1_breaks, tp1_graphs)
    assert tp1_graphs > 0


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("name", ["llama", "llama-1-kv-head"])
def test_tp2_nccl_on_gpus_matches_tp1(model_dirs: dict[str, Path], name: str) -> None:
    """NCCL on two GPUs with the GPU defaults (Triton attention, compiled layers, decode CUDA graphs that
    capture the all-reduces): TP=2 gives TP=1's greedy tokens (fp32), also for steps replayed as graphs."""
    def config(tp_size: int) -> EngineConfig:
        return EngineConfig.create(model=str(model_dirs[name]), tp_size=tp_size, device="cuda", dtype="float32",
                                   num_blocks=48, max_num_seqs=4, max_batch_tokens=32)

    torch._dynamo.reset()
    expected = _greedy(LLMEngine(config(1)), max_tokens=16)
    torch._dynamo.reset()
    engine = LLMEngine(config(2))
    try:
        assert engine.runner._decode_graphs is not None, "decode graphs were not captured"
        assert engine.runner.is_compiled
        assert _greedy(engine, max_tokens=16) == expected
    finally:
        engine.shutdown()
