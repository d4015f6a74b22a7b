"""How long a step takes, by its shape: a linear cost model the engine fits online from its own step times.

The scheduler asks it two questions: how many prompt tokens can a step carry beside its decodes and still take
at most `ratio` times the decode-only step of the same batch (`prefill_step_time_ratio`;
`prompt_tokens_within_ratio`), and how many must it carry for the waiting prompts to make their deadline
(`prompt_tokens_to_drain`). Sarathi-Serve sizes its token budget from a latency target by profiling offline;
this fits the same costs while serving.
Pure Python: no tensors, no device, no clock; the engine measures, the scheduler asks.

The model: step seconds = fixed + per_seq * sequences + per_context_token * decode context tokens
+ per_prompt_token * prompt tokens, with two fixed costs: a decode step replayed from a CUDA graph (kernels
launched as one) and an eager step (every step with prompt tokens, and decode batches past the captured
sizes). Decode context tokens (the lengths the decodes attend over) carry the KV reads, which grow with
context while the weight reads do not.

The fit: least squares over the steps seen, each weighted down by `1 - 1 / memory_steps` per later step (the
costs follow the current operating point: a GPU's cost per prompt token is not the same at 64 tokens as at
2,048), pulled toward an anchor as if by `prior_weight` steps at each feature's typical value, so that
coefficients the data cannot tell apart (no graph on a CPU; no prompt seen yet) stay sensible. The anchor is
the prior scaled to the machine: the prior is no guide to scale (a CPU is 100x slower than the GPU it
describes), so the first `num_seed_steps` steps set the scale (their median time over the prior's prediction)
and then the first fit (`_fit_seed`). From then on a step whose time lies further than `outlier_relative_error`
from the prediction counts less, by the square of how much further: a compile, an autotune, a collector pause
at 100x the step counts 1/40,000 (they must not teach the model that steps are slow); a real change of 2x
still counts a quarter, and is learnt.
"""

from __future__ import annotations

from dataclasses import dataclass

# Features: graph step, eager step, sequences, decode context tokens, prompt tokens. Each is scaled by a typical
# value before the fit, so the normal equations stay well conditioned and the prior weighs each alike.
_FEATURE_SCALES = (1.0, 1.0, 64.0, 65536.0, 512.0)


@dataclass(frozen=True)
class StepShape:
    """What a step's time depends on, as the scheduler built it. `num_prompt_tokens`: every token past one per
    decoding sequence (prompt chunks, recomputes of preempted requests); speculative proposals apart."""

    num_seqs: int = 0
    num_decode_context_tokens: int = 0
    num_prompt_tokens: int = 0
    num_draft_tokens: int = 0

    @property
    def is_decode_only(self) -> bool:
        return self.num_prompt_tokens == 0 and self.num_draft_tokens == 0


@dataclass(frozen=True)
class StepCosts:
    """Coefficients of the model, in seconds."""

    graph_step_s: float
    eager_step_s: float
    per_seq_s: float
    per_context_token_s: float
    per_prompt_token_s: float

    def as_vector(self) -> list[float]:
        return [self.graph_step_s, self.eager_step_s, self.per_seq_s, self.per_context_token_s,
                self.per_prompt_token_s]

    def step_s(self, num_seqs: int, num_context_tokens: int, num_prompt_tokens: float, runs_graph: bool) -> float:
        return ((self.graph_step_s if runs_graph else self.eager_step_s) + self.per_seq_s * num_seqs
                + self.per_context_token_s * num_context_tokens + self.per_prompt_token_s * num_prompt_tokens)

    def describe(self) -> str:
        return (f"graph step {self.graph_step_s * 1e3:.2f} ms, eager step {self.eager_step_s * 1e3:.2f} ms, "
                f"+{self.per_seq_s * 1e3:.4f} ms a sequence, +{self.per_context_token_s * 1e6:.4f} us a decode "
                f"context token, +{self.per_prompt_token_s * 1e3:.4f} ms a prompt token")


# The prior: the Llama-3-8B shape in bf16 on one H200 (bench/online_engine_bench.py's model): decode steps
# 4.5 ms + about 0.035 ms a sequence at ~600 tokens of context, 0.023 ms a prompt token, eager steps a few ms
# dearer than graph replays. On other machines and models the data replaces it within tens of steps.
PRIOR_STEP_COSTS = StepCosts(graph_step_s=4.5e-3, eager_step_s=7.0e-3, per_seq_s=2.0e-5,
                             per_context_token_s=2.5e-8, per_prompt_token_s=2.3e-5)


