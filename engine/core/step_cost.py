"""How long a step takes, by its shape: a linear cost model the engine fits online from its own step times.

Two rules ask it. The scheduler's step-time budget: how many prompt tokens can a step carry beside its decodes and
still take at most `ratio` times the decode-only step of the same batch (`prefill_step_time_ratio`;
`prompt_tokens_within_ratio`), and how many must it carry for the waiting prompts to make their deadline
(`prompt_tokens_to_drain`); Sarathi-Serve sizes its token budget from a latency target by profiling offline, this
fits the same costs while serving. And adaptive speculation (engine/spec/adaptive.py): what a step that verifies
proposals costs beside the plain step of the same batch.
Pure Python: no tensors, no device, no clock; the engine measures, the scheduler and the rule ask.

The model: step seconds = fixed + per_seq * sequences + per_context_token * decode context tokens
+ per_prompt_token * prompt tokens, with two fixed costs: a step replayed from a CUDA graph (kernels launched as
one: decode-only steps, and verification steps within the verification graphs' batch sizes) and an eager step
(every step with prompt tokens, and batches past the captured sizes). Decode context tokens (the lengths the
decodes attend over) carry the KV reads, which grow with context while the weight reads do not. Then what
speculation adds:
- `serial_step_s`, a step whose host work did not overlap the device (`StepShape.is_serial`): under async
  scheduling a step is prepared while the one before it runs, except a speculative step (its proposals continue
  the tokens of the step before, and how many tokens it commits decides the next) and the step after one;
- `spec_step_s` and `spec_per_seq_s`, a verification step's own fixed and per-sequence cost (k + 1 rows a
  sequence in a verification graph, padded; the multi-row kernels instead of the one-row ones; for the draft
  method, its proposal forwards' launches);
- `per_draft_token_s`, a proposal's (its verification row when eager; for the draft method, its share of the
  draft model's forwards).

The fit: least squares over the steps seen, each weighted down by `1 - 1 / memory_steps` per later step (the
costs follow the current operating point: a GPU's cost per prompt token is not the same at 64 tokens as at
2,048), pulled toward an anchor as if by `prior_weight` steps at each feature's typical value, so that
coefficients the data cannot tell apart (no graph on a CPU; no prompt or speculative step seen yet) stay
sensible. The anchor is the prior scaled to the machine: the prior is no guide to scale (a CPU is 100x slower
than the GPU it describes), so the first `num_seed_steps` steps set the scale (their median time over the prior's
prediction) and then the first fit (`_fit_seed`). From then on a step whose time lies further than
`outlier_relative_error` from the prediction counts less, by the square of how much further: a compile, an
autotune, a collector pause at 100x the step counts 1/40,000 (they must not teach the model that steps are slow);
a real change of 2x still counts a quarter, and is learnt.

Cost per step: the engine observes every step, so `observe` touches only the step's nonzero features (the decay is
a common scale, applied when solving) and the fit is solved every RESOLVE_EVERY steps unless someone asks for
`costs()`; `latest_costs()` is that last solve, for a rule asked every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Features: graph step, eager step, sequences, decode context tokens, prompt tokens; serial step, speculative step,
# sequences of a speculative step, proposals. Each is scaled by a typical value before the fit, so the normal
# equations stay well conditioned and the prior weighs each alike.
_FEATURE_SCALES = (1.0, 1.0, 64.0, 65536.0, 512.0, 1.0, 1.0, 8.0, 32.0)
_NUM_FEATURES = len(_FEATURE_SCALES)
# The prior counts as this many steps more for what speculation adds (features 5-8): only serial and speculative
# steps tell those costs, few and noisy at first (a CPU's first forwards), and a rule acts on them at once.
_SPEC_PRIOR_WEIGHT_FACTOR = 3.0
# The decay is kept as a growing scale of new steps' weights (a step's weight / decay^t), folded back into the
# sums before it overflows.
_MAX_WEIGHT_SCALE = 1e100


@dataclass(frozen=True)
class StepShape:
    """What a step's time depends on, as the scheduler built it. `num_prompt_tokens`: every token past one per
    decoding sequence (prompt chunks, recomputes of preempted requests); speculative proposals apart
    (`num_draft_tokens`). `is_serial`: its host work did not overlap the device's (the engine sets it)."""

    num_seqs: int = 0
    num_decode_context_tokens: int = 0
    num_prompt_tokens: int = 0
    num_draft_tokens: int = 0
    is_serial: bool = False

    @property
    def is_decode_only(self) -> bool:
        return self.num_prompt_tokens == 0 and self.num_draft_tokens == 0

    @property
    def is_speculative(self) -> bool:
        return self.num_draft_tokens > 0


