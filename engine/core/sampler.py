"""Batched sampling: logits [N, V] -> one token per row, on the logits' device.

`apply_logits_processing` is the pure part (penalties, min_tokens, temperature, top-k, top-p, min-p) and
is what tests compare against a per-row reference. `Sampler` owns the random state: one
`torch.Generator` per seeded request, kept across steps so that a seeded request draws the same noise
whatever else shares its batch and wherever its row is, and one generator for every unseeded row.

Logprobs are "raw": log_softmax of the model's logits before penalties, temperature and filtering (vLLM's
default `logprobs_mode="raw_logprobs"`), so they describe the model, not the sampling recipe.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from pagedserve.engine.core.request import Request

# Like vLLM, temperatures in (0, 0.01) act as 0.01: dividing by less can overflow float32 logits to inf.
_MIN_TEMPERATURE = 1e-2
# Exponential noise is clamped away from 0: probs / 0 would be inf, or NaN for a filtered token.
_MIN_NOISE = 1e-10
# Up to this many rows the argmax runs in two stages (see greedy_argmax): faster up to 16 rows of a
# 128k vocabulary, slower at 64 (bench/linear_bench.py).
_TWO_STAGE_MAX_ROWS = 16


@functools.cache
def _argmax_chunk(vocab_size: int) -> int | None:
    """The smallest divisor of the vocabulary from 256 up that leaves at least 16 chunks, if any."""
    for chunk in range(256, vocab_size // 16 + 1):
        if vocab_size % chunk == 0:
            return chunk
    return None


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(dim=1)`, the same index on ties (the first), faster for a few rows on a GPU.

    torch reduces a row of a 128k vocabulary in one thread block (about a hundredth of a batch-1 decode
    step); here each chunk of the row is reduced by its own block first, then the chunk maxima, in less
    than half the time. Both stages return the first maximal index, so the result is argmax's.
    """
    rows, vocab_size = logits.shape
    chunk = _argmax_chunk(vocab_size)
    if chunk is None or rows > _TWO_STAGE_MAX_ROWS or not logits.is_contiguous():
        return logits.argmax(dim=1)
    values, within = logits.view(rows, vocab_size // chunk, chunk).max(dim=2)
    best = values.argmax(dim=1, keepdim=True)
    return (best * chunk + within.gather(1, best)).squeeze(1)


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row, on the host
    logprobs: list[float] | None  # raw logprob of each sampled token (None when no row asked)
    # Per row, the top-n (token_id, logprob) sorted by logprob, descending; [] for rows that did not ask.
    top_logprobs: list[list[tuple[int, float]]] | None
    # 1-based rank of each sampled token in its row's raw distribution (None when no row asked).
    sampled_ranks: list[int] | None = None


def _rows_tensor(values: list[float] | list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def _token_mask(token_lists: list[list[int]], num_rows: int, vocab_size: int, device: torch.device) -> torch.Tensor:
    """Counts [num_rows, vocab_size] of each token id in each row's list (ids outside the vocab ignored)."""
    counts = torch.zeros(num_rows, vocab_size + 1, dtype=torch.float32, device=device)
    width = max((len(tokens) for tokens in token_lists), default=0)
    if width == 0:
        return counts[:, :vocab_size]
    # Pad with an extra column index that is cut off afterwards, so one scatter serves ragged rows.
    padded = [[t if 0 <= t < vocab_size else vocab_size for t in tokens] + [vocab_size] * (width - len(tokens))
              for tokens in token_lists]
    index = torch.tensor(padded, dtype=torch.int64, device=device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
    return counts[:, :vocab_size]


def _apply_penalties(logits: torch.Tensor, requests: list[Request]) -> None:
    """Repetition (HF: prompt + output), then presence and frequency (OpenAI: output only), in place."""
    num_rows, vocab_size = logits.shape
    device = logits.device
    repetition = [r.sampling_params.repetition_penalty for r in requests]
    if any(penalty != 1.0 for penalty in repetition):
        # Building the mask walks every token on the host, so rows without the penalty contribute none.
        token_lists = [r.all_token_ids if p != 1.0 else [] for r, p in zip(requests, repetition)]
        seen = _token_mask(token_lists, num_rows, vocab_size, device) > 0
        penalty = _rows_tensor(repetition, torch.float32, device).unsqueeze(1)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits.copy_(torch.where(seen, penalized, logits))
    presence = [r.sampling_params.presence_penalty for r in requests]
    frequency = [r.sampling_params.frequency_penalty for r in requests]
    if any(presence) or any(frequency):
        token_lists = [r.output_token_ids if p or f else [] for r, p, f in zip(requests, presence, frequency)]
        counts = _token_mask(token_lists, num_rows, vocab_size, device)
        logits -= _rows_tensor(frequency, torch.float32, device).unsqueeze(1) * counts
        logits -= _rows_tensor(presence, torch.float32, device).unsqueeze(1) * (counts > 0).float()


def _apply_min_tokens(logits: torch.Tensor, requests: list[Request], *, constrained: bool) -> None:
    """While a request has fewer than min_tokens outputs, its EOS and stop token ids cannot be sampled.

    `constrained` picks the rows: those without a grammar (before the other masks), or those under one
    (after its mask). Under a grammar the ban holds only while the row has another token left: a grammar
    that allows nothing but its end wins over min_tokens, and its completion ends there (the engine ends a
    request whose matcher has terminated), where a full ban left no token and sampled one the grammar refuses.
    """
    vocab_size = logits.shape[1]
    rows: list[int] = []
    columns: list[int] = []
    for row, request in enumerate(requests):
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            continue
        if (request.grammar is not None and not request.is_finished) != constrained:
            continue
        banned = set(params.stop_token_ids or [])
        if not params.ignore_eos:
            banned |= request.eos_token_ids
        for token_id in sorted(banned):
            if 0 <= token_id < vocab_size:
                rows.append(row)
                columns.append(token_id)
    if not rows:
        return
    device = logits.device
    if not constrained:
        index = (_rows_tensor(rows, torch.int64, device), _rows_tensor(columns, torch.int64, device))
        logits.index_put_(index, torch.tensor(float("-inf"), device=device))
        return
    # On the device, without a sync: per row, whether a token outside the ban is still allowed.
    selected = sorted(set(rows))
    position = {row: index for index, row in enumerate(selected)}
    banned = torch.zeros(len(selected), vocab_size, dtype=torch.bool, device=device)
    banned[_rows_tensor([position[row] for row in rows], torch.int64, device),
           _rows_tensor(columns, torch.int64, device)] = True
    selected_rows = _rows_tensor(selected, torch.int64, device)
    row_logits = logits[selected_rows]
    has_other = ((row_logits > float("-inf")) & ~banned).any(dim=1, keepdim=True)
    logits[selected_rows] = row_logits.masked_fill(banned & has_other, float("-inf"))


def _apply_token_constraints(logits: torch.Tensor, requests: list[Request]) -> None:
    """logit_bias (added), allowed_token_ids (every other token -inf) and bad words (the last token of a
    bad word whose other tokens end the output, -inf), in place, in the rows that ask for them."""
    vocab_size = logits.shape[1]
    device = logits.device
    bias_rows: list[torch.Tensor] = []
    bias_columns: list[torch.Tensor] = []
    bias_values: list[torch.Tensor] = []
    banned_rows: list[int] = []
    banned_columns: list[int] = []
    for row, request in enumerate(requests):
        params = request.sampling_params
        bias = params.logit_bias_tensors
        if bias is not None:
            bias_rows.append(torch.full_like(bias[0], row))
            bias_columns.append(bias[0])
            bias_values.append(bias[1])
        if params.allowed_token_ids is not None:
            allowed = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            allowed[[t for t in params.allowed_token_ids if t < vocab_size]] = True
            logits[row].masked_fill_(~allowed, float("-inf"))
        output = request.output_token_ids
        for word in request.bad_word_ids:
            prefix = word[:-1]
            if len(output) >= len(prefix) and (not prefix or output[len(output) - len(prefix):] == prefix):
                banned_rows.append(row)
                banned_columns.append(word[-1])
    if bias_rows:
        rows, columns, values = torch.cat(bias_rows), torch.cat(bias_columns), torch.cat(bias_values)
        inside = columns < vocab_size
        if not bool(inside.all()):
            rows, columns, values = rows[inside], columns[inside], values[inside]
        logits.index_put_((rows.to(device), columns.to(device)), values.to(device), accumulate=True)
    if banned_rows:
        index = (_rows_tensor(banned_rows, torch.int64, device), _rows_tensor(banned_columns, torch.int64, device))
        logits.index_put_(index, torch.tensor(float("-inf"), device=device))


def _apply_grammars(logits: torch.Tensor, requests: list[Request]) -> None:
    """Rows of sequences under a grammar: tokens their matcher does not allow next are -inf, in place."""
    # A request that ended since its row was launched (its previous token was a stop) samples freely: the
    # token is dropped, and its matcher, done, has nothing more to allow.
    rows = [row for row, request in enumerate(requests) if request.grammar is not None and not request.is_finished]
    if not rows:
        return
    from pagedserve.engine.core.grammar import apply_bitmask, fill_bitmask

    bitmask = fill_bitmask([requests[row].grammar for row in rows], rows, logits.shape[0], logits.shape[1])
    apply_bitmask(logits, bitmask, rows)


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Rows' logits with tokens outside top-k, then outside top-p, set to -inf (HF/vLLM rules).

    top_k: [R] int64, 0 = off; top_p: [R] float, 1 = off. Tokens tied with the k-th logit are kept. Top-p
    removes the lowest tokens whose total probability (after top-k) is at most 1 - top_p; the top token
    always stays.
    """
    vocab_size = logits.shape[1]
    sorted_logits, sorted_index = logits.sort(dim=1, descending=False)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab_size), torch.full_like(top_k, vocab_size))
    kth_logit = sorted_logits.gather(1, (vocab_size - k).unsqueeze(1))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_logit, float("-inf"))
    cumulative = sorted_logits.softmax(dim=1).cumsum(dim=1)
    outside_top_p = (cumulative <= (1.0 - top_p).unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    outside_top_p[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(outside_top_p, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_index, sorted_logits)


def _apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Removes tokens whose probability is below min_p times the row's top probability."""
    probs = logits.softmax(dim=1)
    threshold = probs.amax(dim=1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_logits_processing(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """The logits each row is sampled from: a new float32 tensor; filtered tokens are -inf.

    Order: repetition penalty, presence/frequency penalties, min_tokens (rows under a grammar: after its
    mask, see `_apply_min_tokens`), logit_bias, allowed_token_ids, bad words, the grammar's mask, then for
    sampled rows only: temperature (at least 0.01), top-k, top-p, min-p. Greedy rows (temperature 0) get
    everything before the temperature (as in vLLM and transformers' generate) but nothing after, so with
    default parameters their argmax is exactly the argmax of the raw float32 logits. Neutral parameters leave
    a row untouched.
    """
    processed = logits.to(torch.float32, copy=True)
    if not requests:
        return processed
    device = processed.device
    _apply_penalties(processed, requests)
    _apply_min_tokens(processed, requests, constrained=False)
    _apply_token_constraints(processed, requests)
    _apply_grammars(processed, requests)
    _apply_min_tokens(processed, requests, constrained=True)

    params = [r.sampling_params for r in requests]
    sampled_rows = [row for row, p in enumerate(params) if not p.is_greedy]
    if not sampled_rows:
        return processed
    temperatures = [1.0 if p.is_greedy else max(p.temperature, _MIN_TEMPERATURE) for p in params]
    temperature = _rows_tensor(temperatures, torch.float32, device)
    processed /= temperature.unsqueeze(1)

    filtered_rows = [row for row in sampled_rows if params[row].top_k > 0 or params[row].top_p < 1.0]
    if filtered_rows:
        # Sorting is the costly part, so only rows that filter are sorted.
        rows = _rows_tensor(filtered_rows, torch.int64, device)
        top_k = _rows_tensor([params[row].top_k for row in filtered_rows], torch.int64, device)
        top_p = _rows_tensor([params[row].top_p for row in filtered_rows], torch.float32, device)
        processed[rows] = _apply_top_k_top_p(processed[rows], top_k, top_p)
    min_p_rows = [row for row in sampled_rows if params[row].min_p > 0.0]
    if min_p_rows:
        rows = _rows_tensor(min_p_rows, torch.int64, device)
        min_p = _rows_tensor([params[row].min_p for row in min_p_rows], torch.float32, device)
        processed[rows] = _apply_min_p(processed[rows], min_p)
    return processed


class Sampler:
    """Turns each step's logits into tokens; owns every generator used for sampling.

    Invariant: a seeded request's generator is created on its first sampled token and advanced exactly
    once per token it samples (one draw of V exponentials), so its tokens depend only on its seed, its
    completion index and its own logits. Callers pass only rows that really sample a token and call
    `forget` when a request finishes or is aborted.
    """

    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = torch.device(device)
        self._unseeded_generator = torch.Generator(device=self.device)
        self._unseeded_generator.manual_seed(seed)
        self._generators: dict[str, torch.Generator] = {}
        # Seeded requests that continue a completion begun elsewhere: tokens their generator already drew.
        self._skips: dict[str, int] = {}
        # Seeded requests with several rows in the last batch (speculative decoding): the generator's state
        # before their first row's draw, and the vocabulary size, until `settle` says how many rows count.
        self._rewind_points: dict[str, tuple[torch.Tensor, int]] = {}

    def skip(self, request_id: str, num_tokens: int) -> None:
        """The request's first `num_tokens` tokens were sampled elsewhere (a `Continuation`): its generator
        starts past their draws, so a seeded completion goes on as it would have there."""
        if num_tokens > 0:
            self._skips[request_id] = num_tokens

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """logits [N, V] float (row i belongs to requests[i]); reads each request's sampling_params,
        prompt_token_ids, output_token_ids, eos_token_ids and completion_index."""
        return self.sample_async(logits, requests).result()

    def sample_async(self, logits: torch.Tensor, requests: list[Request]) -> "SampledBatch":
        """`sample` without waiting: the tokens stay on the device (`token_ids`, usable as the next step's
        inputs at once) while their copy to the host runs behind the work already queued."""
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} do not match {len(requests)} requests "
                f"({[r.request_id for r in requests]})"
            )
        processed = apply_logits_processing(logits, requests)
        token_ids = greedy_argmax(processed)
        sampled_rows = [row for row, r in enumerate(requests) if not r.sampling_params.is_greedy]
        if sampled_rows:
            rows = _rows_tensor(sampled_rows, torch.int64, processed.device)
            probs = processed[rows].softmax(dim=1)
            noise = self._exponential_noise([requests[row] for row in sampled_rows], probs.shape[1], probs.device)
            # argmax(p / q) with q ~ Exp(1) picks token i with probability p_i (exponential race).
            token_ids[rows] = (probs / noise).argmax(dim=1)
        return SampledBatch(logits, token_ids, [r.sampling_params.logprobs for r in requests])

    def forget(self, request_id: str) -> None:
        """Drop the request's generator (finished or aborted); unknown ids are fine (greedy, unseeded)."""
        self._generators.pop(request_id, None)
        self._skips.pop(request_id, None)
        self._rewind_points.pop(request_id, None)

    def settle(self, request_id: str, num_rows_used: int) -> None:
        """A request with several rows in the last batch (a speculative step) keeps the draws of its first
        `num_rows_used` rows only: its generator goes back and draws exactly those again, so it stays
        advanced once per committed token (the invariant above). No-op for unseeded and one-row requests."""
        point = self._rewind_points.pop(request_id, None)
        generator = self._generators.get(request_id)
        if point is None or generator is None:
            return
        state, vocab_size = point
        generator.set_state(state)
        row = torch.empty(vocab_size, dtype=torch.float32, device=self.device)
        for _ in range(num_rows_used):
            row.exponential_(generator=generator)

    def _generator(self, request: Request, seed: int, vocab_size: int) -> torch.Generator:
        generator = self._generators.get(request.request_id)
        if generator is None:
            generator = torch.Generator(device=self.device)
            # Completion i of a seeded request behaves like a request with seed + i (vLLM's rule for n > 1).
            generator.manual_seed((seed + request.completion_index) % 2**64)
            num_skipped = self._skips.pop(request.request_id, 0)
            if num_skipped:  # the draws of the tokens sampled elsewhere, each exactly as `_exponential_noise`'s
                row = torch.empty(vocab_size, dtype=torch.float32, device=self.device)
                for _ in range(num_skipped):
                    row.exponential_(generator=generator)
            self._generators[request.request_id] = generator
        return generator

    def _exponential_noise(self, requests: list[Request], vocab_size: int, device: torch.device) -> torch.Tensor:
        noise = torch.empty(len(requests), vocab_size, dtype=torch.float32, device=device)
        unseeded = [index for index, r in enumerate(requests) if r.sampling_params.seed is None]
        previous_id = None
        for index, request in enumerate(requests):
            seed = request.sampling_params.seed
            if seed is not None:
                generator = self._generator(request, seed, vocab_size)
                # Rows of one request are consecutive (one per proposal and one more): note where they start.
                if request.request_id != previous_id and index + 1 < len(requests) and \
                        requests[index + 1].request_id == request.request_id:
                    self._rewind_points[request.request_id] = (generator.get_state(), vocab_size)
                noise[index].exponential_(generator=generator)
            previous_id = request.request_id
        if unseeded:
            rows = _rows_tensor(unseeded, torch.int64, device)
            drawn = torch.empty(len(unseeded), vocab_size, dtype=torch.float32, device=device)
            noise[rows] = drawn.exponential_(generator=self._unseeded_generator)
        return noise.clamp_min_(_MIN_NOISE)


class SampledBatch:
    """One step's sampled tokens: on the device now, on the host once `result()` returns.

    Everything the host needs (token ids, and the logprob columns when a row asked) is packed into one
    tensor and copied in one transfer, into pinned memory on a GPU so that the copy runs behind the
    queued work instead of stalling the host; `result()` waits only for that copy.
    """

    def __init__(self, logits: torch.Tensor, token_ids: torch.Tensor, wanted: list[int | None]) -> None:
        self.token_ids = token_ids  # [R] int64 on the logits' device
        self._wanted = wanted
        self._num_top = 0
        if all(n is None for n in wanted):
            packed = token_ids
        else:
            # One float64 tensor holds ids exactly (below 2**53) beside the logprobs.
            raw_logprobs = logits.to(torch.float32).log_softmax(dim=1)
            sampled_logprobs = raw_logprobs.gather(1, token_ids.unsqueeze(1))
            ranks = (raw_logprobs > sampled_logprobs).sum(dim=1, keepdim=True) + 1
            self._num_top = min(max(n or 0 for n in wanted), raw_logprobs.shape[1])
            columns = [token_ids.unsqueeze(1).double(), sampled_logprobs.double(), ranks.double()]
            if self._num_top > 0:
                top_values, top_ids = raw_logprobs.topk(self._num_top, dim=1)
                columns += [top_ids.double(), top_values.double()]
            packed = torch.cat(columns, dim=1)
        self._event: torch.cuda.Event | None = None
        if packed.device.type == "cuda":
            self._host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = packed

    def result(self) -> SamplerOutput:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        if self._host.dim() == 1:
            return SamplerOutput(token_ids=self._host.tolist(), logprobs=None, top_logprobs=None)
        num_top = self._num_top
        host = self._host.tolist()
        top_logprobs: list[list[tuple[int, float]]] = []
        for row, n in zip(host, self._wanted):
            top_ids_row = row[3:3 + num_top]
            top_values_row = row[3 + num_top:3 + 2 * num_top]
            top_logprobs.append([(int(i), v) for i, v in zip(top_ids_row[: n or 0], top_values_row[: n or 0])])
        return SamplerOutput(
            token_ids=[int(row[0]) for row in host],
            logprobs=[row[1] for row in host],
            top_logprobs=top_logprobs,
            sampled_ranks=[int(row[2]) for row in host],
        )
