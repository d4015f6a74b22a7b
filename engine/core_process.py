"""The engine core in a process of its own, so that a server's event loop never shares its GIL.

A Ray Serve replica spends much of its time in Python on the transport: every streamed message
through a handle is serialised, queued and sent under the GIL. The step loop is Python too (schedule,
prepare inputs, detokenise). In one process they take turns, and the GPU waits on whichever runs.
`EngineCoreClient` starts `LLMEngine` in a spawned child and drives it over two pipes:

    parent (server, AsyncLLMEngine)                child (engine core)
      sender thread  -- [commands] ---------------->  between steps: add / abort / stop
      reader thread  <-- ("step", deltas, stats) ---  results thread, after every step

Commands are batched by a sender thread, so the event loop never blocks on a full pipe; results leave
the child from a thread of their own, so a step never waits for the parent to read: while the parent
is behind, the steps that pile up go as one message, each request's deltas merged (fewer, larger
messages, exactly when the server is busiest). Deltas travel as plain tuples without their prompt
(the parent's stream already holds it): a dataclass costs pickle several times more, and the parent
unpickles under the GIL its event loop needs. Validation runs in the child, where the KV-cache
geometry is; a refused request gets its error as the first item of its stream.
The child exits when the parent's end of the command pipe closes (the parent died or stopped), and
it ignores SIGINT: Ctrl-C reaches the whole process group, and the parent decides when it stops.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import multiprocessing as mp
import pickle
import signal
import threading
import time
import weakref
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from pagedserve.config.engine import EngineConfig

from .async_engine import QueuedCommands, apply_command
from .errors import EngineDeadError, EngineError
from .llm_engine import LLMEngine, encode_prompt
from .request import CompletionOutput, Continuation, RequestMetrics, RequestOutput, SamplingParams, merge_delta
from .stats import EngineStats, StepStats

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from .async_engine import CoreSink

logger = logging.getLogger(__name__)

_IDLE_POLL_S = 1.0  # an idle core checks its health (tensor-parallel ranks) this often


def wants_engine_process(config: EngineConfig) -> bool:
    """`EngineConfig.engine_process`, with None resolved: a process of its own on CUDA, a thread on CPU."""
    if config.engine_process is not None:
        return config.engine_process
    if config.device != "auto":
        return config.device == "cuda"
    import torch

    return torch.cuda.is_available()


@dataclass(frozen=True)
class _Ready:
    model_name: str
    tokenizer: Any
    max_model_len: int
    stats: EngineStats


class EngineCoreClient(QueuedCommands):
    """Parent side of an engine core process. Blocks in __init__ until the engine is loaded or failed."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__()
        self.config = config
        context = mp.get_context("spawn")  # fork would copy this process's threads (Ray's, the event loop's)
        commands_out, self._commands_in = context.Pipe(duplex=False)
        self._results, results_in = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_core_main,
            args=(config, commands_out, results_in, logging.getLogger("pagedserve").getEffectiveLevel()),
            name="pagedserve-engine-core",
            daemon=False,  # it may start tensor-parallel ranks of its own, which daemons cannot
        )
        self._process.start()
        commands_out.close()  # the child holds the only other ends: its exit shows here as EOF
        results_in.close()
        self._stopping = False
        self._abandoned = False
        self._dead_reason: str | None = None
        self._sender: threading.Thread | None = None
        self._reader: threading.Thread | None = None
        atexit.register(_shutdown_at_exit, weakref.ref(self))
        ready = self._wait_until_ready()
        self.model_name = ready.model_name
        self.tokenizer = ready.tokenizer
        self.max_model_len = ready.max_model_len
        self._initial_stats = ready.stats
        logger.info("engine core process %d serves %s", self._process.pid, self.model_name)

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def _wait_until_ready(self) -> _Ready:
        while not self._results.poll(0.2):
            if not self._process.is_alive():
                self._process.join(1.0)
                raise EngineDeadError(
                    f"the engine process exited during start-up (exit code {self._process.exitcode}); see its log "
                    "above. A script that starts it needs `if __name__ == '__main__':` (the process is spawned)"
                )
        try:
            kind, payload = self._results.recv()
        except EOFError:
            self._process.join(5.0)
            raise EngineDeadError(
                f"the engine process exited during start-up (exit code {self._process.exitcode})"
            ) from None
        if kind == "failed":
            self._process.join(5.0)
            raise payload
        return payload

    # ---- EngineCore ----------------------------------------------------------------------------
    def initial_stats(self) -> EngineStats:
        return self._initial_stats

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams,
                         continuation: Continuation | None = None) -> None:
        """Validation happens in the core, which knows the KV cache; errors come back on the stream."""

    def start(self, sink: CoreSink) -> None:
        self._sender = threading.Thread(target=self._send_loop, name="pagedserve-core-sender", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, args=(sink,), name="pagedserve-core-reader",
                                        daemon=True)
        self._sender.start()
        self._reader.start()

    def check_health(self) -> None:
        if self._dead_reason is not None:
            raise EngineDeadError(self._dead_reason)
        if not self._stopping and not self._process.is_alive():
            raise EngineDeadError(f"the engine process exited (exit code {self._process.exitcode})")

    def abandon(self) -> None:
        """Kill the core (hung in a kernel or a collective, it would hold the device forever)."""
        self._abandoned = True  # the caller reported why; the reader need not report the kill
        if self._process.is_alive():
            logger.error("killing the hung engine process %d", self._process.pid)
            self._process.kill()
            self._process.join(5.0)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the core (it stops its tensor-parallel ranks); kill it if it does not stop in time. Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        self._queue(("stop",))
        if self._sender is None:  # never started: send directly
            self._send_now([("stop",)])
        self._process.join(timeout_s)
        if self._process.is_alive():
            logger.warning("engine process %d did not stop in %.0f s; killing it", self._process.pid, timeout_s)
            self._process.kill()
            self._process.join(5.0)
        self._wakeup.set()
        for thread in (self._sender, self._reader):
            if thread is not None and thread is not threading.current_thread():
                thread.join(1.0)
        self._results.close()

    # ---- threads -------------------------------------------------------------------------------
    def _send_now(self, batch: list[tuple]) -> bool:
        try:
            self._commands_in.send(batch)
            return True
        except (OSError, ValueError):  # the child is gone (the reader reports it) or the pipe is closed
            return False

    def _send_loop(self) -> None:
        while True:
            self._wakeup.wait()
            self._wakeup.clear()
            batch = []
            while self._commands:
                batch.append(self._commands.popleft())
            if batch and not self._send_now(batch):
                return
            if any(command[0] == "stop" for command in batch) or not self._process.is_alive():
                self._commands_in.close()
                return

    def _read_loop(self, sink: CoreSink) -> None:
        reason = None
        try:
            while True:
                message = self._results.recv()
                kind = message[0]
                if kind == "step":
                    _, packed, stats, steps = message
                    for step in steps[:-1]:  # steps merged into one message: each still counts (metrics)
                        sink.on_step([], stats, step)
                    sink.on_step(unpack_outputs(packed), stats, steps[-1] if steps else None)
                elif kind == "error":
                    sink.on_request_error(message[1], message[2])
                elif kind == "dead":
                    reason = message[1]
                    break
                elif kind == "stopped":
                    return
        except (EOFError, OSError):
            self._process.join(2.0)
            reason = f"the engine process exited (exit code {self._process.exitcode})"
        except BaseException as exc:  # noqa: BLE001 - a listener's bug must not hide the engine's state
            logger.exception("engine core reader failed")
            reason = f"engine core reader failed: {type(exc).__name__}: {exc}"
        if reason is not None and not self._stopping and not self._abandoned:
            self._dead_reason = reason
            logger.error("engine core is dead: %s", reason)
            sink.on_dead(reason)


