"""The synchronous engine: add_request / step / abort over the scheduler, model runner and sampler.

One user request with `n` completions is one `_RequestGroup` of `n` sequences (`Request`s); the
children share the parent's prompt blocks. `step()` returns `RequestOutput` deltas: for each group
with news, the completions that changed, holding only their new text, token ids and logprobs.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gc
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass, field

import torch

from pagedserve.cache.kv_cache_manager import KVCacheManager
from pagedserve.config.engine import ConfigError, EngineConfig
from pagedserve.config.resolve import ResolvedConfig, resolve

from pagedserve.engine.core.detokenizer import IncrementalDetokenizer
from pagedserve.engine.core.grammar import GrammarCompiler, PendingGrammar
from pagedserve.engine.core.limits import CONTEXT, KV_CACHE, check_fits, check_token_ids, too_large
from pagedserve.engine.errors import EngineDeadError, InvalidRequestError, ModelLoadError
from pagedserve.engine.runner.loader import LoadedModel, dtype_name, load_model, read_model_config
from pagedserve.engine.runner.lora import WARM_UP_ADAPTER
from pagedserve.engine.runner.model_runner import ModelRunner
from pagedserve.engine.runner.platform import detect_platform, model_facts
from pagedserve.engine.runner.step_input import StepInput, warm_up_steps
from pagedserve.engine.core.request import (
    CompletionOutput,
    Continuation,
    FinishReason,
    PLACEHOLDER_TOKEN_ID,
    Logprob,
    Request,
    RequestOutput,
    RequestStatus,
    SamplingParams,
)
from pagedserve.engine.core.sampler import SampledBatch, Sampler
from pagedserve.engine.core.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from pagedserve.engine.core.stats import EngineStats, SpecDecodeCounts, StepStats
from pagedserve.engine.core.step_cost import StepCostModel, StepShape
from pagedserve.engine.spec.speculator import Speculator
from pagedserve.engine.spec.verify import num_accepted

logger = logging.getLogger(__name__)


def _is_local_path(source: str) -> bool:
    """A hub id is `name` or `org/name`; a source that starts like a path or has more parts is a local path."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source


def check_model_sources(config: EngineConfig) -> None:
    """Raise ModelLoadError for a model, tokenizer or draft model given as a local path that is not there, before
    anything loads (transformers would take it for a malformed hub id and say so)."""
    fields = ["model", "tokenizer"] + (["speculative_model"] if config.speculative_method == "draft" else [])
    for name in fields:
        source = getattr(config, name)
        if source is not None and _is_local_path(source) and not os.path.exists(source):
            raise ModelLoadError(f"EngineConfig.{name}={source!r}: no such file or folder")


@contextlib.contextmanager
def model_load_errors(what: str) -> Iterator[None]:
    """What transformers raises for a model it cannot read (OSError: files missing, the hub unreachable and
    nothing cached; ValueError: files that are not a model) becomes a ModelLoadError naming `what` (the
    setting and its value); a ConfigError (a setting the model does not allow) goes on as it is."""
    try:
        yield
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{what} cannot be loaded: {exc}") from exc


@dataclass
class _Delta:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)


@dataclass
class _InFlightStep:
    """A launched step whose sampled tokens are not on the host yet."""

    requests: list[Request]  # row -> request
    rows: dict[str, int]  # request id -> row
    sampled: SampledBatch | None  # None when no request of the step samples
    delivered: bool = False
    # Speculating requests: id -> proposals; such a request has 1 + k consecutive rows from its first.
    drafts: dict[str, list[int]] = field(default_factory=dict)
    # For the step cost model: what the step held, when the host began preparing it (perf_counter: scheduling in
    # the `step()` call that launched it), and whether a step that is never delivered (no request sampled) went to
    # the device before it, so that its start is unknown.
    shape: StepShape | None = None
    prepared_at: float = 0.0
    follows_unobserved: bool = False
    # Off CUDA the forward and sampling ran inside the launch: when they ended (the next step's launch, which
    # comes before this step's delivery under async scheduling, must not count as this step's time).
    computed_at: float | None = None
    # A pipelined verification (`_pipelined_step`): requests whose rows were computed on a wrong guess, not delivered.
    void: set[str] = field(default_factory=set)
    # The next step went out before this one's delivery (a pipelined verification): its commits overlap that step.
    is_followed: bool = False

    @classmethod
    def of_rows(cls, requests: list[Request], sampled: SampledBatch | None,
                drafts: dict[str, list[int]]) -> "_InFlightStep":
        """A step whose sampled row i is `requests[i]`'s (a speculating request has consecutive rows)."""
        first_rows: dict[str, int] = {}
        for row, request in enumerate(requests):
            first_rows.setdefault(request.request_id, row)
        return cls(requests, first_rows, sampled, drafts=drafts)


@dataclass
class _RequestGroup:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[Request]
    detokenizers: list[IncrementalDetokenizer]
    deltas: dict[int, _Delta] = field(default_factory=dict)
    error: str | None = None
    grammar: PendingGrammar | None = None  # structured outputs: the compile it waits for before it is scheduled

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.sequences)


