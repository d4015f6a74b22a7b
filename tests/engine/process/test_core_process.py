"""The engine core in its own process (`EngineConfig.engine_process`, the default on CUDA).

Same tokens as the in-process engine under concurrency; a refused request gets its typed error; start-up
errors keep their type; a core that dies fails every open stream and `check_health`; a core whose parent
died exits on its own; shutdown leaves no process behind; deltas cross the pipe as tuples that come back
equal, and steps that queue up while the parent is behind go as one message, nothing lost or reordered.
Streaming, merging for slow consumers and abort on disconnect run for both cores in test_engine_features.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import sys
import time

import pytest

from pagedserve.config.engine import ConfigError, EngineConfig
from pagedserve.engine.async_engine import AsyncLLMEngine
from pagedserve.engine.process.child import ResultSender
from pagedserve.config.resolve import Platform, resolve_engine_process
from pagedserve.engine.process.client import EngineCoreClient
from pagedserve.engine.process.liveness import process_running
from pagedserve.engine.process.wire import pack_outputs, unpack_outputs
from pagedserve.engine.errors import EngineDeadError, RequestTooLargeError
from pagedserve.engine.core.request import CompletionOutput, Logprob, RequestMetrics, RequestOutput, SamplingParams
from pagedserve.engine.core.stats import StepStats
from processes import wait_gone

ARGS = {"dtype": "float32", "block_size": 8, "num_blocks": 64}
PROMPTS = [list(range(20 + i, 40 + i)) for i in range(4)]


async def declared_dead(engine: AsyncLLMEngine, timeout_s: float = 20.0) -> EngineDeadError:
    """Poll `check_health` until it raises (a core past its step_timeout_s); return that error."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await engine.check_health()
        except EngineDeadError as error:
            return error
        if time.monotonic() > deadline:
            raise AssertionError(f"check_health still passes {timeout_s:g} s on")
        await asyncio.sleep(0.1)


def test_auto_resolves_to_a_process_on_cuda_only() -> None:
    cpu, gpu = Platform.cpu_only(), Platform(cuda_available=True)
    assert not resolve_engine_process(EngineConfig(device="cpu"), gpu)
    assert resolve_engine_process(EngineConfig(device="cuda"), cpu)
    assert resolve_engine_process(EngineConfig(device="cpu", engine_process=True), cpu)
    assert not resolve_engine_process(EngineConfig(device="cuda", engine_process=False), gpu)
    assert resolve_engine_process(EngineConfig(), gpu) and not resolve_engine_process(EngineConfig(), cpu)


def test_process_core_streams_the_same_tokens_and_refuses_with_typed_errors(tiny_model_dir) -> None:
    model = str(tiny_model_dir("llama"))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    async def collect(engine: AsyncLLMEngine) -> list[list[int]]:
        async def one(index: int) -> list[int]:
            tokens: list[int] = []
            async for delta in engine.generate(PROMPTS[index], params, f"r{index}"):
                assert delta.prompt_token_ids == PROMPTS[index]  # the parent puts the prompt back
                tokens += delta.outputs[0].token_ids
            return tokens

        return list(await asyncio.gather(*(one(i) for i in range(len(PROMPTS)))))

    threaded = AsyncLLMEngine.from_kwargs(model=model, engine_process=False, **ARGS)
    try:
        want = asyncio.run(collect(threaded))
    finally:
        threaded.shutdown()

    engine = AsyncLLMEngine.from_kwargs(model=model, engine_process=True, **ARGS)
    pid = engine._core.pid
    try:
        assert isinstance(engine._core, EngineCoreClient) and pid != os.getpid()
        assert asyncio.run(collect(engine)) == want

        async def refused() -> None:
            with pytest.raises(RequestTooLargeError) as excinfo:
                async for _ in engine.generate([7] * 500, SamplingParams(max_tokens=100), "too-long"):
                    pass
            assert excinfo.value.param == "max_tokens"  # the error keeps its field across the pipe
            await engine.check_health()

        asyncio.run(refused())
    finally:
        engine.shutdown()
    assert wait_gone(pid, 10)


