"""What crosses the pipes between an engine-core client and its child: the ready message and packed deltas.

Deltas travel as plain tuples of their fields, in the constructors' order, without their prompt (the
parent's stream already holds it): a dataclass costs pickle several times more, and the parent unpickles
under the GIL its event loop needs. Exceptions travel as themselves when they pickle, else as an
`EngineError` naming them.
"""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from pagedserve.engine.core.request import CompletionOutput, RequestMetrics, RequestOutput
from pagedserve.engine.core.stats import EngineStats
from pagedserve.engine.errors import EngineError


@dataclass(frozen=True)
class Ready:
    model_name: str
    tokenizer: Any
    max_model_len: int
    stats: EngineStats
    worker_pids: tuple[int, ...] = ()  # the core's tensor-parallel worker ranks (its children), if any


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


def portable(exc: BaseException) -> BaseException:
    """The exception itself when it survives pickling, else an `EngineError` naming it."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return EngineError(f"{type(exc).__name__}: {exc}")