def encode_prompt(tokenizer, prompt: str | list[int]) -> list[int]:
    """Token ids of a prompt given as text or as ids."""
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt))
    return list(prompt)


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        """Loads `config.model`, unless `loaded` brings a model already in memory. Every auto value of
        `config` is decided once, here, by `config/resolve.py`, and logged."""
        self.config = config
        if config.tp_size > 1 and loaded is not None:
            raise ConfigError(f"EngineConfig.tp_size={config.tp_size}: every rank loads the model; pass no `loaded`")
        if loaded is not None:
            settings = resolve(config, detect_platform(), model_facts(loaded.model.config),
                               device=loaded.device.type, dtype=dtype_name(loaded.dtype))
        else:
            check_model_sources(config)
            with model_load_errors(f"EngineConfig.model={config.model!r}"):
                hf_config = read_model_config(config.model, config.revision, config.trust_remote_code)
            settings = resolve(config, detect_platform(), model_facts(hf_config))
        logger.info(settings.describe())
        self.settings: ResolvedConfig = settings
        if config.tp_size > 1:
            from pagedserve.engine.runner.tensor_parallel import start_tensor_parallel

            # Rank 0 of a group it spawns: the runner mirrors every call onto the worker ranks.
            loaded, self.runner = start_tensor_parallel(settings)
        else:
            if loaded is None:
                what = f"EngineConfig.model={config.model!r}" + (
                    "" if config.tokenizer is None else f" (or EngineConfig.tokenizer={config.tokenizer!r})")
                with model_load_errors(what):
                    loaded = load_model(settings.load)
            self.runner = ModelRunner(loaded, settings.runner, settings.cache)
        self.model_name = loaded.served_name
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        shape = self.runner.shape
        self.scheduler_settings = settings.scheduler
        self.max_model_len = settings.scheduler.max_model_len
        max_batch_tokens = settings.scheduler.max_batch_tokens
        max_num_seqs = settings.scheduler.max_num_seqs
        # A draft model and its cache first: the memory plan then counts them as taken.
        with (model_load_errors(f"EngineConfig.speculative_model={config.speculative_model!r}")
              if config.speculative_method == "draft" else contextlib.nullcontext()):
            self._speculator = Speculator.build(settings, self.runner, self.max_model_len)
        self.memory_plan = self.runner.plan_memory(max_num_seqs, self.max_model_len, max_batch_tokens)
        logger.info(self.memory_plan.describe())
        self.runner.allocate_kv_cache(self.memory_plan.num_blocks)
        if self.device.type == "cuda" or self.runner.is_compiled:
            self._warm_up(max_batch_tokens)
        decode_graph_max_batch_size = 0  # decode batches up to this size replay a CUDA graph
        verify_graph_max_batch_size = 0  # and verification batches up to this one
        mixed_graph_max_tokens = 0  # and steps with prompt tokens of up to this many tokens
        if settings.runner.cuda_graphs:
            max_graph_batch = min(settings.runner.cuda_graph_max_batch_size, max_num_seqs)
            # Verification steps (1 + k tokens a sequence) replay graphs of their own, for the batches that speculate.
            kinds = {} if not settings.speculative.enabled else dict(
                verify_query_len=settings.speculative.num_tokens + 1,
                verify_max_batch_size=min(max_graph_batch, settings.speculative.disable_batch_size))
            if settings.runner.cuda_graph_max_mixed_tokens:
                kinds.update(mixed_max_tokens=settings.runner.cuda_graph_max_mixed_tokens, max_num_seqs=max_num_seqs)
            if self.runner.capture_cuda_graphs(max_graph_batch, self.max_model_len, self.memory_plan.cuda_graph_bytes,
                                               **kinds):
                decode_graph_max_batch_size = max_graph_batch
                verify_graph_max_batch_size = kinds.get("verify_max_batch_size", 0)
                mixed_graph_max_tokens = self.runner.mixed_graph_max_tokens
            if self._speculator is not None:
                self._speculator.capture_cuda_graphs(kinds["verify_max_batch_size"], self.max_model_len)
        self.kv_cache = KVCacheManager(
            settings.cache.block_size,
            [g.sliding_window for g in shape.groups],
            self.memory_plan.num_blocks,
            settings.cache.enable_prefix_caching,
        )
        self.scheduler = Scheduler(self.scheduler_settings, self.kv_cache,
                                   StepCostModel(decode_graph_max_batch_size=decode_graph_max_batch_size,
                                                 verify_graph_max_batch_size=verify_graph_max_batch_size,
                                                 mixed_graph_max_tokens=mixed_graph_max_tokens))
        self._last_delivered_at: float | None = None  # when the latest delivered step's tokens reached the host
        self._launch_computes = self.device.type != "cuda"  # the launch returns with the step computed
        self._launched_unobserved = False  # a step no request sampled went out after the latest one that did
        self.sampler = Sampler(self.device, seed=settings.seed)
        self.eos_token_ids = self._eos_token_ids(loaded.model)
        self._groups: dict[str, _RequestGroup] = {}
        self._compiling: dict[str, _RequestGroup] = {}  # waiting for their grammar, not yet scheduled
        self._refused: list[tuple[str, Exception]] = []  # refused after add_request returned (a grammar)
        self._grammar_compiler: GrammarCompiler | None = None  # built with the first constrained request
        self._finished_outputs: list[RequestOutput] = []
        self._num_prompt_tokens_total = 0
        self._num_generation_tokens_total = 0
        self._num_steps_total = 0  # steps that ran the model
        self._finished_by_reason: dict[str, int] = {}
        self.last_step: StepStats | None = None
        self.async_scheduling = settings.async_scheduling
        self._in_flight: _InFlightStep | None = None
        self._asked_for_proposals = False  # this step's requests were asked for proposals
        # The model, tokenizer and caches are long-lived: keep them out of every future garbage
        # collection, which otherwise rescans them and costs milliseconds per step.
        gc.collect()
        gc.freeze()
        # Unfrozen at exit, so that the interpreter's last collection frees them: frozen, the cycles of Triton's
        # nanobind objects outlive it, and nanobind reports them as leaks (some thirty lines on stderr). Once per
        # process, however many engines it builds.
        atexit.unregister(gc.unfreeze)
        atexit.register(gc.unfreeze)

    def _warm_up(self, max_batch_tokens: int) -> None:
        started = time.perf_counter()
        num_blocks = self.memory_plan.num_blocks
        steps = warm_up_steps(self.settings.cache.block_size, len(num_blocks), min(num_blocks), self.max_model_len,
                              max_batch_tokens, WARM_UP_ADAPTER if self.runner.lora is not None else None)
        for step in steps:
            self.runner.execute(step)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if steps:
            logger.info("warm-up: %d steps in %.1f s (compilation and kernel loading before the first request)",
                        len(steps), time.perf_counter() - started)

    def _eos_token_ids(self, model) -> frozenset[int]:
        ids: set[int] = set()
        generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        for value in (generation_eos, self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif value:
                ids.update(value)
        return frozenset(ids)

    # ---- requests ------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def validate_request(
        self, prompt_token_ids: list[int], params: SamplingParams, continuation: Continuation | None = None
    ) -> None:
        """Raise `InvalidRequestError` / `RequestTooLargeError` for a request that can never run."""
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        vocab = self.runner.shape.vocab_size
        check_token_ids(prompt_token_ids, vocab, "prompt")
        check_token_ids(params.logit_bias or (), vocab, "logit_bias")
        check_token_ids(params.allowed_token_ids or (), vocab, "allowed_token_ids")
        check_token_ids(params.stop_token_ids, vocab, "stop_token_ids")
        if continuation is not None:
            self._validate_continuation(num_prompt, params, continuation)
        max_tokens = params.max_tokens if params.max_tokens is not None else 1
        check_fits(num_prompt, max_tokens, self.max_model_len, CONTEXT)
        new_tokens = params.max_tokens or self.max_model_len - num_prompt
        if not self.kv_cache.can_ever_fit(num_prompt + new_tokens, self.scheduler_settings.max_batch_tokens):
            raise too_large(num_prompt, new_tokens, self.kv_cache.num_total_blocks * self.kv_cache.block_size, KV_CACHE)

    def _validate_continuation(self, num_prompt: int, params: SamplingParams, continuation: Continuation) -> None:
        done = continuation.output_token_ids
        if params.n != 1:
            raise InvalidRequestError(f"a continuation goes on with one completion; n is {params.n}", param="n")
        check_token_ids(done, self.runner.shape.vocab_size, "continuation")
        limit = min(self.max_model_len, num_prompt + params.max_tokens if params.max_tokens is not None
                    else self.max_model_len)
        if num_prompt + len(done) >= limit:
            raise InvalidRequestError(f"the continuation's {len(done)} tokens leave none to generate "
                                      f"(max_tokens {params.max_tokens}, context {self.max_model_len})",
                                      param="continuation")

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        prompt_text: str | None = None,
        continuation: Continuation | None = None,
        priority: int = 0,
        lora: str | None = None,
    ) -> None:
        """Queue a request; `prompt_text` names the prompt in outputs when `prompt` is already tokenized;
        `continuation`: tokens its one completion already produced elsewhere (only what follows streams);
        `priority`: vLLM's (lower is served earlier), only with the `priority` scheduling policy; `lora`: the
        name of a loaded LoRA adapter to run under (None: the base model)."""
        if request_id in self._groups:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        if priority != 0 and self.scheduler_settings.policy != "priority":
            raise InvalidRequestError(f"priority {priority} needs scheduling_policy 'priority'; this engine's is "
                                      f"{self.scheduler_settings.policy!r}", param="priority")
        if lora is not None and not self.has_lora(lora):
            raise InvalidRequestError(f"no LoRA adapter named {lora!r} is loaded (loaded: "
                                      f"{', '.join(self.lora_names()) or 'none'})", param="lora")
        prompt_token_ids = self.encode_prompt(prompt)
        self.validate_request(prompt_token_ids, params, continuation)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        sequences = [
            Request(
                request_id=request_id if index == 0 else f"{request_id}#{index}",
                prompt_token_ids=prompt_token_ids,
                sampling_params=params,
                eos_token_ids=self.eos_token_ids,
                arrival_time=arrival,
                parent_id=request_id,
                completion_index=index,
                priority=priority,
                lora_name=lora,
                token_limit=min(self.max_model_len, len(prompt_token_ids) + params.max_tokens)
                if params.max_tokens is not None else self.max_model_len,
            )
            for index in range(params.n)
        ]
        group = _RequestGroup(
            request_id=request_id,
            prompt=prompt if isinstance(prompt, str) else prompt_text,
            prompt_token_ids=prompt_token_ids,
            params=params,
            sequences=sequences,
            detokenizers=[IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params) for _ in sequences],
        )
        if params.bad_words:
            bad_word_ids = self._bad_word_ids(params.bad_words)
            for sequence in sequences:
                sequence.bad_word_ids = bad_word_ids
        if continuation is not None:
            self._continue_from(group, continuation)
        self._groups[request_id] = group
        self._num_prompt_tokens_total += len(prompt_token_ids)
        if params.structured_outputs is not None:
            # Compiled off the step loop; scheduled once it is ready (`_admit_compiled`).
            group.grammar = self._grammars().submit(params.structured_outputs)
            self._compiling[request_id] = group
        else:
            self.scheduler.add_request(sequences[0], children=sequences[1:])

    def _bad_word_ids(self, words: list[str]) -> list[list[int]]:
        """Each bad word as token ids, alone and after a space (vLLM's rule: a word mid-text has its space)."""
        encoded: dict[tuple[int, ...], None] = {}  # in order, each once (a list scan made many words quadratic)
        for word in words:
            for text in (word, " " + word.lstrip()):
                ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
                if ids:
                    encoded.setdefault(ids)
        return [list(ids) for ids in encoded]

    def _grammars(self) -> GrammarCompiler:
        if self._grammar_compiler is None:
            self._grammar_compiler = GrammarCompiler(self.tokenizer, self.runner.shape.vocab_size,
                                                     sorted(self.eos_token_ids))
        return self._grammar_compiler

    def _admit_compiled(self) -> None:
        """Schedule the requests whose grammar has compiled, each sequence with a matcher of its own that
        has accepted the tokens a continuation brought; refuse those whose grammar failed or timed out."""
        for request_id, group in list(self._compiling.items()):
            try:
                compiled = group.grammar.result()
                if compiled is None:
                    continue
                for sequence in group.sequences:
                    matcher = self._grammars().matcher(compiled)
                    for token_id in sequence.output_token_ids:
                        if not matcher.accept_token(token_id):
                            raise InvalidRequestError(f"the continuation's token {token_id} breaks the "
                                                      f"{group.params.structured_outputs.kind}", param="continuation")
                    if matcher.is_terminated():
                        # It took its stop token (EOS, under ignore_eos too): nothing may follow, and the matcher
                        # has no next mask, so scheduling it failed every request of its first step.
                        raise InvalidRequestError(f"the continuation already ends the "
                                                  f"{group.params.structured_outputs.kind} (its stop token)",
                                                  param="continuation")
                    sequence.grammar = matcher
            except InvalidRequestError as exc:
                del self._compiling[request_id]
                self._refuse(group, exc)
                continue
            del self._compiling[request_id]
            self.scheduler.add_request(group.sequences[0], children=group.sequences[1:])

    def _refuse(self, group: _RequestGroup, error: Exception) -> None:
        """A request refused after `add_request` returned: it ends without output, its error goes to
        `take_refused` (servers answer it as a bad request)."""
        for sequence in group.sequences:
            sequence.status = RequestStatus.FINISHED
            sequence.finish_reason = FinishReason.ERROR
            self.sampler.forget(sequence.request_id)
        self._groups.pop(group.request_id, None)
        self._refused.append((group.request_id, error))

    def take_refused(self) -> list[tuple[str, Exception]]:
        """Requests refused since the last call, with why: (request id, error). Each is reported once."""
        refused, self._refused = self._refused, []
        return refused

    def _continue_from(self, group: _RequestGroup, continuation: Continuation) -> None:
        """Put the tokens already produced in place: the scheduler then computes prompt + them as it
        recomputes a preempted request, and the next sampled token is the first new one."""
        request, detokenizer = group.sequences[0], group.detokenizers[0]
        done = list(continuation.output_token_ids)
        for num_out, token_id in enumerate(done, start=1):  # their text reached the client; what is held stays held
            _, stop_string = detokenizer.append(token_id, check_stop=num_out > group.params.min_tokens)
            if stop_string is not None:
                raise InvalidRequestError(f"the continuation already ends at stop string {stop_string!r}",
                                          param="continuation")
        request.output_token_ids = done
        request.cumulative_logprob = continuation.cumulative_logprob
        if group.params.seed is not None:
            self.sampler.skip(request.request_id, len(done))

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks. False if it is unknown or already finished."""
        group = self._groups.get(request_id)
        if group is None:
            return False
        if self._compiling.pop(request_id, None) is not None:
            for sequence in group.sequences:  # never scheduled: nothing to free
                sequence.status = RequestStatus.FINISHED
                sequence.finish_reason = FinishReason.ABORT
            self._groups.pop(request_id, None)
            return True
        self._finish_group(group, FinishReason.ABORT)
        return True

    # ---- LoRA adapters -------------------------------------------------------------------------
    def has_lora(self, name: str) -> bool:
        return self.runner.lora is not None and self.runner.lora.has(name)

    def lora_names(self) -> list[str]:
        return [] if self.runner.lora is None else [info.name for info in self.runner.lora.adapters()]

    def add_lora(self, name: str, path: str) -> None:
        """Load an adapter at run time (vLLM's load_lora_adapter); `InvalidRequestError` if LoRA is off, the
        name is taken (by an adapter or the base model) or the adapter cannot run here."""
        if self.runner.lora is None:
            raise InvalidRequestError("LoRA is off on this engine (start it with enable_lora or lora_modules)",
                                      param="lora_name")
        if name == self.model_name:
            raise InvalidRequestError(f"{name!r} is the base model's name", param="lora_name")
        try:
            self.runner.lora.add(name, path)
        except ConfigError as exc:
            raise InvalidRequestError(str(exc), param="lora_path") from None

    def remove_lora(self, name: str) -> None:
        """Unload an adapter (vLLM's unload_lora_adapter); refused while requests still run under it."""
        if not self.has_lora(name):
            raise InvalidRequestError(f"no LoRA adapter named {name!r} is loaded", param="lora_name")
        users = [g.request_id for g in self._groups.values() if g.sequences[0].lora_name == name]
        if users:
            raise InvalidRequestError(f"LoRA adapter {name!r} still serves {len(users)} requests", param="lora_name")
        self.runner.lora.remove(name)

    def update_scheduler(self, **changes: object) -> None:
        """Change scheduling decisions that size nothing (`config.resolve.RUNTIME_SCHEDULER_FIELDS`) from the
        next step on, on a warm engine: a benchmark compares values without rebuilding the model and its
        captures. `ConfigError` names a field that cannot change, or a bad value."""
        self.scheduler_settings = self.scheduler_settings.updated(**changes)
        self.scheduler.config = self.scheduler_settings
        logger.info("scheduler settings updated: %s; %s", ", ".join(f"{k}={v}" for k, v in changes.items()),
                    self.scheduler.step_costs.describe())

    def has_unfinished_requests(self) -> bool:
        return (bool(self._groups) or bool(self._finished_outputs) or self._in_flight is not None
                or bool(self._refused))

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch one step; return the deltas of the tokens that are on the host by now.

        Under async scheduling the step launched here is delivered by the next call: while the device
        runs step N, the host turns step N-1's tokens into outputs and then schedules and prepares step
        N+1, whose inputs take N's sampled ids straight from the device. A request holds a placeholder
        for its token in flight, so the scheduler counts it; the placeholder is replaced when the token
        arrives. Without async scheduling each call launches and delivers its own step.
        """
        started = time.perf_counter()
        self.last_step = None
        if self._compiling:
            self._admit_compiled()
            if self._compiling and not self.scheduler.num_unfinished and self._in_flight is None:
                # Only compiles to wait for: sleep on them briefly instead of spinning the step loop.
                wait_for_futures([g.grammar.future for g in self._compiling.values()], timeout=0.01,
                                 return_when="FIRST_COMPLETED")
        preparing_at = time.perf_counter()  # the host's work on the step to launch begins
        if self._in_flight is not None and self._in_flight.drafts:
            # A verification in flight: the next one goes out before its tokens arrive where it can; otherwise its
            # tokens are needed (how many it commits decides the next step), so it is delivered first.
            if self._pipelined_step(preparing_at):
                return self._collect_outputs()
            in_flight, self._in_flight = self._in_flight, None
            self._deliver(in_flight)
        self._asked_for_proposals = False
        output = self.scheduler.schedule(self._propose() if self._speculator is not None else None)
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None and output.is_empty:
            self._deliver(in_flight)
            in_flight = None
        # With sampling that reads earlier tokens' values (penalties, bad words, grammars), the launch
        # delivers the step in flight after the forward is queued and before sampling.
        launched = self._launch(output, in_flight) if not output.is_empty else None
        if launched is not None and self._launch_computes:
            launched.computed_at = time.perf_counter()
        if in_flight is not None:
            self._deliver(in_flight)
        if self._asked_for_proposals:
            self._speculator.record_step(launched is not None and bool(launched.drafts))
        if launched is not None:
            # Decodes and nothing in flight at its launch (a speculative step, the step after one, every step
            # without async scheduling): the decoding streams waited for its host work, and the cost model hears so.
            shape = output.shape
            if in_flight is None and shape.num_decode_context_tokens:
                shape = dataclasses.replace(shape, is_serial=True)
            launched.shape, launched.prepared_at = shape, preparing_at
            launched.follows_unobserved, self._launched_unobserved = self._launched_unobserved, launched.sampled is None
            # After the delivery, so that each request's one placeholder is its last token.
            self.scheduler.finish_step(output)
            for request in {r.request_id: r for r in launched.requests}.values():  # speculating: several rows
                if not request.is_finished:
                    request.output_token_ids.append(PLACEHOLDER_TOKEN_ID)
            if launched.sampled is not None:  # None: no request sampled (middle chunks of prompts)
                # A speculative step is delivered at once (how many tokens it commits decides the next step), unless
                # the next one can go out before it on a guess (`_pipelined_step`).
                if self.async_scheduling and (not launched.drafts or self._may_pipeline(launched)):
                    self._in_flight = launched
                else:
                    self._deliver(launched)
        if not output.is_empty:
            self._num_steps_total += 1
            num_decode = sum(c.num_new_tokens for c in output.chunks if (c.num_new_tokens == 1 or c.draft_token_ids)
                             and c.num_computed_tokens >= c.request.num_prompt_tokens)
            self.last_step = StepStats(
                num_prefill_tokens=output.num_batched_tokens - num_decode,
                num_decode_tokens=num_decode,
                num_seqs=len(output.chunks),
                step_time_s=time.perf_counter() - started,
                num_preempted=len(output.preempted),
                prefill_token_budget=output.prefill_token_budget,
            )
        return self._collect_outputs()

    def _may_pipeline(self, step: _InFlightStep) -> bool:
        """Whether the verification `step` can have the next one launched before its tokens arrive: n-gram proposals;
        every running request verifies in it (not one whose rows a pipelined step dropped: it has nothing in flight
        to guess from, and its guess would be dropped again in every step while the others' held), none waits to be
        scheduled; no request whose sampling reads earlier tokens (penalties, bad words, grammars), draws from a
        seed (the next step would draw before this one's draws are settled) or runs under an adapter; no
        sliding-window layers (their blocks are released by position)."""
        if self._speculator is None or not self._speculator.can_pipeline or self.kv_cache.has_sliding_groups:
            return False
        if self.scheduler.waiting or self._compiling or self._refused:
            return False
        running = self.scheduler.running
        if len(step.drafts) != len(running) or any(r.request_id not in step.drafts or r.request_id in step.void
                                                   for r in running):
            return False
        return all(r.sampling_params.seed is None and not r.sampling_params.needs_token_history
                   and r.lora_name is None and not r.is_finished for r in running)

    def _pipelined_step(self, preparing_at: float) -> bool:
        """Launch the next verification while the one in flight (`self._in_flight`) runs, on the guess that it
        accepts every proposal and samples the token the n-gram lookup expects after them: the next step's inputs
        are that token and the proposals after it, all known to the host, at the positions that follow. Then
        deliver the one in flight: a request whose guess held takes the new step as its next (the scheduler
        counts it as it counts a step it scheduled); one whose guess failed has its rows dropped (`void`): their
        K/V lies past its tokens and is written again before anything reads it. False (nothing launched) where
        it cannot: the caller delivers the verification first, as without pipelining.

        Why: a verification's tokens decide the next step, so without this the host prepares each step while the
        device idles and the device runs it while the host waits (docs/speculative.md)."""
        in_flight = self._in_flight
        if not self._may_pipeline(in_flight):
            return False
        requests = list(self.scheduler.running)  # a copy: the delivery below removes the requests that end
        guessed = self._speculator.propose_pipelined(requests, in_flight.drafts)
        if guessed is None or sum(len(t) for t in guessed.values()) > self.scheduler_settings.max_batch_tokens:
            return False
        # The guess commits every proposal in flight: the guessed token sits where the last of them would put the
        # request's newest token.
        starts = {r.request_id: r.num_computed_tokens + len(in_flight.drafts[r.request_id]) for r in requests}
        if not all(self.kv_cache.allocate_slots(r.request_id, starts[r.request_id], len(guessed[r.request_id]))
                   for r in requests):
            return False  # blocks taken for the others stay with them: the next steps use them
        step_input = StepInput.empty(self.kv_cache.num_groups, self.kv_cache.take_pending_copies())
        row_requests: list[Request] = []
        for request in requests:
            tokens = guessed[request.request_id]
            # No sliding-window groups here (`_may_pipeline`): the tables hold no released blocks.
            step_input.add_sequence(tokens, starts[request.request_id], self.kv_cache.block_tables(request.request_id),
                                    logits="all")
            row_requests.extend([request] * len(tokens))
        try:
            logits = self.runner.execute(step_input)
            sampled = self.sampler.sample_async(logits, row_requests)
        except Exception as exc:  # noqa: BLE001 -- handed to the requests of this step
            self._in_flight = None
            self._deliver(in_flight)
            self._fail_requests([r for r in requests if not r.is_finished], exc)
            return True
        launched = _InFlightStep.of_rows(row_requests, sampled, {rid: tokens[1:] for rid, tokens in guessed.items()})
        launched.shape = StepShape(num_seqs=len(requests), num_decode_context_tokens=sum(starts.values()),
                                   num_draft_tokens=sum(len(t) - 1 for t in guessed.values()))
        launched.prepared_at = preparing_at
        if self._launch_computes:
            launched.computed_at = time.perf_counter()
        self._in_flight = None
        in_flight.is_followed = True
        self._deliver(in_flight)
        adopted = SchedulerOutput()
        for request in requests:
            if request.is_finished:  # it ended in the delivery (a stop, an error): skipped as finished, no void
                continue
            tokens, start = guessed[request.request_id], starts[request.request_id]
            if request.num_computed_tokens == start and request.output_token_ids[-1] == tokens[0]:
                adopted.chunks.append(ScheduledChunk(request, start, len(tokens), samples=True,
                                                     draft_token_ids=tokens[1:]))
            else:
                launched.void.add(request.request_id)
        stats = self._speculator.stats
        stats.num_pipelined_steps += 1
        stats.num_pipelined_voids += len(launched.void)
        self.scheduler.finish_step(adopted)
        for chunk in adopted.chunks:
            chunk.request.output_token_ids.append(PLACEHOLDER_TOKEN_ID)
        if adopted.chunks:
            self._speculator.record_step(True)
            self._in_flight = launched
            launched.follows_unobserved, self._launched_unobserved = self._launched_unobserved, False
        else:
            # Dropped whole, it still runs on the device before the next step: that one's time is not the cost
            # model's to learn from.
            self._launched_unobserved = True
        self._num_steps_total += 1
        num_tokens = len(step_input.token_ids)
        self.last_step = StepStats(num_prefill_tokens=0, num_decode_tokens=num_tokens, num_seqs=len(requests),
                                   step_time_s=time.perf_counter() - preparing_at)
        return True

    def _propose(self) -> dict[str, list[int]] | None:
        """Proposals for this step's decoding requests, or None when the step does not speculate
        (engine/spec/speculator.py). A step in flight is delivered first only when this one asks for proposals
        (they continue the real tokens, not placeholders): a step kept plain keeps its overlap with it."""
        asks = self._speculator.plan(self.scheduler.running, self.scheduler.step_costs,
                                     self.scheduler_settings.max_batch_tokens,
                                     step_in_flight=self._in_flight is not None)
        if asks is None:
            return None
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            self._deliver(in_flight)
        self._asked_for_proposals = True
        return self._speculator.propose(asks)

    @staticmethod
    def _needs_token_values(output: SchedulerOutput) -> bool:
        """Sampling of this step reads earlier tokens' values on the host (penalties, bad words, grammars)."""
        return any(chunk.request.sampling_params.needs_token_history for chunk in output.chunks)

    def _fail_requests(self, requests: list[Request], exc: BaseException) -> None:
        """A failed forward or sampling fails the requests it carried, not the engine."""
        if isinstance(exc, EngineDeadError):  # a tensor-parallel rank died: nothing can run any more
            raise exc
        logger.error("step failed; failing its %d requests", len(requests), exc_info=exc)
        for request in requests:
            group = self._groups.get(request.parent_id or request.request_id)
            if group is not None and not group.is_finished:
                group.error = f"engine error: {type(exc).__name__}: {exc}"
                self._finish_group(group, FinishReason.ERROR)

    def _launch(self, output: SchedulerOutput, in_flight: _InFlightStep | None) -> _InFlightStep | None:
        """Run the model on the step and sample on the device, without waiting for either. None if
        nothing was launched (every request ended, or the step failed and failed its requests)."""
        # A request may have ended since it was scheduled (its token in flight was a stop): skip it.
        chunks = [chunk for chunk in output.chunks if not chunk.request.is_finished]
        if not chunks:
            return None
        output.chunks = chunks
        try:
            step_input = self._build_step_input(output, in_flight.rows if in_flight is not None else {})
            logits = self.runner.execute(step_input, in_flight.sampled.token_ids if in_flight is not None else None)
            if in_flight is not None and self._needs_token_values(output):
                # The forward above runs on the device meanwhile; sampling below reads the tokens.
                self._deliver(in_flight)
            rows: list[int] = []
            row_requests: list[Request] = []
            sample_index = 0
            drafts: dict[str, list[int]] = {}
            for chunk in chunks:
                if not chunk.samples:
                    continue
                if chunk.draft_token_ids:  # a row per proposal and one after them
                    drafts[chunk.request.request_id] = chunk.draft_token_ids
                    for _ in range(len(chunk.draft_token_ids) + 1):
                        rows.append(sample_index)
                        row_requests.append(chunk.request)
                        sample_index += 1
                    continue
                for request in [chunk.request, *output.forks.get(chunk.request.request_id, [])]:
                    rows.append(sample_index)
                    row_requests.append(request)
                sample_index += 1
            sampled = None
            if row_requests:
                if len(rows) != logits.shape[0]:
                    logits = logits.index_select(0, torch.tensor(rows, device=logits.device))
                sampled = self.sampler.sample_async(logits, row_requests)
        except Exception as exc:  # noqa: BLE001 -- handed to the requests of this step
            self._fail_requests([chunk.request for chunk in chunks], exc)
            return None
        return _InFlightStep.of_rows(row_requests, sampled, drafts)

    def _deliver(self, step: _InFlightStep) -> None:
        """Wait for a launched step's tokens on the host and put each in place of its placeholder (once)."""
        if step.delivered:
            return
        step.delivered = True
        try:
            sampled = step.sampled.result()
        except Exception as exc:  # noqa: BLE001 -- an asynchronous device error surfaces here
            self._fail_requests(step.requests, exc)
            return
        received_at = time.perf_counter() if step.computed_at is None else step.computed_at
        now = time.monotonic()
        row = 0
        while row < len(step.requests):
            request = step.requests[row]
            drafts = step.drafts.get(request.request_id)
            if drafts is not None:
                if not request.is_finished and request.request_id not in step.void:
                    self._accept_verified(request, drafts, sampled, row, now)
                row += len(drafts) + 1
                continue
            if not request.is_finished:  # else it ended (stop, abort, error) while its token was in flight
                self._accept_sampled(request, sampled, row, now)
            row += 1
        # A speculative step's commits run with nothing on the device (the next step waits for them): its time
        # ends after them. A plain step's commits overlap the next step's device time, as a speculative step's do
        # when the next went out before its delivery (and on a CPU that launch computed the next step).
        self._observe_step_time(step, time.perf_counter() if step.drafts and not step.is_followed else received_at)

    def _observe_step_time(self, step: _InFlightStep, finished_at: float) -> None:
        """Teach the scheduler's cost model the step's time as the decoding streams see it: from when it could
        start (the host began preparing it, or the step before was delivered, whichever is later: under async
        scheduling the next step is prepared and queued while this one runs, so that is the delivery; a step with
        nothing in flight, a speculative one above all, pays its own preparation and proposals) to when its tokens
        were on the host."""
        started_at = step.prepared_at
        if self._last_delivered_at is not None:
            started_at = max(started_at, self._last_delivered_at)
        self._last_delivered_at = finished_at
        if step.shape is not None and not step.follows_unobserved:
            self.scheduler.observe_step(step.shape, finished_at - started_at)

    def _accept_sampled(self, request: Request, sampled, row: int, now: float) -> None:
        logprob = sampled.logprobs[row] if sampled.logprobs is not None else None
        top = sampled.top_logprobs[row] if sampled.top_logprobs is not None else []
        rank = sampled.sampled_ranks[row] if sampled.sampled_ranks is not None else None
        self._accept_token(request, sampled.token_ids[row], logprob, rank, top, now)

    def _accept_verified(self, request: Request, drafts: list[int], sampled, row: int, now: float) -> None:
        """Commit the target's tokens of a speculating request's rows up to and including the first that
        differs from its proposal (engine/spec/verify.py), one at a time, so that stop strings, stop ids,
        max_tokens and logprobs hold for each; tokens after one that ends the request are dropped."""
        targets = sampled.token_ids[row:row + len(drafts) + 1]
        accepted = num_accepted(targets, drafts)
        self._speculator.record_verified(request.request_id, len(drafts), accepted)
        # A seeded request's generator drew a row per proposal: keep the draws of committed tokens only.
        self.sampler.settle(request.request_id, accepted + 1)
        for offset in range(accepted + 1):
            if offset > 0:
                request.output_token_ids.append(PLACEHOLDER_TOKEN_ID)
            self._accept_sampled(request, sampled, row + offset, now)
            if request.is_finished:
                return
        self.scheduler.commit_drafts(request, accepted)

    def _build_step_input(self, output: SchedulerOutput, pending_rows: dict[str, int] | None = None) -> StepInput:
        """The step as plain lists. `pending_rows`: request id -> row of the step in flight, for requests
        whose last token is still a placeholder (its value is taken on the device)."""
        step = StepInput.empty(self.kv_cache.num_groups, output.block_copies)
        # Sliding-window groups mark released blocks as None; full-attention tables hold ids only and go as is.
        has_released = self.kv_cache.has_sliding_groups
        for chunk in output.chunks:
            request = chunk.request
            start = chunk.num_computed_tokens
            end = start + chunk.num_new_tokens
            if chunk.draft_token_ids or (chunk.num_new_tokens == 1 and end == request.num_tokens):
                # A decode, or a verification: the newest token (on the host), then the proposals if any.
                newest = request.output_token_ids[-1] if request.output_token_ids else request.prompt_token_ids[-1]
                tokens = [newest, *chunk.draft_token_ids] if chunk.draft_token_ids else [newest]
            else:
                tokens = request.token_ids_between(start, end)
            # A verification takes logits at every position: each verifies the proposal after it.
            step.add_sequence(tokens, start, self.kv_cache.block_tables(request.request_id),
                              "all" if chunk.draft_token_ids else "last" if chunk.samples else "none", has_released)
            if pending_rows and chunk.samples and not chunk.draft_token_ids:
                source = pending_rows.get(request.request_id)
                if source is not None and end == request.num_tokens:
                    step.pending_input_indices.append(len(step.token_ids) - 1)
                    step.pending_source_rows.append(source)
        if output.lora_names:
            step.lora_names = [chunk.request.lora_name for chunk in output.chunks]
        return step

    def _accept_token(
        self,
        request: Request,
        token_id: int,
        logprob: float | None,
        rank: int | None,
        top: list[tuple[int, float]],
        now: float,
    ) -> None:
        """The request's newest token (its placeholder until now) is `token_id`: record it, stream it,
        and end the request if it stops here."""
        group = self._groups[request.parent_id or request.request_id]
        params = request.sampling_params
        request.output_token_ids[-1] = token_id
        if request.grammar is not None and not request.grammar.accept_token(token_id):
            # The mask allowed only what the matcher accepts; a token it refuses means the two disagree.
            group.error = f"engine error: token {token_id} breaks the request's {params.structured_outputs.kind}"
            logger.error("request %s: %s", request.request_id, group.error)
            self._finish_group(group, FinishReason.ERROR)
            return
        self._num_generation_tokens_total += 1
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = now
        request.metrics.last_token_time = now
        delta = group.deltas.setdefault(request.completion_index, _Delta())
        delta.token_ids.append(token_id)
        if params.logprobs is not None and logprob is not None:
            request.cumulative_logprob += logprob
            entry = {token_id: Logprob(logprob, rank=rank)}
            for rank, (top_id, top_logprob) in enumerate(top[: params.logprobs], start=1):
                entry.setdefault(top_id, Logprob(top_logprob, rank=rank))
            for tid, value in entry.items():
                value.decoded_token = self.tokenizer.decode([tid])
            delta.logprobs.append(entry)
        num_out = request.num_output_tokens
        # A stop string ends the completion only past min_tokens, as stop ids and EOS (the sampler masks those
        # before it), and as vLLM does.
        check_stop = num_out > params.min_tokens
        detokenizer = group.detokenizers[request.completion_index]
        text, stop_string = detokenizer.append(token_id, check_stop)
        delta.text += text

        reason: FinishReason | None = None
        stop_reason: int | str | None = None
        can_stop = num_out >= params.min_tokens
        if stop_string is not None:
            reason, stop_reason = FinishReason.STOP, stop_string
        elif can_stop and not params.ignore_eos and token_id in request.eos_token_ids:
            reason = FinishReason.STOP
        elif can_stop and token_id in params.stop_token_ids:
            reason, stop_reason = FinishReason.STOP, token_id
        elif request.grammar is not None and request.grammar.is_terminated():
            # The constraint took its stop token (EOS under ignore_eos): nothing may follow, and asking the
            # matcher for a next mask raises in the step, which failed every request of that step.
            reason = FinishReason.STOP
        elif request.num_tokens >= request.token_limit:
            reason = FinishReason.LENGTH
        if reason is not None:
            if stop_string is None:
                delta.text += detokenizer.flush(check_stop)
            request.stop_reason = stop_reason
            self._finish_sequence(request, reason)

    def _finish_sequence(self, request: Request, reason: FinishReason) -> None:
        self.scheduler.finish_request(request, reason)
        self._account_finished(request, reason)

    def _account_finished(self, request: Request, reason: FinishReason) -> None:
        """What the engine keeps of a finished sequence: its end time, the counters, its completion's last delta."""
        request.metrics.finished_time = time.monotonic()
        self.sampler.forget(request.request_id)
        if self._speculator is not None:
            self._speculator.forget(request.request_id)
        self._finished_by_reason[reason.value] = self._finished_by_reason.get(reason.value, 0) + 1
        group = self._groups.get(request.parent_id or request.request_id)
        if group is not None:
            group.deltas.setdefault(request.completion_index, _Delta())

    def _finish_group(self, group: _RequestGroup, reason: FinishReason) -> None:
        for request in [r for r in group.sequences if not r.is_finished]:
            if request.is_finished:
                # A completion that had not forked yet (n > 1, its prompt unfinished): the scheduler ended it with
                # its parent, and it is counted and answered like the others.
                self._account_finished(request, reason)
            else:
                self._finish_sequence(request, reason)

    def _collect_outputs(self) -> list[RequestOutput]:
        outputs, self._finished_outputs = self._finished_outputs, []
        for request_id in [rid for rid, group in self._groups.items() if group.deltas]:
            group = self._groups[request_id]
            completions = []
            for index in sorted(group.deltas):
                delta = group.deltas[index]
                seq = group.sequences[index]
                completions.append(
                    CompletionOutput(
                        index=index,
                        text=delta.text,
                        token_ids=delta.token_ids,
                        cumulative_logprob=seq.cumulative_logprob if group.params.logprobs is not None else None,
                        logprobs=delta.logprobs if group.params.logprobs is not None else None,
                        finish_reason=seq.finish_reason.value if seq.finish_reason else None,
                        stop_reason=seq.stop_reason,
                    )
                )
            group.deltas = {}
            finished = group.is_finished
            outputs.append(
                RequestOutput(
                    request_id=request_id,
                    prompt=group.prompt,
                    prompt_token_ids=group.prompt_token_ids,
                    outputs=completions,
                    finished=finished,
                    metrics=group.sequences[0].metrics,
                    num_cached_tokens=group.sequences[0].num_cached_prompt_tokens,
                    error=group.error,
                )
            )
            if finished:
                del self._groups[request_id]
        return outputs

    def check_health(self) -> None:
        """Raise `EngineDeadError` when a tensor-parallel rank has died, even between steps."""
        check_alive = getattr(self.runner, "check_alive", None)
        if check_alive is not None:
            check_alive()

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker ranks, if any, and let the collector reclaim this engine. Idempotent."""
        if self._grammar_compiler is not None:
            self._grammar_compiler.shutdown()
        if self._speculator is not None:
            self._speculator.shutdown()
        stop = getattr(self.runner, "shutdown", None)
        if stop is not None:
            stop()
        # Start-up froze the engine's objects out of collection; a process that builds another engine
        # after this one (benchmarks, tests) needs its cycles collectable again.
        gc.unfreeze()

    # ---- state ---------------------------------------------------------------------------------
    def get_stats(self) -> EngineStats:
        kv = self.kv_cache
        plan = self.memory_plan
        usage = kv.usage
        lora = self.runner.lora  # rank 0's under tensor parallel: each rank fills its slots the same way
        return EngineStats(
            num_free_blocks=kv.num_free_blocks,
            num_total_blocks=kv.num_total_blocks,
            block_size=kv.block_size,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_preempted_waiting=self.scheduler.num_preempted_waiting,
            max_model_len=self.max_model_len,
            kv_cache_usage=usage,
            kv_cache_bytes_total=plan.kv_bytes,
            kv_cache_bytes_used=int(plan.kv_bytes * usage),
            kv_cache_dtype=plan.kv_cache_dtype,
            num_prompt_tokens_total=self._num_prompt_tokens_total,
            num_generation_tokens_total=self._num_generation_tokens_total,
            num_steps_total=self._num_steps_total,
            num_preemptions_total=self.scheduler.num_preemptions_total,
            num_prefix_cache_queries_total=kv.num_prefix_queries_tokens,
            num_prefix_cache_hits_total=kv.num_prefix_hit_tokens,
            finished_by_reason=dict(self._finished_by_reason),
            last_step_num_prefill_tokens=self.last_step.num_prefill_tokens if self.last_step else 0,
            last_step_num_decode_tokens=self.last_step.num_decode_tokens if self.last_step else 0,
            max_batch_tokens=self.scheduler_settings.max_batch_tokens,
            spec_decode=self._speculator.stats.snapshot() if self._speculator is not None else SpecDecodeCounts(),
            num_lora_slots=0 if lora is None else lora.settings.max_loras,
            lora_slot_names=() if lora is None else lora.slot_names(),
            lora_host_names=() if lora is None else lora.host_names(),
            num_lora_slot_loads_total=0 if lora is None else lora.num_device_loads_total,
        )
