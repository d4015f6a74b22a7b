"""torch.compile of the step forward: same greedy tokens as eager, and a logged fallback when it fails.

The engine test uses the "eager" backend: Dynamo traces the model and the paged attention without
inductor's code generation (inductor takes minutes for the tiny model on two shared CPU cores). The
fallback ladder is tested on a small module, where each trace costs milliseconds, not seconds.
"""

from __future__ import annotations

import logging

import pytest
from resolved import resolved
from tiny_models import build_tiny_model
import torch

from pagedserve.config.engine import EngineConfig
from pagedserve.engine.runner.compile import CompiledForward, compile_ladder
from pagedserve.engine.llm import LLM
from pagedserve.engine.core.request import SamplingParams

PROMPTS = [[5, 17, 42, 99, 7, 130, 64, 201, 12], [33, 8, 250, 71, 4]]
PARAMS = SamplingParams(temperature=0.0, max_tokens=4)
FAILING_BACKEND = "pagedserve_test_failing_backend"


def generate(model_dir, **kwargs) -> tuple[LLM, list[list[int]]]:
    llm = LLM(str(model_dir), dtype="float32", block_size=8, **kwargs)
    return llm, [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]


@pytest.fixture(scope="module")
def eager_tokens(tiny_model_dir) -> list[list[int]]:
    return generate(tiny_model_dir("llama"))[1]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_step_forward_gives_eager_tokens(tiny_model_dir, eager_tokens):
    llm, tokens = generate(tiny_model_dir("llama"), compile=True, compile_backend="eager", compile_dynamic=True)
    assert tokens == eager_tokens
    step_model = llm.engine.runner._step_model
    assert isinstance(step_model, CompiledForward) and step_model.is_compiled
    assert step_model.options.backend == "eager"


def test_warm_up_compiles_before_the_first_request(tiny_model_dir, eager_tokens):
    """Start-up runs the shapes serving meets first, so requests of new lengths trace nothing new."""
    from torch._dynamo.utils import counters

    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", block_size=8, compile=True, compile_backend="eager")
    traced_at_start = counters["stats"]["unique_graphs"]
    assert traced_at_start > 0  # the warm-up traced the layers
    prompts = PROMPTS + [list(range(3, 103)), [9, 8, 7], list(range(40, 77))]
    outputs = llm.generate(prompts, PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs[:2]] == eager_tokens
    llm.generate([list(range(5, 60))], SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)
    assert counters["stats"]["unique_graphs"] == traced_at_start, "a request paid for a compilation"