def _shutdown_at_exit(ref: weakref.ref) -> None:
    client = ref()
    if client is not None:
        client.shutdown(timeout_s=5.0)


# ---- the wire format of deltas ----------------------------------------------------------------------
_OUTPUT_FIELDS = tuple(f.name for f in dataclasses.fields(RequestOutput))
_OUTPUTS_AT = _OUTPUT_FIELDS.index("outputs")
_METRICS_AT = _OUTPUT_FIELDS.index("metrics")
_PROMPT_AT, _PROMPT_IDS_AT = _OUTPUT_FIELDS.index("prompt"), _OUTPUT_FIELDS.index("prompt_token_ids")
_output_row = attrgetter(*_OUTPUT_FIELDS)
_completion_row = attrgetter(*(f.name for f in dataclasses.fields(CompletionOutput)))
_metrics_row = attrgetter(*(f.name for f in dataclasses.fields(RequestMetrics)))


def pack_outputs(outputs: list[RequestOutput]) -> list[tuple]:
    """Deltas as nested tuples of their fields (every field, in the constructors' order), without the prompt."""
    packed = []
    for output in outputs:
        row = list(_output_row(output))
        row[_PROMPT_AT], row[_PROMPT_IDS_AT] = None, []  # the parent's stream holds the prompt
        row[_OUTPUTS_AT] = [_completion_row(completion) for completion in output.outputs]
        row[_METRICS_AT] = None if output.metrics is None else _metrics_row(output.metrics)
        packed.append(tuple(row))
    return packed