@dataclass(frozen=True)
class StepCosts:
    """Coefficients of the model, in seconds."""

    graph_step_s: float
    eager_step_s: float
    per_seq_s: float
    per_context_token_s: float
    per_prompt_token_s: float
    serial_step_s: float = 0.0
    spec_step_s: float = 0.0
    spec_per_seq_s: float = 0.0
    per_draft_token_s: float = 0.0

    def as_vector(self) -> list[float]:
        return [self.graph_step_s, self.eager_step_s, self.per_seq_s, self.per_context_token_s,
                self.per_prompt_token_s, self.serial_step_s, self.spec_step_s, self.spec_per_seq_s,
                self.per_draft_token_s]

    def step_s(self, num_seqs: int, num_context_tokens: int, num_prompt_tokens: float, runs_graph: bool) -> float:
        """A plain step's time, its host work overlapped (no speculation, not serial)."""
        return ((self.graph_step_s if runs_graph else self.eager_step_s) + self.per_seq_s * num_seqs
                + self.per_context_token_s * num_context_tokens + self.per_prompt_token_s * num_prompt_tokens)

    def shape_s(self, shape: StepShape, runs_graph: bool) -> float:
        """Any step's time: `step_s` plus what being serial and speculative add."""
        seconds = self.step_s(shape.num_seqs, shape.num_decode_context_tokens, shape.num_prompt_tokens, runs_graph)
        if shape.is_serial:
            seconds += self.serial_step_s
        if shape.num_draft_tokens:
            seconds += (self.spec_step_s + self.spec_per_seq_s * shape.num_seqs
                        + self.per_draft_token_s * shape.num_draft_tokens)
        return seconds

    def describe(self) -> str:
        return (f"graph step {self.graph_step_s * 1e3:.2f} ms, eager step {self.eager_step_s * 1e3:.2f} ms, "
                f"+{self.per_seq_s * 1e3:.4f} ms a sequence, +{self.per_context_token_s * 1e6:.4f} us a decode "
                f"context token, +{self.per_prompt_token_s * 1e3:.4f} ms a prompt token; serial step "
                f"+{self.serial_step_s * 1e3:.3f} ms; speculative step +{self.spec_step_s * 1e3:.3f} ms, "
                f"+{self.spec_per_seq_s * 1e3:.4f} ms a sequence, +{self.per_draft_token_s * 1e3:.4f} ms a proposal")


# The prior: the Llama-3-8B shape in bf16 on one H200 (bench/online_engine_bench.py's model): decode steps
# 4.5 ms + about 0.035 ms a sequence at ~600 tokens of context, 0.023 ms a prompt token, eager steps a few ms
# dearer than graph replays. What speculation adds is a guess until bench/spec_bench.py prints the fit on a GPU:
# a step's host work about 0.5 ms, a verification graph 0.5 ms dearer than a decode graph, its padded rows about
# a sequence's cost, a proposal's row nearly free at small batch (the weights are read once for all rows). On other
# machines and models the data replaces it within tens of steps.
PRIOR_STEP_COSTS = StepCosts(graph_step_s=4.5e-3, eager_step_s=7.0e-3, per_seq_s=2.0e-5,
                             per_context_token_s=2.5e-8, per_prompt_token_s=2.3e-5, serial_step_s=5.0e-4,
                             spec_step_s=5.0e-4, spec_per_seq_s=2.0e-5, per_draft_token_s=5.0e-6)


RESOLVE_EVERY = 16  # observed steps between solves when nobody asks for the costs


def _solve(matrix: list[list[float]], vector: list[float]) -> list[float]:
    """x with matrix @ x = vector, for a small symmetric positive definite matrix (Cholesky)."""
    size = len(vector)
    lower = [[0.0] * size for _ in range(size)]
    for row in range(size):
        lower_row = lower[row]
        for col in range(row + 1):
            lower_col = lower[col]
            total = matrix[row][col]
            for k in range(col):
                total -= lower_row[k] * lower_col[k]
            if row == col:
                lower_row[row] = math.sqrt(max(total, 1e-300))
            else:
                lower_row[col] = total / lower_col[col]
    forward = [0.0] * size
    for row in range(size):
        total = vector[row]
        lower_row = lower[row]
        for k in range(row):
            total -= lower_row[k] * forward[k]
        forward[row] = total / lower_row[row]
    solution = [0.0] * size
    for row in reversed(range(size)):
        total = forward[row]
        for k in range(row + 1, size):
            total -= lower[k][row] * solution[k]
        solution[row] = total / lower[row][row]
    return solution


