"""The engine core in a process of its own, so that a server's event loop never shares its GIL.

A Ray Serve replica spends much of its time in Python on the transport: every streamed message
through a handle is serialised, queued and sent under the GIL. The step loop is Python too (schedule,
prepare inputs, detokenise). In one process they take turns, and the GPU waits on whichever runs.
`EngineCoreClient` starts `LLMEngine` in a spawned child and drives it over two pipes:

    parent (server, AsyncLLMEngine)                child (engine core)
      sender thread  -- [commands] ---------------->  between steps: add / abort / stop
      reader thread  <-- ("step", deltas, stats) ---  results thread, after every step

Commands are batched by a sender thread, so the event loop never blocks on a full pipe. The child's side
is `process/child.py`, the messages `process/wire.py`. Validation runs in the child, where the KV-cache
geometry is; a refused request gets its error as the first item of its stream.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import threading
import weakref

from pagedserve.config.engine import EngineConfig
from pagedserve.engine.core.llm_engine import encode_prompt
from pagedserve.engine.core.protocol import CoreSink, QueuedCommands
from pagedserve.engine.core.request import Continuation, SamplingParams
from pagedserve.engine.core.stats import EngineStats
from pagedserve.engine.errors import EngineDeadError
from pagedserve.engine.process.child import core_main
from pagedserve.engine.process.liveness import process_running
from pagedserve.engine.process.wire import Ready, unpack_outputs

logger = logging.getLogger(__name__)


class EngineCoreClient(QueuedCommands):
    """Parent side of an engine core process. Blocks in __init__ until the engine is loaded or failed."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__()
        self.config = config
        context = mp.get_context("spawn")  # fork would copy this process's threads (Ray's, the event loop's)
        commands_out, self._commands_in = context.Pipe(duplex=False)
        self._results, results_in = context.Pipe(duplex=False)
        self._process = context.Process(
            target=core_main,
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
        # Watched from here, not only by the core: a core blocked in a collective whose peer died waits there
        # (NCCL sees no dead peer on one host) and cannot check its workers itself.
        self._worker_pids = ready.worker_pids
        logger.info("engine core process %d serves %s", self._process.pid, self.model_name)

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def _wait_until_ready(self) -> Ready:
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
        """`EngineDeadError` when the core is dead, or one of its tensor-parallel workers is: the core would
        find that out itself only between steps, or inside a collective that notices (gloo's closed sockets;
        NCCL waits out its timeout), and the caller then kills it (`abandon`)."""
        if self._dead_reason is not None:
            raise EngineDeadError(self._dead_reason)
        if self._stopping:
            return
        if not self._process.is_alive():
            raise EngineDeadError(f"the engine process exited (exit code {self._process.exitcode})")
        for rank, pid in enumerate(self._worker_pids, start=1):
            if not process_running(pid):
                raise EngineDeadError(f"tensor-parallel worker rank {rank} (process {pid}) exited")

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