def test_start_up_error_keeps_its_type(tiny_model_dir) -> None:
    # 4 attention heads cannot split over 8 ranks: the child refuses, the parent raises the same error.
    with pytest.raises(ConfigError, match="tp_size=8"):
        EngineCoreClient(EngineConfig(model=str(tiny_model_dir("llama")), tp_size=8, engine_process=True, **ARGS))


def test_a_dead_core_fails_open_streams_and_health(tiny_model_dir) -> None:
    engine = AsyncLLMEngine.from_kwargs(model=str(tiny_model_dir("llama")), engine_process=True, **ARGS)
    pid = engine._core.pid

    async def scenario() -> None:
        stream = engine.generate(PROMPTS[1], SamplingParams(max_tokens=400, ignore_eos=True), "long")
        await stream.__anext__()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="exit code"):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await engine.check_health()
        with pytest.raises(EngineDeadError):
            async for _ in engine.generate(PROMPTS[0], SamplingParams(max_tokens=4), "after"):
                pass

    try:
        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        engine.shutdown()


PARENT = """
import sys, time
from pagedserve.config.engine import EngineConfig
from pagedserve.engine.process.client import EngineCoreClient
if __name__ == "__main__":
    client = EngineCoreClient(EngineConfig(model=sys.argv[1], dtype="float32", num_blocks=16, engine_process=True))
    print(client.pid, flush=True)
    time.sleep(600)
"""


def test_the_core_exits_when_its_parent_is_killed(tiny_model_dir, tmp_path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), str(tiny_model_dir("llama"))],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        child = int(parent.stdout.readline())
        assert process_running(child)
    finally:
        parent.kill()  # SIGKILL: no atexit, no shutdown; only the closed pipe tells the child
        parent.wait(30)
    assert wait_gone(child, 20), "the engine core outlived its parent"


def test_a_hung_core_is_declared_dead_and_killed(tiny_model_dir) -> None:
    """A core that stops making progress (here: SIGSTOP, as a hung kernel) fails its streams on the next
    health check past step_timeout_s and is killed, so it does not hold the device for the replacement."""
    engine = AsyncLLMEngine.from_kwargs(model=str(tiny_model_dir("llama")), engine_process=True, step_timeout_s=1.0,
                                        **ARGS)
    pid = engine._core.pid

    async def scenario() -> None:
        stream = engine.generate(PROMPTS[1], SamplingParams(max_tokens=400, ignore_eos=True), "long")
        await stream.__anext__()
        os.kill(pid, signal.SIGSTOP)
        await engine.check_health()  # within the timeout: still healthy
        assert "step_timeout_s" in str(await declared_dead(engine))
        with pytest.raises(EngineDeadError, match="step_timeout_s"):
            await engine.check_health()
        with pytest.raises(EngineDeadError, match="step_timeout_s"):
            async for _ in stream:
                pass

    try:
        asyncio.run(asyncio.wait_for(scenario(), 60))
        assert wait_gone(pid, 10), "the hung core was not killed"
    finally:
        if process_running(pid):
            os.kill(pid, signal.SIGKILL)
        engine.shutdown()


def test_a_hung_thread_core_is_declared_dead(tiny_model_dir) -> None:
    from pagedserve.engine.core.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir("llama")), step_timeout_s=1.0, **ARGS))
    release = threading.Event()
    real_step = engine.step

    def hanging_step():
        outputs = real_step()
        release.wait(30)  # a kernel that never returns
        return outputs

    engine.step = hanging_step
    async_engine = AsyncLLMEngine(engine)

    async def scenario() -> None:
        stream = async_engine.generate(PROMPTS[0], SamplingParams(max_tokens=8, ignore_eos=True), "stuck")
        waiting = asyncio.ensure_future(stream.__anext__())
        assert "step_timeout_s" in str(await declared_dead(async_engine))
        with pytest.raises(EngineDeadError, match="step_timeout_s"):
            await async_engine.check_health()
        with pytest.raises(EngineDeadError):
            await waiting

    try:
        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        release.set()
        async_engine.shutdown()


def delta(request_id: str, text: str, token_ids: list[int], finished: bool = False) -> RequestOutput:
    return RequestOutput(request_id, "the prompt", [1, 2, 3], [CompletionOutput(0, text, token_ids)], finished,
                         RequestMetrics(arrival_time=1.0, first_token_time=2.0))