class BreakingModel(torch.nn.Module):
    """Stands in for a model with data-dependent Python: one graph break in the forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.linear(x)
        torch._dynamo.graph_break()
        return torch.relu(hidden) * 2


def test_aot_eager_gives_eager_outputs():
    model = BreakingModel()
    inputs = [torch.randn(rows, 8) for rows in (3, 5)]
    expected = [model(x) for x in inputs]  # before compiling: the wrapper compiles the model in place
    forward = CompiledForward(model, resolved(EngineConfig(compile=True, compile_backend="aot_eager")).runner.compile)
    for x, want in zip(inputs, expected):
        torch.testing.assert_close(forward(x), want, rtol=0, atol=0)
    assert forward.options.backend == "aot_eager"


def test_decoder_layers_are_compiled_one_by_one(tiny_model_dir, eager_tokens):
    """Regional compilation: each decoder layer in place (inductor), the final norm and the rotary
    embedding; the paged attention left out."""
    llm, tokens = generate(tiny_model_dir("llama"), compile=True, compile_dynamic=True)
    assert tokens == eager_tokens
    step_model = llm.engine.runner._step_model
    decoder = llm.engine.runner.model.model
    regions = [*decoder.layers, decoder.norm, decoder.rotary_emb]
    assert step_model.regions == regions and all(region._compiled_call_impl is not None for region in regions)
    assert step_model.options.backend == "inductor" and step_model.is_compiled
    assert step_model.options.inductor_options == {"combo_kernels": True}
    llm.engine.shutdown()  # the model is given back eager
    assert all(region._compiled_call_impl is None for region in regions) and not step_model.is_compiled


def test_graph_break_under_fullgraph_retries_without_fullgraph(caplog):
    """fullgraph=True fails on the first call; the next rung (fullgraph off, dynamic on) gives the outputs."""
    caplog.set_level(logging.INFO, logger="pagedserve.engine.runner.compile")
    model = BreakingModel()
    x = torch.randn(3, 8)
    want = model(x)  # before wrapping: the wrapper compiles the model in place
    forward = CompiledForward(model, resolved(EngineConfig(compile=True, compile_backend="eager", compile_fullgraph=True)).runner.compile)
    torch.testing.assert_close(forward(x), want, rtol=0, atol=0)
    assert forward.options is not None
    assert (forward.options.fullgraph, forward.options.dynamic) == (False, True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("fullgraph=True" in w and "failed" in w and "retrying with" in w for w in warnings), warnings


def test_backend_failure_falls_back_to_eager_with_a_warning(caplog):
    def failing_backend(graph_module, example_inputs):
        raise RuntimeError("this backend cannot compile the model")

    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if FAILING_BACKEND not in _BACKENDS:
        register_backend(failing_backend, name=FAILING_BACKEND)
    caplog.set_level(logging.WARNING, logger="pagedserve.engine.runner.compile")
    model = BreakingModel()
    x = torch.randn(3, 8)
    want = model(x)
    forward = CompiledForward(model, resolved(EngineConfig(compile=True, compile_backend=FAILING_BACKEND, compile_fullgraph=True)).runner.compile)
    torch.testing.assert_close(forward(x), want, rtol=0, atol=0)
    assert not forward.is_compiled
    warnings = [r.getMessage() for r in caplog.records]
    assert any("retrying with" in w for w in warnings), warnings
    assert any("running the model eagerly" in w and "cannot compile the model" in w for w in warnings), warnings


def test_unknown_backend_name_is_refused_with_a_warning(tiny_model_dir, caplog):
    caplog.set_level(logging.WARNING, logger="pagedserve.engine.runner.compile")
    model = torch.nn.Linear(4, 4)
    forward = CompiledForward(model, resolved(EngineConfig(compile=True, compile_backend="no-such-backend")).runner.compile)
    assert not forward.is_compiled
    assert forward(torch.ones(1, 4)).shape == (1, 4)
    assert any("refused" in r.getMessage() and "no-such-backend" in r.getMessage() for r in caplog.records)


def test_ladder_relaxes_to_fullgraph_off_dynamic_on():
    ladder = compile_ladder(resolved(EngineConfig(compile=True, compile_fullgraph=True, compile_dynamic=False,
                                         compile_mode="max-autotune", compile_backend="inductor")).runner.compile)
    assert [(o.fullgraph, o.dynamic, o.mode) for o in ladder] == [(True, False, "max-autotune"),
                                                                 (False, True, "max-autotune")]
    assert len(compile_ladder(resolved(EngineConfig(compile=True, compile_dynamic=True)).runner.compile)) == 1


def test_compile_off_runs_the_plain_model(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", block_size=8)
    assert llm.engine.runner._step_model is llm.engine.runner.model


def test_compiled_layers_are_not_recompiled_per_layer(tiny_model_dir, tmp_path):
    """One compiled graph serves every decoder layer: the frames compiled do not grow with the depth
    (a layer index read inside the compiled region would specialize, and recompile, each layer)."""
    from torch._dynamo.utils import counters
    from transformers import AutoConfig

    source = tiny_model_dir("llama")
    num_layers = AutoConfig.from_pretrained(source).num_hidden_layers
    deeper = build_tiny_model("llama", tmp_path / "deeper", num_hidden_layers=2 * num_layers)

    def frames_compiled(model_dir) -> int:
        torch._dynamo.reset()
        counters.clear()
        generate(model_dir, compile=True, compile_backend="eager")
        return counters["frames"]["total"]

    assert frames_compiled(deeper) == frames_compiled(source)


def test_programmatic_launch_reaches_inductor_only_where_asked():
    """PDL goes to inductor as an option when the runner's device allows it (never on a CPU), and not
    at all with a compile mode (torch.compile takes a mode or options)."""
    from pagedserve.engine.kernels.launch import supports_programmatic_launch
    from pagedserve.engine.runner.compile import CompileOptions, _inductor_has_pdl

    with_pdl = CompileOptions(False, None, None, "inductor", True, dependent_launch=True)
    expected = {"combo_kernels": True, **({"triton.enable_pdl": True} if _inductor_has_pdl() else {})}
    assert with_pdl.inductor_options == expected
    assert CompileOptions(False, None, None, "inductor", True).inductor_options == {"combo_kernels": True}
    assert CompileOptions(False, None, "max-autotune", "inductor", True, True).inductor_options is None
    assert all(not rung.dependent_launch for rung in compile_ladder(resolved(EngineConfig(compile=True)).runner.compile))
    assert not supports_programmatic_launch(torch.device("cpu"))


def test_compiling_raises_torchs_recompile_limit():
    """torch's default keeps 8 graphs a function, fewer than a decoder layer's step variants (LoRA W1 on the H200
    went eager past it): compiling raises it, and never lowers a higher one."""
    import torch._dynamo.config as dynamo_config

    from pagedserve.engine.runner.compile import RECOMPILE_LIMIT

    settings = resolved(EngineConfig(compile=True, compile_backend="eager")).runner.compile
    before = dynamo_config.recompile_limit
    try:
        dynamo_config.recompile_limit = 8
        CompiledForward(BreakingModel(), settings)
        assert dynamo_config.recompile_limit == RECOMPILE_LIMIT
        dynamo_config.recompile_limit = 4 * RECOMPILE_LIMIT
        CompiledForward(BreakingModel(), settings)
        assert dynamo_config.recompile_limit == 4 * RECOMPILE_LIMIT
    finally:
        dynamo_config.recompile_limit = before
