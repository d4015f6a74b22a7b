"""A deterministic stand-in for `AsyncLLMEngine` that honours its contract, for fast HTTP-stack tests.

No model: token t+1 = (31 * t + 7 + completion index + seed) mod vocab. Requests advance together in
steps, as in a real batch: every request due for a token waits for the same tick of a step clock (one per
step time), and `get_stats().num_steps_total` counts the ticks. It keeps real block accounting
(a request holds blocks_for(prompt + n * max_tokens) blocks while it runs and waits while they
are not free), so routing, 429, disconnect-abort and free-blocks-back tests see the same signals as
with the real engine. Its prefix cache is a model (`FakePrefixCache`: the prompts' full blocks under the
cache's chained hashes, least recently used evicted past the replica's blocks) that counts lookups and hits
as the engine's stats do, so prefix-affinity routing shows in the replicas' hit rates. Magic words in the
prompt inject faults:
  "SLOW"   each step sleeps 0.2 s (a long stream to disconnect from); other steps take 5 ms
  "FAST"   steps take no time (a long answer that only its length matters for)
  "STEPMS <n>"  steps take n milliseconds (a load shaped like a GPU replica's batch, for bench/stream_event_cost.py)
  "FAIL"   the request ends after two tokens with finish_reason "error" (engine failure of one request)
  "CRASH"  generate raises RuntimeError before the first yield
  "DIEONCE <word>"   the first request naming <word> ends its replica's process (os._exit) after two
                     tokens; later ones run normally (a marker file per word, shared by all replicas)
  "DIEEARLY <word>"  the same, before the first token
  "ENGINEDIES <word>"  the first request naming <word> kills the engine (not the process) after two tokens:
                     every open stream fails with EngineDeadError, later calls are refused; check_health
                     fails once the test creates `health_check_gate(<word>)`. In production Serve notices a
                     dead engine only after three failed checks (half a minute at a 10 s period); the gate
                     lets a test hold that window open exactly as long as it needs, with a short period.
Workers import this module through PYTHONPATH set in the cluster's runtime_env (tests/ray_harness.py).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import AsyncIterator

from pagedserve.cache.blocks import blocks_for
from pagedserve.cache.prefix_cache import extend_block_hashes
from pagedserve.config.engine import EngineConfig
from pagedserve.engine.core.limits import CONTEXT, KV_CACHE, check_fits, too_large
from pagedserve.engine.errors import EngineDeadError, InvalidRequestError
from pagedserve.engine.core.request import (
    CompletionOutput,
    Continuation,
    Logprob,
    RequestOutput,
    SamplingParams,
)
from pagedserve.engine.core.stats import EngineStats
from transformers import PreTrainedTokenizerFast


def _marker(magic: str, word: str) -> Path:
    return Path(tempfile.gettempdir()) / f"pagedserve-fake-engine-{magic}-{word}"


def health_check_gate(word: str) -> Path:
    """The file whose existence lets the health check of an engine killed by "ENGINEDIES <word>" fail."""
    return _marker("HEALTHFAILS", word)


def _word_after(text: str, magic: str) -> str | None:
    words = text.split()
    if magic not in words or words.index(magic) + 1 >= len(words):
        return None
    return words[words.index(magic) + 1]


def _dies_now(text: str, magic: str) -> bool:
    """True once per word named after `magic` in the prompt, across all processes of this machine."""
    word = _word_after(text, magic)
    if word is None:
        return False
    marker = _marker(magic, word)
    try:
        marker.touch(exist_ok=False)
    except FileExistsError:
        return False
    return True


class StepClock:
    """Ticks every `period_s` while anyone waits: all requests waiting for a step wake at the same tick."""

    def __init__(self) -> None:
        self._next: dict[float, asyncio.Future] = {}
        self.num_steps = 0

    async def step(self, period_s: float) -> None:
        if period_s <= 0:
            await asyncio.sleep(0)
            return
        tick = self._next.get(period_s)
        if tick is None or tick.done():
            loop = asyncio.get_running_loop()
            tick = self._next[period_s] = loop.create_future()
            loop.call_later(period_s, self._tick, tick)
        await asyncio.shield(tick)  # a cancelled waiter must not cancel everyone's tick

    def _tick(self, tick: asyncio.Future) -> None:
        self.num_steps += 1
        if not tick.done():
            tick.set_result(None)


class FakePrefixCache:
    """The prefix cache as far as hit rates go: the chained hashes of prompts' full blocks (cache/prefix_cache.py),
    the least recently used forgotten past `num_blocks` (the engine keeps a freed block's hash until the block
    is reused). A prompt hits its leading blocks found here, but never its last token, which the engine always
    computes for the first new token's logits."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._hashes: OrderedDict[bytes, None] = OrderedDict()
        self.num_queries_total = 0  # prompt tokens looked up
        self.num_hits_total = 0  # prompt tokens found

    def look_up_and_add(self, token_ids: list[int]) -> int:
        """Count the prompt's lookup, remember its full blocks; the number of its tokens found."""
        hashes: list[bytes] = []
        extend_block_hashes(hashes, token_ids, self.block_size)
        num_found = 0
        while num_found < len(hashes) and hashes[num_found] in self._hashes:
            num_found += 1
        num_hit_tokens = min(num_found, (len(token_ids) - 1) // self.block_size) * self.block_size
        for block_hash in hashes:
            self._hashes[block_hash] = None
            self._hashes.move_to_end(block_hash)
        while len(self._hashes) > self.num_blocks:
            self._hashes.popitem(last=False)
        self.num_queries_total += len(token_ids)
        self.num_hits_total += num_hit_tokens
        return num_hit_tokens


class FakeAsyncEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        # The tests' models save a PreTrainedTokenizerFast (tests/tiny_models.py). Not AutoTokenizer: that imports
        # torch, a second and a half of every replica's start, and the tests wait for many (deploys, replacements).
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(config.model)
        self.model_name = config.model
        self.max_model_len = config.max_model_len or 256
        self.block_size = config.block_size
        self.num_total_blocks = config.num_blocks or 64
        self._used: dict[str, int] = {}
        self._waiting: set[str] = set()
        self._aborted: set[str] = set()
        self._freed = asyncio.Event()
        self._dead_reason: str | None = None
        self._health_check_gate: Path | None = None
        # LoRA adapters by name -> path (any folder will do: there are no weights); an adapter shifts the tokens.
        self.is_lora_enabled = config.enable_lora or bool(config.lora_modules)
        self.loras: dict[str, str] = dict(config.lora_modules or {})
        self._lora_requests: dict[str, str] = {}  # request id -> its adapter, while it runs
        self.clock = StepClock()
        self.prefix_cache = FakePrefixCache(self.num_total_blocks, self.block_size)

    @property
    def is_dead(self) -> bool:
        return self._dead_reason is not None

    def add_step_listener(self, listener) -> None:
        """No steps to report: the fake engine has no step loop."""

    @classmethod
    def from_config(cls, config: EngineConfig) -> "FakeAsyncEngine":
        return cls(config)

    @property
    def num_free_blocks(self) -> int:
        return self.num_total_blocks - sum(self._used.values())

    async def generate(
        self, prompt: str | list[int], sampling_params: SamplingParams, request_id: str,
        continuation: Continuation | None = None, priority: int = 0,  # no scheduler here: priority is not used
        lora: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        if self._dead_reason is not None:
            raise EngineDeadError(self._dead_reason)
        if lora is not None and lora not in self.loras:
            raise InvalidRequestError(f"no LoRA adapter named {lora!r} is loaded", param="lora")
        ids = list(self.tokenizer.encode(prompt)) if isinstance(prompt, str) else list(prompt)
        text = prompt if isinstance(prompt, str) else self.tokenizer.decode(ids)
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if "CRASH" in text:
            raise RuntimeError("injected crash")
        params = sampling_params
        max_tokens = params.max_tokens or (self.max_model_len - len(ids))
        check_fits(len(ids), max_tokens, self.max_model_len, CONTEXT)  # the engine's checks and messages
        blocks = blocks_for(len(ids) + params.n * max_tokens, self.block_size)
        if blocks > self.num_total_blocks:
            raise too_large(len(ids), params.n * max_tokens, self.num_total_blocks * self.block_size, KV_CACHE)
        step_ms = _word_after(text, "STEPMS")
        delay_s = (float(step_ms) / 1000 if step_ms is not None else 0.2 if "SLOW" in text
                   else 0.0 if "FAST" in text else 0.005)
        die_after = 0 if _dies_now(text, "DIEEARLY") else 2 if _dies_now(text, "DIEONCE") else None
        engine_dies_after = 2 if _dies_now(text, "ENGINEDIES") else None
        if engine_dies_after is not None:
            self._health_check_gate = health_check_gate(_word_after(text, "ENGINEDIES"))
        if lora is not None:
            self._lora_requests[request_id] = lora
        try:
            self._waiting.add(request_id)
            while self.num_free_blocks < blocks:
                self._freed.clear()
                await self._freed.wait()
            self._waiting.discard(request_id)
            self._used[request_id] = blocks
            if continuation is None:
                self.prefix_cache.look_up_and_add(ids)
            last = [ids[-1]] * params.n
            done = list(continuation.output_token_ids) if continuation is not None else []
            if done:  # the formula depends on the previous token only: go on from the last one produced
                assert params.n == 1, "a continuation has one completion"
                last = [done[-1]]
            vocab = len(self.tokenizer)
            seed = (params.seed or 0) + (sum(map(ord, lora)) if lora is not None else 0)
            for step in range(len(done), max_tokens):
                await self.clock.step(delay_s)
                if step == die_after:
                    os._exit(1)  # the replica's process ends here, as a crashed or killed one does
                if step == engine_dies_after:
                    self._dead_reason = "injected engine death"
                if self._dead_reason is not None:
                    raise EngineDeadError(self._dead_reason)
                if request_id in self._aborted:
                    return
                is_last = step == max_tokens - 1
                failed = "FAIL" in text and step == 2
                outputs = []
                for index in range(params.n):
                    token = (31 * last[index] + 7 + index + seed) % vocab
                    last[index] = token
                    logprobs = None
                    if params.logprobs is not None:
                        logprobs = [{token: Logprob(-0.5, 1, None),
                                     **{(token + k) % vocab: Logprob(-1.0 - k, k + 1, None)
                                        for k in range(1, params.logprobs)}}]
                    outputs.append(CompletionOutput(
                        index=index, text=self.tokenizer.decode([token]), token_ids=[token], logprobs=logprobs,
                        finish_reason="error" if failed else ("length" if is_last else None),
                    ))
                yield RequestOutput(request_id, text, ids, outputs, finished=is_last or failed,
                                    error="injected failure" if failed else None)
                if failed:
                    return
        finally:
            self._waiting.discard(request_id)
            self._used.pop(request_id, None)
            self._aborted.discard(request_id)
            self._lora_requests.pop(request_id, None)
            self._freed.set()

    def lora_names(self) -> list[str]:
        return list(self.loras)

    async def load_lora_adapter(self, name: str, path: str) -> None:
        if not self.is_lora_enabled:
            raise InvalidRequestError("LoRA is off on this engine", param="lora_name")
        if name in self.loras:
            raise InvalidRequestError(f"a LoRA adapter named {name!r} is already loaded", param="lora_name")
        if not Path(path).is_dir():
            raise InvalidRequestError(f"LoRA adapter path {path!r} is not a folder", param="lora_path")
        self.loras[name] = path

    async def unload_lora_adapter(self, name: str) -> None:
        if name not in self.loras:
            raise InvalidRequestError(f"no LoRA adapter named {name!r} is loaded", param="lora_name")
        if name in self._lora_requests.values():  # as the engine: not while requests run under it
            raise InvalidRequestError(f"LoRA adapter {name!r} still serves requests", param="lora_name")
        del self.loras[name]

    async def abort(self, request_id: str) -> None:
        if request_id in self._used or request_id in self._waiting:
            self._aborted.add(request_id)

    def get_stats(self) -> EngineStats:
        free = self.num_free_blocks
        return EngineStats(
            num_free_blocks=free, num_total_blocks=self.num_total_blocks, block_size=self.block_size,
            num_running=len(self._used), num_waiting=len(self._waiting), num_preempted_waiting=0,
            max_model_len=self.max_model_len, kv_cache_usage=1 - free / self.num_total_blocks,
            kv_cache_bytes_total=0, kv_cache_bytes_used=0, num_steps_total=self.clock.num_steps,
            num_prefix_cache_queries_total=self.prefix_cache.num_queries_total,
            num_prefix_cache_hits_total=self.prefix_cache.num_hits_total,
        )

    async def check_health(self) -> None:
        if self._dead_reason is not None and (self._health_check_gate is None or self._health_check_gate.exists()):
            raise EngineDeadError(self._dead_reason)

    def shutdown(self) -> None:
        return None
