"""The engine core's child process: `LLMEngine` stepping while there is work, commands applied between steps.

Results leave the child from a thread of its own (`ResultSender`), so a step never waits for the parent to
read: while the parent is behind, the steps that pile up go as one message, each request's deltas merged
(fewer, larger messages, exactly when the server is busiest). The child exits when the parent's end of the
command pipe closes, and ignores SIGINT: Ctrl-C reaches the whole process group, and the parent decides
when it stops.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import TYPE_CHECKING

from pagedserve.config.engine import EngineConfig
from pagedserve.engine.core.llm_engine import LLMEngine
from pagedserve.engine.core.protocol import apply_command
from pagedserve.engine.core.request import RequestOutput, merge_delta
from pagedserve.engine.process.wire import Ready, pack_outputs, portable

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

logger = logging.getLogger(__name__)

_IDLE_POLL_S = 1.0  # an idle core checks its health (tensor-parallel ranks) this often


class ResultSender:
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


def core_main(config: EngineConfig, commands: Connection, results: Connection, log_level: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [engine core] %(message)s")
    try:
        engine = LLMEngine(config)
    except BaseException as exc:  # noqa: BLE001 - the parent raises it
        logger.exception("engine start-up failed")
        results.send(("failed", portable(exc)))
        return
    sender: ResultSender | None = None
    try:
        workers = getattr(engine.runner, "workers", ())  # tensor parallel: rank 0's worker processes
        results.send(("ready", Ready(engine.model_name, engine.tokenizer, engine.max_model_len, engine.get_stats(),
                                     tuple(process.pid for process in workers))))
        sender = ResultSender(results)
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


def _serve(engine: LLMEngine, commands: Connection, results: ResultSender) -> bool:
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
                    results.put(("error", request_id, portable(error)))
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
        for request_id, error in engine.take_refused():
            results.put(("error", request_id, portable(error)))
        results.put(("step", outputs, engine.get_stats(), engine.last_step))


def _log_busy_period(results: ResultSender, since: tuple[int, int]) -> None:
    """One line when the server fell behind the engine during the work that just ended (it read the results
    of several steps at once): a sign that the server's process, not the GPU, limits the service."""
    num_steps, num_messages = results.num_steps - since[0], results.num_step_messages - since[1]
    if num_messages < num_steps:
        logger.info("the server read the results of %d steps as %d messages (it fell behind the engine %d times)",
                    num_steps, num_messages, num_steps - num_messages)