def test_deltas_cross_the_pipe_as_tuples_and_come_back_equal() -> None:
    full = RequestOutput(
        "r1", "the prompt", [1, 2, 3],
        [CompletionOutput(0, " a", [5], -0.5, [{5: Logprob(-0.5, 1, " a"), 6: Logprob(-1.5, 2, " b")}], None, None),
         CompletionOutput(1, " end", [7, 2], -2.0, None, "stop", 2)],
        True, RequestMetrics(1.0, 1.5, 2.0, 3.0, 4.0, num_preemptions=2, num_cached_prompt_tokens=16),
        num_cached_tokens=16, error="why",
    )
    bare = RequestOutput("r2", None, [], [CompletionOutput(0, "", [])], False)
    packed = pack_outputs([full, bare])
    assert all(isinstance(row, tuple) for row in packed)
    back = unpack_outputs(packed)
    assert back[0] == RequestOutput(**{**full.__dict__, "prompt": None, "prompt_token_ids": []})  # the parent adds it
    assert back[1] == bare


class BlockedPipe:
    """A connection whose first send waits until `release` is set: the parent reading slowly."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.sent: list[tuple] = []
        self.first_send_started = threading.Event()

    def send(self, message: tuple) -> None:
        if not self.sent:
            self.first_send_started.set()
            assert self.release.wait(10)
        self.sent.append(message)


def test_steps_queued_behind_a_slow_parent_go_as_one_message_in_order() -> None:
    pipe = BlockedPipe()
    sender = ResultSender(pipe)
    step = [StepStats(num_prefill_tokens=i, num_decode_tokens=1, num_seqs=2, step_time_s=0.01) for i in range(5)]
    sender.put(("step", [delta("a", "x", [1])], "stats0", step[0]))
    assert pipe.first_send_started.wait(10)  # the sender is stuck in the first send; the step loop is not
    sender.put(("step", [delta("a", "y", [2]), delta("b", "p", [9])], "stats1", step[1]))
    sender.put(("error", "refused", ValueError("no")))
    sender.put(("step", [delta("a", "z", [3]), delta("b", "q", [8], finished=True)], "stats2", step[2]))
    sender.put(("step", [], "stats3", None))  # an idle tick in between
    sender.put(("step", [delta("a", "!", [4], finished=True)], "stats4", step[3]))
    sender.put(("stopped",))
    pipe.release.set()
    sender.close()

    kinds = [message[0] for message in pipe.sent]
    assert kinds == ["step", "step", "error", "step", "stopped"]
    first, merged_1, error, merged_2 = pipe.sent[0], pipe.sent[1], pipe.sent[2], pipe.sent[3]
    assert [o.outputs[0].token_ids for o in unpack_outputs(first[1])] == [[1]]
    assert error[1] == "refused"
    # Behind the blocked send: step 1 alone (the error keeps its place after it), then steps 2-4 as one.
    assert merged_1[2:] == ("stats1", [step[1]])
    outputs = {o.request_id: o for o in unpack_outputs(merged_2[1])}
    assert (outputs["a"].outputs[0].text, outputs["a"].outputs[0].token_ids, outputs["a"].finished) == ("z!", [3, 4], True)
    assert (outputs["b"].outputs[0].text, outputs["b"].outputs[0].token_ids, outputs["b"].finished) == ("q", [8], True)
    assert merged_2[2:] == ("stats4", [step[2], step[3]])  # the latest stats; every step for the metrics
    assert (sender.num_steps, sender.num_step_messages) == (4, 3)


@pytest.mark.parametrize("failure", [BrokenPipeError("the parent is gone"), TypeError("cannot pickle 'x'")])
def test_the_sender_reports_a_failed_send_on_the_next_put(failure) -> None:
    class Failing:
        def send(self, message: tuple) -> None:
            raise failure

    sender = ResultSender(Failing())
    sender.put(("step", [], "stats", None))
    sender.close()
    assert sender.error is failure
    with pytest.raises(type(failure)):
        sender.put(("step", [], "stats", None))