class StepCostModel:
    """Step time by shape, fitted online (module docstring). `decode_graph_max_batch_size`: the largest decode
    batch the engine replays from a CUDA graph (0: none, every step eager); `verify_graph_max_batch_size`: the
    same for verification steps (speculative decoding); `mixed_graph_max_tokens`: the most tokens of a step with
    prompt tokens that replays a graph (0: they run eagerly); the engine sets them once captured."""

    def __init__(self, prior: StepCosts = PRIOR_STEP_COSTS, memory_steps: int = 512, prior_weight: float = 0.1,
                 num_seed_steps: int = 16, outlier_relative_error: float = 0.5,
                 decode_graph_max_batch_size: int = 0, verify_graph_max_batch_size: int = 0,
                 mixed_graph_max_tokens: int = 0) -> None:
        self.prior = prior
        self.decode_graph_max_batch_size = decode_graph_max_batch_size
        self.verify_graph_max_batch_size = verify_graph_max_batch_size
        self.mixed_graph_max_tokens = mixed_graph_max_tokens
        self._decay = 1.0 - 1.0 / memory_steps
        self._prior_weight = prior_weight
        self._num_seed_steps = max(1, num_seed_steps)
        self._outlier_relative_error = outlier_relative_error
        self._reset_sums()
        # What the fit is pulled toward: the prior, scaled to this machine once the seed steps are in.
        self._anchor = [value * scale for value, scale in zip(prior.as_vector(), _FEATURE_SCALES)]
        self._seed: list[tuple[list[float], float]] = []  # the first steps: (features, seconds)
        self.num_observed = 0
        self._kinds_seen: set[tuple[bool, bool, bool]] = set()  # (graph, serial, speculative) of steps observed
        self._solution = self._anchor  # the latest solve, in scaled features
        self._costs = prior
        self._is_stale = False
        self._num_unsolved = 0  # steps observed since the last solve

    def _reset_sums(self) -> None:
        # Upper triangles of the decayed sums of w * z z^T and w * z * seconds over observed steps, each step's
        # weight multiplied by `_weight_scale` (1 / decay^t) instead of decaying every earlier step.
        self._gram = [[0.0] * _NUM_FEATURES for _ in range(_NUM_FEATURES)]
        self._moment = [0.0] * _NUM_FEATURES
        self._weight_scale = 1.0

    def runs_graph(self, shape: StepShape) -> bool:
        if shape.num_seqs <= 0:
            return False
        if shape.num_prompt_tokens:  # a mixed-step graph, within its token count (proposals included)
            return shape.num_seqs + shape.num_prompt_tokens + shape.num_draft_tokens <= self.mixed_graph_max_tokens
        limit = self.verify_graph_max_batch_size if shape.num_draft_tokens else self.decode_graph_max_batch_size
        return shape.num_seqs <= limit

    def _features(self, shape: StepShape) -> list[tuple[int, float]]:
        """(index, scaled value) of the shape's nonzero features."""
        features = [(0 if self.runs_graph(shape) else 1, 1.0)]
        if shape.num_seqs:
            features.append((2, shape.num_seqs / _FEATURE_SCALES[2]))
        if shape.num_decode_context_tokens:
            features.append((3, shape.num_decode_context_tokens / _FEATURE_SCALES[3]))
        if shape.num_prompt_tokens:
            features.append((4, shape.num_prompt_tokens / _FEATURE_SCALES[4]))
        if shape.is_serial:
            features.append((5, 1.0))
        if shape.num_draft_tokens:
            features += [(6, 1.0), (7, shape.num_seqs / _FEATURE_SCALES[7]),
                         (8, shape.num_draft_tokens / _FEATURE_SCALES[8])]
        return features

    def _weight(self, seconds: float, predicted_s: float) -> float:
        """1 within the allowed error of the prediction; past it, the square of allowed / error."""
        allowed = self._outlier_relative_error * predicted_s
        error = abs(seconds - predicted_s)
        return (allowed / error) ** 2 if error > allowed > 0.0 else 1.0

    def observe(self, shape: StepShape, seconds: float) -> None:
        """A step of `shape` took `seconds` (from when the device could start it, or its host work began when
        nothing overlapped it, to when its tokens were on the host). Empty steps and nonsense times are ignored."""
        if shape.num_seqs == 0 or not seconds > 0.0:
            return
        # The first step of a kind runs code paths for the first time (a CPU's first multi-row attention, a GPU's
        # autotuning of a shape the warm-up did not cover): at 10-100x its cost, it would teach the few steps
        # that tell serial and speculative costs apart that they are dear.
        kind = (self.runs_graph(shape), shape.is_serial, shape.num_draft_tokens > 0)
        if kind not in self._kinds_seen:
            self._kinds_seen.add(kind)
            return
        features = self._features(shape)
        self.num_observed += 1
        if len(self._seed) < self._num_seed_steps:
            self._seed.append((_dense(features), seconds))
            self._fit_seed()
            return
        # Weighed against the latest solve: solving costs as much as the rest of a step's bookkeeping here, so
        # without a reader it is done every RESOLVE_EVERY steps only.
        self._num_unsolved += 1
        if self._num_unsolved >= RESOLVE_EVERY:
            self.costs()
        solution = self._solution
        predicted_s = sum(solution[index] * value for index, value in features)
        self._weight_scale /= self._decay
        if self._weight_scale > _MAX_WEIGHT_SCALE:
            self._fold_scale()
        self._accumulate(features, seconds, self._weight(seconds, predicted_s) * self._weight_scale)
        self._is_stale = True

    def _accumulate(self, features: list[tuple[int, float]], seconds: float, weight: float) -> None:
        gram, moment = self._gram, self._moment
        for position, (row, value) in enumerate(features):
            moment[row] += weight * value * seconds
            gram_row = gram[row]
            scaled = weight * value
            for col, other in features[position:]:  # indices ascend: the upper triangle
                gram_row[col] += scaled * other

    def _fold_scale(self) -> None:
        scale = self._weight_scale
        self._gram = [[value / scale for value in row] for row in self._gram]
        self._moment = [value / scale for value in self._moment]
        self._weight_scale = 1.0

    def _fit_seed(self) -> None:
        """While the first steps come in: the prior scaled by the median of their times over its predictions
        (one number, robust to a few outliers, right in scale however far the machine is from the prior). With
        the last of them: the full fit, reweighted a few times against its own predictions (so an outlier among
        them counts little), anchored to that scaled prior."""
        prior = [value * scale for value, scale in zip(self.prior.as_vector(), _FEATURE_SCALES)]
        ratios = sorted(seconds / max(_dot(prior, features), 1e-12) for features, seconds in self._seed)
        scale = ratios[len(ratios) // 2]
        self._anchor = [value * scale for value in prior]
        self._solution = self._anchor
        self._costs = _costs_of(self._anchor)
        if len(self._seed) < self._num_seed_steps:
            return
        solution = self._anchor
        for _ in range(4):
            self._reset_sums()
            for features, seconds in self._seed:
                sparse = [(index, value) for index, value in enumerate(features) if value]
                self._accumulate(sparse, seconds, self._weight(seconds, _dot(solution, features)))
            solution = self._solve()
        self._solution = solution
        self._costs = _costs_of(solution)

    def _solve(self) -> list[float]:
        scale = self._weight_scale
        matrix = [[0.0] * _NUM_FEATURES for _ in range(_NUM_FEATURES)]
        for row in range(_NUM_FEATURES):
            for col in range(row, _NUM_FEATURES):
                matrix[row][col] = matrix[col][row] = self._gram[row][col] / scale
        vector = [value / scale for value in self._moment]
        for index, value in enumerate(self._anchor):
            weight = self._prior_weight * (_SPEC_PRIOR_WEIGHT_FACTOR if index >= 5 else 1.0)
            matrix[index][index] += weight
            vector[index] += weight * value
        return _solve(matrix, vector)

    def costs(self) -> StepCosts:
        """The fitted coefficients (the prior's until a step is observed)."""
        if self._is_stale:
            self._is_stale = False
            self._num_unsolved = 0
            self._solution = self._solve()
            self._costs = _costs_of(self._solution)
        return self._costs

    def latest_costs(self) -> StepCosts:
        """The coefficients of the latest solve (at most RESOLVE_EVERY observed steps old): for a rule that asks
        every step, which a solve each step would cost more than the rule itself."""
        return self._costs

    def predict(self, shape: StepShape) -> float:
        return self.costs().shape_s(shape, self.runs_graph(shape))

    def describe(self) -> str:
        return f"step cost model after {self.num_observed} steps: {self.costs().describe()}"


def _costs_of(solution: list[float]) -> StepCosts:
    """Coefficients from a solution in scaled features; none below zero (no cost is negative: a noisy fit that
    says so, say per sequence on a busy CPU, would predict steps that take less time the more they carry)."""
    return StepCosts(*(max(0.0, value) / scale for value, scale in zip(solution, _FEATURE_SCALES)))


def _dense(features: list[tuple[int, float]]) -> list[float]:
    dense = [0.0] * _NUM_FEATURES
    for index, value in features:
        dense[index] = value
    return dense


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