def unpack_outputs(packed: list[tuple]) -> list[RequestOutput]:
    outputs = []
    for row in packed:
        row = list(row)
        row[_OUTPUTS_AT] = [CompletionOutput(*completion) for completion in row[_OUTPUTS_AT]]
        metrics = row[_METRICS_AT]
        row[_METRICS_AT] = None if metrics is None else RequestMetrics(*metrics)
        outputs.append(RequestOutput(*row))
    return outputs


# ---- the child -----------------------------------------------------------------------------------
class _ResultSender:
    """The child's results, sent in order from a thread of its own so that a step never waits on the pipe.

    Steps that queued up while the parent was behind leave as one "step" message: each request's deltas
    merged in order, the latest stats, every step's `StepStats`. Other messages (a refused request's
    error, "dead", "stopped") keep their place between steps. If the parent is gone, the next `put`
    raises the pipe's error, which ends the child's loop.
    """

    def __init__(self, results: Connection) -> None:
        self._results = results
        self._pending: list[tuple] = []
        self._ready = threading.Condition()
        self._closing = False
        self._error: BaseException | None = None
        self.num_steps = self.num_step_messages = 0
        self._thread = threading.Thread(target=self._run, name="pagedserve-core-results", daemon=True)
        self._thread.start()

    def put(self, message: tuple) -> None:
        with self._ready:
            if self._error is not None:
                raise self._error
            self._pending.append(message)
            self._ready.notify()

    def close(self, timeout_s: float = 10.0) -> None:
        """Send what is queued, then stop the thread."""
        with self._ready:
            self._closing = True
            self._ready.notify()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._pending and not self._closing:
                    self._ready.wait()
                if not self._pending:
                    return
                batch, self._pending = self._pending, []
            try:
                for message in self._merged(batch):
                    self._results.send(message)
            except Exception as exc:  # noqa: BLE001 - the parent is gone (BrokenPipeError), or a result
                with self._ready:        # would not pickle: the step loop raises it on its next put
                    self._error = exc
                return

    @property
    def error(self) -> BaseException | None:
        return self._error

    def _merged(self, batch: list[tuple]) -> list[tuple]:
        """Runs of ("step", outputs, stats, step) become one ("step", packed outputs, stats, [steps])."""
        messages: list[tuple] = []
        run: list[tuple] = []
        for message in batch + [("end",)]:
            if message[0] == "step":
                run.append(message)
                continue
            if run:
                messages.append(self._one_step_message(run))
                run = []
            if message[0] != "end":
                messages.append(message)
        return messages

    def _one_step_message(self, run: list[tuple]) -> tuple:
        steps = [step for _, _, _, step in run if step is not None]
        self.num_steps += len(steps)
        self.num_step_messages += 1 if steps else 0
        if len(run) == 1:
            outputs = run[0][1]
        else:
            by_id: dict[str, RequestOutput] = {}
            for _, step_outputs, _, _ in run:
                for output in step_outputs:
                    held = by_id.get(output.request_id)
                    by_id[output.request_id] = output if held is None else merge_delta(held, output)
            outputs = list(by_id.values())
        return ("step", pack_outputs(outputs), run[-1][2], steps)


