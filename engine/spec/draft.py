"""The draft-model proposer: a smaller causal LM with the target's tokenizer (`speculative_model`) proposes k tokens
a request by greedy decoding, run by a `ModelRunner` of its own over a paged KV cache of its own.

Greedy proposals are point masses, so the verification rule of engine/spec/verify.py is standard rejection sampling
for them too: the output is the target's, greedy token for token and sampled in distribution (seeded: the same
tokens as without speculation). Sampling the draft (q not a point mass, the general min(1, p/q) rule) would accept
more of a sampled request's proposals; not built.

Per request the proposer knows how many of its tokens have K/V in the draft cache (`_num_computed`). A proposal
round for a batch of requests is k forwards of the draft: the first catches each request up from that count to its
last token (its whole prompt the first time; later the tokens committed since) and takes the logits of the last;
each further forward feeds the previous proposals back, taken on the device (the runner's pending-token inputs), so
the host waits once, for all k proposals. With CUDA graphs the usual round (a catch-up of at most k + 2 tokens a
request) is one replay: the catch-up and the k - 1 forwards after it are captured together, the proposals fed back
and the positions, context lengths and cache slots advanced on the device (engine/runner/cuda_graphs.py's
`GreedyChainGraphs`); a round that starts with a prompt runs a forward at a time. The K/V of proposals is written at positions past the committed tokens:
after a round the count stays at the committed tokens, and the next round's catch-up rewrites what verification
rejected. The draft cache has its own block manager (no prefix caching), sized for `disable_batch_size` requests of
`max_model_len` tokens; a request that finds no room is not proposed for (blocks of requests that did not ask this
round are given back first). Owned by the engine, which calls `forget` when a request ends.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch

from pagedserve.cache.blocks import blocks_for
from pagedserve.cache.kv_cache_manager import KVCacheManager
from pagedserve.config.engine import ConfigError
from pagedserve.config.resolve import LoraSettings, ResolvedConfig

from pagedserve.engine.core.request import Request
from pagedserve.engine.core.sampler import greedy_argmax
from pagedserve.engine.runner.loader import load_model
from pagedserve.engine.runner.model_runner import ModelRunner
from pagedserve.engine.runner.step_input import StepInput

logger = logging.getLogger(__name__)


class DraftProposer:
    def __init__(self, runner: ModelRunner, kv_cache: KVCacheManager, num_speculative_tokens: int) -> None:
        self.runner = runner
        self.kv_cache = kv_cache
        self.num_speculative_tokens = num_speculative_tokens
        self._num_computed: dict[str, int] = {}

    @classmethod
    def build(cls, settings: ResolvedConfig, target: ModelRunner, max_model_len: int) -> "DraftProposer":
        """Load `settings.speculative.model` beside the target (same device, dtype, attention backend, graphs and
        compile settings) and allocate its cache. Called before the target plans its memory, which then counts the
        draft's as taken. A draft of the target's class shares torch.compile's cache of the compiled regions' code
        (graphs are guarded on shapes, and parameters' shapes stay static: neither model's graphs go dynamic in the
        other's sizes; the raised recompile limit holds both models' variants)."""
        speculative = settings.speculative
        load = dataclasses.replace(settings.load, model=speculative.model, tokenizer=None, quantization="none")
        runner_settings = dataclasses.replace(settings.runner, lora=LoraSettings())
        runner = ModelRunner(load_model(load), runner_settings, settings.cache)
        if runner.shape.vocab_size != target.shape.vocab_size:
            raise ConfigError(f"EngineConfig.speculative_model={speculative.model!r} has a vocabulary of "
                              f"{runner.shape.vocab_size} tokens, the model {target.shape.vocab_size}: a draft model "
                              "needs the model's tokenizer")
        draft_len = runner.shape.max_position_embeddings
        if draft_len is not None and draft_len < max_model_len:
            raise ConfigError(f"EngineConfig.speculative_model={speculative.model!r} takes {draft_len} positions, "
                              f"fewer than max_model_len={max_model_len}")
        blocks_per_request = blocks_for(max_model_len + speculative.num_tokens, runner.block_size) + 1
        num_blocks = speculative.disable_batch_size * blocks_per_request
        runner.allocate_kv_cache(tuple(num_blocks for _ in runner.shape.groups))
        kv_cache = KVCacheManager(runner.block_size, [g.sliding_window for g in runner.shape.groups],
                                  [num_blocks] * len(runner.shape.groups), enable_prefix_caching=False)
        logger.info("draft model %s: %d layers, KV cache of %d blocks (%d requests of %d tokens)", speculative.model,
                    runner.shape.num_layers, num_blocks, speculative.disable_batch_size, max_model_len)
        return cls(runner, kv_cache, speculative.num_tokens)

    def capture_cuda_graphs(self, max_batch_size: int, max_model_len: int) -> None:
        """Graphs of a whole proposal round for the usual catch-up (the last token of the round before and the 1
        to k + 1 tokens verification committed since: k + 2 rows a request) with the k - 1 forwards after it fed
        back on the device (`ModelRunner.greedy_chain`), and decode graphs for the rounds after a longer catch-up
        (a prompt), which runs eagerly."""
        self.runner.capture_greedy_chain_graphs(max_batch_size, max_model_len, self.num_speculative_tokens + 2,
                                                self.num_speculative_tokens - 1, greedy_argmax)

    def propose_batch(self, requests: Sequence[Request], max_tokens: Sequence[int]) -> dict[str, list[int]]:
        """Up to `min(k, max_tokens[i])` proposals for each request (every token known), by request id."""
        rows: list[tuple[Request, int]] = []  # (request, proposals wanted), in the forwards' row order
        asking = {request.request_id for request in requests}
        for request, limit in zip(requests, max_tokens):
            wanted = min(self.num_speculative_tokens, limit)
            if wanted > 0 and self._allocate(request, wanted, asking):
                rows.append((request, wanted))
        if not rows:
            return {}
        first = self._step_input(rows, 0, [])  # built once: it takes the cache's pending block copies
        chain = self.runner.greedy_chain(first, [wanted for _, wanted in rows])
        if chain is not None:  # one replay for the whole round
            host = chain.tolist()
            result = {request.request_id: [host[r][row] for r in range(wanted)]
                      for row, (request, wanted) in enumerate(rows)}
            self._settle(rows)
            return result
        proposals: list[torch.Tensor] = []  # per forward: the proposal of each of its rows, on the device
        row_requests = rows
        previous: torch.Tensor | None = None
        for round_index in range(max(wanted for _, wanted in rows)):
            if round_index == 0:
                step = first
            else:
                # Rows whose request wants another proposal, each taking its previous one from the device.
                sources = [row for row, (_, wanted) in enumerate(row_requests) if wanted > round_index]
                row_requests = [row_requests[row] for row in sources]
                step = self._step_input(row_requests, round_index, sources)
            logits = self.runner.execute(step, previous)
            previous = greedy_argmax(logits)
            proposals.append(previous)
        # One wait for every proposal: round r's tensor has a row per request still proposing then.
        host = [tokens.tolist() for tokens in proposals]
        result: dict[str, list[int]] = {request.request_id: [] for request, _ in rows}
        active = rows
        for round_tokens in host:
            active = [entry for entry in active if entry[1] > len(result[entry[0].request_id])]
            for (request, _), token in zip(active, round_tokens):
                result[request.request_id].append(token)
        self._settle(rows)
        return result

    def _settle(self, rows: list[tuple[Request, int]]) -> None:
        for request, _ in rows:
            # The proposals' K/V is rewritten by the next round's catch-up, which starts at the last token at the
            # latest, so that it has a token to take logits from even if no proposal was verified meanwhile.
            self._num_computed[request.request_id] = request.num_tokens - 1

    def _allocate(self, request: Request, wanted: int, asking: set[str]) -> bool:
        """Blocks for the request's catch-up and the K/V of its first `wanted - 1` proposals; when full, the
        blocks of requests not asking this round are given back first. False: no room (no proposals)."""
        computed = self._num_computed.get(request.request_id, 0)
        num_new = request.num_tokens - computed + wanted - 1
        if self.kv_cache.allocate_slots(request.request_id, computed, num_new):
            return True
        for request_id in [rid for rid in self._num_computed if rid not in asking]:
            self.forget(request_id)
        return self.kv_cache.allocate_slots(request.request_id, computed, num_new)

    def _step_input(self, rows: list[tuple[Request, int]], round_index: int, sources: list[int]) -> StepInput:
        """The first forward: each request from its computed count to its last token. Later ones: one token a
        request, the previous forward's proposal (row `sources[i]` of it) at the next position."""
        step = StepInput.empty(self.kv_cache.num_groups, self.kv_cache.take_pending_copies())
        for request, _ in rows:
            tables = self.kv_cache.block_tables(request.request_id)
            if round_index == 0:
                start = self._num_computed.get(request.request_id, 0)
                step.add_sequence(request.token_ids_between(start, request.num_tokens), start, tables,
                                  has_released=True)
            else:
                # A placeholder: the token is taken from the device (pending rows below).
                step.add_sequence([0], request.num_tokens + round_index - 1, tables, has_released=True)
        # One token a row after the first forward: row i's token is packed index i.
        step.pending_input_indices = list(range(len(sources)))
        step.pending_source_rows = sources
        return step

    def forget(self, request_id: str) -> None:
        self._num_computed.pop(request_id, None)
        self.kv_cache.free(request_id)

    def shutdown(self) -> None:
        self.runner.shutdown()