RESOLVE_EVERY = 16  # observed steps between solves when nobody asks for the costs


def _solve(matrix: list[list[float]], vector: list[float]) -> list[float]:
    """x with matrix @ x = vector, for a small symmetric positive definite matrix (Cholesky)."""
    size = len(vector)
    lower = [[0.0] * size for _ in range(size)]
    for row in range(size):
        for col in range(row + 1):
            total = matrix[row][col] - sum(lower[row][k] * lower[col][k] for k in range(col))
            if row == col:
                lower[row][row] = max(total, 1e-300) ** 0.5
            else:
                lower[row][col] = total / lower[col][col]
    forward = [0.0] * size
    for row in range(size):
        forward[row] = (vector[row] - sum(lower[row][k] * forward[k] for k in range(row))) / lower[row][row]
    solution = [0.0] * size
    for row in reversed(range(size)):
        later = sum(lower[k][row] * solution[k] for k in range(row + 1, size))
        solution[row] = (forward[row] - later) / lower[row][row]
    return solution


class StepCostModel:
    """Step time by shape, fitted online (module docstring). `decode_graph_max_batch_size`: the largest decode
    batch the engine replays from a CUDA graph (0: none, every step eager); the engine sets it once captured."""

    def __init__(self, prior: StepCosts = PRIOR_STEP_COSTS, memory_steps: int = 512, prior_weight: float = 0.1,
                 num_seed_steps: int = 16, outlier_relative_error: float = 0.5,
                 decode_graph_max_batch_size: int = 0) -> None:
        self.prior = prior
        self.decode_graph_max_batch_size = decode_graph_max_batch_size
        self._decay = 1.0 - 1.0 / memory_steps
        self._prior_weight = prior_weight
        self._num_seed_steps = max(1, num_seed_steps)
        self._outlier_relative_error = outlier_relative_error
        size = len(_FEATURE_SCALES)
        self._gram = [[0.0] * size for _ in range(size)]  # decayed sum of w * z z^T over observed steps
        self._moment = [0.0] * size  # decayed sum of w * z * seconds
        # What the fit is pulled toward: the prior, scaled to this machine once the seed steps are in.
        self._anchor = [value * scale for value, scale in zip(prior.as_vector(), _FEATURE_SCALES)]
        self._seed: list[tuple[list[float], float]] = []  # the first steps: (features, seconds)
        self.num_observed = 0
        self._costs = prior
        self._is_stale = False
        self._num_unsolved = 0  # steps observed since the last solve

    def runs_graph(self, shape: StepShape) -> bool:
        return shape.is_decode_only and 0 < shape.num_seqs <= self.decode_graph_max_batch_size

    def _features(self, shape: StepShape) -> list[float]:
        graph = 1.0 if self.runs_graph(shape) else 0.0
        raw = (graph, 1.0 - graph, shape.num_seqs, shape.num_decode_context_tokens, shape.num_prompt_tokens)
        return [value / scale for value, scale in zip(raw, _FEATURE_SCALES)]

    def _weight(self, seconds: float, predicted_s: float) -> float:
        """1 within the allowed error of the prediction; past it, the square of allowed / error."""
        allowed = self._outlier_relative_error * predicted_s
        error = abs(seconds - predicted_s)
        return (allowed / error) ** 2 if error > allowed > 0.0 else 1.0

    def observe(self, shape: StepShape, seconds: float) -> None:
        """A step of `shape` took `seconds` (from when the device could start it to when its tokens were on the
        host). Speculative steps are not the model's business: ignored."""
        if shape.num_draft_tokens or shape.num_seqs == 0 or not seconds > 0.0:
            return
        features = self._features(shape)
        self.num_observed += 1
        if len(self._seed) < self._num_seed_steps:
            self._seed.append((features, seconds))
            self._fit_seed()
            return
        # Weighed against the latest solve: solving costs as much as the rest of a step's bookkeeping here, so
        # without a reader (the rule off) it is done every RESOLVE_EVERY steps only.
        self._num_unsolved += 1
        if self._num_unsolved >= RESOLVE_EVERY:
            self.costs()
        predicted_s = self._costs.step_s(shape.num_seqs, shape.num_decode_context_tokens, shape.num_prompt_tokens,
                                         self.runs_graph(shape))
        self._accumulate(features, seconds, self._weight(seconds, predicted_s))
        self._is_stale = True

    def _accumulate(self, features: list[float], seconds: float, weight: float) -> None:
        decay = self._decay
        for row, value in enumerate(features):
            self._moment[row] = self._moment[row] * decay + weight * value * seconds
            gram_row = self._gram[row]
            for col, other in enumerate(features):
                gram_row[col] = gram_row[col] * decay + weight * value * other

    def _fit_seed(self) -> None:
        """While the first steps come in: the prior scaled by the median of their times over its predictions
        (one number, robust to a few outliers, right in scale however far the machine is from the prior). With
        the last of them: the full fit, reweighted a few times against its own predictions (so an outlier among
        them counts little), anchored to that scaled prior."""
        prior = [value * scale for value, scale in zip(self.prior.as_vector(), _FEATURE_SCALES)]
        ratios = sorted(seconds / max(_dot(prior, features), 1e-12) for features, seconds in self._seed)
        scale = ratios[len(ratios) // 2]
        self._anchor = [value * scale for value in prior]
        self._costs = _costs_of(self._anchor)
        if len(self._seed) < self._num_seed_steps:
            return
        solution = self._anchor
        for _ in range(4):
            size = len(_FEATURE_SCALES)
            self._gram = [[0.0] * size for _ in range(size)]
            self._moment = [0.0] * size
            for features, seconds in self._seed:
                self._accumulate(features, seconds, self._weight(seconds, _dot(solution, features)))
            solution = self._solve()
        self._costs = _costs_of(solution)

    def _solve(self) -> list[float]:
        matrix = [row[:] for row in self._gram]
        vector = self._moment[:]
        for index, value in enumerate(self._anchor):
            matrix[index][index] += self._prior_weight
            vector[index] += self._prior_weight * value
        return _solve(matrix, vector)

    def costs(self) -> StepCosts:
        """The fitted coefficients (the prior's until a step is observed)."""
        if self._is_stale:
            self._is_stale = False
            self._num_unsolved = 0
            self._costs = _costs_of(self._solve())
        return self._costs

    def predict(self, shape: StepShape) -> float:
        return self.costs().step_s(shape.num_seqs, shape.num_decode_context_tokens, shape.num_prompt_tokens,
                                   self.runs_graph(shape))

    def describe(self) -> str:
        return f"step cost model after {self.num_observed} steps: {self.costs().describe()}"


def _costs_of(solution: list[float]) -> StepCosts:
    """Coefficients from a solution in scaled features; none below zero (no cost is negative: a noisy fit that
    says so, say per sequence on a busy CPU, would predict steps that take less time the more they carry)."""
    return StepCosts(*(max(0.0, value) / scale for value, scale in zip(solution, _FEATURE_SCALES)))


def _dot(left: list[float], right: list[float]) -> float:
    return sum(a * b for a, b in zip(left, right))


def prompt_tokens_within_ratio(costs: StepCosts, num_decode_seqs: int, num_context_tokens: int,
                               decode_runs_graph: bool, ratio: float) -> float:
    """The most prompt tokens a step may add to `num_decode_seqs` decodes and take at most `ratio` times the
    decode-only step of that batch, beyond the fixed cost that any step with prompt tokens pays for running eager
    instead of from a CUDA graph: the prompt tokens' own time is at most (ratio - 1) decode steps. (Counting that
    premium in would leave no prompt token at all wherever it exceeds (ratio - 1) decode steps, and prompts would
    only move by the floor and the deadline.) Infinite when prompt tokens cost nothing."""
    if costs.per_prompt_token_s <= 0.0:
        return float("inf")
    decode_only_s = costs.step_s(num_decode_seqs, num_context_tokens, 0, decode_runs_graph)
    return max(0.0, (ratio - 1.0) * decode_only_s) / costs.per_prompt_token_s


def prompt_tokens_to_drain(costs: StepCosts, step_without_prompt_s: float, num_tokens: int, slack_s: float) -> float:
    """The fewest prompt tokens a step must take for `num_tokens` of them to be computed within `slack_s`, steps
    of P prompt tokens taking step_without_prompt_s + P x per_prompt_token_s: (n / P) steps x that <= slack,
    so P >= base x n / (slack - per_token x n); infinite when no P is enough."""
    if num_tokens <= 0:
        return 0.0
    room_s = slack_s - max(costs.per_prompt_token_s, 0.0) * num_tokens
    if room_s <= 0.0:
        return float("inf")
    return max(step_without_prompt_s, 0.0) * num_tokens / room_s