def _core_main(config: EngineConfig, commands: Connection, results: Connection, log_level: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [engine core] %(message)s")
    try:
        engine = LLMEngine(config)
    except BaseException as exc:  # noqa: BLE001 - the parent raises it
        logger.exception("engine start-up failed")
        results.send(("failed", _portable(exc)))
        return
    sender: _ResultSender | None = None
    try:
        results.send(("ready", _Ready(engine.model_name, engine.tokenizer, engine.max_model_len, engine.get_stats())))
        sender = _ResultSender(results)
        if _serve(engine, commands, sender):
            sender.put(("stopped",))
    except (BrokenPipeError, EOFError, ConnectionResetError):
        pass  # the parent is gone: nobody to report to
    except BaseException as exc:  # noqa: BLE001 - the loop must report its death, never vanish
        logger.exception("engine loop died")
        dead = ("dead", f"engine loop died: {type(exc).__name__}: {exc}")
        try:
            if sender is not None and sender.error is None:
                sender.put(dead)
            else:  # the results thread failed: directly (a message that would not pickle was never written)
                results.send(dead)
        except (OSError, ValueError):
            pass
    finally:
        if sender is not None:
            sender.close()
        engine.shutdown()


def _serve(engine: LLMEngine, commands: Connection, results: _ResultSender) -> bool:
    """Step while there is work; apply commands between steps. True on a stop command, False on EOF."""
    last_health_check = time.monotonic()
    busy_since: tuple[int, int] | None = None  # the sender's counts when this busy period began
    while True:
        busy = engine.has_unfinished_requests()
        if commands.poll(0 if busy else _IDLE_POLL_S):
            try:
                batch = commands.recv()
            except EOFError:
                return False
            for command in batch:
                if command[0] == "stop":
                    return True
                refused = apply_command(engine, command)
                if refused is not None:
                    request_id, error = refused
                    results.put(("error", request_id, _portable(error)))
            continue  # drain every queued command before the next step
        if not engine.has_unfinished_requests():
            if busy_since is not None:
                _log_busy_period(results, busy_since)
                busy_since = None
            now = time.monotonic()
            if now - last_health_check >= _IDLE_POLL_S:
                engine.check_health()
                last_health_check = now
                results.put(("step", [], engine.get_stats(), None))
            continue
        if busy_since is None:
            busy_since = (results.num_steps, results.num_step_messages)
        outputs = engine.step()
        results.put(("step", outputs, engine.get_stats(), engine.last_step))


def _log_busy_period(results: _ResultSender, since: tuple[int, int]) -> None:
    """One line when the server fell behind the engine during the work that just ended (it read the results
    of several steps at once): a sign that the server's process, not the GPU, limits the service."""
    num_steps, num_messages = results.num_steps - since[0], results.num_step_messages - since[1]
    if num_messages < num_steps:
        logger.info("the server read the results of %d steps as %d messages (it fell behind the engine %d times)",
                    num_steps, num_messages, num_steps - num_messages)


def _portable(exc: BaseException) -> BaseException:
    """The exception itself when it survives pickling, else an `EngineError` naming it."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return EngineError(f"{type(exc).__name__}: {exc}")
